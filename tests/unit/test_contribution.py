from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from fedgrpc import contribution as c
from fedgrpc.errors import InvalidUpdateError
from fedgrpc.types import UpdateKind

SHAPES = {"fc1.w": (7, 5), "fc1.b": (7,), "fc2.w": (3, 7), "fc2.b": (3,)}


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[name].reshape(-1) for name in SHAPES])


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
    dots = {p: c.dot_chunked(_flat(v), _flat(u), 0) for p, u in updates.items()}
    got = c.digfl_scores(dots, weights, kind, server_lr=0.3)

    want = _naive_scores(v, updates, num_samples, kind, server_lr=0.3)
    assert got.keys() == want.keys()
    for p in want:
        assert got[p] == pytest.approx(want[p], rel=1e-12, abs=1e-12)


def test_digfl_scores_require_a_weight_for_every_party() -> None:
    with pytest.raises(ValueError, match="p2"):
        c.digfl_scores({"p1": 1.0, "p2": 2.0}, {"p1": 1.0}, UpdateKind.DELTA, 1.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_streaming_score_equals_whole_tensor_for_random_chunkings(
    seed: int, dtype: type[np.floating]
) -> None:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=1000).astype(np.float32)
    u = rng.normal(size=1000).astype(dtype)
    cuts = np.sort(
        rng.choice(np.arange(1, 1000), size=rng.integers(1, 30), replace=False)
    )
    bounds = list(pairwise([0, *cuts.tolist(), 1000]))
    order = rng.permutation(len(bounds))

    score = c.StreamingScore(v)
    for k in order:
        start, stop = bounds[k]
        assert score.add(start, u[start:stop])

    want_dot = float(np.dot(v.astype(np.float64), u.astype(np.float64)))
    want_sq = float(np.dot(u.astype(np.float64), u.astype(np.float64)))
    assert score.complete
    assert score.finite
    assert score.elements == 1000
    assert score.dot == pytest.approx(want_dot, rel=1e-12, abs=1e-12)
    assert score.sq_norm == pytest.approx(want_sq, rel=1e-12)
    assert score.norm == pytest.approx(float(np.linalg.norm(u.astype(np.float64))))
    assert c.dot_chunked(v, u, 0) == pytest.approx(want_dot, rel=1e-12, abs=1e-12)


def test_streaming_score_flags_nonfinite_chunk() -> None:
    v = np.ones(10, dtype=np.float32)
    score = c.StreamingScore(v)

    ok = score.add(0, np.ones(4, dtype=np.float32))
    bad = score.add(4, np.array([1.0, np.nan, 1.0], dtype=np.float32))
    worse = score.add(7, np.array([np.inf, 0.0, 0.0], dtype=np.float32))

    assert ok
    assert not bad
    assert not worse
    assert not score.finite
    assert score.nonfinite_offset == 4
    assert score.dot == 4.0
    assert score.complete


def test_streaming_score_rejects_chunk_outside_model() -> None:
    score = c.StreamingScore(np.zeros(8, dtype=np.float32))

    with pytest.raises(InvalidUpdateError, match="offset 6"):
        score.add(6, np.zeros(3, dtype=np.float32))
    with pytest.raises(InvalidUpdateError):
        score.add(-1, np.zeros(1, dtype=np.float32))


def test_streaming_score_rejects_nonfinite_validation_gradient() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        c.StreamingScore(np.array([1.0, np.nan]))


def test_dot_chunked_uses_the_slice_at_offset() -> None:
    v = np.arange(10, dtype=np.float32)
    chunk = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)

    got = c.dot_chunked(v, chunk, 3)

    assert got == 3 * 1 + 4 * 2 + 5 * 3 + 6 * 4


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
    dots = {p: c.dot_chunked(v, u, 0) for p, u in updates.items()}

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


def _glove(s: frozenset[str]) -> float:
    # One left glove, two right gloves: a pair is worth 1.
    return float(min(len(s & {"L"}), len(s & {"R1", "R2"})))


def test_exact_shapley_glove_game() -> None:
    got = c.exact_shapley(["L", "R1", "R2"], _glove)

    assert got == pytest.approx({"L": 2 / 3, "R1": 1 / 6, "R2": 1 / 6})


def test_exact_shapley_weighted_majority_game() -> None:
    # Weights 3, 2, 2 with quota 4: any two players win, so all are symmetric.
    w = {"a": 3, "b": 2, "c": 2}

    def vote(s: frozenset[str]) -> float:
        return 1.0 if sum(w[p] for p in s) >= 4 else 0.0

    got = c.exact_shapley(list(w), vote)

    assert got == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_exact_shapley_additive_game_gives_own_values() -> None:
    own = {"a": 1.5, "b": -0.5, "c": 2.0, "d": 0.0}

    def additive(s: frozenset[str]) -> float:
        return 10.0 + sum(own[p] for p in s)  # v(∅) = 10 must cancel out

    got = c.exact_shapley(list(own), additive)

    assert got == pytest.approx(own)


def _cubic_game(s: frozenset[str]) -> float:
    value = {"a": 1.0, "b": 2.0, "c": 0.5, "d": -1.0, "e": 3.0}
    x = sum(value[p] for p in s)
    return x**3 / 10 + (1.0 if {"a", "e"} <= s else 0.0)


def test_permutation_shapley_converges_to_exact() -> None:
    players = ["a", "b", "c", "d", "e"]
    exact = c.exact_shapley(players, _cubic_game)

    def error(n_permutations: int, seed: int) -> float:
        rng = np.random.default_rng(seed)
        est = c.permutation_shapley(players, _cubic_game, n_permutations, rng)
        return max(abs(est[p] - exact[p]) for p in players)

    few, some, many = (
        np.mean([error(n, seed) for seed in range(20)]) for n in (5, 100, 2000)
    )

    # Monte Carlo error shrinks like 1/sqrt(n): about 4.5x per 20x more permutations.
    assert few > 2 * some > 4 * many
    assert many < 0.05 * max(abs(x) for x in exact.values())


def test_permutation_shapley_caches_utility() -> None:
    calls: list[frozenset[str]] = []

    def counted(s: frozenset[str]) -> float:
        calls.append(s)
        return _glove(s)

    c.permutation_shapley(["L", "R1", "R2"], counted, 500, np.random.default_rng(0))

    assert len(calls) == len(set(calls)) <= 2**3


def test_permutation_shapley_is_seeded() -> None:
    players = ["a", "b", "c", "d", "e"]

    one = c.permutation_shapley(players, _cubic_game, 7, np.random.default_rng(3))
    two = c.permutation_shapley(players, _cubic_game, 7, np.random.default_rng(3))

    assert one == two


def test_leave_one_out_glove_game() -> None:
    got = c.leave_one_out(["L", "R1", "R2"], _glove)

    assert got == {"L": 1.0, "R1": 0.0, "R2": 0.0}


def test_shapley_refuses_duplicate_players() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        c.exact_shapley(["a", "a"], _glove)


def test_pearson_by_hand() -> None:
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: sxy = 11, sxx = 5, syy = 26.
    got = c.pearson([1, 2, 3, 4], [2, 4, 5, 9])

    assert got == pytest.approx(11 / math.sqrt(130))
    assert c.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_with_ties_by_hand() -> None:
    # Ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: sxy = 4.5, sxx = 4.5, syy = 5.
    got = c.spearman([1, 2, 2, 3], [1, 3, 2, 4])

    assert got == pytest.approx(3 / math.sqrt(10))


def test_spearman_is_one_for_monotone_nonlinear() -> None:
    x = [0.1, 0.5, 2.0, 3.0, 10.0]

    assert c.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert c.pearson(x, [v**3 for v in x]) < 1.0


def test_correlation_edge_cases() -> None:
    assert math.isnan(c.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(c.spearman([2, 2], [1, 2]))
    with pytest.raises(ValueError, match="length"):
        c.pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        c.spearman([1], [1])
