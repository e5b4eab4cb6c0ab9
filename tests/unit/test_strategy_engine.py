"""Strategies in the engine: the applied step, its scoring, client sampling, FedBuff,
resume with optimiser state, and the ledger's contributions under them.

The engine tests' quadratic problem: L(theta) = 0.5 ||theta - theta*||^2, so
v_t = theta_t - theta* and every identity below is checked on what was committed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]  # (scikit-learn's dependency)

from fedgrpc.config import RoundConfig
from fedgrpc.engine import RoundEngine
from fedgrpc.engine.uploads import Resend
from fedgrpc.errors import ConfigError, DuplicateSubmissionError, StaleRoundError
from fedgrpc.layout import update_digest
from fedgrpc.store.ledger import Ledger
from fedgrpc.strategies import SGD, Strategy, Uniform
from fedgrpc.types import PartyRound, RoundOutcome, RoundResult, RunState
from tests.unit.test_engine import (
    LR,
    SIZE,
    SPECS,
    THETA_0,
    THETA_STAR,
    TIMEOUT_S,
    FakeClock,
    QuadraticValidator,
    Run,
    _active,
    _cfg,
    _run,
    _submit,
)
from tests.unit.test_server_optimisers import Reference

N5 = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 6}
RULES = ("samples", "uniform", "median", "trimmed-mean", "krum", "fltrust", "digfl")
OPTIMISERS = ("sgd", "avgm", "adagrad", "adam", "yogi")
STRATEGIES = [
    (r, o) for r in RULES for o in OPTIMISERS if not (r == "digfl" and o != "sgd")
]


def _update(party: str, t: int, theta: np.ndarray, base: int = 0) -> np.ndarray:
    """A deterministic gradient-like update: the descent direction plus party noise."""
    k = ord(party[0]) - ord("a")
    rng = np.random.default_rng([base, k, t])
    noise = rng.normal(scale=0.5, size=SIZE)
    g = (theta.astype(np.float64) - THETA_STAR) * (1.0 + 0.25 * k) + noise
    return g.astype(np.float32)


def _drop(theta_t: np.ndarray, theta_next: np.ndarray) -> float:
    """<v_t, theta_t - theta_{t+1}> in float64 of the committed float32 vectors."""
    v = theta_t.astype(np.float64) - THETA_STAR
    return float(v @ (theta_t.astype(np.float64) - theta_next.astype(np.float64)))


def _score_sum(result: RoundResult) -> float:
    return sum(p.score for p in result.parties) + sum(result.carry.values())


def _assert_scores_add_up(run: Run, theta_0: np.ndarray = THETA_0) -> None:
    theta = theta_0
    for result, theta_next in run.commits:
        if not result.ok:
            continue
        drop = _drop(theta, theta_next)
        scale = 1e-6 * (1.0 + sum(abs(p.score) for p in result.parties))
        assert _score_sum(result) == pytest.approx(drop, abs=scale), result.round
        assert result.predicted_drop == pytest.approx(drop, abs=scale)
        theta = theta_next


# ---------------------------------------------------------------- oracles


def _oracle_aggregate(
    aggregation: str,
    xs: Mapping[str, np.ndarray],
    n: Mapping[str, int],
    v: np.ndarray,
    cfg: RoundConfig,
) -> np.ndarray:
    """The rule's aggregate of the (already scaled) updates, from NumPy / SciPy."""
    ids = sorted(xs)
    x = np.stack([xs[p].astype(np.float64) for p in ids])  # (n, d)
    if aggregation in ("samples", "digfl"):
        w = np.array([n[p] for p in ids], np.float64)
        return np.asarray((w / w.sum()) @ x)
    if aggregation == "uniform":
        return np.asarray(x.mean(axis=0))
    if aggregation == "median":
        return np.asarray(np.median(x, axis=0))
    if aggregation == "trimmed-mean":
        return np.asarray(stats.trim_mean(x, cfg.trim_beta, axis=0))
    if aggregation == "krum":
        k = len(ids) - cfg.krum_f - 2
        scores: list[tuple[float, str]] = []
        for i in range(len(ids)):
            d = sorted(
                float(((x[i] - x[j]) ** 2).sum()) for j in range(len(ids)) if j != i
            )
            scores.append((sum(d[:k]), ids[i]))
        chosen = [p for _, p in sorted(scores)[: cfg.krum_m or len(ids) - cfg.krum_f]]
        return np.asarray(np.mean([x[ids.index(p)] for p in chosen], axis=0))
    if aggregation == "fltrust":
        trust = []
        for i in range(len(ids)):
            cos = float(x[i] @ v) / (np.linalg.norm(x[i]) * np.linalg.norm(v))
            trust.append(max(0.0, float(cos)) * n[ids[i]])
        t = np.array(trust)
        return np.zeros(x.shape[1]) if t.sum() == 0 else np.asarray((t / t.sum()) @ x)
    raise AssertionError(aggregation)


def _reference(cfg: RoundConfig) -> Reference:
    from fedgrpc.strategies.registry import DEFAULT_OPT_LR

    lr = cfg.server_opt_lr or DEFAULT_OPT_LR.get(cfg.server_opt, 1.0)
    return Reference(
        cfg.server_opt, lr, cfg.server_beta1, cfg.server_beta2, cfg.server_tau, SIZE
    )


# ------------------------------------------------- every strategy, scored right


@pytest.mark.parametrize(("aggregation", "server_opt"), STRATEGIES)
def test_strategy_step_matches_oracle_and_scores_sum_to_the_drop(
    aggregation: str, server_opt: str
) -> None:
    kw: dict[str, Any] = {"aggregation": aggregation, "server_opt": server_opt}
    kw.update(rounds=4, min_parties=4 if aggregation == "krum" else 2)
    if server_opt != "sgd":
        kw.update(server_opt_lr=0.2, server_beta1=0.5, server_beta2=0.9)
    run = _run(N5, **kw)
    engine = run.engine
    ref = _reference(engine.cfg)

    for t in range(4):
        theta = engine.theta.copy()
        # Party e misses round 2 (deadline): its momentum, if any, is carried.
        present = [p for p in N5 if not (t == 2 and p == "e")]
        updates = {p: _update(p, t, theta) for p in present}
        for p in present:
            assert _submit(engine, p, t, N5[p], updates[p]).accepted
        if t == 2:
            run.clock.advance(TIMEOUT_S)
        engine.tick()
        result, theta_next = run.commits[-1]
        assert result.ok and result.round == t

        if aggregation != "digfl":  # digfl's own weights: test_engine.py
            v = theta.astype(np.float64) - THETA_STAR
            agg = _oracle_aggregate(aggregation, updates, N5, v, engine.cfg)
            m, scale = ref.step(LR * agg)
            want = theta.astype(np.float64) - scale * m
            np.testing.assert_allclose(theta_next, want, rtol=2e-4, atol=2e-6)
        if t == 2 and engine.strategy.optimiser.beta:
            assert list(result.carry) == ["e"], result.extra  # absent, has momentum
        else:
            assert result.carry == {}
        assert result.late == (("e",) if t == 2 else ())

    _assert_scores_add_up(run)
    assert engine.state == RunState.DONE
    weights = [sum(p.weight for p in r.parties) for r in run.results]
    if aggregation in ("samples", "uniform", "median", "trimmed-mean", "krum"):
        assert weights == pytest.approx([1.0] * 4)  # p_i, or L1 shares of the parts


def test_strategy_median_tied_parties_get_equal_scores() -> None:
    run = _run({"a": 1, "b": 5, "c": 2}, aggregation="median", rounds=2)
    same = np.linspace(-1, 1, SIZE).astype(np.float32)
    other = (same + 1.0).astype(np.float32)

    for p, u in (("a", same), ("b", same), ("c", other)):
        _submit(run.engine, p, 0, {"a": 1, "b": 5, "c": 2}[p], u)
    run.engine.tick()
    for p in "abc":
        _submit(run.engine, p, 1, {"a": 1, "b": 5, "c": 2}[p], same)
    run.engine.tick()

    first, second = run.results
    s = {p.party_id: p.score for p in first.parties}
    assert s["a"] == s["b"] != 0.0  # tied at the median: equal whatever the counts
    assert s["c"] == 0.0
    s2 = {p.party_id: p.score for p in second.parties}
    assert s2["a"] == s2["b"] == s2["c"]  # all equal: thirds
    assert [p.weight for p in second.parties] == pytest.approx([1 / 3] * 3)
    _assert_scores_add_up(run)


def test_strategy_custom_streaming_rule_is_scored_by_its_own_weights() -> None:
    clock, validator = FakeClock(), QuadraticValidator()
    run = Run(engine=None, clock=clock, validator=validator)  # type: ignore[arg-type]
    run.engine = RoundEngine(
        _cfg(rounds=1, aggregation="samples"),
        SPECS,
        THETA_0,
        validator,
        on_commit=run.on_commit,
        clock=clock,
        strategy=Strategy(Uniform(), SGD()),  # what a --strategy factory returns
    )
    run.engine.join("a", 1)
    run.engine.join("b", 3)
    run.engine.tick()

    for p, n in (("a", 1), ("b", 3)):
        _submit(run.engine, p, 0, n, _update(p, 0, THETA_0))
    run.engine.tick()

    assert [p.weight for p in run.results[0].parties] == [0.5, 0.5]
    _assert_scores_add_up(run)


# ------------------------------------------------------ momentum parts, sampling


def _drive(
    run: Run, rounds: Sequence[int], *, skip: Mapping[int, str] | None = None
) -> None:
    """Every asked party submits (but ``skip``'s party of a round); then close."""
    engine = run.engine
    for t in rounds:
        theta = engine.theta.copy()
        for p in engine.parties.ids():
            if engine.sampled(p, t) and (skip or {}).get(t) != p:
                _submit(engine, p, t, engine.parties.claims()[p], _update(p, t, theta))
        if skip and t in skip:
            run.clock.advance(TIMEOUT_S)
        engine.tick()
        assert run.results[-1].ok and run.results[-1].round == t


@pytest.mark.parametrize("server_opt", ["avgm", "adam"])
def test_strategy_party_momenta_under_sampling_match_oracle(server_opt: str) -> None:
    run = _run(
        N5,
        rounds=7,
        sample_count=2,
        server_opt=server_opt,
        server_opt_lr=0.5,
        server_beta1=0.5,
        seed=3,
    )
    ref = _reference(run.engine.cfg)
    gain = 1.0 if server_opt == "avgm" else 1.0 - 0.5
    moments: dict[str, np.ndarray] = {}

    _drive(run, range(7))

    theta = THETA_0.astype(np.float64)
    absent_seen = 0
    for result, theta_next in run.commits:
        asked = result.sampled
        assert asked is not None and len(asked) == 2
        assert sorted(p.party_id for p in result.parties) == list(asked)
        n = {p: N5[p] for p in asked}
        total = sum(n.values())
        parts = {
            p: LR * n[p] / total * _update(p, result.round, theta).astype(np.float64)
            for p in asked
        }
        m, scale = ref.step(np.sum(list(parts.values()), axis=0))
        v = theta - THETA_STAR
        for p in list(moments):
            moments[p] = 0.5 * moments[p]
        for p in asked:
            moments[p] = moments.get(p, np.zeros(SIZE)) + gain * parts[p]
        want = {p: float((scale * v) @ moments[p]) for p in moments}
        got = {p.party_id: p.score for p in result.parties}
        assert set(result.carry) == set(moments) - set(asked)
        got.update(result.carry)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
        np.testing.assert_allclose(theta_next, theta - scale * m, rtol=1e-4, atol=1e-6)
        absent_seen += len(result.carry)
        theta = theta_next.astype(np.float64)
    assert absent_seen > 0  # the subsets did leave someone's momentum behind
    _assert_scores_add_up(run)


def test_strategy_decayed_momentum_is_forgotten() -> None:
    # beta = 0.05: a party absent 5 rounds has 0.05^5 < 1e-6 of its share left.
    run = _run(
        {"a": 1, "b": 1, "c": 1},
        rounds=8,
        server_opt="avgm",
        server_beta1=0.05,
        min_parties=2,
    )
    _drive(run, range(1))
    assert set(run.engine.moments.vectors) == {"a", "b", "c"}

    _drive(run, range(1, 7), skip=dict.fromkeys(range(1, 7), "c"))

    carried = [("c" in r.carry) for r in run.results]
    assert carried == [False, True, True, True, True, True, False]
    assert set(run.engine.moments.vectors) == {"a", "b"}
    assert "pm:c" not in run.engine.strategy_state()
    _assert_scores_add_up(run)  # what was forgotten is below the tolerance


# ------------------------------------------------------------- client sampling


def _subsets(seed: int, order: Sequence[str], rounds: int = 4) -> list[frozenset[str]]:
    run = _run(dict.fromkeys(order, 2), rounds=rounds, sample_count=3, seed=seed)
    _drive(run, range(rounds))
    return [frozenset(r.sampled or ()) for r in run.results]


TEN = [f"p{i}" for i in range(10)]


def test_sampling_is_seeded_by_seed_and_joined_parties() -> None:
    first = _subsets(1, TEN)

    assert _subsets(1, TEN) == first
    assert _subsets(1, TEN[::-1]) == first  # join order does not matter
    assert _subsets(2, TEN) != first
    assert all(len(s) == 3 for s in first)
    assert len(set(first)) > 1  # a fresh subset each round


@pytest.mark.parametrize(
    ("parties", "kw", "want"),
    [
        (10, {"sample_fraction": 0.25}, 3),  # ceil(2.5)
        (10, {"sample_fraction": 0.3}, 3),
        (10, {"sample_fraction": 0.25, "sample_min": 5}, 5),
        (10, {"sample_fraction": 0.5, "sample_count": 4}, 4),  # count wins
        (10, {"sample_fraction": 0.1}, 2),  # never below min_parties
        (10, {"sample_count": 12}, 10),  # never above the joined
        (10, {"sample_fraction": 0.1, "min_parties": 3}, 3),
        (50, {"sample_fraction": 0.14}, 7),  # 0.14 * 50 = 7.000000000000001
        (100, {"sample_fraction": 0.55}, 55),  # 55.00000000000001
        (4, {"sample_fraction": 0.25, "sample_min": 1, "min_parties": 3}, 3),
    ],
)
def test_sampling_count_arithmetic(parties: int, kw: dict[str, Any], want: int) -> None:
    ids = [f"q{i:03d}" for i in range(parties)]
    run = _run(dict.fromkeys(ids, 1), **kw)

    asked = [p for p in ids if run.engine.sampled(p, 0)]

    assert len(asked) == want


def test_sampling_refuses_the_others_and_closes_on_the_asked() -> None:
    run = _run(dict.fromkeys(TEN, 2), rounds=2, sample_count=3, seed=5)
    engine = run.engine
    asked = [p for p in TEN if engine.sampled(p, 0)]
    idle = [p for p in TEN if p not in asked]
    assert len(asked) == 3

    with pytest.raises(
        StaleRoundError,
        match=rf"^party {idle[0]}, round 0: party {idle[0]} was not sampled for round "
        r"0 \(3 of 10 parties were\)",
    ):
        engine.begin_submission(idle[0], 0, 2)
    for p in asked[:2]:
        _submit(engine, p, 0, 2, _update(p, 0, THETA_0))
    engine.tick()
    assert engine.open_round == 0  # waits for the third asked party only
    _submit(engine, asked[2], 0, 2, _update(asked[2], 0, THETA_0))
    engine.tick()

    (result,) = run.results
    assert engine.open_round == 1
    assert result.late == ()
    assert result.sampled == tuple(sorted(asked))
    assert result.extra["sampled"] == sorted(asked)
    assert all(_active(engine, p) for p in TEN)
    assert not engine.sampled(asked[0], 5)  # a round not open


def test_sampling_late_is_an_asked_party_missing() -> None:
    run = _run(dict.fromkeys(TEN, 2), rounds=3, sample_count=3, seed=5)
    engine = run.engine
    asked = sorted(p for p in TEN if engine.sampled(p, 0))
    for p in asked[:2]:
        _submit(engine, p, 0, 2, _update(p, 0, THETA_0))
    run.clock.advance(TIMEOUT_S)

    engine.tick()

    (result,) = run.results
    assert result.ok
    assert result.late == (asked[2],)
    info = engine.parties.get(asked[2])
    assert info is not None and not info.active
    assert sum(1 for p in TEN if _active(engine, p)) == 9
    # Active parties are asked first: the late one is not asked while 9 others are.
    assert not engine.sampled(asked[2], 1)


def test_sampling_retry_draws_again_from_the_active() -> None:
    run = _run(dict.fromkeys(TEN, 2), rounds=2, sample_count=3, quorum_retries=1)
    engine = run.engine
    first = {p for p in TEN if engine.sampled(p, 0)}
    run.clock.advance(TIMEOUT_S)

    engine.tick()  # nobody submitted: failed, the asked are late, round 0 reopens

    failed = run.results[0]
    assert not failed.ok and set(failed.late) == first
    retry = {p for p in TEN if engine.sampled(p, 0)}
    assert len(retry) == 3 and not retry & first
    twin = _run(dict.fromkeys(TEN, 2), rounds=2, sample_count=3, quorum_retries=1)
    twin.clock.advance(TIMEOUT_S)
    twin.engine.tick()
    assert {p for p in TEN if twin.engine.sampled(p, 0)} == retry


# ------------------------------------------------------------------- FedBuff


def _fedbuff(**kw: Any) -> Run:
    cfg: dict[str, Any] = {
        "rounds": 6,
        "buffer_size": 2,
        "max_staleness": 2,
        "staleness_exponent": 0.5,
    }
    cfg.update(kw)
    return _run({"a": 1, "b": 3, "c": 4}, **cfg)


def test_fedbuff_steps_every_k_and_weights_stale_updates() -> None:
    run = _fedbuff()
    engine = run.engine
    u = {p: _update(p, 0, THETA_0) for p in "abc"}  # all trained on version 0

    _submit(engine, "a", 0, 1, u["a"])
    engine.tick()
    assert engine.open_round == 0  # 1 of K = 2
    _submit(engine, "b", 0, 3, u["b"])
    engine.tick()
    assert engine.open_round == 1
    theta_1 = run.commits[0][1]
    np.testing.assert_allclose(
        theta_1, -LR * (0.25 * u["a"].astype(np.float64) + 0.75 * u["b"]), rtol=1e-6
    )
    assert run.results[0].late == ()  # c is still training, not late
    # c's update of version 0 arrives at version 1: tau = 1, factor 2^-0.5.
    a1 = _update("a", 1, theta_1)
    out = _submit(engine, "c", 0, 4, u["c"], submission_id="c-v0")
    assert out.accepted
    _submit(engine, "a", 1, 1, a1)
    engine.tick()

    result, theta_2 = run.commits[1]
    s = 2.0**-0.5
    p_a, p_c = 1 / 5, 4 / 5
    step = LR * (p_a * a1.astype(np.float64) + p_c * s * u["c"])
    np.testing.assert_allclose(theta_2, theta_1 - step, rtol=1e-5, atol=1e-7)
    v_1 = theta_1.astype(np.float64) - THETA_STAR  # the open version's v
    rows = {p.party_id: p for p in result.parties}
    assert rows["c"].score == pytest.approx(
        LR * p_c * s * float(v_1 @ u["c"]), rel=1e-5
    )
    assert rows["c"].dot == pytest.approx(float(v_1 @ u["c"]), rel=1e-5)
    assert rows["c"].weight == pytest.approx(p_c * s)
    assert result.extra["staleness"] == {"c": 1}
    assert result.late == ()
    _assert_scores_add_up(run)
    # c's resend after the close still gets its OK (keyed by the version it names).
    again = _submit(engine, "c", 0, 4, u["c"], submission_id="c-v0")
    assert again.accepted and again.duplicate


def test_fedbuff_staleness_limit() -> None:
    run = _fedbuff()
    engine = run.engine
    for t in range(3):  # a and b move the model to version 3; c keeps version 0
        theta = engine.theta.copy()
        for p, n in (("a", 1), ("b", 3)):
            _submit(engine, p, t, n, _update(p, t, theta))
        engine.tick()
    assert engine.open_round == 3

    with pytest.raises(
        StaleRoundError,
        match=r"^party c, round 0: past round \(more than --max-staleness 2 versions "
        r"old\); open round is 3$",
    ):
        engine.begin_submission("c", 0, 4)
    with pytest.raises(StaleRoundError, match="future round; open round is 3"):
        engine.begin_submission("c", 4, 4)
    # tau = 2 = max_staleness is taken, with factor 3^-0.5.
    theta_3 = engine.theta.copy()
    c1 = _update("c", 1, THETA_0)
    _submit(engine, "c", 1, 4, c1)
    a3 = _update("a", 3, theta_3)
    _submit(engine, "a", 3, 1, a3)
    engine.tick()

    result, theta_4 = run.commits[-1]
    assert result.extra["staleness"] == {"c": 2}
    step = LR * (0.2 * a3.astype(np.float64) + 0.8 * 3.0**-0.5 * c1)
    np.testing.assert_allclose(theta_4, theta_3 - step, rtol=1e-5, atol=1e-7)
    assert all(_active(engine, p) for p in "abc")
    assert all(r.late == () for r in run.results)
    _assert_scores_add_up(run)


def test_fedbuff_upload_streaming_across_a_close_counts_in_the_next_version() -> None:
    run = _fedbuff()
    engine = run.engine
    u_c = _update("c", 0, THETA_0)
    sub = engine.begin_submission("c", 0, 4, submission_id="c-0", slot_timeout_s=1.0)
    assert not isinstance(sub, Resend)
    for i, off in enumerate(engine.layout.offsets):
        sub.add(i, 0, u_c[off : off + engine.layout.specs[i].numel])
    for p, n in (("a", 1), ("b", 3)):  # version 0 fills its buffer meanwhile
        _submit(engine, p, 0, n, _update(p, 0, THETA_0))
    engine.tick()
    assert engine.open_round == 1

    out = sub.finish(update_digest(u_c))

    assert out.accepted
    theta_1 = run.commits[0][1]
    a1 = _update("a", 1, theta_1)
    _submit(engine, "a", 1, 1, a1)
    engine.tick()
    result, theta_2 = run.commits[1]
    v_1 = theta_1.astype(np.float64) - THETA_STAR
    row = {p.party_id: p for p in result.parties}["c"]
    assert row.dot == pytest.approx(float(v_1 @ u_c), rel=1e-5)  # v of version 1
    assert row.dot != pytest.approx(float(-THETA_STAR @ u_c), rel=1e-3)
    assert result.extra["staleness"] == {"c": 1}
    step = LR * (0.2 * a1.astype(np.float64) + 0.8 * 2.0**-0.5 * u_c)
    np.testing.assert_allclose(theta_2, theta_1 - step, rtol=1e-5, atol=1e-7)
    _assert_scores_add_up(run)
    again = _submit(engine, "c", 0, 4, u_c, submission_id="c-0")
    assert again.accepted and again.duplicate


def test_fedbuff_one_update_per_party_per_version() -> None:
    run = _fedbuff(buffer_size=3)
    _submit(run.engine, "a", 0, 1, _update("a", 0, THETA_0), submission_id="x")

    with pytest.raises(DuplicateSubmissionError, match="already accepted"):
        _submit(run.engine, "a", 0, 1, _update("a", 1, THETA_0), submission_id="y")


def test_fedbuff_with_median_and_adam_scales_the_stale_update() -> None:
    parties = {"a": 1, "b": 2, "c": 3, "d": 4}
    run = _run(
        parties,
        rounds=3,
        buffer_size=3,
        max_staleness=3,
        staleness_exponent=1.0,
        aggregation="median",
        server_opt="adam",
        server_opt_lr=0.1,
    )
    engine = run.engine
    ref = _reference(engine.cfg)
    u0 = {p: _update(p, 0, THETA_0) for p in parties}
    for p in "abc":
        _submit(engine, p, 0, parties[p], u0[p])
    engine.tick()
    theta_1 = run.commits[0][1]
    m, scale = ref.step(LR * np.median(np.stack([u0[p] for p in "abc"]), axis=0))
    np.testing.assert_allclose(theta_1, -scale * m, rtol=1e-4, atol=1e-6)

    u1 = {p: _update(p, 1, theta_1) for p in "ab"}
    for p in "ab":
        _submit(engine, p, 1, parties[p], u1[p])
    _submit(engine, "d", 0, 4, u0["d"])  # tau = 1, factor 1/2
    engine.tick()

    result, theta_2 = run.commits[1]
    blk = np.stack([u1["a"], u1["b"], 0.5 * u0["d"].astype(np.float64)])
    m, scale = ref.step(LR * np.median(blk, axis=0))
    want = theta_1.astype(np.float64) - scale * m
    np.testing.assert_allclose(theta_2, want, rtol=1e-4, atol=1e-6)
    assert result.extra["staleness"] == {"d": 1}
    _assert_scores_add_up(run)


# ------------------------------------------------------------------- resume


def _engine_at(
    start_round: int, theta: np.ndarray, parties: Mapping[str, int], **kw: Any
) -> Run:
    clock, validator = FakeClock(), QuadraticValidator()
    run = Run(engine=None, clock=clock, validator=validator)  # type: ignore[arg-type]
    run.engine = RoundEngine(
        _cfg(**kw),
        SPECS,
        theta,
        validator,
        on_commit=run.on_commit,
        on_publish=run.on_publish,
        clock=clock,
        start_round=start_round,
    )
    return run


def _through_npz(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


RESUMED = [
    {"server_opt": "adam", "server_opt_lr": 0.1},
    {"server_opt": "avgm", "server_beta1": 0.7},
    {"server_opt": "avgm", "server_beta1": 0.7, "sample_count": 2, "seed": 4},
    {"server_opt": "yogi", "aggregation": "median", "server_opt_lr": 0.1},
]


@pytest.mark.parametrize("kw", RESUMED)
def test_resume_with_strategy_state_equals_uninterrupted(kw: dict[str, Any]) -> None:
    parties = {"a": 1, "b": 2, "c": 3, "d": 4}
    whole = _run(parties, rounds=4, **kw)
    _drive(whole, range(4))
    first = _run(parties, rounds=4, **kw)
    _drive(first, range(2))
    saved = _through_npz(first.engine.strategy_state())
    theta_2 = first.commits[-1][1]

    def resumed(state: Mapping[str, np.ndarray] | None) -> Run:
        run = _engine_at(2, theta_2, parties, rounds=4, **kw)
        if state is not None:
            run.engine.load_strategy_state(state)
        for p, n in parties.items():
            run.engine.join(p, n)
        run.engine.tick()
        _drive(run, range(2, 4))
        return run

    second = resumed(saved)

    np.testing.assert_array_equal(second.commits[-1][1], whole.commits[-1][1])
    for a, b in zip(second.results, whole.results[2:], strict=True):
        assert a.parties == b.parties
        assert a.extra == b.extra
    state = second.engine.strategy_state()
    for k, v in whole.engine.strategy_state().items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    if kw.get("sample_count"):
        assert any(r.carry for r in whole.results[2:])  # per-party momenta mattered
    # Without the state the resumed run differs: the test sees the state.
    cold = resumed(None)
    assert not np.array_equal(cold.commits[-1][1], whole.commits[-1][1])


# ----------------------------------------------------- failed step, state kept


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("server_opt", ["avgm", "adam"])
def test_failed_step_leaves_optimiser_state_unchanged(server_opt: str) -> None:
    parties = {"a": 1, "b": 1, "c": 1}
    kw: dict[str, Any] = {"rounds": 3, "server_opt": server_opt, "server_lr": 4.0}
    kw.update(quorum_retries=1, server_opt_lr=0.1)
    run = _run(parties, **kw)
    twin = _run(parties, **kw)  # never fails
    _drive(run, range(1))
    _drive(twin, range(1))
    before = run.engine.strategy_state()
    assert any(k.startswith("pm:") for k in before)  # the parties' momenta too
    # eta * p_i * max: the parts overflow float32, the step is not finite.
    huge = np.full(SIZE, np.finfo(np.float32).max, np.float32)
    for p in parties:
        _submit(run.engine, p, 1, 1, huge)

    run.engine.tick()

    failed = run.results[-1]
    assert not failed.ok and "the aggregated model is not finite" in failed.reason
    np.testing.assert_array_equal(run.engine.theta, twin.engine.theta)
    after = run.engine.strategy_state()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    # The retry continues exactly like the run that never failed.
    _drive(run, range(1, 3))
    _drive(twin, range(1, 3))
    np.testing.assert_array_equal(run.commits[-1][1], twin.commits[-1][1])
    assert [r.parties for r in run.results if r.ok] == [r.parties for r in twin.results]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_adaptive_overflow_never_freezes_the_model() -> None:
    run = _run({"a": 1, "b": 1}, rounds=3, server_opt="adam")
    big = np.full(SIZE, 1e20, np.float32)
    _submit(run.engine, "a", 0, 1, big)
    _submit(run.engine, "b", 0, 1, _update("b", 0, THETA_0))

    run.engine.tick()

    state = run.engine.strategy_state()
    assert not run.results[0].ok or np.isfinite(state["opt:v"]).all()


# ------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"aggregation": "digfl", "server_opt": "adam"},
            "--aggregation digfl reweights the plain step: it needs --server-opt sgd",
        ),
        (
            {"aggregation": "digfl", "buffer_size": 2},
            "and synchronous rounds (no --buffer-size)",
        ),
        (
            {"buffer_size": 4, "sample_fraction": 0.5},
            "--buffer-size (FedBuff) and client sampling do not combine",
        ),
        ({"buffer_size": 2, "sample_count": 2}, "do not combine"),
        ({"server_beta1": 1.0}, "--server-beta1 must be in [0, 1)"),
        ({"server_beta1": -0.5}, "--server-beta1 must be in [0, 1)"),
        ({"server_beta2": 1.0}, "--server-beta2 must be in [0, 1)"),
        ({"server_tau": 0.0}, "--server-tau must be > 0"),
        ({"server_tau": math.inf}, "--server-tau must be > 0"),
        ({"server_opt_lr": -1.0}, "--server-opt-lr must be a number >= 0"),
        ({"server_opt": "lamb"}, "--server-opt must be one of sgd, avgm, adagrad"),
        ({"trim_beta": 0.5}, "--trim-beta must be in [0, 0.5)"),
        ({"sample_fraction": 0.0}, "--sample-fraction must be in (0, 1]"),
        ({"sample_fraction": 1.5}, "--sample-fraction must be in (0, 1]"),
        ({"sample_count": 1}, "--sample-count 1 is below --min-parties 2"),
        ({"buffer_size": 1}, "--buffer-size 1 is below --min-parties 2"),
        ({"max_staleness": -1}, "--max-staleness must be >= 0"),
        ({"staleness_exponent": -0.5}, "--staleness-exponent must be >= 0"),
    ],
)
def test_config_strategy_settings_refused_naming_the_option(
    kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(**kw)


def test_config_sampling_and_buffered_flags() -> None:
    assert not _cfg().sampling and not _cfg().buffered
    assert _cfg(sample_fraction=0.5).sampling
    assert _cfg(sample_count=3).sampling
    assert _cfg(buffer_size=3).buffered


# ------------------------------------------------------------------- ledger


def _row(pid: str, score: float, score2: float = math.nan) -> PartyRound:
    return PartyRound(pid, 10, 0.5, score, 1.0, 1.0, 0.5, score2=score2)


def _result(
    t: int,
    rows: Sequence[PartyRound],
    *,
    sampled: Sequence[str] | None = None,
    carry: Mapping[str, float] | None = None,
    late: Sequence[str] = (),
    ok: bool = True,
) -> RoundResult:
    extra: dict[str, Any] = {}
    if sampled is not None:
        extra["sampled"] = list(sampled)
    if carry:
        extra["carry"] = dict(carry)
    return RoundResult(
        round=t,
        outcome=RoundOutcome.OK if ok else RoundOutcome.FAILED,
        reason="" if ok else "quorum",
        parties=tuple(rows),
        late=tuple(late),
        val_loss_before=2.0,
        val_acc_before=0.5,
        val_loss_after=1.5,
        val_acc_after=0.6,
        model_digest=f"m{t}",
        extra=extra,
    )


def test_ledger_contributions_with_carry_and_sampling(tmp_path: Path) -> None:
    rounds = [
        _result(0, [_row("a", 0.5, 0.4), _row("b", 0.25, 0.2)], sampled=["a", "b"]),
        _result(
            1,
            [_row("b", 0.125, 0.1), _row("c", -0.25, -0.2)],
            sampled=["b", "c"],
            carry={"a": 0.0625},
        ),
        _result(
            2,
            [_row("a", 0.5, 0.3)],
            sampled=["a", "c"],
            late=["c"],
            carry={"b": 0.03125, "d": 0.015625},
        ),
        _result(3, [], sampled=["a", "b"], ok=False),
    ]
    with Ledger(tmp_path / "ledger.sqlite") as led:
        led.start_run("r", {"rounds": 4}, "digest")
        for p in "abcd":
            led.upsert_party(p, 10)
        for r in rounds:
            led.record_round(r)

        got = led.rounds()
        one = {c.party_id: c for c in led.contributions().parties}
        two = {c.party_id: c for c in led.contributions(method="digfl-2").parties}

    assert got == rounds
    assert got[2].carry == {"b": 0.03125, "d": 0.015625}
    assert got[2].sampled == ("a", "c")
    assert got[2].predicted_drop == pytest.approx(0.5 + 0.03125 + 0.015625)
    assert got[2].residual("digfl-1") == pytest.approx(0.5 - 0.546875)
    a, b, c, d = (one[p] for p in "abcd")
    assert a.total == pytest.approx(0.5 + 0.0625 + 0.5)
    assert (a.carry, a.asked_rounds, a.participated) == (0.0625, 2, 2)
    assert a.per_participation == pytest.approx(1.0625 / 2)
    assert b.total == pytest.approx(0.25 + 0.125 + 0.03125)
    assert (b.carry, b.asked_rounds, b.participated) == (0.03125, 2, 2)
    assert (c.asked_rounds, c.participated) == (2, 1)  # asked in 1 and 2, late in 2
    assert c.per_participation == pytest.approx(-0.25)
    assert (d.total, d.carry, d.asked_rounds, d.participated) == (
        0.015625,
        0.015625,
        0,
        0,
    )
    assert math.isnan(d.per_participation)
    assert sum(x.total for x in one.values()) == pytest.approx(
        sum(r.predicted_drop for r in rounds if r.ok)
    )
    assert sum(x.share for x in one.values()) == pytest.approx(1.0)
    # digfl-2: the rows' second-order scores, plus the same carry.
    assert two["a"].total == pytest.approx(0.4 + 0.0625 + 0.3)
    assert two["b"].total == pytest.approx(0.2 + 0.1 + 0.03125)


def test_ledger_asked_without_sampling_is_submitted_or_late(tmp_path: Path) -> None:
    rounds = [
        _result(0, [_row("a", 0.5), _row("b", 0.25)], late=["c"]),
        _result(1, [_row("a", 0.5), _row("c", 0.25)]),
    ]
    with Ledger(tmp_path / "ledger.sqlite") as led:
        led.start_run("r", {"rounds": 2}, "digest")
        for r in rounds:
            led.record_round(r)

        got = {c.party_id: c for c in led.contributions().parties}

    assert {p: got[p].asked_rounds for p in "abc"} == {"a": 2, "b": 1, "c": 2}
    assert {p: got[p].participated for p in "abc"} == {"a": 2, "b": 1, "c": 1}
    assert got["a"].carry == 0.0


def test_fedbuff_refuses_replaying_an_accepted_update_under_a_new_id() -> None:
    run = _run(
        {"a": 1, "b": 1}, rounds=4, buffer_size=1, max_staleness=3, min_parties=1
    )
    u = _update("a", 0, THETA_0)
    assert _submit(run.engine, "a", 0, 1, u, submission_id="a-0").accepted
    run.engine.tick()
    assert run.engine.open_round == 1
    with pytest.raises(DuplicateSubmissionError, match="computed on version 0"):
        _submit(run.engine, "a", 0, 1, u, submission_id="a-replay-1")
    # The same id is a resend: its OK again, nothing counted twice.
    again = _submit(run.engine, "a", 0, 1, u, submission_id="a-0")
    assert again.accepted and again.duplicate
