"""Momentum, weight decay and FedProx mu travel to real parties over gRPC and act."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import numpy as np
import pytest

from fedgrpc.client.party import run_party
from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import Dataset, load_dataset, subset
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.server.app import Aggregator
from fedgrpc.types import ContributionReport, RunState, UpdateKind
from tests.conftest import MakeServer, client_config

pytestmark = pytest.mark.integration

_ROUND: dict[str, Any] = {
    "rounds": 2,
    "min_parties": 2,
    "update_kind": UpdateKind.DELTA,
    "lr": 0.2,
    "local_steps": 6,
    "batch_size": 16,
    "model": "logreg",
}


def _data() -> dict[str, Dataset]:
    digits = load_dataset("digits")
    return {
        "p0": subset(digits, np.arange(300, 420)),
        "p1": subset(digits, np.arange(420, 600)),
    }


def _run(agg: Aggregator, data: dict[str, Dataset]) -> ContributionReport:
    with futures.ThreadPoolExecutor(2, thread_name_prefix="party") as pool:
        runs = {
            p: pool.submit(run_party, client_config(agg, p), d) for p, d in data.items()
        }
        results = {p: f.result(timeout=60) for p, f in runs.items()}
    assert agg.wait(timeout_s=20.0)
    assert agg.engine.state == RunState.DONE
    assert all(r.reason == "completed" for r in results.values())
    with AggregatorClient(client_config(agg, "observer")) as client:
        return client.contributions()


def _norms(report: ContributionReport) -> dict[tuple[str, int], float]:
    return {
        (p.party_id, t): r.update_norm
        for p in report.parties
        for t, r in zip(p.round_indices, p.rounds, strict=True)
    }


def test_parties_train_with_the_servers_optimiser_options(
    make_server: MakeServer,
) -> None:
    opts: dict[str, Any] = {"momentum": 0.5, "weight_decay": 0.01, "prox_mu": 0.5}
    data = _data()
    val = subset(load_dataset("digits"), np.arange(200))  # the fixture's val_count
    cfg = config_for_data(RoundConfig(**_ROUND, **opts), val)

    agg = make_server(**_ROUND, **opts)
    report = _run(agg, data)

    with_opts, results = run_in_process(cfg, data, val)
    plain, _ = run_in_process(config_for_data(RoundConfig(**_ROUND), val), data, val)
    # The gRPC parties trained exactly as the in-process run with the options...
    np.testing.assert_allclose(agg.engine.theta, with_opts.theta, rtol=1e-5, atol=1e-6)
    scores = {(p.party_id, r.round): p.score for r in results for p in r.parties}
    for (pid, t), score in {
        (p.party_id, t): r.score
        for p in report.parties
        for t, r in zip(p.round_indices, p.rounds, strict=True)
    }.items():
        assert score == pytest.approx(scores[pid, t], rel=1e-4, abs=1e-7)
    # ... which is not the run without them.
    assert np.abs(with_opts.theta - plain.theta).max() > 1e-3


def test_prox_mu_shrinks_every_submitted_delta(make_server: MakeServer) -> None:
    data = _data()

    free = _norms(_run(make_server(**_ROUND), data))
    prox = _norms(_run(make_server(**_ROUND, prox_mu=5.0), data))

    # FedProx pulls theta_local towards theta_t: each ||Delta|| is smaller.
    assert free.keys() == prox.keys() and len(free) == 4
    for key, norm in free.items():
        assert 0 < prox[key] < 0.9 * norm, key
