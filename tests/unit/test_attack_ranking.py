"""Seeded in-process runs: DIG-FL ranks attacked parties below clean ones."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.datasets.attacks import apply_data_attack, parse_attack
from fedgrpc.datasets.partition import iid
from fedgrpc.datasets.sources import Dataset, load_dataset, split_holdout, subset
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.types import UpdateKind


def _parties(n: int, seed: int = 3) -> tuple[dict[str, Dataset], Dataset]:
    rng = np.random.default_rng(seed)
    train, val = split_holdout(load_dataset("digits"), 300, rng)
    return {
        f"party-{i}": subset(train, idx)
        for i, idx in enumerate(iid(len(train), n, rng))
    }, val


def _totals(results: list) -> dict[str, float]:  # type: ignore[type-arg]
    out: dict[str, float] = {}
    for r in results:
        for p in r.parties:
            out[p.party_id] = out.get(p.party_id, 0.0) + p.score
    return out


def test_digfl_flipped_party_ranks_last_and_free_rider_scores_zero() -> None:
    parties, val = _parties(5)
    flip = parse_attack("label-flip:0.9")
    assert flip is not None
    ds = parties["party-3"]
    x, y = apply_data_attack(flip, ds.x, ds.y, ds.num_classes, np.random.default_rng(0))
    parties["party-3"] = Dataset(x, y, ds.num_classes, "flipped")
    attacks = {"party-4": parse_attack("free-rider")}
    cfg = config_for_data(
        RoundConfig(
            rounds=12,
            min_parties=5,
            update_kind=UpdateKind.GRADIENT,
            server_lr=0.5,
            model="mlp",
            model_hidden=32,
            seed=1,
        ),
        val,
    )

    _, results = run_in_process(cfg, parties, val, attacks=attacks)  # type: ignore[arg-type]
    totals = _totals(results)

    ranking = sorted(totals, key=totals.__getitem__, reverse=True)
    assert ranking[-1] == "party-3"
    assert totals["party-3"] < 0
    assert totals["party-4"] == pytest.approx(0.0, abs=1e-12)
    clean = [totals[f"party-{i}"] for i in range(3)]
    assert min(clean) > totals["party-4"] > totals["party-3"]


def test_digfl_mixed_digits_party_ranks_below_clean_parties() -> None:
    parties, val = _parties(4, seed=5)
    mix = parse_attack("mix:6->2:0.8")
    flip = parse_attack("label-flip:0.5")
    assert mix is not None and flip is not None
    for pid, att in (("party-2", mix), ("party-3", flip)):
        ds = parties[pid]
        x, y = apply_data_attack(
            att, ds.x, ds.y, ds.num_classes, np.random.default_rng(1)
        )
        parties[pid] = Dataset(x, y, ds.num_classes, pid)
    cfg = config_for_data(
        RoundConfig(
            rounds=10,
            min_parties=4,
            update_kind=UpdateKind.DELTA,
            lr=0.1,
            batch_size=32,
            model="mlp",
            model_hidden=32,
            seed=2,
        ),
        val,
    )

    _, results = run_in_process(cfg, parties, val)
    totals = _totals(results)

    clean = min(totals["party-0"], totals["party-1"])
    assert clean > totals["party-2"] > totals["party-3"]


def test_digfl_round_fidelity_tracks_measured_drop() -> None:
    parties, val = _parties(3)
    cfg = config_for_data(
        RoundConfig(
            rounds=8,
            min_parties=3,
            update_kind=UpdateKind.GRADIENT,
            server_lr=0.2,
            model="logreg",
            seed=4,
        ),
        val,
    )

    _, results = run_in_process(cfg, parties, val)

    pred = np.array([r.predicted_drop for r in results])
    meas = np.array([r.measured_drop for r in results])
    assert np.corrcoef(pred, meas)[0, 1] > 0.95
    np.testing.assert_allclose(pred, meas, rtol=0.3, atol=1e-3)
