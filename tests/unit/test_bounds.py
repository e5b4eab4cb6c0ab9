"""Bounded influence: the norm bound and the claim cap, as rules and in the engine."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fedgrpc.config import RoundConfig, parse_norm_bound
from fedgrpc.engine import RoundEngine
from fedgrpc.engine.parties import PartyTable
from fedgrpc.errors import (
    ConfigError,
    DuplicateSubmissionError,
    InvalidUpdateError,
    PreconditionError,
)
from fedgrpc.layout import update_digest
from fedgrpc.scoring import bounds
from fedgrpc.types import PartyRound, RoundResult, RunState

# The engine tests' quadratic problem, validator and clock.
from tests.unit.test_engine import (
    LR,
    SIZE,
    SPECS,
    THETA_0,
    THETA_STAR,
    FakeClock,
    QuadraticValidator,
)


@dataclass
class Run:
    engine: RoundEngine
    commits: list[tuple[RoundResult, np.ndarray]] = field(default_factory=list)
    joins: list[tuple[str, int]] = field(default_factory=list)

    @property
    def results(self) -> list[RoundResult]:
        return [r for r, _ in self.commits]


def _cfg(**overrides: Any) -> RoundConfig:
    kw: dict[str, Any] = {
        "rounds": 3,
        "min_parties": 2,
        "server_lr": LR,
        "round_timeout_s": 10.0,
        "join_timeout_s": 5.0,
        "norm_bound": "auto",
        "norm_bound_factor": 2.0,
        "claim_cap": 0.0,
    }
    kw.update(overrides)
    return RoundConfig(**kw)


def _run(
    parties: Mapping[str, int],
    attested: Mapping[str, int] | None = None,
    **cfg: Any,
) -> Run:
    run = Run(engine=None)  # type: ignore[arg-type]

    def commit(result: RoundResult, theta: np.ndarray) -> None:
        run.commits.append((result, theta.copy()))  # the engine reuses the buffer

    run.engine = RoundEngine(
        _cfg(**cfg),
        SPECS,
        THETA_0,
        QuadraticValidator(),
        on_commit=commit,
        on_join=lambda p, n: run.joins.append((p, n)),
        clock=FakeClock(),
        max_in_flight=8,  # 2 slots per party: a second stream of one party
    )
    for pid, n in parties.items():
        run.engine.join(pid, n, (attested or {}).get(pid))
    run.engine.tick()
    assert run.engine.state == RunState.TRAINING
    return run


def _submit(engine: RoundEngine, party: str, rnd: int, n: int, u: np.ndarray) -> None:
    flat = np.asarray(u, dtype=np.float32)
    sub = engine.begin_submission(party, rnd, n, slot_timeout_s=1.0)
    try:
        for i, off in enumerate(engine.layout.offsets):
            sub.add(i, 0, flat[off : off + engine.layout.specs[i].numel])
        assert sub.finish(update_digest(flat)).accepted
    except BaseException:
        sub.abort()
        raise


def _round(
    run: Run, rnd: int, updates: Mapping[str, np.ndarray], n: Mapping[str, int]
) -> RoundResult:
    """Submit every update of round ``rnd``, close it, return its result."""
    for p, u in updates.items():
        _submit(run.engine, p, rnd, n[p], u)
    run.engine.tick()
    result = run.results[-1]
    assert result.round == rnd and result.ok, result.reason
    return result


def _party(result: RoundResult, pid: str) -> PartyRound:
    return next(p for p in result.parties if p.party_id == pid)


def _with_norm(seed: int, norm: float) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(SIZE)
    return (norm * v / np.linalg.norm(v)).astype(np.float32)


def _oracle(
    theta: np.ndarray,
    updates: Mapping[str, np.ndarray],
    n: Mapping[str, int],
    factor: float = 2.0,
) -> tuple[np.ndarray, float, dict[str, float]]:
    """theta - eta * sum_i p_i c_i u_i in float64, with B = k x median norm."""
    u64 = {p: u.astype(np.float64) for p, u in updates.items()}
    norms = {p: float(np.linalg.norm(u)) for p, u in u64.items()}
    bound = factor * statistics.median(x for x in norms.values() if x > 0)
    clip = {p: min(1.0, bound / x) if x > 0 else 1.0 for p, x in norms.items()}
    total = sum(n.values())
    step = sum((n[p] / total) * clip[p] * u64[p] for p in u64)
    return theta.astype(np.float64) - LR * step, bound, clip


N3 = {"a": 2, "b": 2, "c": 4}


# ------------------------------------------------------------------- pure rules
def test_bounds_auto_is_factor_times_median_of_nonzero_norms() -> None:
    norms = {"a": 1.0, "free": 0.0, "b": 3.0, "c": 2.0, "z": 0.0}

    bound = bounds.round_bound(norms, "auto", 2.0)

    # Zeros left out: median of (1, 2, 3) is 2; with them it would be 1.
    assert bound == 4.0
    assert bounds.round_bound({"a": 1.0, "b": 3.0}, "auto", 1.5) == 3.0
    assert bounds.round_bound({"a": 1.0, "n": math.nan, "i": math.inf}, "auto", 2) == 2


def test_bounds_auto_without_nonzero_norms_is_unbounded() -> None:
    assert bounds.round_bound({}, "auto", 2.0) == math.inf
    assert bounds.round_bound({"a": 0.0, "b": 0.0}, "auto", 2.0) == math.inf


def test_bounds_fixed_and_off_ignore_the_norms() -> None:
    norms = {"a": 1.0, "b": 100.0}

    assert bounds.round_bound(norms, "0.25", 2.0) == 0.25
    assert bounds.round_bound(norms, " 3 ", 2.0) == 3.0
    assert bounds.round_bound(norms, "off", 2.0) == math.inf
    assert bounds.round_bound(norms, "OFF", 2.0) == math.inf
    assert bounds.round_bound(norms, "Auto", 2.0) == 101.0


def test_bounds_parse_norm_bound() -> None:
    assert parse_norm_bound("auto") is None
    assert parse_norm_bound("off") == math.inf
    assert parse_norm_bound("1e-3") == 0.001


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "norm bound must be auto, off or a positive number, got 'abc'"),
        ("", "norm bound must be auto, off or a positive number, got ''"),
        ("0", "norm bound must be a positive finite number, got '0'"),
        ("-1", "norm bound must be a positive finite number, got '-1'"),
        ("nan", "norm bound must be a positive finite number, got 'nan'"),
        ("inf", "norm bound must be a positive finite number, got 'inf'"),
    ],
)
def test_bounds_bad_spec_is_refused_with_message(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        parse_norm_bound(spec)
    with pytest.raises(ValueError, match=f"^{message}$"):
        bounds.round_bound({"a": 1.0}, spec, 2.0)
    with pytest.raises(ConfigError, match=f"^{message}$"):
        RoundConfig(norm_bound=spec)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"norm_bound_factor": 0.5}, "norm_bound_factor must be in \\[1, 1e6\\)"),
        ({"norm_bound_factor": math.nan}, "norm_bound_factor must be in"),
        ({"claim_cap": 0.5}, "claim_cap must be 0 \\(off\\) or in \\[1, 1e6\\)"),
        ({"claim_cap": -1.0}, "claim_cap must be 0 \\(off\\)"),
    ],
)
def test_bounds_bad_factors_are_config_errors(
    kw: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RoundConfig(**kw)  # type: ignore[arg-type]


def test_bounds_clip_factor() -> None:
    assert bounds.clip_factor(4.0, 2.0) == 0.5
    assert bounds.clip_factor(2.0, 2.0) == 1.0
    assert bounds.clip_factor(1.0, 2.0) == 1.0
    assert bounds.clip_factor(0.0, 0.0) == 1.0
    assert bounds.clip_factor(1e30, math.inf) == 1.0


def test_bounds_early_fold_limit() -> None:
    assert bounds.early_fold_limit(math.inf, "auto") == 0.0  # round 0: all wait
    assert bounds.early_fold_limit(4.0, "auto") == 4.0
    assert bounds.early_fold_limit(4.0, "1.5") == 1.5
    assert bounds.early_fold_limit(4.0, "off") == math.inf


def test_bounds_count_caps_use_the_other_parties_median_and_weight_count() -> None:
    claims = {"a": 10, "b": 10, "c": 1000}

    caps, late = bounds.count_caps(claims, 2.0)

    # Each party's cap is 2 x the median of the *others'* claims.
    assert caps == {"a": 1010, "b": 1010, "c": 20}
    assert late == 20  # a party joining later: 2 x the median of every claim
    # Two parties: the inflated claim cannot lift its own cap.
    assert bounds.count_caps({"a": 10, "b": 1000}, 1.25)[0] == {"a": 1250, "b": 12}
    assert bounds.count_caps({"a": 1}, 1.5) == ({}, 1)  # alone: no cap of its own
    assert bounds.count_caps(claims, 0.0) == ({}, None)
    assert bounds.count_caps({}, 2.0) == ({}, None)
    assert bounds.weight_count(1000, caps["c"], attested=False) == 20
    assert bounds.weight_count(1000, caps["c"], attested=True) == 1000
    assert bounds.weight_count(10, caps["a"], attested=False) == 10
    assert bounds.weight_count(1000, None, attested=False) == 1000


# ------------------------------------------------------------- norm bound, engine
def test_bounds_scaled_update_is_clipped_in_round_0() -> None:
    updates = {"a": _with_norm(1, 1.0), "b": _with_norm(2, 1.5)}
    updates["c"] = 50 * _with_norm(3, 1.25)
    bounded = _run(N3)
    unbounded = _run(N3, norm_bound="off")

    r = _round(bounded, 0, updates, N3)
    free = _round(unbounded, 0, updates, N3)

    expected, bound, clip = _oracle(THETA_0, updates, N3)
    c = _party(r, "c")
    assert bound == pytest.approx(3.0)  # 2 x median(1, 1.5, 62.5)
    assert c.norm_bound == pytest.approx(bound, rel=1e-6)
    assert c.clip == pytest.approx(bound / np.linalg.norm(updates["c"]), rel=1e-6)
    assert c.clip == pytest.approx(clip["c"], rel=1e-6)
    assert c.bounded
    assert [
        (p.party_id, p.clip, p.bounded) for p in r.parties if p.party_id != "c"
    ] == [
        ("a", 1.0, False),
        ("b", 1.0, False),
    ]
    assert all(p.norm_bound == pytest.approx(bound) for p in r.parties)
    # The score sees the bounded update: c_i times the unbounded score.
    assert c.score == pytest.approx(c.clip * _party(free, "c").score, rel=1e-6)
    for p in ("a", "b"):
        assert _party(r, p).score == pytest.approx(_party(free, p).score, rel=1e-12)
        assert _party(r, p).weight == _party(free, p).weight
    assert c.weight == 0.5  # the clip scales the update, not the weight
    np.testing.assert_allclose(bounded.commits[0][1], expected, rtol=1e-6, atol=1e-7)


def test_bounds_early_folded_update_over_the_bound_is_corrected() -> None:
    run = _run(N3)
    r0 = {p: _with_norm(i, 1.0) for i, p in enumerate(N3)}  # B_0 = 2: limit 2 next
    _round(run, 0, r0, N3)
    theta1 = run.commits[0][1]
    r1 = {"a": _with_norm(4, 0.2), "b": _with_norm(5, 0.25), "c": _with_norm(6, 0.9)}
    for p, u in r1.items():
        _submit(run.engine, p, 1, N3[p], u)
    rnd = run.engine._round
    assert rnd is not None
    assert rnd.fold_limit == pytest.approx(2.0, rel=1e-6)
    assert all(e.folded for e in rnd.accepted.values())  # all under the limit

    run.engine.tick()

    res = run.results[-1]
    expected, bound, clip = _oracle(theta1, r1, N3)
    assert bound == pytest.approx(0.5)  # 2 x 0.25, below c's early-folded 0.9
    assert _party(res, "c").clip == pytest.approx(0.5 / 0.9, rel=1e-6)
    assert _party(res, "c").clip == pytest.approx(clip["c"], rel=1e-6)
    np.testing.assert_allclose(run.commits[1][1], expected, rtol=1e-6, atol=1e-7)


def test_bounds_oracle_over_rounds_with_varying_scales() -> None:
    rounds = 4
    run = _run(N3, rounds=rounds)
    scales = [
        {"a": 1.0, "b": 2.0, "c": 100.0},  # c bounded, deferred (round 0): B = 4
        {"a": 0.0, "b": 0.25, "c": 0.3},  # a free rider; all early; B = 0.55
        {"a": 3.0, "b": 0.1, "c": 0.2},  # a over the limit, bounded at the close
        {"a": 0.05, "b": 0.06, "c": 0.19},  # c early-folded (<= 0.2), corrected
    ]
    # Folded on arrival: under the last bound (none in round 0).
    early = [set(), {"a", "b", "c"}, {"b", "c"}, {"a", "b", "c"}]
    theta = THETA_0.astype(np.float64)
    folded = []

    for t, norms in enumerate(scales):
        updates = {
            p: _with_norm(10 * t + i, x) for i, (p, x) in enumerate(norms.items())
        }
        for p, u in updates.items():
            _submit(run.engine, p, t, N3[p], u)
        rnd = run.engine._round
        assert rnd is not None
        folded.append({p for p, e in rnd.accepted.items() if e.folded})
        run.engine.tick()
        res = run.results[-1]

        expected, bound, clip = _oracle(theta.astype(np.float32), updates, N3)
        for p in N3:
            assert _party(res, p).clip == pytest.approx(clip[p], rel=1e-6), (t, p)
            assert _party(res, p).norm_bound == pytest.approx(bound, rel=1e-6)
        np.testing.assert_allclose(run.commits[t][1], expected, rtol=1e-5, atol=1e-6)
        theta = run.commits[t][1].astype(np.float64)

    bounded = {
        (r.round, p.party_id) for r in run.results for p in r.parties if p.bounded
    }
    assert bounded == {(0, "c"), (2, "a"), (3, "c")}
    assert folded == early
    assert run.engine.state == RunState.DONE


def test_bounds_off_reproduces_the_unbounded_step_exactly() -> None:
    # Dyadic values and counts summing to 8: the float32 step is exact.
    updates = {
        "a": np.array([1, -2, 3, 0.5, 0, 1, 2, -1, 0.25], dtype=np.float32),
        "b": np.array([0, 1, -1, 2, 0.5, -0.5, 1, 1, 1], dtype=np.float32),
        "c": 64 * np.array([-1, 0, 0.25, 1, 2, 0, -2, 0.5, 3], dtype=np.float32),
    }
    run = _run(N3, norm_bound="off")

    res = _round(run, 0, updates, N3)

    step = sum((N3[p] / 8) * u.astype(np.float64) for p, u in updates.items())
    np.testing.assert_array_equal(run.commits[0][1], THETA_0 - LR * step)
    assert [(p.clip, p.norm_bound) for p in res.parties] == [(1.0, math.inf)] * 3
    v0 = THETA_0.astype(np.float64) - THETA_STAR
    for p, u in updates.items():
        assert _party(res, p).score == LR * (N3[p] / 8) * float(v0 @ u)


def test_bounds_fixed_value_bounds_every_round() -> None:
    run = _run(N3, rounds=2, norm_bound="1.5")
    theta = THETA_0
    scales: list[dict[str, float]] = [
        {"a": 1.0, "b": 3.0, "c": 1.5},
        {"a": 6.0, "b": 1.0, "c": 2.0},
    ]

    for t, norms in enumerate(scales):
        updates = {
            p: _with_norm(t * 3 + i, x) for i, (p, x) in enumerate(norms.items())
        }
        res = _round(run, t, updates, N3)

        total = sum(N3.values())
        step = np.zeros(SIZE)
        for p, u in updates.items():
            c = min(1.0, 1.5 / float(np.linalg.norm(u.astype(np.float64))))
            assert _party(res, p).clip == pytest.approx(c, rel=1e-6)
            assert _party(res, p).norm_bound == 1.5
            step += (N3[p] / total) * c * u.astype(np.float64)
        expected = theta.astype(np.float64) - LR * step
        np.testing.assert_allclose(run.commits[t][1], expected, rtol=1e-6, atol=1e-7)
        theta = run.commits[t][1]

    assert [p.party_id for r in run.results for p in r.parties if p.bounded] == [
        "b",
        "a",
        "c",
    ]


# --------------------------------------------------------------------- claim cap
def test_bounds_claim_of_100x_weighs_at_most_cap_times_median() -> None:
    n = {"a": 10, "b": 10, "c": 1000}
    updates = {p: _with_norm(i, 1.0) for i, p in enumerate(n)}
    run = _run(n, claim_cap=2.0)

    res = _round(run, 0, updates, n)

    c = _party(res, "c")
    assert (c.num_samples, c.weight_samples) == (1000, 20)  # 2 x median 10
    assert c.weight == pytest.approx(20 / 40)
    assert c.weight <= 2.0 * _party(res, "a").weight
    assert [_party(res, p).weight_samples for p in ("a", "b")] == [10, 10]
    capped = {"a": 10, "b": 10, "c": 20}
    expected, _, _ = _oracle(THETA_0, updates, capped)
    np.testing.assert_allclose(run.commits[0][1], expected, rtol=1e-6, atol=1e-7)


def test_bounds_attested_party_is_not_capped() -> None:
    n = {"a": 10, "b": 10, "c": 1000}
    updates = {p: _with_norm(i, 1.0) for i, p in enumerate(n)}
    run = _run(n, attested={"c": 1000}, claim_cap=2.0)

    res = _round(run, 0, updates, n)

    c = _party(res, "c")
    assert (c.num_samples, c.weight_samples) == (1000, 1000)
    assert c.weight == pytest.approx(1000 / 1020)
    expected, _, _ = _oracle(THETA_0, updates, n)
    np.testing.assert_allclose(run.commits[0][1], expected, rtol=1e-6, atol=1e-7)


def test_bounds_claim_cap_off_keeps_the_claim() -> None:
    n = {"a": 10, "b": 10, "c": 1000}
    updates = {p: _with_norm(i, 1.0) for i, p in enumerate(n)}
    run = _run(n, claim_cap=0.0)

    res = _round(run, 0, updates, n)

    assert _party(res, "c").weight_samples == 1000
    assert _party(res, "c").weight == pytest.approx(1000 / 1020)


# ------------------------------------------------------------------ party table
def _table() -> PartyTable:
    table = PartyTable(max_parties=4, clock=FakeClock(), max_samples=1000)
    table.join("a", 10)
    table.join("b", 20, attested=50)
    return table


def _snapshot(table: PartyTable) -> tuple[Any, ...]:
    return (table.claims(), table.attested(), table.ids(), len(table))


def test_bounds_party_table_refuses_over_the_ceiling() -> None:
    table = _table()
    before = _snapshot(table)

    with pytest.raises(
        InvalidUpdateError, match=r"^party c claims 1001 samples; the most"
    ):
        table.join("c", 1001)

    assert _snapshot(table) == before
    assert table.get("c") is None
    table.join("c", 1000)  # the ceiling itself is allowed
    assert table.claims()["c"] == 1000


def test_bounds_party_table_refuses_over_the_attested_count() -> None:
    table = _table()
    before = _snapshot(table)

    with pytest.raises(
        InvalidUpdateError,
        match=r"^party c claims 60 samples; the parties file attests at most 50$",
    ):
        table.join("c", 60, attested=50)

    assert _snapshot(table) == before
    assert table.join("c", 50, attested=50)
    assert table.attested()["c"] == 50


def test_bounds_party_table_refuses_a_changed_count() -> None:
    table = _table()
    before = _snapshot(table)

    with pytest.raises(
        PreconditionError, match=r"^party a joined with 10 samples and now claims 11;"
    ):
        table.join("a", 11)
    with pytest.raises(PreconditionError, match="party b joined with 20 samples"):
        table.join("b", 30, attested=50)

    assert _snapshot(table) == before
    assert table.join("a", 10) is False  # the same count re-joins


def test_bounds_engine_refused_join_changes_nothing() -> None:
    run = _run({"a": 10, "b": 10}, claim_cap=2.0)
    rnd = run.engine._round
    assert rnd is not None
    cap, ref = rnd.count_caps, rnd.weight_ref

    with pytest.raises(InvalidUpdateError, match="attests at most 5"):
        run.engine.join("c", 6, attested=5)
    with pytest.raises(PreconditionError, match="joined with 10 samples"):
        run.engine.join("a", 1000)

    assert run.engine.parties.claims() == {"a": 10, "b": 10}
    assert run.joins == [("a", 10), ("b", 10)]
    assert (rnd.count_caps, rnd.weight_ref) == (cap, ref) == ({"a": 20, "b": 20}, 20.0)


# ------------------------------------------------------- deferred folds, spill
def test_bounds_refused_second_upload_does_not_replace_the_deferred_update() -> None:
    # Round 0 under auto: every update waits in the spill for B_0. A second upload
    # of party a (another submission id, started before the first finished) is
    # refused; the update folded at the close must still be the accepted one.
    run = _run(N3)
    small = _with_norm(1, 1.0)
    huge = 1000 * _with_norm(2, 1.0)
    updates = {"a": small, "b": _with_norm(3, 1.0), "c": _with_norm(4, 1.0)}
    first = run.engine.begin_submission("a", 0, 2, submission_id="a-1")
    second = run.engine.begin_submission("a", 0, 2, submission_id="a-2")
    for sub, flat in ((first, small), (second, huge)):
        for i, off in enumerate(run.engine.layout.offsets):
            sub.add(i, 0, flat[off : off + run.engine.layout.specs[i].numel])

    assert first.finish(update_digest(small)).accepted
    with pytest.raises(DuplicateSubmissionError, match="a different update"):
        second.finish(update_digest(huge))
    for p in ("b", "c"):
        _submit(run.engine, p, 0, N3[p], updates[p])
    run.engine.tick()

    res = run.results[-1]
    expected, _, clip = _oracle(THETA_0, updates, N3)
    assert _party(res, "a").clip == pytest.approx(clip["a"])
    np.testing.assert_allclose(run.commits[0][1], expected, rtol=1e-6, atol=1e-7)
