"""Robust aggregation rules against NumPy / SciPy oracles, ties and all-equal inputs.

Each coordinate-wise rule is checked twice: its aggregate (the column sums of its
parts) against ``np.median`` / ``scipy.stats.trim_mean``, and its per-party parts
against a loop that spells out the documented split (a used value's weight shared
equally by every party holding that value).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]  # (scikit-learn's dependency)

from fedgrpc.config import RoundConfig
from fedgrpc.errors import ConfigError
from fedgrpc.strategies import (
    SGD,
    AvgM,
    CoordinateMedian,
    MultiKrum,
    SampleWeighted,
    Strategy,
    TrimmedMean,
    Uniform,
    UpdateInfo,
    ValidationTrust,
)
from fedgrpc.strategies.registry import build_rule, build_strategy

PARTIES = [f"p{i}" for i in range(9)]


def _blocks(n: int, b: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs of every kind: distinct, heavily tied, all equal, one outlier."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(n, b)).astype(np.float32)
    tied = rng.integers(-2, 3, size=(n, b)).astype(np.float32) / 4
    equal = np.full((n, b), 0.375, np.float32)
    outlier = distinct.copy()
    outlier[0] = 1e6
    mixed = tied.copy()
    mixed[:, : b // 2] = -1.5  # whole columns equal beside tied ones
    return {
        "distinct": distinct,
        "tied": tied,
        "equal": equal,
        "outlier": outlier,
        "mixed": mixed,
    }


def _parts_oracle(column: np.ndarray, used: list[tuple[int, float]]) -> np.ndarray:
    """Parts of one column for an aggregate sum_k w_k s[k] (s: the sorted column).

    The weight of sorted position k goes to the parties holding the value s[k],
    shared equally among all of them (a value at positions k1, k2 gets both weights).
    """
    s = sorted(float(x) for x in column)
    parts = np.zeros(len(column))
    for k, w in used:
        holders = [i for i, x in enumerate(column) if float(x) == s[k]]
        for i in holders:
            parts[i] += w * float(column[i]) / len(holders)
    return parts


def _median_used(n: int) -> list[tuple[int, float]]:
    if n % 2:
        return [(n // 2, 1.0)]
    return [(n // 2 - 1, 0.5), (n // 2, 0.5)]


def _trim_used(n: int, k: int) -> list[tuple[int, float]]:
    kept = n - 2 * k
    return [(j, 1.0 / kept) for j in range(k, n - k)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("kind", ["distinct", "tied", "equal", "outlier", "mixed"])
def test_rule_median_matches_numpy_and_the_documented_parts(n: int, kind: str) -> None:
    block = _blocks(n, 12, seed=n)[kind]

    parts = CoordinateMedian().combine_block(block)

    assert parts.shape == block.shape and parts.dtype == np.float32
    np.testing.assert_allclose(
        parts.sum(axis=0, dtype=np.float64),
        np.median(block.astype(np.float64), axis=0),
        rtol=1e-6,
        atol=1e-7,
    )
    want = np.stack(
        [_parts_oracle(block[:, j], _median_used(n)) for j in range(block.shape[1])],
        axis=1,
    )
    np.testing.assert_allclose(parts, want, rtol=1e-6, atol=1e-7)


def test_rule_median_ties_share_equally_and_all_equal_splits_evenly() -> None:
    # Column 0: the two middle values of n=4 are tied (1, 1): a and b share the whole
    # median. Column 1: all four equal: a quarter each. Column 2: odd one out.
    block = np.array(
        [[1.0, 2.0, 5.0], [1.0, 2.0, 1.0], [0.0, 2.0, 2.0], [3.0, 2.0, 3.0]],
        np.float32,
    )

    parts = CoordinateMedian().combine_block(block)

    np.testing.assert_array_equal(parts[:, 0], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(parts[:, 1], [0.5, 0.5, 0.5, 0.5])
    # Sorted 1, 2, 3, 5: the middle pair 2 (party 2) and 3 (party 3), half each.
    np.testing.assert_array_equal(parts[:, 2], [0.0, 0.0, 1.0, 1.5])


def test_rule_median_parts_follow_a_permutation_of_the_parties() -> None:
    block = _blocks(6, 20, seed=3)["tied"]
    perm = np.random.default_rng(0).permutation(6)

    parts = CoordinateMedian().combine_block(block)
    permuted = CoordinateMedian().combine_block(block[perm])

    np.testing.assert_array_equal(permuted, parts[perm])


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.25, 0.34, 0.45])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize("kind", ["distinct", "tied", "equal", "outlier", "mixed"])
def test_rule_trimmed_mean_matches_scipy_and_the_documented_parts(
    beta: float, n: int, kind: str
) -> None:
    block = _blocks(n, 10, seed=100 + n)[kind]
    rule = TrimmedMean(beta)
    k = math.floor(beta * n)

    parts = rule.combine_block(block)

    assert rule.trimmed(n) == k
    agg = parts.sum(axis=0, dtype=np.float64)
    b64 = block.astype(np.float64)
    np.testing.assert_allclose(
        agg, stats.trim_mean(b64, beta, axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        agg, np.sort(b64, axis=0)[k : n - k].mean(axis=0), rtol=1e-5, atol=1e-6
    )
    want = np.stack(
        [_parts_oracle(block[:, j], _trim_used(n, k)) for j in range(block.shape[1])],
        axis=1,
    )
    np.testing.assert_allclose(parts, want, rtol=1e-6, atol=1e-6)


def test_rule_trimmed_mean_boundary_ties_share_the_kept_copies() -> None:
    # n = 5, beta = 0.2: k = 1, three kept. Column: 0, 0, 0, 4, 8 sorted; kept 0, 0, 4:
    # two kept copies of 0 shared by its three holders, 4 whole to its holder.
    # (Values times the weights: 0 contributes nothing, so use 1, 1, 1, 4, 8.)
    block = np.array([[1.0], [8.0], [1.0], [4.0], [1.0]], np.float32)

    parts = TrimmedMean(0.2).combine_block(block)[:, 0]

    third = 2.0 / 3.0 / 3.0  # each 1-holder: (2 kept copies / 3 holders) / kept
    np.testing.assert_allclose(parts, [third, 0.0, third, 4.0 / 3.0, third], rtol=1e-6)
    assert float(parts.sum(dtype=np.float64)) == pytest.approx(2.0)  # (1 + 1 + 4) / 3


def test_rule_trimmed_mean_all_equal_splits_evenly() -> None:
    block = np.full((7, 3), -0.75, np.float32)

    parts = TrimmedMean(0.3).combine_block(block)

    np.testing.assert_allclose(parts, np.full((7, 3), -0.75 / 7), rtol=1e-6)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_rule_trimmed_mean_refuses_bad_beta(beta: float) -> None:
    with pytest.raises(ConfigError, match=r"trimmed-mean beta must be in \[0, 0.5\)"):
        TrimmedMean(beta)


# ------------------------------------------------------------------- multi-Krum


def _infos(
    n: int, samples: list[int] | None = None, dots: list[float] | None = None
) -> list[UpdateInfo]:
    return [
        UpdateInfo(
            PARTIES[i],
            samples[i] if samples else 1,
            dots[i] if dots else 0.0,
            1.0,
        )
        for i in range(n)
    ]


def _krum_oracle(x: np.ndarray, f: int, m: int) -> set[int]:
    """Brute force: every pair's squared distance by a loop, scores, the m best."""
    n = len(x)
    scores = []
    for i in range(n):
        d = sorted(
            float(np.sum((x[i].astype(np.float64) - x[j]) ** 2))
            for j in range(n)
            if j != i
        )
        scores.append((sum(d[: n - f - 2]), PARTIES[i]))
    chosen = sorted(scores)[: (m or n - f)]
    return {PARTIES.index(p) for _, p in chosen}


def _distances(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.array([[float(np.sum((a - b) ** 2)) for b in x] for a in x])


@pytest.mark.parametrize(("n", "f", "m"), [(4, 1, 0), (5, 1, 1), (6, 2, 0), (9, 2, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_rule_krum_matches_brute_force(n: int, f: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 7)).astype(np.float32)
    x[:f] += rng.normal(scale=20.0, size=(f, 7)).astype(np.float32)  # Byzantine

    w = MultiKrum(f, m).weights(_infos(n), _distances(x), 1.0)

    chosen = _krum_oracle(x, f, m)
    assert w == {
        PARTIES[i]: (1.0 / len(chosen) if i in chosen else 0.0) for i in range(n)
    }
    assert sum(w.values()) == pytest.approx(1.0)
    assert not set(range(f)) & chosen  # the far-away updates are never selected


def test_rule_krum_all_equal_inputs_pick_by_party_id() -> None:
    x = np.ones((5, 3), np.float32)

    w = MultiKrum(1, 2).weights(_infos(5), _distances(x), 1.0)

    # Every score is 0: the tie goes to the lowest ids (documented), not shared.
    assert w == {"p0": 0.5, "p1": 0.5, "p2": 0.0, "p3": 0.0, "p4": 0.0}


def test_rule_krum_m_above_n_takes_everyone() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3))

    w = MultiKrum(1, 10).weights(_infos(4), _distances(x), 1.0)

    assert w == dict.fromkeys(PARTIES[:4], 0.25)


@pytest.mark.parametrize(("n", "f", "m"), [(3, 1, 0), (4, 2, 0), (5, 4, 2)])
def test_rule_krum_small_rounds_tolerate_n_minus_3(n: int, f: int, m: int) -> None:
    # Fewer than f + 3 updates: Krum runs with f' = n - 3 (fedgrpc shapley's small
    # coalitions still have a value).
    x = np.random.default_rng(n).normal(size=(n, 4))
    x[0] += 50.0

    w = MultiKrum(f, m).weights(_infos(n), _distances(x), 1.0)

    chosen = _krum_oracle(x, n - 3, m)
    assert w == {
        PARTIES[i]: (1.0 / len(chosen) if i in chosen else 0.0) for i in range(n)
    }


@pytest.mark.parametrize("n", [1, 2])
def test_rule_krum_one_or_two_updates_are_averaged(n: int) -> None:
    x = np.random.default_rng(0).normal(size=(n, 3))

    w = MultiKrum(1).weights(_infos(n), _distances(x), 1.0)

    assert w == dict.fromkeys(PARTIES[:n], 1.0 / n)


def test_rule_krum_needs_the_distances_and_f_m_non_negative() -> None:
    with pytest.raises(ValueError, match=r"needs the \(n, n\) pairwise distances"):
        MultiKrum(1).weights(_infos(4), None, 1.0)
    with pytest.raises(ConfigError, match="krum f and m must be >= 0"):
        MultiKrum(-1)


# ---------------------------------------------------------- validation trust


def test_rule_validation_trust_matches_the_cosine_oracle() -> None:
    rng = np.random.default_rng(5)
    v = rng.normal(size=11)
    u = rng.normal(size=(6, 11))
    u[0] = 3 * v  # aligned
    u[1] = -v  # opposed: weight 0
    u[2] = 0.0  # no direction: weight 0
    samples = [1, 2, 3, 4, 5, 6]
    infos = [
        UpdateInfo(PARTIES[i], samples[i], float(u[i] @ v), float(np.linalg.norm(u[i])))
        for i in range(6)
    ]

    w = ValidationTrust().weights(infos, None, float(np.linalg.norm(v)))

    raw = []
    for i in range(6):
        nrm = np.linalg.norm(u[i])
        cos = 0.0 if nrm == 0 else float(u[i] @ v) / (nrm * np.linalg.norm(v))
        raw.append(max(0.0, cos) * samples[i])
    want = np.array(raw) / sum(raw)
    assert [w[PARTIES[i]] for i in range(6)] == pytest.approx(want.tolist(), rel=1e-12)
    assert w["p1"] == w["p2"] == 0.0
    assert w["p0"] > 0.0


def test_rule_validation_trust_no_step_when_nothing_descends() -> None:
    infos = [UpdateInfo("a", 3, -1.0, 1.0), UpdateInfo("b", 1, -0.5, 2.0)]

    assert ValidationTrust().weights(infos, None, 1.0) == {"a": 0.0, "b": 0.0}
    assert ValidationTrust().weights(infos, None, 0.0) == {"a": 0.0, "b": 0.0}


def test_rule_validation_trust_scale_invariant_and_tied_parties_equal() -> None:
    # The same direction at any norm earns the same trust; equal counts: equal weights.
    infos = [UpdateInfo("a", 2, 1.0, 1.0), UpdateInfo("b", 2, 100.0, 100.0)]

    w = ValidationTrust().weights(infos, None, 1.0)

    assert w == {"a": 0.5, "b": 0.5}


def test_rule_sample_and_uniform_weights() -> None:
    infos = _infos(3, samples=[1, 3, 4])

    assert SampleWeighted().weights(infos, None, 1.0) == {
        "p0": 0.125,
        "p1": 0.375,
        "p2": 0.5,
    }
    assert Uniform().weights(infos, None, 1.0) == dict.fromkeys(
        ["p0", "p1", "p2"], 1 / 3
    )
    assert SampleWeighted().fixed_weight(3, 8.0) == 0.375
    assert Uniform().fixed_weight(3, 8.0) == 1.0
    for rule in (CoordinateMedian(), TrimmedMean(), MultiKrum(), ValidationTrust()):
        assert rule.fixed_weight(3, 8.0) is None  # decided at the close


# ------------------------------------------------------------------- registry


def _cfg(**kw: Any) -> RoundConfig:
    base: dict[str, Any] = {"rounds": 1, "norm_bound": "off", "claim_cap": 0.0}
    base.update(kw)
    return RoundConfig(**base)


def test_rule_built_from_config() -> None:
    assert isinstance(build_rule(_cfg(aggregation="samples")), SampleWeighted)
    assert isinstance(build_rule(_cfg(aggregation="digfl")), SampleWeighted)
    assert isinstance(build_rule(_cfg(aggregation="uniform")), Uniform)
    assert isinstance(build_rule(_cfg(aggregation="median")), CoordinateMedian)
    trim = build_rule(_cfg(aggregation="trimmed-mean", trim_beta=0.25))
    assert isinstance(trim, TrimmedMean) and trim.beta == 0.25
    krum = build_rule(_cfg(aggregation="krum", krum_f=2, krum_m=3, min_parties=5))
    assert isinstance(krum, MultiKrum) and (krum.f, krum.m) == (2, 3)
    assert isinstance(build_rule(_cfg(aggregation="fltrust")), ValidationTrust)


def uniform_momentum(cfg: RoundConfig) -> Strategy:
    """A user's factory (named by --strategy below)."""
    return Strategy(
        build_rule(_cfg(aggregation="uniform")), AvgM(lr=cfg.server_lr, beta=0.5)
    )


def not_a_strategy(cfg: RoundConfig) -> object:
    return (Uniform(), SGD())


def broken_factory(cfg: RoundConfig) -> Strategy:
    raise RuntimeError("no GPU here")


class _NoFold:
    name = "nofold"
    linear = True
    # needs_distances, fixed_weight, weights, combine_block missing


def half_a_rule(cfg: RoundConfig) -> Strategy:
    return Strategy(_NoFold(), SGD())  # type: ignore[arg-type]


HERE = __name__


def test_rule_custom_strategy_factory_is_used() -> None:
    made = build_strategy(_cfg(strategy=f"{HERE}:uniform_momentum", server_lr=0.25))

    assert made.name == "uniform+avgm"
    assert isinstance(made.optimiser, AvgM) and made.optimiser.lr == 0.25


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("not_a_strategy", "returned a tuple, not a fedgrpc.strategies.Strategy"),
        ("broken_factory", "failed: no GPU here"),
        ("half_a_rule", "its AggregationRule (_NoFold) lacks part of the protocol"),
        ("no_such_factory", "has no attribute 'no_such_factory'"),
    ],
)
def test_rule_custom_strategy_errors_name_the_factory(
    factory: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_strategy(_cfg(strategy=f"{HERE}:{factory}"))

    assert f"{HERE}:{factory}" in str(err.value)
