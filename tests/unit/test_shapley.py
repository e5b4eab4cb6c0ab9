from __future__ import annotations

import math

import numpy as np
import pytest

from fedgrpc.scoring import shapley as c


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
