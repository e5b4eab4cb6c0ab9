"""Strategies over real gRPC: optimisers, robust rules, sampling, FedBuff, resume."""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgrpc.client.party import run_party
from fedgrpc.client.stub import AggregatorClient, ModelVersion
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import Dataset, load_dataset, subset
from fedgrpc.errors import ConfigError
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.server.app import Aggregator
from fedgrpc.types import RoundSkipped, RunState, UpdateKind
from tests.conftest import MakeServer, client_config

pytestmark = pytest.mark.integration

_ROUND: dict[str, Any] = {
    "rounds": 3,
    "update_kind": UpdateKind.DELTA,
    "lr": 0.2,
    "local_steps": 4,
    "batch_size": 16,
    "model": "logreg",
}


def _data(n: int) -> dict[str, Dataset]:
    digits = load_dataset("digits")
    return {
        f"p{i}": subset(digits, np.arange(300 + 120 * i, 420 + 120 * i))
        for i in range(n)
    }


def _val() -> Dataset:
    return subset(load_dataset("digits"), np.arange(200))  # the fixture's val_count


def _run_parties(agg: Aggregator, data: dict[str, Dataset]) -> dict[str, Any]:
    with futures.ThreadPoolExecutor(len(data), thread_name_prefix="party") as pool:
        runs = {
            p: pool.submit(run_party, client_config(agg, p), d) for p, d in data.items()
        }
        results = {p: f.result(timeout=120) for p, f in runs.items()}
    assert agg.wait(timeout_s=30.0)
    assert agg.engine.state == RunState.DONE, agg.engine.reason
    return results


@pytest.mark.parametrize(
    "strategy",
    [
        {"server_opt": "adam", "aggregation": "median"},
        {"server_opt": "avgm", "aggregation": "fltrust"},
        {"aggregation": "krum", "krum_f": 1},
        {"aggregation": "trimmed-mean", "trim_beta": 0.25, "server_opt": "yogi"},
    ],
    ids=["adam+median", "avgm+fltrust", "krum", "yogi+trimmed"],
)
def test_a_strategy_over_grpc_equals_the_in_process_engine(
    make_server: MakeServer, strategy: dict[str, Any]
) -> None:
    data = _data(4)
    kw = {**_ROUND, "min_parties": 4, **strategy}
    agg = make_server(**kw)
    _run_parties(agg, data)
    ref, results = run_in_process(
        config_for_data(RoundConfig(**kw), _val()), data, _val()
    )
    # The close reads the round back in party order: arrival order does not matter.
    np.testing.assert_allclose(agg.engine.theta, ref.theta, rtol=1e-5, atol=1e-6)
    report = agg.ledger.contributions()
    want = {(p.party_id, r.round): p.score for r in results for p in r.parties}
    got = {
        (c.party_id, t): r.score
        for c in report.parties
        for t, r in zip(c.round_indices, c.rounds, strict=True)
    }
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7)
    for r in report.rounds:  # credits add up to the first-order drop, carry included
        assert r.extra["strategy"] == agg.engine.strategy.name


def test_client_sampling_sends_skips_and_scores_per_participation(
    make_server: MakeServer,
) -> None:
    data = _data(5)
    kw = {**_ROUND, "rounds": 4, "min_parties": 2, "expected_parties": 5}
    agg = make_server(**kw, sample_count=2)
    results = _run_parties(agg, data)
    report = agg.ledger.contributions()
    asked: dict[str, int] = dict.fromkeys(data, 0)
    for r in report.rounds:
        sampled = r.sampled
        assert sampled is not None and len(sampled) == 2
        assert sorted(p.party_id for p in r.parties) == sorted(sampled)
        assert r.late == ()
        for p in sampled:
            asked[p] += 1
    for c in report.parties:
        assert c.asked_rounds == asked[c.party_id] == c.participated
        assert results[c.party_id].rounds_submitted == asked[c.party_id]
        if c.participated:
            assert c.per_participation == pytest.approx(c.total / c.participated)
    # The same seeded subsets and model as the in-process engine.
    ref, ref_results = run_in_process(
        config_for_data(RoundConfig(**kw, sample_count=2), _val()), data, _val()
    )
    assert [r.sampled for r in ref_results] == [r.sampled for r in report.rounds]
    np.testing.assert_allclose(agg.engine.theta, ref.theta, rtol=1e-5, atol=1e-6)


def test_a_party_not_sampled_gets_a_skip_instead_of_the_model(
    make_server: MakeServer,
) -> None:
    agg = make_server(**_ROUND, min_parties=1, expected_parties=3, sample_count=1)
    clients = [AggregatorClient(client_config(agg, f"p{i}")) for i in range(3)]
    try:
        for c in clients:
            c.join(100)
        firsts = [next(iter(c.models(0, 30.0))) for c in clients]
        models = [f for f in firsts if isinstance(f, ModelVersion)]
        skips = [f for f in firsts if isinstance(f, RoundSkipped)]
        assert len(models) == 1 and len(skips) == 2
        assert all(s.round == 0 and "not sampled" in s.reason for s in skips)
        # A skipped party that submits anyway is refused, naming why.
        idle = clients[[isinstance(f, RoundSkipped) for f in firsts].index(True)]
        zero = {s.name: np.zeros(s.shape, np.float32) for s in idle.specs}
        with pytest.raises(Exception, match="not sampled"):
            idle.submit(0, zero, 100, train_loss=0.0, kind=UpdateKind.DELTA)
    finally:
        for c in clients:
            c.close()


def test_fedbuff_accepts_a_stale_update_weighted_by_its_staleness(
    make_server: MakeServer,
) -> None:
    agg = make_server(
        **{**_ROUND, "rounds": 3}, min_parties=2, expected_parties=3, buffer_size=2
    )
    clients = {p: AggregatorClient(client_config(agg, p)) for p in ("a", "b", "slow")}
    try:
        for c in clients.values():
            c.join(100)
        spec = clients["a"].specs
        rng = np.random.default_rng(0)

        def update() -> dict[str, np.ndarray]:
            return {s.name: 0.01 * rng.standard_normal(s.shape).astype(np.float32)
                    for s in spec}  # fmt: skip

        for p in ("a", "b"):  # version 0 closes with a and b
            clients[p].submit(0, update(), 100, train_loss=0.0, kind=UpdateKind.DELTA)
        _wait_round(agg, 1)
        # "slow" trained on version 0 and submits now: staleness 1.
        out = clients["slow"].submit(
            0, update(), 100, train_loss=0.0, kind=UpdateKind.DELTA
        )
        assert out.accepted and out.round == 1
        clients["a"].submit(1, update(), 100, train_loss=0.0, kind=UpdateKind.DELTA)
        _wait_round(agg, 2)
    finally:
        for c in clients.values():
            c.close()
    r1 = agg.ledger.rounds(1, 1)[0]
    assert r1.extra["staleness"] == {"slow": 1}
    assert r1.late == ()
    weights = {p.party_id: p.weight for p in r1.parties}
    assert weights["slow"] == pytest.approx(0.5 * 2**-0.5)
    assert weights["a"] == pytest.approx(0.5)


def test_fedbuff_refuses_past_max_staleness(make_server: MakeServer) -> None:
    agg = make_server(
        **{**_ROUND, "rounds": 4}, min_parties=1, buffer_size=1, max_staleness=1
    )
    with AggregatorClient(client_config(agg, "a")) as c:
        c.join(100)
        zero = {s.name: np.zeros(s.shape, np.float32) for s in c.specs}
        for t in range(2):
            c.submit(t, zero, 100, train_loss=0.0, kind=UpdateKind.DELTA)
            _wait_round(agg, t + 1)
    # A party that trained on version 0 and only now submits: two versions old.
    with AggregatorClient(client_config(agg, "late")) as late:
        late.join(100)
        with pytest.raises(Exception, match="max-staleness 1"):
            late.submit(0, zero, 100, train_loss=0.0, kind=UpdateKind.DELTA)


def _wait_round(agg: Aggregator, round_index: int, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while agg.engine.open_round < round_index:
        assert time.monotonic() < end, f"round {round_index} never opened"
        time.sleep(0.01)


def _fixed_updates(
    agg: Aggregator, n_rounds: int
) -> list[dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(7)
    with AggregatorClient(client_config(agg, "probe")) as c:
        specs = c.join(1, check_only=True).specs
    return [
        {p: {s.name: (0.05 * rng.standard_normal(s.shape)).astype(np.float32)
             for s in specs} for p in ("a", "b", "c")}
        for _ in range(n_rounds)
    ]  # fmt: skip


def _submit_rounds(
    agg: Aggregator, updates: list[dict[str, dict[str, np.ndarray]]], rounds: range
) -> None:
    clients = {p: AggregatorClient(client_config(agg, p)) for p in ("a", "b", "c")}
    try:
        for c in clients.values():
            c.join(100)
        for t in rounds:
            _wait_round(agg, t)
            for p, c in clients.items():
                c.submit(
                    t, updates[t][p], 100, train_loss=0.0, kind=UpdateKind.DELTA,
                    submission_id=f"{p}:{t}",
                )  # fmt: skip
            _wait_round(agg, t + 1)
    finally:
        for c in clients.values():
            c.close()


@pytest.mark.parametrize("opt", ["adam", "avgm"])
def test_resume_with_optimiser_state_equals_an_uninterrupted_run(
    make_server: MakeServer, tmp_path: Path, opt: str
) -> None:
    kw = {**_ROUND, "rounds": 4, "min_parties": 3, "server_opt": opt,
          "sample_count": 3 if opt == "adam" else 0}  # fmt: skip
    whole = make_server(**kw, run_dir=tmp_path / "whole")
    updates = _fixed_updates(whole, 4)
    _submit_rounds(whole, updates, range(4))
    assert whole.wait(timeout_s=20.0)

    run = tmp_path / "cut"
    first = make_server(**kw, run_dir=run)
    _submit_rounds(first, updates, range(2))
    first.shutdown(grace_s=0.2, save_open_round=False)
    assert (run / "checkpoints" / "strategy-000002.npz").is_file()
    again = make_server(**kw, run_dir=run, server={"resume": True})
    _submit_rounds(again, updates, range(2, 4))
    assert again.wait(timeout_s=20.0)
    np.testing.assert_array_equal(again.engine.theta, whole.engine.theta)
    assert [r.parties for r in again.ledger.rounds()] == [
        r.parties for r in whole.ledger.rounds()
    ]


def test_a_custom_strategy_named_by_import_string_runs_over_grpc(
    make_server: MakeServer,
) -> None:
    data = _data(4)
    kw = {**_ROUND, "min_parties": 4, "strategy": "tests.custom_strategy:make"}
    agg = make_server(**kw)
    _run_parties(agg, data)
    ref, _ = run_in_process(config_for_data(RoundConfig(**kw), _val()), data, _val())
    np.testing.assert_allclose(agg.engine.theta, ref.theta, rtol=1e-5, atol=1e-6)
    for r in agg.ledger.rounds():
        assert r.extra["strategy"] == "small-half+avgm"
        # Half the parties carry the round; the others have weight 0 this round.
        assert sorted(p.weight for p in r.parties) == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.custom_strategy:not_a_strategy", "not a fedgrpc.strategies.Strategy"),
        ("tests.custom_strategy:missing", "has no attribute 'missing'"),
        ("no_such_module:make", "cannot import module 'no_such_module'"),
    ],
)
def test_a_bad_custom_strategy_stops_the_start_naming_it(
    make_server: MakeServer, spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_server(**_ROUND, strategy=spec)
