"""The Aggregator service on a real loopback server: replies, runs, bad input."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import cast

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from fedgrpc import wire
from fedgrpc.client.party import run_party
from fedgrpc.client.stub import AggregatorClient, ModelVersion
from fedgrpc.config import Limits
from fedgrpc.datasets.sources import load_dataset, subset
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from fedgrpc.server.app import Aggregator
from fedgrpc.types import RunState, TensorSpec, TrainingDone
from tests.conftest import MakeServer, client_config
from tests.wirehelp import bundle_chunks, tensor_chunks

pytestmark = pytest.mark.integration

StubFor = Callable[[Aggregator], aggregator_pb2_grpc.AggregatorStub]
Update = dict[str, np.ndarray]
Messages = list[aggregator_pb2.SubmitMessage]
Build = Callable[[Sequence[TensorSpec], Update], Messages]

_TIMEOUT_S = 10.0
_SERVICE = "fedgrpc.v1.Aggregator"
_SERVER_LR = 0.5  # RoundConfig default, restated so the oracle is explicit
_SAMPLES = 100


def _xxh(data: bytes) -> bytes:
    h = wire.stream_digest()
    h.update(data)
    return bytes(h.digest())


# ----------------------------------------------------------------- helpers
def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, err)  # what a stub raises is both an RpcError and a Call
    return call.code(), call.details() or ""


def _wait_for(
    what: str, pred: Callable[[], bool], timeout_s: float = _TIMEOUT_S
) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


def _state(stub: aggregator_pb2_grpc.AggregatorStub) -> aggregator_pb2.StatusReply:
    reply: aggregator_pb2.StatusReply = stub.GetStatus(
        aggregator_pb2.StatusRequest(), timeout=_TIMEOUT_S
    )
    return reply


def _join(
    stub: aggregator_pb2_grpc.AggregatorStub, party: str, num_samples: int = _SAMPLES
) -> aggregator_pb2.JoinReply:
    reply: aggregator_pb2.JoinReply = stub.Join(
        aggregator_pb2.JoinRequest(party_id=party, num_samples=num_samples),
        timeout=_TIMEOUT_S,
    )
    return reply


def _training(
    make_server: MakeServer,
    stub_for: StubFor,
    parties: Sequence[str],
    samples: Mapping[str, int] | None = None,
    **kw: object,
) -> tuple[Aggregator, aggregator_pb2_grpc.AggregatorStub]:
    """A server with ``parties`` joined (``_SAMPLES`` each, or ``samples``) and
    round 0 open."""
    agg = make_server(**kw)
    stub = stub_for(agg)
    for party in parties:
        _join(stub, party, (samples or {}).get(party, _SAMPLES))
    _wait_for("round 0 to open", lambda: _state(stub).state == "training")

    def published() -> bool:
        latest = agg.broadcaster.latest
        return latest is not None and latest.round == 0

    _wait_for("round 0's model to be published", published)
    return agg, stub


def _update(specs: Sequence[TensorSpec], seed: int, scale: float = 0.01) -> Update:
    rng = np.random.default_rng(seed)
    return {
        s.name: (scale * rng.standard_normal(s.shape)).astype(np.float32) for s in specs
    }


def _header(
    party: str,
    round_index: int,
    *,
    num_samples: int = _SAMPLES,
    kind: int = aggregator_pb2.GRADIENT,
    sid: str = "",
) -> aggregator_pb2.SubmitMessage:
    return aggregator_pb2.SubmitMessage(
        header=aggregator_pb2.SubmitHeader(
            party_id=party,
            round=round_index,
            num_samples=num_samples,
            train_loss=1.0,
            update_kind=kind,  # type: ignore[arg-type]
            submission_id=sid,
        )
    )


def _chunks(
    specs: Sequence[TensorSpec], update: Update, chunk_bytes: int = wire.CHUNK_BYTES
) -> Messages:
    arrays = [(s.name, update[s.name]) for s in specs]
    return [
        aggregator_pb2.SubmitMessage(chunk=c)
        for c in bundle_chunks(arrays, chunk_bytes=chunk_bytes)
    ]


def _trailer(
    chunks: Sequence[aggregator_pb2.SubmitMessage],
) -> aggregator_pb2.SubmitMessage:
    h = wire.stream_digest()
    for msg in chunks:
        h.update(msg.chunk.data)
    return aggregator_pb2.SubmitMessage(
        trailer=aggregator_pb2.SubmitTrailer(digest=h.digest())
    )


def _submission(
    party: str,
    round_index: int,
    specs: Sequence[TensorSpec],
    update: Update,
    *,
    chunk_bytes: int = wire.CHUNK_BYTES,
    **header: object,
) -> Messages:
    chunks = _chunks(specs, update, chunk_bytes)
    return [_header(party, round_index, **header), *chunks, _trailer(chunks)]  # type: ignore[arg-type]


def _submit(
    stub: aggregator_pb2_grpc.AggregatorStub,
    messages: Sequence[aggregator_pb2.SubmitMessage],
) -> aggregator_pb2.SubmitReply:
    reply: aggregator_pb2.SubmitReply = stub.SubmitGradient(
        iter(messages), timeout=_TIMEOUT_S
    )
    return reply


def _rejected(
    stub: aggregator_pb2_grpc.AggregatorStub,
    messages: Sequence[aggregator_pb2.SubmitMessage],
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _submit(stub, messages)
    return _status(info.value)


def _expected_theta(
    theta0: np.ndarray,
    specs: Sequence[TensorSpec],
    updates: Sequence[tuple[Update, int]],
) -> np.ndarray:
    """FedSGD oracle in float64: theta_1 = theta_0 - eta * sum_i (n_i / n) g_i."""
    layout = wire.FlatLayout.of(specs)
    n = sum(n_i for _, n_i in updates)
    step = np.zeros(layout.size, dtype=np.float64)
    for u, n_i in updates:
        step += (n_i / n) * layout.flatten(u).astype(np.float64)
    return theta0.astype(np.float64) - _SERVER_LR * step


def _assert_theta(agg: Aggregator, expected: np.ndarray) -> None:
    np.testing.assert_allclose(agg.engine.theta, expected, rtol=1e-5, atol=1e-7)


def _wait_done(agg: Aggregator) -> None:
    assert agg.wait(timeout_s=_TIMEOUT_S), "run did not finish"
    assert agg.engine.state == RunState.DONE, agg.engine.reason


def _probe_open_upload(stub: aggregator_pb2_grpc.AggregatorStub, party: str) -> None:
    """Wait until the server holds an upload of ``party`` open (one stream per party).

    The probe claims a model digest that is not round 0's, so if it slips past the
    stream limit it is refused (stale model) before the engine sees it and leaves no
    trace. (A header without an update kind no longer works as a probe: it is
    refused while parsing the header, before the stream limit is checked.)
    """
    probe = _header(party, 0)
    probe.header.model_digest = bytes(16)

    def limited() -> bool:
        code, _ = _rejected(stub, [probe])
        assert code in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        return code == grpc.StatusCode.RESOURCE_EXHAUSTED

    _wait_for(f"the server to hold an upload of party {party}", limited)


def _held_upload(
    head: Sequence[aggregator_pb2.SubmitMessage],
    tail: Sequence[aggregator_pb2.SubmitMessage],
    go: threading.Event,
    *,
    then_raise: bool = False,
) -> Iterator[aggregator_pb2.SubmitMessage]:
    """Yield ``head``, block until ``go`` (bounded), then raise or yield ``tail``."""
    yield from head
    if not go.wait(_TIMEOUT_S):
        return
    if then_raise:
        raise RuntimeError("party process killed mid-upload")
    yield from tail


# ------------------------------------------------------------ join, status
@pytest.mark.parametrize("kind", ["gradient", "delta"])
def test_join_returns_spec_config_and_open_round(
    make_server: MakeServer, stub_for: StubFor, kind: str
) -> None:
    agg = make_server(rounds=3, min_parties=2, update_kind=kind)
    stub = stub_for(agg)

    reply = _join(stub, "alice", 120)
    status = _state(stub)

    spec = [(t.name, t.dtype, list(t.shape)) for t in reply.model_spec.tensors]
    assert spec == [
        ("fc.weight", tensor_pb2.FLOAT32, [10, 64]),
        ("fc.bias", tensor_pb2.FLOAT32, [10]),
    ]
    cfg = reply.config
    assert cfg.rounds == 3
    want_kind = aggregator_pb2.GRADIENT if kind == "gradient" else aggregator_pb2.DELTA
    assert cfg.update_kind == want_kind
    assert (cfg.model, list(cfg.input_shape), cfg.num_classes) == (
        "logreg",
        [1, 8, 8],
        10,
    )
    assert cfg.server_lr == pytest.approx(_SERVER_LR)
    assert cfg.wire_dtype == tensor_pb2.FLOAT32
    assert (reply.open_round, reply.party_id, reply.run_id) == (0, "alice", agg.run_id)
    assert (status.state, list(status.joined), status.rounds_total) == (
        "waiting",
        ["alice"],
        3,
    )


def test_status_reflects_joins_and_round_start(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=3, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "bob")

    _join(stub, "alice")
    _wait_for("round 0 to open", lambda: _state(stub).state == "training")
    status = _state(stub)

    assert list(status.joined) == ["alice", "bob"]
    assert (status.open_round, status.rounds_done, list(status.submitted)) == (0, 0, [])
    assert status.run_id == agg.run_id


def test_health_and_reflection_list_the_service(make_server: MakeServer) -> None:
    agg = make_server()

    with grpc.insecure_channel(f"localhost:{agg.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=_TIMEOUT_S
        )
        ours = health.Check(
            health_pb2.HealthCheckRequest(service=_SERVICE), timeout=_TIMEOUT_S
        )
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        desc = DescriptorPool(db).FindServiceByName(_SERVICE)

    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert ours.status == health_pb2.HealthCheckResponse.SERVING
    assert {_SERVICE, "grpc.health.v1.Health"} <= services
    methods = {m.name: m for m in desc.methods}
    assert set(methods) == {
        "Join",
        "GetModel",
        "SubmitGradient",
        "GetContributions",
        "GetStatus",
    }
    assert methods["SubmitGradient"].client_streaming
    assert methods["GetModel"].server_streaming


# ---------------------------------------------------------------- GetModel
def test_get_model_streams_round_zero_with_matching_digest(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"])
    theta0 = agg.engine.theta.copy()

    stream = stub.GetModel(
        aggregator_pb2.GetModelRequest(party_id="alice", from_round=0),
        timeout=_TIMEOUT_S,
    )
    messages = []
    for msg in stream:
        messages.append(msg)
        if msg.WhichOneof("kind") == "end":
            break
    stream.cancel()
    with AggregatorClient(client_config(agg, "alice")) as client:
        client.join(_SAMPLES)
        first = next(iter(client.models(0, _TIMEOUT_S)))

    kinds = [m.WhichOneof("kind") for m in messages]
    assert kinds[0] == "header"
    assert kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"chunk"}
    header, end = messages[0].header, messages[-1].end
    data = b"".join(m.chunk.data for m in messages[1:-1])
    assert (header.round, header.version, header.wire_dtype) == (
        0,
        0,
        tensor_pb2.FLOAT32,
    )
    assert header.total_bytes == len(data) == 4 * agg.layout.size
    assert header.digest == end.digest == _xxh(data)
    assert [m.chunk.name for m in messages[1:-1] if m.chunk.offset == 0] == [
        "fc.weight",
        "fc.bias",
    ]
    assert isinstance(first, ModelVersion)
    assert (first.round, first.digest) == (0, header.digest)
    np.testing.assert_array_equal(first.flat, theta0)


def test_get_model_sends_current_model_not_history(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=3)
    specs = agg.engine.specs
    assert _submit(stub, _submission("alice", 0, specs, _update(specs, 1))).accepted
    _wait_for("round 1 to open", lambda: _state(stub).open_round == 1)
    theta1 = agg.engine.theta.copy()

    with AggregatorClient(client_config(agg, "alice")) as client:
        client.join(_SAMPLES)
        first = next(iter(client.models(0, _TIMEOUT_S)))

    assert isinstance(first, ModelVersion)
    assert first.round == 1
    np.testing.assert_array_equal(first.flat, theta1)


# ------------------------------------------------------------- a whole run
def test_run_with_two_parties_records_contributions(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=2, min_parties=2, claim_cap=0.0)  # plain n_i weights
    digits = load_dataset("digits")
    data = {
        "p0": subset(digits, np.arange(0, 150)),
        "p1": subset(digits, np.arange(150, 400)),
    }

    with futures.ThreadPoolExecutor(2, thread_name_prefix="party") as pool:
        runs = {
            p: pool.submit(run_party, client_config(agg, p), d) for p, d in data.items()
        }
        results = {p: f.result(timeout=40) for p, f in runs.items()}
    assert agg.wait(timeout_s=_TIMEOUT_S)
    with AggregatorClient(client_config(agg, "observer")) as client:
        everyone = client.contributions()
        only_p1 = client.contributions(["p1"])
        round1 = client.contributions(from_round=1, to_round=1)
        round0 = client.contributions(to_round=0)

    assert agg.engine.state == RunState.DONE
    assert _state(stub_for(agg)).state == "done"
    for res in results.values():
        assert (res.rounds_submitted, res.rounds_completed, res.reason) == (
            2,
            2,
            "completed",
        )
    assert everyone.rounds_done == 2
    assert [r.round for r in everyone.rounds] == [0, 1]
    assert all(
        r.status == "ok" and {p.party_id for p in r.parties} == {"p0", "p1"}
        for r in everyone.rounds
    )
    by_party = {p.party_id: p for p in everyone.parties}
    assert set(by_party) == {"p0", "p1"}
    for pid, n in (("p0", 150), ("p1", 250)):
        rows = by_party[pid].rounds
        assert list(by_party[pid].round_indices) == [0, 1]
        assert len(rows) == 2
        assert all(r.num_samples == n and r.update_norm > 0 for r in rows)
        assert all(r.weight == pytest.approx(n / 400) for r in rows)
        assert by_party[pid].total == pytest.approx(sum(r.score for r in rows))
    assert [p.party_id for p in only_p1.parties] == ["p1"]
    assert list(only_p1.parties[0].round_indices) == [0, 1]
    assert [r.round for r in round1.rounds] == [1]
    assert all(
        list(p.round_indices) == [1] and len(p.rounds) == 1 for p in round1.parties
    )
    assert [r.round for r in round0.rounds] == [0]
    assert all(
        list(p.round_indices) == [0] and len(p.rounds) == 1 for p in round0.parties
    )


# ------------------------------------------------------------- bad uploads
def _no_header(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    chunks = _chunks(specs, bad)
    return [*chunks, _trailer(chunks)]


def _with_tensor(
    name: str, arr: np.ndarray, specs: Sequence[TensorSpec], bad: Update
) -> Messages:
    """A submission whose first tensor is replaced by ``name``/``arr`` as encoded."""
    first = [aggregator_pb2.SubmitMessage(chunk=c) for c in tensor_chunks(name, arr)]
    chunks = first + _chunks(specs[1:], bad)
    return [_header("alice", 0), *chunks, _trailer(chunks)]


def _truncated(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    return [_header("alice", 0), *_chunks(specs, bad)]


def _missing_tensor(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    chunks = _chunks(specs[:1], bad)
    return [_header("alice", 0), *chunks, _trailer(chunks)]


def _cut_tensor(
    specs: Sequence[TensorSpec], bad: Update, party: str = "alice"
) -> Messages:
    weight = _chunks(specs[:1], bad, chunk_bytes=1024)
    chunks = [weight[0], *_chunks(specs[1:], bad)]
    return [_header(party, 0), *chunks, _trailer(chunks)]


def _digest_mismatch(
    specs: Sequence[TensorSpec], bad: Update, party: str = "alice"
) -> Messages:
    msgs = _submission(party, 0, specs, bad)
    msgs[-1].trailer.digest = wire.stream_digest().digest()
    return msgs


def _after_trailer(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    msgs = _submission("alice", 0, specs, bad)
    return [*msgs, msgs[1]]


def _out_of_order(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    chunks = _chunks(specs[::-1], bad)
    return [_header("alice", 0), *chunks, _trailer(chunks)]


def _gap(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    chunks = _chunks(specs, bad, chunk_bytes=1024)
    del chunks[1]  # fc.weight bytes [1024, 2048)
    return [_header("alice", 0), *chunks, _trailer(chunks)]


def _wrong_total(specs: Sequence[TensorSpec], bad: Update) -> Messages:
    msgs = _submission("alice", 0, specs, bad)
    msgs[1].chunk.total_bytes = 1 << 40  # a lie that would allocate 1 TiB
    return msgs


def _non_finite(value: float) -> Build:
    def build(specs: Sequence[TensorSpec], bad: Update) -> Messages:
        poisoned = {k: v.copy() for k, v in bad.items()}
        poisoned["fc.bias"][3] = value
        # Small chunks: fc.weight is already in the party's buffer when fc.bias fails.
        return _submission("alice", 0, specs, poisoned, chunk_bytes=512)

    return build


_BAD: dict[str, tuple[Build, str, tuple[str, ...]]] = {
    "no-header": (_no_header, "INVALID_ARGUMENT", ("must start with a header",)),
    "unknown-party": (
        lambda s, b: _submission("ghost", 0, s, b),
        "FAILED_PRECONDITION",
        ("party ghost", "has not joined"),
    ),
    "bad-party-id": (
        lambda s, b: _submission("al ice", 0, s, b),
        "INVALID_ARGUMENT",
        ("'al ice'", "invalid", "[A-Za-z0-9_.-]"),
    ),
    "future-round": (
        lambda s, b: _submission("alice", 1, s, b),
        "FAILED_PRECONDITION",
        ("party alice, round 1", "future round", "open round is 0"),
    ),
    "wrong-kind": (
        lambda s, b: _submission("alice", 0, s, b, kind=aggregator_pb2.DELTA),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "update kind delta", "expects gradient"),
    ),
    "unset-kind": (
        lambda s, b: _submission(
            "alice", 0, s, b, kind=aggregator_pb2.UPDATE_KIND_UNSPECIFIED
        ),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "update kind is unset"),
    ),
    "zero-samples": (
        lambda s, b: _submission("alice", 0, s, b, num_samples=0),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "num_samples must be > 0, got 0"),
    ),
    "unknown-tensor": (
        lambda s, b: _with_tensor("fc.nope", b["fc.weight"], s, b),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "unknown tensor 'fc.nope'", "expected 'fc.weight'"),
    ),
    "wrong-shape": (
        lambda s, b: _with_tensor("fc.weight", b["fc.weight"].reshape(64, 10), s, b),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "'fc.weight'", "shape [64, 10]", "expected [10, 64]"),
    ),
    "wrong-dtype": (
        lambda s, b: _with_tensor("fc.weight", b["fc.weight"].astype(np.float64), s, b),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "'fc.weight'", "dtype float64", "expected float32"),
    ),
    "truncated": (
        _truncated,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "without its trailer"),
    ),
    "missing-tensor": (
        _missing_tensor,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "missing tensor 'fc.bias'", "1 of 2 tensors"),
    ),
    "cut-tensor": (
        _cut_tensor,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "'fc.weight' truncated", "1024 of 2560 bytes"),
    ),
    "digest-mismatch": (
        _digest_mismatch,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "digest mismatch"),
    ),
    "out-of-order": (
        _out_of_order,
        "INVALID_ARGUMENT",
        (
            "party alice, round 0",
            "'fc.bias' arrived out of order",
            "expected 'fc.weight'",
        ),
    ),
    "gap": (
        _gap,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "offset 2048 leaves a gap", "expected offset 1024"),
    ),
    "wrong-total-bytes": (
        _wrong_total,
        "INVALID_ARGUMENT",
        (
            "party alice, round 0",
            "'fc.weight' declares 1099511627776 bytes",
            "needs 2560",
        ),
    ),
    "after-trailer": (
        _after_trailer,
        "INVALID_ARGUMENT",
        ("party alice, round 0", "after the trailer"),
    ),
    "nan": (
        _non_finite(float("nan")),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "'fc.bias'", "non-finite", "element 3"),
    ),
    "inf": (
        _non_finite(float("inf")),
        "INVALID_ARGUMENT",
        ("party alice, round 0", "'fc.bias'", "non-finite", "element 3"),
    ),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_submit_bad_upload_rejected_and_round_unharmed(
    make_server: MakeServer, stub_for: StubFor, case: str
) -> None:
    build, code, needles = _BAD[case]
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=1)
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    # Loud values: if any of them leaked into the round, theta_1 would be far off.
    bad = {s.name: np.full(s.shape, 1e3, dtype=np.float32) for s in specs}
    good = _update(specs, seed=7)

    got_code, details = _rejected(stub, build(specs, bad))
    reply = _submit(stub, _submission("alice", 0, specs, good, sid="good"))
    _wait_done(agg)

    assert got_code.name == code, details
    for needle in needles:
        assert needle in details, (needle, details)
    assert reply.accepted, reply.message
    _assert_theta(agg, _expected_theta(theta0, specs, [(good, _SAMPLES)]))


def test_submit_before_first_round_opens(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=1, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "alice")
    specs = agg.engine.specs

    code, details = _rejected(stub, _submission("alice", 0, specs, _update(specs, 1)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "party alice, round 0" in details
    assert "no round is open yet" in details


@pytest.mark.parametrize(
    ("limits", "needles"),
    [
        (
            Limits(max_tensor_bytes=1024),
            ("party alice, round 0", "'fc.weight' has 2560 bytes", "limit is 1024"),
        ),
        (
            Limits(max_submission_bytes=2560),
            ("party alice, round 0", "exceeds 2560 bytes", "'fc.bias'"),
        ),
    ],
    ids=["tensor", "submission"],
)
def test_submit_over_size_limit_is_resource_exhausted(
    make_server: MakeServer,
    stub_for: StubFor,
    limits: Limits,
    needles: tuple[str, ...],
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], limits=limits)
    specs = agg.engine.specs

    code, details = _rejected(stub, _submission("alice", 0, specs, _update(specs, 1)))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    for needle in needles:
        assert needle in details, (needle, details)
    assert list(_state(stub).submitted) == []


def test_join_over_party_limit_is_resource_exhausted(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(min_parties=2, limits=Limits(max_parties=2))
    stub = stub_for(agg)
    _join(stub, "alice")
    _join(stub, "bob")

    with pytest.raises(grpc.RpcError) as info:
        _join(stub, "carol")
    code, details = _status(info.value)
    again = _join(stub, "alice")  # a known party may always re-join

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "party carol" in details
    assert "2 parties already" in details
    assert again.party_id == "alice"
    assert list(_state(stub).joined) == ["alice", "bob"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_submit_large_sample_count_keeps_theta_finite(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=1)
    stub = stub_for(agg)
    n = 1 << 40  # any party may claim this many samples (uint64 on the wire)
    _join(stub, "alice", n)
    _wait_for("round 0 to open", lambda: _state(stub).state == "training")
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    g = {s.name: np.full(s.shape, 1e30, dtype=np.float32) for s in specs}  # finite

    reply = _submit(stub, _submission("alice", 0, specs, g, num_samples=n))
    _wait_done(agg)

    assert reply.accepted
    # p_alice = 1, so theta_1 = theta_0 - 0.5e30: finite and representable in float32.
    assert np.isfinite(agg.engine.theta).all()
    _assert_theta(agg, _expected_theta(theta0, specs, [(g, n)]))


def test_submit_past_round_names_open_round(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=3)
    specs = agg.engine.specs
    first = _submission("alice", 0, specs, _update(specs, 1), sid="r0")
    assert _submit(stub, first).accepted
    _wait_for("round 1 to open", lambda: _state(stub).open_round == 1)

    code, details = _rejected(
        stub, _submission("alice", 0, specs, _update(specs, 2), sid="x")
    )
    resend = _submit(stub, first)

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "party alice, round 0" in details
    assert "past round; open round is 1" in details
    assert resend.accepted  # an exact resend after the close still gets its OK


def test_submit_chunk_over_limit_is_resource_exhausted(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice"],
        rounds=1,
        model="mlp",
        model_hidden=64,
        limits=Limits(max_chunk_bytes=1024),
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    good = _update(specs, seed=3)
    big = _submission("alice", 0, specs, good, chunk_bytes=4096)
    assert specs[0].name == "fc1.weight"
    assert len(big[1].chunk.data) == 4096 < specs[0].numel * 4

    code, details = _rejected(stub, big)
    reply = _submit(stub, _submission("alice", 0, specs, good, chunk_bytes=1024))
    _wait_done(agg)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for needle in (
        "party alice, round 0",
        "'fc1.weight'",
        "4096 bytes",
        "limit is 1024",
    ):
        assert needle in details, (needle, details)
    assert reply.accepted
    _assert_theta(agg, _expected_theta(theta0, specs, [(good, _SAMPLES)]))


def test_submit_duplicates_conflict_but_exact_resend_is_ok(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice", "bob"], rounds=1)
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    ua, other, ub = _update(specs, 1), _update(specs, 2), _update(specs, 3)
    first = _submission("alice", 0, specs, ua, sid="a-1")
    assert _submit(stub, first).accepted

    new_id = _rejected(stub, _submission("alice", 0, specs, other, sid="a-2"))
    same_id = _rejected(stub, _submission("alice", 0, specs, other, sid="a-1"))
    resend = _submit(stub, first)
    assert _submit(stub, _submission("bob", 0, specs, ub, sid="b-1")).accepted
    _wait_done(agg)

    for code, details in (new_id, same_id):
        assert code == grpc.StatusCode.ALREADY_EXISTS, details
        assert "party alice, round 0" in details
        assert "already accepted" in details
    assert "resend it with the same submission id" in new_id[1]
    assert "different bytes" in same_id[1]
    assert (resend.accepted, resend.submission_id, resend.round) == (True, "a-1", 0)
    assert "already accepted" in resend.message
    _assert_theta(agg, _expected_theta(theta0, specs, [(ua, _SAMPLES), (ub, _SAMPLES)]))


def test_submit_after_training_is_over(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=1)
    specs = agg.engine.specs
    first = _submission("alice", 0, specs, _update(specs, 1), sid="a-1")
    assert _submit(stub, first).accepted
    _wait_done(agg)

    next_round = _rejected(
        stub, _submission("alice", 1, specs, _update(specs, 2), sid="a-2")
    )
    same_round = _rejected(
        stub, _submission("alice", 0, specs, _update(specs, 2), sid="a-3")
    )
    resend = _submit(stub, first)

    for (code, details), rnd in ((next_round, 1), (same_round, 0)):
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"party alice, round {rnd}" in details
        assert "training is over after 1 rounds" in details
    assert resend.accepted


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("SubmitGradient", "stream_unary"),
        ("Join", "unary_unary"),
        ("GetContributions", "unary_unary"),
        ("GetStatus", "unary_unary"),
        ("GetModel", "unary_stream"),
    ],
)
def test_malformed_protobuf_is_invalid_argument(
    make_server: MakeServer, method: str, kind: str
) -> None:
    agg = make_server()
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, absurd length

    with (
        grpc.insecure_channel(f"localhost:{agg.port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        path = f"/{_SERVICE}/{method}"
        ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
        if kind == "stream_unary":
            channel.stream_unary(
                path, request_serializer=ident, response_deserializer=ident
            )(iter([garbage]), timeout=_TIMEOUT_S)
        elif kind == "unary_unary":
            channel.unary_unary(
                path, request_serializer=ident, response_deserializer=ident
            )(garbage, timeout=_TIMEOUT_S)
        else:
            call = channel.unary_stream(
                path, request_serializer=ident, response_deserializer=ident
            )
            list(call(garbage, timeout=_TIMEOUT_S))
    code, details = _status(info.value)

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "malformed" in details


def test_malformed_message_mid_upload_is_discarded(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, _ = _training(make_server, stub_for, ["alice"], rounds=1)
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    good = _update(specs, 5)
    raw = [m.SerializeToString() for m in _submission("alice", 0, specs, good)]

    with grpc.insecure_channel(f"localhost:{agg.port}") as channel:
        call = channel.stream_unary(
            f"/{_SERVICE}/SubmitGradient",
            request_serializer=lambda b: b,
            response_deserializer=aggregator_pb2.SubmitReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(
                iter([raw[0], raw[1], b"\xff\xff\xff\xff", *raw[2:]]),
                timeout=_TIMEOUT_S,
            )
        reply = call(iter(raw), timeout=_TIMEOUT_S)
    _wait_done(agg)

    code, details = _status(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "malformed SubmitMessage" in details
    assert reply.accepted
    _assert_theta(agg, _expected_theta(theta0, specs, [(good, _SAMPLES)]))


def test_submit_too_many_streams_per_party(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice"],
        rounds=1,
        limits=Limits(max_streams_per_party=1),
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    good = _update(specs, 11)
    msgs = _submission("alice", 0, specs, good, sid="held", chunk_bytes=1024)
    go = threading.Event()
    held = stub.SubmitGradient.future(
        _held_upload(msgs[:2], msgs[2:], go), timeout=_TIMEOUT_S
    )
    try:
        _probe_open_upload(stub, "alice")

        code, details = _rejected(
            stub, _submission("alice", 0, specs, good, sid="second")
        )
    finally:
        go.set()
    reply = held.result(timeout=_TIMEOUT_S)
    _wait_done(agg)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    for needle in ("party alice, round 0", "already open", "limit is 1"):
        assert needle in details, (needle, details)
    assert (reply.accepted, reply.submission_id) == (True, "held")
    _assert_theta(agg, _expected_theta(theta0, specs, [(good, _SAMPLES)]))


@pytest.mark.parametrize("party", ["bad id!", "", "p/1", "x" * 65, "ünï"])
def test_join_bad_party_id_is_invalid_argument(
    make_server: MakeServer, stub_for: StubFor, party: str
) -> None:
    stub = stub_for(make_server())

    with pytest.raises(grpc.RpcError) as info:
        _join(stub, party)
    code, details = _status(info.value)

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert repr(party) in details
    assert "[A-Za-z0-9_.-]" in details
    assert list(_state(stub).joined) == []


def test_join_zero_samples_is_invalid_argument(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    stub = stub_for(make_server())

    with pytest.raises(grpc.RpcError) as info:
        _join(stub, "alice", num_samples=0)
    code, details = _status(info.value)

    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "party alice" in details
    assert "0 samples; need > 0" in details


# ---------------------------------------------- bad uploads among good ones
def test_garbage_between_good_uploads_does_not_corrupt_round(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice", "bob"],
        {"bob": 300},
        rounds=1,
        min_parties=2,
        claim_cap=0.0,  # plain n_i weights: the cap has its own tests
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    ua, ub = _update(specs, 21), _update(specs, 22)
    loud = {s.name: np.full(s.shape, -5e2, dtype=np.float32) for s in specs}
    poisoned = {k: v.copy() for k, v in loud.items()}
    poisoned["fc.bias"][9] = np.nan
    garbage = [
        _submission("bob", 0, specs, poisoned, num_samples=300, chunk_bytes=256),
        _submission("bob", 0, specs, loud, num_samples=300, chunk_bytes=256)[:-1],
        _digest_mismatch(specs, loud, party="bob"),
        _cut_tensor(specs, loud, party="bob"),
        _submission("bob", 0, specs, loud, num_samples=300, kind=aggregator_pb2.DELTA),
    ]
    assert _submit(stub, _submission("alice", 0, specs, ua, num_samples=100)).accepted

    codes = [_rejected(stub, msgs)[0] for msgs in garbage]
    mid = _state(stub)
    reply = _submit(stub, _submission("bob", 0, specs, ub, num_samples=300))
    _wait_done(agg)

    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(garbage)
    assert list(mid.submitted) == ["alice"]
    assert reply.accepted
    result = agg.ledger.rounds()[0]
    assert {p.party_id: p.weight for p in result.parties} == pytest.approx(
        {"alice": 0.25, "bob": 0.75}
    )
    _assert_theta(agg, _expected_theta(theta0, specs, [(ua, 100), (ub, 300)]))


def test_party_killed_mid_upload_is_discarded(
    make_server: MakeServer, stub_for: StubFor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedgrpc.engine")
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice", "bob", "carol"],
        rounds=1,
        min_parties=1,
        expected_parties=3,
        round_timeout_s=5.0,
        limits=Limits(max_streams_per_party=1),
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    loud = {s.name: np.full(s.shape, 7e2, dtype=np.float32) for s in specs}
    ub = _update(specs, 31)

    def discarded(party: str) -> Callable[[], bool]:
        return lambda: f"party {party}, round 0: upload discarded" in caplog.messages

    # alice's connection is cancelled after the header and two chunks.
    msgs = _submission("alice", 0, specs, loud, chunk_bytes=512)
    go_a = threading.Event()
    cancelled = stub.SubmitGradient.future(
        _held_upload(msgs[:3], msgs[3:], go_a), timeout=_TIMEOUT_S
    )
    try:
        _probe_open_upload(stub, "alice")
        cancelled.cancel()
        _wait_for("alice's upload to be discarded", discarded("alice"))
    finally:
        go_a.set()
    # carol's request iterator raises after the header and two chunks.
    msgs = _submission("carol", 0, specs, loud, chunk_bytes=512)
    go_c = threading.Event()
    crashed = stub.SubmitGradient.future(
        _held_upload(msgs[:3], msgs[3:], go_c, then_raise=True), timeout=_TIMEOUT_S
    )
    try:
        _probe_open_upload(stub, "carol")
    finally:
        go_c.set()
    _wait_for("carol's upload to be discarded", discarded("carol"))
    mid = _state(stub)
    reply = _submit(stub, _submission("bob", 0, specs, ub))
    _wait_done(agg)

    assert cancelled.cancelled()
    assert crashed.exception(timeout=_TIMEOUT_S) is not None
    assert list(mid.submitted) == []
    assert reply.accepted
    result = agg.ledger.rounds()[0]
    assert [p.party_id for p in result.parties] == ["bob"]
    assert result.late == ("alice", "carol")
    _assert_theta(agg, _expected_theta(theta0, specs, [(ub, _SAMPLES)]))


def test_models_stream_ends_with_training_over(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=1)
    specs = agg.engine.specs

    with AggregatorClient(client_config(agg, "alice")) as client:
        client.join(_SAMPLES)
        stream = client.models(0, _TIMEOUT_S)
        first = next(stream)
        assert _submit(stub, _submission("alice", 0, specs, _update(specs, 1))).accepted
        last = next(stream)

    assert isinstance(first, ModelVersion)
    assert last == TrainingDone(1, "completed")
