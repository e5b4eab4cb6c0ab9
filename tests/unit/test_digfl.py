from __future__ import annotations

import math

import numpy as np
import pytest

from fedgrpc.scoring import digfl as c
from fedgrpc.types import UpdateKind

SHAPES = {"fc1.w": (7, 5), "fc1.b": (7,), "fc2.w": (3, 7), "fc2.b": (3,)}


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[name].reshape(-1) for name in SHAPES])


def _dot64(v: np.ndarray, u: np.ndarray) -> float:
    return float(np.dot(v.astype(np.float64), u.astype(np.float64)))


def _random_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        name: rng.normal(size=shape).astype(np.float32)
        for name, shape in SHAPES.items()
    }


def _naive_scores(
    v: dict[str, np.ndarray],
    updates: dict[str, dict[str, np.ndarray]],
    num_samples: dict[str, int],
    kind: UpdateKind,
    server_lr: float,
) -> dict[str, float]:
    """Oracle: explicit loops over every party and every parameter element."""
    total_n = 0
    for n in num_samples.values():
        total_n += n
    out = {}
    for party, tensors in updates.items():
        dot = 0.0
        for name in SHAPES:
            vv = v[name].reshape(-1).tolist()
            uu = tensors[name].reshape(-1).tolist()
            for k in range(len(vv)):
                dot += vv[k] * uu[k]
        p = num_samples[party] / total_n
        eta = server_lr if kind == UpdateKind.GRADIENT else 1.0
        out[party] = eta * p * dot
    return out


@pytest.mark.parametrize("kind", [UpdateKind.GRADIENT, UpdateKind.DELTA])
def test_digfl_scores_match_naive_loop_oracle(kind: UpdateKind) -> None:
    rng = np.random.default_rng(0)
    v = _random_model(rng)
    updates = {f"p{i}": _random_model(rng) for i in range(4)}
    num_samples = {"p0": 10, "p1": 30, "p2": 5, "p3": 55}

    weights = c.sample_weights(num_samples)
    dots = {p: _dot64(_flat(v), _flat(u)) for p, u in updates.items()}
    got = c.digfl_scores(dots, weights, kind, server_lr=0.3)

    want = _naive_scores(v, updates, num_samples, kind, server_lr=0.3)
    assert got.keys() == want.keys()
    for p in want:
        assert got[p] == pytest.approx(want[p], rel=1e-12, abs=1e-12)


def test_digfl_scores_require_a_weight_for_every_party() -> None:
    with pytest.raises(ValueError, match="p2"):
        c.digfl_scores({"p1": 1.0, "p2": 2.0}, {"p1": 1.0}, UpdateKind.DELTA, 1.0)


def test_sample_weights_equal_counts_are_uniform() -> None:
    got = c.sample_weights({"a": 50, "b": 50, "c": 50, "d": 50})

    assert got == c.uniform_weights(["a", "b", "c", "d"])
    assert got == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


def test_sample_weights_unequal_counts_scale_scores() -> None:
    weights = c.sample_weights({"small": 10, "big": 30})
    dots = {"small": 2.0, "big": 2.0}

    scores = c.digfl_scores(dots, weights, UpdateKind.GRADIENT, server_lr=0.5)

    assert weights == {"small": 0.25, "big": 0.75}
    assert scores["big"] == pytest.approx(3 * scores["small"])
    assert scores["small"] == pytest.approx(0.5 * 0.25 * 2.0)


def test_sample_weights_refuse_zero_total() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        c.sample_weights({"a": 0, "b": 0})
    with pytest.raises(ValueError, match="negative"):
        c.sample_weights({"a": -1, "b": 3})
    assert c.sample_weights({}) == {}


def test_digfl_scores_negative_for_update_that_increases_quadratic_loss() -> None:
    # L_v(θ) = ½ (θ - θ*)ᵀ A (θ - θ*), so v = A (θ - θ*).
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    a = m @ m.T + 6 * np.eye(6)
    theta_star = rng.normal(size=6)
    theta = rng.normal(size=6)

    def loss(t: np.ndarray) -> float:
        d = t - theta_star
        return 0.5 * float(d @ a @ d)

    v = a @ (theta - theta_star)
    updates = {"honest": v.copy(), "flipped": -v, "noise": rng.normal(size=6)}
    weights = c.uniform_weights(updates)
    eta = 1e-3
    dots = {p: _dot64(v, u) for p, u in updates.items()}

    scores = c.digfl_scores(dots, weights, UpdateKind.GRADIENT, eta)

    assert scores["honest"] > 0
    assert scores["flipped"] < 0
    alone = theta - eta * weights["flipped"] * updates["flipped"]
    assert loss(alone) > loss(theta)
    step = sum(weights[p] * updates[p] for p in updates)
    measured = loss(theta) - loss(theta - eta * step)
    assert sum(scores.values()) == pytest.approx(measured, rel=1e-2)


def test_digfl_weights_proportional_to_positive_scores() -> None:
    got = c.digfl_weights(
        {"a": 3.0, "b": 1.0, "c": -2.0, "d": math.nan}, {"a": 1, "b": 1, "c": 1, "d": 1}
    )

    assert got == {"a": 0.75, "b": 0.25, "c": 0.0, "d": 0.0}


def test_digfl_weights_fall_back_to_sample_weights_when_no_positive_score() -> None:
    got = c.digfl_weights({"a": -1.0, "b": 0.0}, {"a": 30, "b": 10, "other": 60})

    assert got == {"a": 0.75, "b": 0.25}


def test_totals_shares_and_reference_shares_by_hand() -> None:
    per_round = [{"a": 1.0, "b": 3.0}, {"a": -1.0, "b": -2.0}, {"a": 2.0, "b": 0.0}]

    tot = c.totals(per_round)
    sh = c.shares(tot)
    ref = c.reference_shares(per_round)

    assert tot == {"a": 2.0, "b": 1.0}
    assert sh == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    # Round 1: a 1/4, b 3/4; round 2 has no positive score; round 3: a 1, b 0.
    assert ref == pytest.approx({"a": 0.625, "b": 0.375})


def test_shares_are_zero_when_totals_sum_to_zero() -> None:
    assert c.shares({"a": 1.0, "b": -1.0}) == {"a": 0.0, "b": 0.0}
    assert c.reference_shares([{"a": -1.0, "b": 0.0}]) == {"a": 0.0, "b": 0.0}
