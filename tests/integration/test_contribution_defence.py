"""Bounded influence and private views on a real loopback server (tokens, counts)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest

from fedgrpc import wire
from fedgrpc.cli.main import main
from fedgrpc.client.credentials import token_metadata
from fedgrpc.client.party import run_party
from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import Limits, RoundConfig, ServerConfig
from fedgrpc.datasets.sources import load_dataset, subset
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.security.registry import hash_token, new_token
from fedgrpc.server.app import Aggregator
from fedgrpc.types import RunState, TensorSpec, UpdateKind
from tests.conftest import MakeServer, client_config
from tests.wirehelp import bundle_chunks

pytestmark = pytest.mark.integration

StubFor = Callable[[Aggregator], aggregator_pb2_grpc.AggregatorStub]
Stub = aggregator_pb2_grpc.AggregatorStub

_TIMEOUT_S = 10.0
_ADMIN = "operator"


# ----------------------------------------------------------------- helpers
def _parties_file(path: Path, samples: Mapping[str, int | None]) -> dict[str, str]:
    """Write a parties file (an admin and ``samples``' parties); return the tokens."""
    tokens = {name: new_token() for name in (_ADMIN, *samples)}
    lines = [
        "[[admin]]",
        f'name = "{_ADMIN}"',
        f'token_sha256 = "{_h(tokens, _ADMIN)}"',
    ]
    for party, n in samples.items():
        lines += [
            "[[party]]",
            f'id = "{party}"',
            f'token_sha256 = "{_h(tokens, party)}"',
        ]
        if n is not None:
            lines.append(f"samples = {n}")
    path.write_text("\n".join(lines) + "\n")
    return tokens


def _h(tokens: Mapping[str, str], name: str) -> str:
    return hash_token(tokens[name])


def _meta(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else tuple(token_metadata(token))


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, err)
    return call.code(), call.details() or ""


def _join(
    stub: Stub, party: str, n: int, token: str | None = None
) -> aggregator_pb2.JoinReply:
    reply: aggregator_pb2.JoinReply = stub.Join(
        aggregator_pb2.JoinRequest(party_id=party, num_samples=n),
        timeout=_TIMEOUT_S,
        metadata=_meta(token),
    )
    return reply


def _join_refused(
    stub: Stub, party: str, n: int, token: str | None = None
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _join(stub, party, n, token)
    return _status(info.value)


def _get_status(stub: Stub, token: str | None = None) -> aggregator_pb2.StatusReply:
    reply: aggregator_pb2.StatusReply = stub.GetStatus(
        aggregator_pb2.StatusRequest(), timeout=_TIMEOUT_S, metadata=_meta(token)
    )
    return reply


def _contributions(
    stub: Stub, token: str, method: str = "", party_ids: tuple[str, ...] = ()
) -> aggregator_pb2.ContributionsReply:
    reply: aggregator_pb2.ContributionsReply = stub.GetContributions(
        aggregator_pb2.ContributionsRequest(method=method, party_ids=list(party_ids)),
        timeout=_TIMEOUT_S,
        metadata=_meta(token),
    )
    return reply


# ------------------------------------------------------------------- joins
def test_join_over_attested_count_is_refused_and_not_registered(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    tokens = _parties_file(tmp_path / "parties.toml", {"alice": 150, "bob": None})
    agg = make_server(min_parties=2, server={"parties_file": tmp_path / "parties.toml"})
    stub = stub_for(agg)

    code, details = _join_refused(stub, "alice", 151, tokens["alice"])

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "party alice claims 151 samples; the parties file attests at most 150"
    )
    assert list(_get_status(stub, tokens[_ADMIN]).joined) == []
    assert agg.ledger.parties() == []
    assert _join(stub, "alice", 150, tokens["alice"]).party_id == "alice"
    assert _join(stub, "bob", 10_000, tokens["bob"]).party_id == "bob"  # unattested
    assert list(_get_status(stub, tokens[_ADMIN]).joined) == ["alice", "bob"]
    assert agg.engine.parties.attested() == {"alice": 150}


def test_join_over_the_sample_ceiling_is_invalid_argument(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(min_parties=2, limits=Limits(max_num_samples=1000))
    stub = stub_for(agg)

    code, details = _join_refused(stub, "p0", 1001)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "party p0 claims 1001 samples; the most a party may claim is 1000"
    )
    assert list(_get_status(stub).joined) == []
    assert _join(stub, "p0", 1000).party_id == "p0"


def test_rejoin_with_another_count_is_failed_precondition(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(min_parties=2)
    stub = stub_for(agg)
    _join(stub, "p0", 100)

    code, details = _join_refused(stub, "p0", 120)
    _join(stub, "p0", 100)  # the same count joins again

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(
        "party p0 joined with 100 samples and now claims 120; a party's count is "
        "fixed for the run"
    )
    assert [(p["party_id"], p["num_samples"]) for p in agg.ledger.parties()] == [
        ("p0", 100)
    ]
    assert agg.engine.parties.claims() == {"p0": 100}


def test_status_party_sees_only_itself_admin_everyone(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    tokens = _parties_file(tmp_path / "p.toml", {"alice": None, "bob": None})
    agg = make_server(min_parties=3, server={"parties_file": tmp_path / "p.toml"})
    stub = stub_for(agg)
    _join(stub, "alice", 10, tokens["alice"])
    _join(stub, "bob", 10, tokens["bob"])

    alice = _get_status(stub, tokens["alice"])
    admin = _get_status(stub, tokens[_ADMIN])

    assert list(alice.joined) == ["alice"]
    assert list(admin.joined) == ["alice", "bob"]
    assert alice.state == admin.state == "waiting"
    with pytest.raises(grpc.RpcError) as info:
        _get_status(stub)  # no token: nobody
    assert _status(info.value)[0] == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------- a whole run
@dataclass
class Finished:
    agg: Aggregator
    stub: Stub
    tokens: dict[str, str]
    token_dir: Path


_PARTIES = {"alice": 150, "bob": None, "mallory": None}
_SCALE = 20.0


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A 3-round run of alice, bob and mallory (scale:20), then kept serving."""
    root = tmp_path_factory.mktemp("defence")
    tokens = _parties_file(root / "parties.toml", _PARTIES)
    for name, tok in tokens.items():
        (root / f"{name}.token").write_text(tok + "\n")
    cfg = ServerConfig(
        round=RoundConfig(
            rounds=3,
            min_parties=3,
            round_timeout_s=30.0,
            join_timeout_s=30.0,
            model="logreg",
            # Stated, not defaulted: honest parties stay within k x the median.
            norm_bound="auto",
            norm_bound_factor=2.0,
        ),
        address="localhost:0",
        run_dir=root / "run",
        val_data="digits",
        val_count=200,
        insecure=True,
        parties_file=root / "parties.toml",
        keep_serving=True,
        validator="thread",
    )
    agg = Aggregator(cfg)
    try:
        agg.start()
        digits = load_dataset("digits")
        with futures.ThreadPoolExecutor(3, thread_name_prefix="party") as pool:
            runs = [
                pool.submit(
                    run_party,
                    client_config(
                        agg,
                        p,
                        token=tokens[p],
                        attack=f"scale:{_SCALE:g}" if p == "mallory" else "",
                    ),
                    subset(digits, np.arange(150 * i, 150 * (i + 1))),
                )
                for i, p in enumerate(_PARTIES)
            ]
            for f in runs:
                assert f.result(timeout=40).reason == "completed"
        assert agg.wait(timeout_s=_TIMEOUT_S), "run did not finish"
        assert agg.engine.state == RunState.DONE, agg.engine.reason
        with grpc.insecure_channel(f"localhost:{agg.port}") as channel:
            yield Finished(
                agg, aggregator_pb2_grpc.AggregatorStub(channel), tokens, root
            )
    finally:
        agg.shutdown(grace_s=0.2, save_open_round=False)


def test_run_records_score2_for_every_round(finished: Finished) -> None:
    rounds = finished.agg.ledger.rounds()

    assert [(r.round, r.ok) for r in rounds] == [(0, True), (1, True), (2, True)]
    for r in rounds:
        assert sorted(p.party_id for p in r.parties) == sorted(_PARTIES)
        for p in r.parties:
            assert math.isfinite(p.score2), (r.round, p.party_id)
            assert math.isfinite(p.dot_next), (r.round, p.party_id)
            assert p.score2 == pytest.approx(
                0.5 * p.score / p.dot * (p.dot + p.dot_next), rel=1e-6, abs=1e-12
            )
    report = finished.agg.ledger.contributions(method="digfl-2")
    assert report.pending_rounds == ()


def test_run_scaled_party_is_bounded_and_flagged(finished: Finished) -> None:
    rounds = finished.agg.ledger.rounds()

    reply = _contributions(finished.stub, finished.tokens[_ADMIN])

    for r in rounds:
        by_id = {p.party_id: p for p in r.parties}
        m = by_id["mallory"]
        assert m.clip < 1.0 and m.bounded, r.round
        assert math.isfinite(m.norm_bound)
        assert m.clip == pytest.approx(m.norm_bound / m.update_norm, rel=1e-5)
        assert m.update_norm > 5 * by_id["alice"].update_norm
        assert (by_id["alice"].clip, by_id["bob"].clip) == (1.0, 1.0)
    report = wire.report_from_proto(reply)
    by_party = {pc.party_id: pc for pc in report.parties}
    assert by_party["mallory"].bounded_rounds == 3
    assert by_party["mallory"].flagged
    assert [by_party[p].bounded_rounds for p in ("alice", "bob")] == [0, 0]
    assert not by_party["alice"].flagged
    assert not reply.private_view
    assert sorted(by_party) == sorted(_PARTIES)
    mallory_rounds = next(pc for pc in reply.parties if pc.party_id == "mallory").rounds
    assert all(0 < r.clip < 1 and r.norm_bound > 0 for r in mallory_rounds)


def test_run_party_reads_a_private_view(finished: Finished) -> None:
    reply = _contributions(finished.stub, finished.tokens["alice"])

    assert reply.private_view
    assert [pc.party_id for pc in reply.parties] == ["alice"]
    (mine,) = reply.parties
    assert math.isnan(mine.share) and math.isnan(mine.reference_share)
    assert math.isfinite(mine.total)
    assert [r.round for r in mine.rounds] == [0, 1, 2]
    assert all(r.norm_bound == 0.0 for r in mine.rounds)  # B_t withheld
    assert len(reply.rounds) == 3
    for r in reply.rounds:
        assert list(r.submitted) == ["alice"]
        assert all(p == "alice" for p in r.late)
        assert math.isnan(r.measured_drop)
        assert math.isnan(r.val_loss_before) and math.isnan(r.val_loss_after)
        assert r.predicted_drop == pytest.approx(
            next(x.score for x in mine.rounds if x.round == r.round)
        )
    with pytest.raises(grpc.RpcError) as info:
        _contributions(finished.stub, finished.tokens["alice"], party_ids=("bob",))
    code, details = _status(info.value)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "party alice may read only its own contributions, not ['bob']" in details


def test_run_contributions_methods(finished: Finished) -> None:
    admin = finished.tokens[_ADMIN]
    rounds = finished.agg.ledger.rounds()

    two = _contributions(finished.stub, admin, "digfl-2")
    one = _contributions(finished.stub, admin, "digfl-1")
    default = _contributions(finished.stub, admin)
    with pytest.raises(grpc.RpcError) as info:
        _contributions(finished.stub, admin, "digfl-9")

    assert (two.method, one.method, default.method) == ("digfl-2", "digfl-1", "digfl-1")
    assert list(two.pending_rounds) == []
    want2 = {
        p: sum(x.score2 for r in rounds for x in r.parties if x.party_id == p)
        for p in _PARTIES
    }
    want1 = {
        p: sum(x.score for r in rounds for x in r.parties if x.party_id == p)
        for p in _PARTIES
    }
    assert {pc.party_id: pc.total for pc in two.parties} == pytest.approx(want2)
    assert {pc.party_id: pc.total for pc in one.parties} == pytest.approx(want1)
    assert [pc.total for pc in default.parties] == [pc.total for pc in one.parties]
    assert two.rows_digest == finished.agg.ledger.rows_digest()
    code, details = _status(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown scoring method 'digfl-9'" in details
    mine = _contributions(finished.stub, finished.tokens["bob"], "digfl-2")
    assert mine.private_view and mine.method == "digfl-2"
    assert mine.parties[0].total == pytest.approx(want2["bob"])


def test_run_status_as_party_and_admin(finished: Finished) -> None:
    bob = _get_status(finished.stub, finished.tokens["bob"])
    admin = _get_status(finished.stub, finished.tokens[_ADMIN])

    assert list(bob.joined) == ["bob"]
    assert list(admin.joined) == sorted(_PARTIES)
    assert bob.state == admin.state == "done"
    assert bob.rounds_done == admin.rounds_done == 3


def test_run_status_withholds_validation_metrics_from_parties(
    finished: Finished,
) -> None:
    # party_view withholds every round's validation loss (the measured drop minus a
    # party's own score is the others' total); GetStatus must not hand it out either.
    bob = _get_status(finished.stub, finished.tokens["bob"])
    admin = _get_status(finished.stub, finished.tokens[_ADMIN])

    assert math.isfinite(admin.val_loss)
    assert math.isnan(bob.val_loss) and math.isnan(bob.val_acc)


def test_run_cli_payout_needs_an_admin(
    finished: Finished, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = f"localhost:{finished.agg.port}"
    out = tmp_path / "payout.json"

    def cli(who: str) -> int:
        return main(
            [
                "contributions",
                "--server",
                server,
                "--insecure",
                "--token-file",
                str(finished.token_dir / f"{who}.token"),
                "--payout",
                "100",
                "--payout-out",
                str(out),
            ]
        )

    refused = cli("alice")
    refused_err = capsys.readouterr().err
    paid = cli(_ADMIN)

    assert refused == 2
    assert "a payout needs every party's totals" in refused_err
    assert paid == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["ledger_rows_sha256"] == finished.agg.ledger.rows_digest()
    assert doc["rounds"] == [0, 1, 2]
    assert sum(round(p["amount"] * 100) for p in doc["parties"]) == 10000


# ------------------------------------------------------------------- resume
_COUNTS = {"big": 1000, "p1": 10, "p2": 10}


def _wait(what: str, pred: Callable[[], bool]) -> None:
    end = time.monotonic() + _TIMEOUT_S
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _submit_round(agg: Aggregator, tokens: Mapping[str, str], rnd: int) -> None:
    """Every party of _COUNTS joins (again), then submits a small update to ``rnd``."""
    rng = np.random.default_rng(rnd)
    clients = {
        p: AggregatorClient(client_config(agg, p, token=tokens[p])) for p in _COUNTS
    }
    try:
        for p, client in clients.items():
            client.join(_COUNTS[p])
        _wait(f"round {rnd} to open", lambda: agg.engine.status().state == "training")
        for p, client in clients.items():
            update = {
                s.name: (0.01 * rng.standard_normal(s.shape)).astype(np.float32)
                for s in agg.engine.specs
            }
            outcome = client.submit(
                rnd, update, _COUNTS[p], train_loss=1.0, kind=UpdateKind.GRADIENT
            )
            assert outcome.accepted
    finally:
        for client in clients.values():
            client.close()
    _wait(f"round {rnd}'s commit", lambda: len(agg.ledger.rounds()) > rnd)


def test_resumed_run_keeps_attested_parties_uncapped(
    make_server: MakeServer, tmp_path: Path
) -> None:
    tokens = _parties_file(
        tmp_path / "parties.toml", {"big": 1000, "p1": None, "p2": None}
    )
    server = {"parties_file": tmp_path / "parties.toml"}
    run_dir = tmp_path / "run"
    kw = {"min_parties": 3, "rounds": 3, "claim_cap": 2.0}
    first = make_server(run_dir=run_dir, server=server, **kw)
    _submit_round(first, tokens, 0)
    first.shutdown(grace_s=0.2, save_open_round=False)

    again = make_server(run_dir=run_dir, server={**server, "resume": True}, **kw)
    _submit_round(again, tokens, 1)

    counted = {
        (r.round, p.party_id): p.weight_samples
        for r in again.ledger.rounds()
        for p in r.parties
    }
    # The parties file still attests big's count: after the resume it must not be
    # capped at claim_cap x the median claim (2 x 10) as an unattested claim is.
    assert counted[(0, "big")] == 1000
    assert counted[(1, "big")] == 1000
    assert again.engine.parties.attested() == {"big": 1000}


# ------------------------------------------------------- a refused second upload
def _messages(
    party: str,
    update: Mapping[str, np.ndarray],
    specs: tuple[TensorSpec, ...],
    sid: str,
) -> list[aggregator_pb2.SubmitMessage]:
    chunks = [
        aggregator_pb2.SubmitMessage(chunk=c)
        for c in bundle_chunks([(s.name, update[s.name]) for s in specs])
    ]
    h = wire.stream_digest()
    for m in chunks:
        h.update(m.chunk.data)
    header = aggregator_pb2.SubmitHeader(
        party_id=party,
        round=0,
        num_samples=100,
        train_loss=1.0,
        update_kind=aggregator_pb2.GRADIENT,
        submission_id=sid,
    )
    trailer = aggregator_pb2.SubmitTrailer(digest=h.digest())
    return [
        aggregator_pb2.SubmitMessage(header=header),
        *chunks,
        aggregator_pb2.SubmitMessage(trailer=trailer),
    ]


def test_refused_second_upload_cannot_bypass_the_norm_bound(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    # 6 slots for 3 parties: each may hold 2, so a's second stream gets one.
    agg = make_server(rounds=1, min_parties=3, limits=Limits(max_inflight_uploads=6))
    stub = stub_for(agg)
    for p in ("a", "b", "c"):
        _join(stub, p, 100)
    _wait("round 0 to open", lambda: agg.broadcaster.latest is not None)
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    rng = np.random.default_rng(7)

    def update(scale: float) -> dict[str, np.ndarray]:
        return {
            s.name: (scale * rng.standard_normal(s.shape)).astype(np.float32)
            for s in specs
        }

    held = _messages("a", update(100.0), specs, "a-huge")
    go = threading.Event()

    def slow() -> Iterator[aggregator_pb2.SubmitMessage]:
        yield from held[:-1]
        go.wait(_TIMEOUT_S)
        yield held[-1]

    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stub.SubmitGradient, slow(), timeout=_TIMEOUT_S)
        # Past begin_submission, holding an upload slot: the first cannot refuse it.
        _wait("a's held upload", lambda: len(agg.engine.uploads._uploads) == 1)
        stub.SubmitGradient(iter(_messages("a", update(0.01), specs, "a-ok")))
        go.set()
        with pytest.raises(grpc.RpcError) as info:
            pending.result(timeout=_TIMEOUT_S)
    assert _status(info.value)[0] == grpc.StatusCode.ALREADY_EXISTS
    for p in ("b", "c"):
        stub.SubmitGradient(iter(_messages(p, update(0.01), specs, f"{p}-ok")))
    assert agg.wait(timeout_s=_TIMEOUT_S), "the one-round run did not finish"

    (r,) = agg.ledger.rounds()
    bound = r.parties[0].norm_bound
    step = float(np.linalg.norm(agg.engine.theta.astype(np.float64) - theta0))
    # Every folded update is at most B_0 long, so the step is at most eta x B_0.
    assert step <= 0.5 * bound * (1 + 1e-5)
