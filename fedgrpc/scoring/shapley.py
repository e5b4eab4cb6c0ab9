"""Shapley values from coalition utilities, leave-one-out, and correlations. Pure NumPy.

The utility of a coalition comes from retraining it
(:mod:`fedgrpc.learning.ground_truth`); these functions only combine the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import numpy.typing as npt

Utility = Callable[[frozenset[str]], float]
"""Value of a coalition of parties, e.g. L_v(θ_0) - L_v(θ_T^S)."""

MAX_EXACT_PLAYERS = 20
"""exact_shapley evaluates 2^n coalitions; refuse more players than this."""


# ------------------------------------------------------------------------------------
# Ground truth: Shapley values from coalition utilities


def _check_players(players: Sequence[str]) -> list[str]:
    names = list(players)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate players in {names}")
    return names


def exact_shapley(players: Sequence[str], utility: Utility) -> dict[str, float]:
    """Exact Shapley values by enumerating every coalition (2^n utility calls).

    φ_i = Σ_{S ⊆ N - {i}} |S|!(n-|S|-1)!/n! · (v(S | {i}) - v(S)), with v(∅) taken
    from ``utility(frozenset())``; no clipping.

    Raises:
        ValueError: Duplicate players, or more than MAX_EXACT_PLAYERS.
    """
    names = _check_players(players)
    n = len(names)
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact Shapley over {n} players needs 2^{n} coalitions")
    value: dict[frozenset[str], float] = {}
    for size in range(n + 1):
        for combo in combinations(names, size):
            s = frozenset(combo)
            value[s] = float(utility(s))
    weight = [
        math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
        for k in range(n)
    ]
    out: dict[str, float] = {}
    for i in names:
        others = [p for p in names if p != i]
        phi = 0.0
        for size in range(n):
            for combo in combinations(others, size):
                s = frozenset(combo)
                phi += weight[size] * (value[s | {i}] - value[s])
        out[i] = phi
    return out


def permutation_shapley(
    players: Sequence[str],
    utility: Utility,
    n_permutations: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Monte Carlo Shapley estimate: mean marginal value over random orderings.

    Utility values are cached per coalition, so repeated prefixes cost nothing.

    Args:
        players: Party ids.
        utility: Coalition value.
        n_permutations: Random orderings to average over (>= 1).
        rng: Source of the orderings.

    Raises:
        ValueError: Duplicate players or ``n_permutations < 1``.
    """
    names = _check_players(players)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    cache: dict[frozenset[str], float] = {}

    def v(s: frozenset[str]) -> float:
        if s not in cache:
            cache[s] = float(utility(s))
        return cache[s]

    sums = dict.fromkeys(names, 0.0)
    for _ in range(n_permutations):
        coalition: frozenset[str] = frozenset()
        before = v(coalition)
        for idx in rng.permutation(len(names)):
            p = names[int(idx)]
            coalition = coalition | {p}
            after = v(coalition)
            sums[p] += after - before
            before = after
    return {p: s / n_permutations for p, s in sums.items()}


def leave_one_out(players: Sequence[str], utility: Utility) -> dict[str, float]:
    """Leave-one-out value v(N) - v(N - {i}) per party."""
    names = _check_players(players)
    everyone = frozenset(names)
    full = float(utility(everyone))
    return {p: full - float(utility(everyone - {p})) for p in names}


# ------------------------------------------------------------------------------------
# Correlations


def _paired(
    a: Sequence[float], b: Sequence[float]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"length mismatch: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError("correlation needs at least 2 pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("correlation inputs must be finite")
    return x, y


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant.

    Raises:
        ValueError: Different lengths, fewer than 2 pairs, or non-finite values.
    """
    x, y = _paired(a, b)
    dx = x - x.mean()
    dy = y - y.mean()
    denom = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    if denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(np.dot(dx, dy)) / denom))


def _ranks(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks, ties sharing the mean of the positions they span."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1  # group index of each sorted position
    starts = np.flatnonzero(starts_group)
    stops = np.append(starts[1:], x.size)  # exclusive
    mean_rank = (starts + stops + 1) / 2.0  # mean of 1-based positions start+1 .. stop
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson on average ranks; NaN if a side is constant.

    Raises:
        ValueError: Different lengths, fewer than 2 pairs, or non-finite values.
    """
    x, y = _paired(a, b)
    rx = _ranks(x)
    ry = _ranks(y)
    return pearson(rx.tolist(), ry.tolist())
