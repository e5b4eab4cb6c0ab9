from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.engine import RoundEngine, submit_arrays
from fedgrpc.errors import (
    DuplicateSubmissionError,
    InvalidUpdateError,
    LimitError,
    PreconditionError,
    StaleRoundError,
    UnknownPartyError,
)
from fedgrpc.layout import FlatLayout, update_digest
from fedgrpc.types import RoundResult, RunState, SubmitOutcome, TensorSpec, UpdateKind

SPECS = (TensorSpec("w", "float32", (2, 3)), TensorSpec("b", "float32", (3,)))
SIZE = 9
# Dyadic values: every sum and product below is exact in float32, so the engine's
# theta can be compared with the float64 oracle bit for bit.
THETA_STAR = (np.arange(SIZE, dtype=np.float32) - 4.0) / 4.0
THETA_0 = np.zeros(SIZE, dtype=np.float32)
V_0 = THETA_0.astype(np.float64) - THETA_STAR  # validation gradient at theta_0
LR = 0.5
TIMEOUT_S = 10.0


class QuadraticValidator:
    """L(theta) = 0.5 ||theta - theta*||^2, gradient theta - theta*; accuracy -L."""

    def __init__(self, target: np.ndarray = THETA_STAR) -> None:
        self.target = target.astype(np.float64)
        self.gradient_at: list[np.ndarray] = []

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        self.gradient_at.append(flat.copy())
        d = flat.astype(np.float64) - self.target
        loss = 0.5 * float(d @ d)
        return d, loss, -loss

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        d = flat.astype(np.float64) - self.target
        loss = 0.5 * float(d @ d)
        return loss, -loss


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Run:
    engine: RoundEngine
    clock: FakeClock
    validator: QuadraticValidator
    events: list[tuple[str, Any]] = field(default_factory=list)
    published: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    commits: list[tuple[RoundResult, np.ndarray]] = field(default_factory=list)
    finished: list[tuple[RunState, str]] = field(default_factory=list)
    commit_hook: Callable[[RoundResult], None] | None = None  # runs inside on_commit

    def on_publish(self, round_index: int, theta: np.ndarray) -> None:
        self.events.append(("publish", round_index))
        self.published.append((round_index, theta, theta.copy()))

    def on_commit(self, result: RoundResult, theta: np.ndarray) -> None:
        if self.commit_hook is not None:
            self.commit_hook(result)
        self.events.append(("commit", result.round))
        self.commits.append((result, theta.copy()))  # the engine reuses the buffer

    def on_finish(self, state: RunState, reason: str) -> None:
        self.events.append(("finish", state))
        self.finished.append((state, reason))

    @property
    def results(self) -> list[RoundResult]:
        return [r for r, _ in self.commits]


def _cfg(**overrides: Any) -> RoundConfig:
    kw: dict[str, Any] = {
        "rounds": 3,
        "min_parties": 2,
        "server_lr": LR,
        "round_timeout_s": TIMEOUT_S,
        "join_timeout_s": 5.0,
        # The undefended arithmetic; test_bounds.py covers the bounds.
        "norm_bound": "off",
        "claim_cap": 0.0,
    }
    kw.update(overrides)
    return RoundConfig(**kw)


def _run(
    parties: Mapping[str, int] | None = None,
    *,
    start: bool = True,
    init: np.ndarray = THETA_0,
    max_in_flight: int = 4,
    theta_buffers: tuple[np.ndarray, np.ndarray] | None = None,
    **cfg: Any,
) -> Run:
    clock = FakeClock()
    validator = QuadraticValidator()
    run = Run(engine=None, clock=clock, validator=validator)  # type: ignore[arg-type]
    run.engine = RoundEngine(
        _cfg(**cfg),
        SPECS,
        init,
        validator,
        on_commit=run.on_commit,
        on_publish=run.on_publish,
        on_finish=run.on_finish,
        clock=clock,
        max_in_flight=max_in_flight,
        theta_buffers=theta_buffers,
    )
    for pid, n in (parties or {}).items():
        run.engine.join(pid, n)
    if start:
        run.engine.tick()
        assert run.engine.state == RunState.TRAINING
    return run


def _submit(
    engine: RoundEngine,
    party: str,
    round_index: int,
    num_samples: int,
    flat: np.ndarray,
    submission_id: str = "",
) -> SubmitOutcome:
    """Like submit_arrays, but never blocks forever on an upload slot."""
    flat = np.asarray(flat, dtype=np.float32)
    sub = engine.begin_submission(
        party, round_index, num_samples, submission_id=submission_id, slot_timeout_s=1.0
    )
    try:
        for i, off in enumerate(engine.layout.offsets):
            sub.add(i, 0, flat[off : off + engine.layout.specs[i].numel])
        return sub.finish(update_digest(flat))
    except BaseException:
        sub.abort()
        raise


def _expected(
    theta: np.ndarray,
    updates: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    step: float,
) -> np.ndarray:
    """Oracle: theta - step * sum_i w_i u_i in float64."""
    total = np.zeros(SIZE)
    for p, u in updates.items():
        total += weights[p] * u.astype(np.float64)
    return theta.astype(np.float64) - step * total


def _sample_weights(n: Mapping[str, int]) -> dict[str, float]:
    total = sum(n.values())
    return {p: k / total for p, k in n.items()}


def _state(engine: RoundEngine) -> RunState:
    """The engine's state, read through a call so mypy does not narrow it."""
    return engine.state


def _active(engine: RoundEngine, party: str) -> bool:
    info = engine.parties.get(party)
    assert info is not None, f"party {party} has not joined"
    return info.active


def _party(result: RoundResult, pid: str) -> Any:
    return next(p for p in result.parties if p.party_id == pid)


# Dyadic updates and sample counts summing to 8.
N3 = {"a": 1, "b": 3, "c": 4}
G3 = {
    "a": np.array([1, -2, 3, 0.5, 0, 1, 2, -1, 0.25], dtype=np.float32),
    "b": np.array([0, 1, -1, 2, 0.5, -0.5, 1, 1, 1], dtype=np.float32),
    "c": np.array([-1, 0, 0.25, 1, 2, 0, -2, 0.5, 3], dtype=np.float32),
}


def _submit_all(
    run: Run, updates: Mapping[str, np.ndarray], n: Mapping[str, int], rnd: int = 0
) -> None:
    for p, u in updates.items():
        outcome = _submit(run.engine, p, rnd, n[p], u)
        assert outcome.accepted
        assert not outcome.duplicate


# ------------------------------------------------------------------- start, joins


def test_engine_waits_for_start_parties_then_opens_round_0() -> None:
    run = _run(start=False, expected_parties=3)
    run.engine.join("a", 5)
    run.engine.join("b", 5)

    run.engine.tick()

    assert run.engine.state == RunState.WAITING
    assert run.published == []
    with pytest.raises(StaleRoundError, match="no round is open yet"):
        run.engine.begin_submission("a", 0, 5)

    run.engine.join("c", 5)
    run.engine.tick()

    assert _state(run.engine) == RunState.TRAINING
    assert run.engine.open_round == 0
    assert [(r, t.tolist()) for r, t, _ in run.published] == [(0, THETA_0.tolist())]
    np.testing.assert_array_equal(run.validator.gradient_at[0], THETA_0)


def test_engine_join_timeout_fails_naming_counts() -> None:
    run = _run({"a": 5}, start=False)
    run.clock.advance(4.9)
    run.engine.tick()
    assert run.engine.state == RunState.WAITING

    run.clock.advance(0.1)
    run.engine.tick()

    assert _state(run.engine) == RunState.FAILED
    assert run.engine.finished
    assert run.engine.reason == "only 1 of 2 parties joined within 5 s"
    assert run.finished == [(RunState.FAILED, run.engine.reason)]
    assert run.published == []


def test_engine_join_rejects_non_positive_samples() -> None:
    run = _run(start=False)

    with pytest.raises(
        InvalidUpdateError, match="party a declared 0 samples; need > 0"
    ):
        run.engine.join("a", 0)


def test_engine_on_join_called_for_new_party_only() -> None:
    joins: list[tuple[str, int]] = []
    engine = RoundEngine(
        _cfg(),
        SPECS,
        THETA_0,
        QuadraticValidator(),
        on_join=lambda p, n: joins.append((p, n)),
    )

    engine.join("a", 5)
    engine.join("a", 5)
    with pytest.raises(
        PreconditionError, match="joined with 5 samples and now claims 7"
    ):
        engine.join("a", 7)
    engine.join("b", 1)

    assert joins == [("a", 5), ("b", 1)]
    assert engine.parties.claims() == {"a": 5, "b": 1}


def test_engine_join_max_parties() -> None:
    engine = RoundEngine(_cfg(), SPECS, THETA_0, QuadraticValidator(), max_parties=1)
    engine.join("a", 1)
    engine.join("a", 1)  # re-joining is not a new party

    with pytest.raises(LimitError, match="party b cannot join: 1 parties already"):
        engine.join("b", 1)


def test_engine_init_is_copied() -> None:
    init = THETA_0.copy()
    run = _run({"a": 1, "b": 1}, init=init)

    init[:] = 99.0

    np.testing.assert_array_equal(run.engine.theta, THETA_0)


def test_engine_init_size_checked() -> None:
    with pytest.raises(
        InvalidUpdateError, match="initial model has 8 elements; specs need 9"
    ):
        RoundEngine(_cfg(), SPECS, np.zeros(8, np.float32), QuadraticValidator())


# ------------------------------------------------------------------- aggregation


def test_engine_round_closes_when_all_submitted_sample_weights_exact() -> None:
    run = _run(N3)
    _submit_all(run, dict(list(G3.items())[:2]), N3)
    run.engine.tick()
    assert run.engine.open_round == 0  # c is still missing
    assert run.engine.status().submitted == ("a", "b")

    _submit(run.engine, "c", 0, N3["c"], G3["c"])
    run.engine.tick()

    want = _expected(THETA_0, G3, _sample_weights(N3), LR)
    assert run.engine.open_round == 1
    np.testing.assert_array_equal(run.engine.theta, want)  # exact: dyadic inputs
    (result,) = run.results
    assert result.status == "ok"
    assert result.round == 0
    assert result.late == ()
    assert [p.party_id for p in result.parties] == ["a", "b", "c"]
    assert [p.weight for p in result.parties] == [1 / 8, 3 / 8, 4 / 8]
    assert [p.num_samples for p in result.parties] == [1, 3, 4]
    assert result.model_digest == update_digest(THETA_0)
    np.testing.assert_array_equal(run.commits[0][1], want)
    assert run.published[-1][0] == 1
    np.testing.assert_array_equal(run.published[-1][2], want)


def test_engine_sample_weights_random_values() -> None:
    rng = np.random.default_rng(0)
    n = {"a": 17, "b": 5, "c": 101}
    g = {p: rng.normal(size=SIZE).astype(np.float32) for p in n}
    init = rng.normal(size=SIZE).astype(np.float32)
    run = _run(n, init=init)

    _submit_all(run, g, n)
    run.engine.tick()

    want = _expected(init, g, _sample_weights(n), LR)
    np.testing.assert_allclose(run.engine.theta, want, rtol=1e-6, atol=1e-6)


def test_engine_delta_updates_skip_server_lr() -> None:
    run = _run(N3, update_kind=UpdateKind.DELTA)

    _submit_all(run, G3, N3)
    run.engine.tick()

    want = _expected(THETA_0, G3, _sample_weights(N3), 1.0)
    np.testing.assert_array_equal(run.engine.theta, want)
    (result,) = run.results
    for p in "abc":
        dot = float(V_0 @ G3[p].astype(np.float64))
        assert _party(result, p).score == pytest.approx(N3[p] / 8 * dot, rel=1e-12)


def test_engine_uniform_aggregation() -> None:
    run = _run(N3, aggregation="uniform")

    _submit_all(run, G3, N3)
    run.engine.tick()

    want = _expected(THETA_0, G3, dict.fromkeys(G3, 1 / 3), LR)
    np.testing.assert_allclose(run.engine.theta, want, rtol=1e-6, atol=1e-7)
    assert [p.weight for p in run.results[0].parties] == pytest.approx([1 / 3] * 3)


def test_engine_digfl_scores_and_signs() -> None:
    run = _run(N3)
    helpful, harmful = V_0.astype(np.float32), (-V_0).astype(np.float32)
    updates = {"a": helpful, "b": harmful, "c": G3["c"]}

    _submit_all(run, updates, N3)
    run.engine.tick()

    (result,) = run.results
    for p, u in updates.items():
        dot = float(V_0 @ u.astype(np.float64))
        got = _party(result, p)
        assert got.dot == pytest.approx(dot, rel=1e-12)
        assert got.score == pytest.approx(LR * N3[p] / 8 * dot, rel=1e-12)
        assert got.update_norm == pytest.approx(float(np.linalg.norm(u)), rel=1e-6)
    assert _party(result, "a").score > 0
    assert _party(result, "b").score < 0
    # First order: sum of scores = <v, step>; the quadratic's exact drop is
    # <v, step> - 0.5 ||step||^2.
    step = THETA_0.astype(np.float64) - run.engine.theta.astype(np.float64)
    assert result.predicted_drop == pytest.approx(float(V_0 @ step), rel=1e-9)
    assert result.measured_drop == pytest.approx(
        result.predicted_drop - 0.5 * float(step @ step), rel=1e-9
    )
    assert result.val_loss_before == pytest.approx(0.5 * float(V_0 @ V_0))


def test_engine_digfl_aggregation_weights_follow_positive_scores() -> None:
    run = _run(N3, aggregation="digfl", max_in_flight=1)
    v = V_0.astype(np.float32)
    updates: dict[str, np.ndarray] = {"a": v, "b": -v, "c": v / 2}

    _submit_all(run, updates, N3)
    run.engine.tick()

    # Pre-scores with p = n/8: a = eta/8 |v|^2, b < 0, c = eta/4 |v|^2 -> weights 1:0:2.
    weights = {"a": 1 / 3, "b": 0.0, "c": 2 / 3}
    (result,) = run.results
    assert [p.weight for p in result.parties] == pytest.approx(list(weights.values()))
    assert _party(result, "b").score == 0.0
    np.testing.assert_allclose(
        run.engine.theta, _expected(THETA_0, updates, weights, LR), rtol=1e-6, atol=1e-7
    )


def test_engine_digfl_aggregation_falls_back_to_sample_weights() -> None:
    run = _run(N3, aggregation="digfl")
    v = V_0.astype(np.float32)
    updates: dict[str, np.ndarray] = {
        "a": -v,
        "b": -v / 2,
        "c": np.zeros(SIZE, np.float32),
    }

    _submit_all(run, updates, N3)
    run.engine.tick()

    (result,) = run.results
    assert [p.weight for p in result.parties] == [1 / 8, 3 / 8, 4 / 8]
    np.testing.assert_allclose(
        run.engine.theta,
        _expected(THETA_0, updates, _sample_weights(N3), LR),
        rtol=1e-6,
        atol=1e-7,
    )


def test_engine_theta_follows_several_rounds() -> None:
    run = _run(N3, rounds=3)
    theta = THETA_0.astype(np.float64)

    for t in range(3):
        _submit_all(run, G3, N3, rnd=t)
        run.engine.tick()
        theta = _expected(theta, G3, _sample_weights(N3), LR)

    assert run.engine.state == RunState.DONE
    assert run.engine.rounds_done == 3
    np.testing.assert_array_equal(run.engine.theta, theta)
    np.testing.assert_array_equal(run.validator.gradient_at[2], run.commits[1][1])


# ---------------------------------------------------------------- deadlines, late


def test_engine_deadline_with_quorum_closes_and_marks_late() -> None:
    run = _run(N3)
    _submit_all(run, {"a": G3["a"], "b": G3["b"]}, N3)
    run.clock.advance(TIMEOUT_S - 0.5)
    run.engine.tick()
    assert run.engine.open_round == 0

    run.clock.advance(0.5)
    run.engine.tick()

    (result,) = run.results
    assert result.status == "ok"
    assert result.late == ("c",)
    assert result.duration_s == TIMEOUT_S
    assert run.engine.status().late == ("c",)
    assert not _active(run.engine, "c")
    assert _active(run.engine, "a")
    want = _expected(THETA_0, {p: G3[p] for p in "ab"}, {"a": 1 / 4, "b": 3 / 4}, LR)
    np.testing.assert_array_equal(run.engine.theta, want)
    # Round 1 no longer waits for c.
    _submit_all(run, {"a": G3["a"], "b": G3["b"]}, N3, rnd=1)
    run.engine.tick()
    assert run.engine.open_round == 2
    assert run.results[1].late == ("c",)


@pytest.mark.parametrize("revive", ["touch", "join", "submission"])
def test_engine_late_party_is_active_again(revive: str) -> None:
    run = _run(N3)
    _submit_all(run, {"a": G3["a"], "b": G3["b"]}, N3)
    run.clock.advance(TIMEOUT_S)
    run.engine.tick()
    assert not _active(run.engine, "c")

    if revive == "touch":
        run.engine.touch("c")
    elif revive == "join":
        run.engine.join("c", 4)
    else:
        sub = run.engine.begin_submission("c", 1, 4, slot_timeout_s=1.0)
    _submit_all(run, {"a": G3["a"], "b": G3["b"]}, N3, rnd=1)
    run.engine.tick()

    assert _active(run.engine, "c")
    assert run.engine.open_round == 1  # waits for c again
    if revive == "submission":
        sub.abort()
    _submit(run.engine, "c", 1, 4, G3["c"])
    run.engine.tick()
    assert run.engine.open_round == 2
    assert run.results[1].late == ()


def test_engine_deadline_without_quorum_fails_run() -> None:
    run = _run({"a": 1, "b": 1})
    _submit(run.engine, "a", 0, 1, G3["a"])
    run.clock.advance(TIMEOUT_S)

    run.engine.tick()

    (result,) = run.results
    assert result.status.startswith("failed")
    assert "round 0: 1 of 2 required submissions by the 10 s deadline" in result.status
    assert result.parties == ()
    assert result.late == ("b",)
    np.testing.assert_array_equal(run.commits[0][1], THETA_0)
    assert run.engine.state == RunState.FAILED
    assert run.engine.reason.startswith("quorum lost: round 0")
    assert run.finished == [(RunState.FAILED, run.engine.reason)]
    assert run.events == [("publish", 0), ("commit", 0), ("finish", RunState.FAILED)]
    np.testing.assert_array_equal(run.engine.theta, THETA_0)
    with pytest.raises(StaleRoundError, match=r"party b, round 0: the run failed"):
        run.engine.begin_submission("b", 0, 1)


def test_engine_quorum_retry_reopens_round() -> None:
    run = _run({"a": 1, "b": 1}, quorum_retries=1)
    _submit(run.engine, "a", 0, 1, G3["a"], submission_id="a-0")
    run.clock.advance(TIMEOUT_S)

    run.engine.tick()

    assert run.engine.state == RunState.TRAINING
    assert run.engine.open_round == 0
    assert [r for r, _, _ in run.published] == [0, 0]
    assert run.results[0].status.startswith("failed")
    assert run.results[0].extra == {"attempt": 0}
    assert run.engine.status().submitted == ()  # the failed attempt's update is dropped
    # Both submit again (a with the same id: the failed attempt is forgotten).
    outcome = _submit(run.engine, "a", 0, 1, G3["b"], submission_id="a-0")
    assert not outcome.duplicate
    _submit(run.engine, "b", 0, 1, G3["c"])
    run.engine.tick()
    assert run.results[1].status == "ok"
    want = _expected(THETA_0, {"a": G3["b"], "b": G3["c"]}, {"a": 0.5, "b": 0.5}, LR)
    np.testing.assert_array_equal(run.engine.theta, want)


def test_engine_quorum_retries_exhausted_fails() -> None:
    run = _run({"a": 1, "b": 1}, quorum_retries=1)
    run.clock.advance(TIMEOUT_S)
    run.engine.tick()
    run.clock.advance(TIMEOUT_S)

    run.engine.tick()

    assert run.engine.state == RunState.FAILED
    assert [r.status.startswith("failed") for r in run.results] == [True, True]
    assert run.results[1].extra == {"attempt": 1}


def test_engine_quorum_retry_does_not_close_below_quorum() -> None:
    run = _run({"a": 1, "b": 1, "c": 1}, quorum_retries=1)
    _submit(run.engine, "a", 0, 1, G3["a"])
    run.clock.advance(TIMEOUT_S)
    run.engine.tick()  # 1 of 2: failed, round 0 reopens
    _submit(run.engine, "a", 0, 1, G3["a"])

    run.engine.tick()

    assert run.engine.open_round == 0
    assert len(run.results) == 1


# --------------------------------------------------------- submission rejections


def test_engine_late_submission_for_closed_round() -> None:
    run = _run(N3)
    _submit_all(run, G3, N3)
    run.engine.tick()

    with pytest.raises(
        StaleRoundError, match=r"^party a, round 0: past round; open round is 1$"
    ):
        run.engine.begin_submission("a", 0, 1)


def test_engine_future_round() -> None:
    run = _run(N3)

    with pytest.raises(
        StaleRoundError, match=r"^party a, round 3: future round; open round is 0$"
    ):
        run.engine.begin_submission("a", 3, 1)


def test_engine_unknown_party() -> None:
    run = _run(N3)

    with pytest.raises(UnknownPartyError, match="party zed has not joined; call Join"):
        run.engine.begin_submission("zed", 0, 1)


def test_engine_wrong_update_kind() -> None:
    run = _run(N3)

    with pytest.raises(
        InvalidUpdateError,
        match=r"party a, round 0: update kind delta; this run expects gradient",
    ):
        run.engine.begin_submission("a", 0, 1, update_kind=UpdateKind.DELTA)


@pytest.mark.parametrize("num_samples", [0, -3])
def test_engine_non_positive_num_samples(num_samples: int) -> None:
    run = _run(N3)

    with pytest.raises(
        InvalidUpdateError, match=rf"num_samples must be > 0, got {num_samples}"
    ):
        run.engine.begin_submission("a", 0, num_samples)


def test_engine_infinite_train_loss() -> None:
    run = _run(N3)

    with pytest.raises(InvalidUpdateError, match="train loss inf is not finite"):
        run.engine.begin_submission("a", 0, 1, train_loss=float("inf"))


def test_engine_training_over() -> None:
    run = _run(N3, rounds=1)
    _submit_all(run, G3, N3)
    run.engine.tick()
    assert run.engine.state == RunState.DONE
    assert run.finished == [(RunState.DONE, "completed")]

    with pytest.raises(
        StaleRoundError, match="party a, round 1: training is over after 1"
    ):
        run.engine.begin_submission("a", 1, 1)
    with pytest.raises(StaleRoundError, match="training is over"):
        run.engine.begin_submission("a", 0, 1, submission_id="new")


# -------------------------------------------------------------------- duplicates


def test_engine_second_different_submission_refused() -> None:
    run = _run(N3)
    _submit(run.engine, "a", 0, 1, G3["a"], submission_id="a-0")

    with pytest.raises(
        DuplicateSubmissionError,
        match=r"party a, round 0: an update \(a-0\) was already accepted",
    ):
        _submit(run.engine, "a", 0, 1, G3["b"], submission_id="a-1")
    with pytest.raises(
        DuplicateSubmissionError, match="already accepted with different"
    ):
        _submit(run.engine, "a", 0, 1, G3["b"], submission_id="a-0")


def test_engine_identical_resend_is_not_folded_twice() -> None:
    run = _run(N3)
    first = _submit(run.engine, "a", 0, 1, G3["a"], submission_id="a-0")

    again = _submit(run.engine, "a", 0, 1, G3["a"], submission_id="a-0")
    _submit(run.engine, "b", 0, 3, G3["b"])
    _submit(run.engine, "c", 0, 4, G3["c"])
    run.engine.tick()

    assert not first.duplicate
    assert again.accepted
    assert again.duplicate
    assert again.submission_id == "a-0"
    np.testing.assert_array_equal(
        run.engine.theta, _expected(THETA_0, G3, _sample_weights(N3), LR)
    )
    assert [p.party_id for p in run.results[0].parties] == ["a", "b", "c"]


def test_engine_identical_resend_after_close() -> None:
    run = _run(N3)
    for p in "abc":
        _submit(run.engine, p, 0, N3[p], G3[p], submission_id=f"{p}-0")
    run.engine.tick()
    theta = run.engine.theta.copy()

    again = _submit(run.engine, "a", 0, 1, G3["a"], submission_id="a-0")

    assert again.accepted
    assert again.duplicate
    assert again.round == 0
    np.testing.assert_array_equal(run.engine.theta, theta)
    assert run.engine.status().submitted == ()
    with pytest.raises(DuplicateSubmissionError, match="different bytes"):
        _submit(run.engine, "a", 0, 1, G3["b"], submission_id="a-0")


def test_engine_identical_resend_after_training_over() -> None:
    run = _run(N3, rounds=1)
    for p in "abc":
        _submit(run.engine, p, 0, N3[p], G3[p], submission_id=f"{p}-0")
    run.engine.tick()

    again = _submit(run.engine, "c", 0, 4, G3["c"], submission_id="c-0")

    assert again.duplicate


# ------------------------------------------------------------ streaming, aborts


def test_engine_abort_leaves_round_untouched_and_frees_slot() -> None:
    run = _run(N3, max_in_flight=1)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, np.full(6, 100.0, np.float32))
    blocked = run.engine.begin_submission("b", 0, 3, slot_timeout_s=0.01)
    with pytest.raises(LimitError, match="party b, round 0: 1 uploads in flight"):
        blocked.add(0, 0, np.full(6, 1.0, np.float32))
    blocked.abort()

    sub.abort()
    sub.abort()  # idempotent
    _submit(run.engine, "b", 0, 3, G3["b"])
    _submit(run.engine, "c", 0, 4, G3["c"])
    run.clock.advance(TIMEOUT_S)
    run.engine.tick()

    want = _expected(THETA_0, {p: G3[p] for p in "bc"}, {"b": 3 / 7, "c": 4 / 7}, LR)
    np.testing.assert_allclose(run.engine.theta, want, rtol=1e-6, atol=1e-7)
    assert run.results[0].late == ("a",)
    with pytest.raises(LimitError, match="upload was discarded"):
        sub.finish("00")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_engine_non_finite_value_refused(bad: float) -> None:
    run = _run(N3, max_in_flight=1)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, G3["a"][:3])
    chunk = G3["a"][3:6].copy()
    chunk[1] = bad

    with pytest.raises(
        InvalidUpdateError,
        match=rf"^party a, round 0: tensor 'w' has a non-finite value \({bad}\) "
        r"at element 4$",
    ):
        sub.add(0, 3, chunk)
    sub.abort()

    assert run.engine.status().submitted == ()
    _submit_all(run, G3, N3)  # the slot is free and a may submit afresh
    run.engine.tick()
    np.testing.assert_array_equal(
        run.engine.theta, _expected(THETA_0, G3, _sample_weights(N3), LR)
    )


# The engine's float32 norm overflows first and warns before it rechecks in float64.
@pytest.mark.filterwarnings("ignore:overflow encountered in dot:RuntimeWarning")
def test_engine_large_finite_values_accepted() -> None:
    run = _run({"a": 1, "b": 1})
    big = np.full(SIZE, 1e20, np.float32)  # squares overflow float32, values do not

    _submit(run.engine, "a", 0, 1, big)
    _submit(run.engine, "b", 0, 1, -big)
    run.engine.tick()

    (result,) = run.results
    assert _party(result, "a").update_norm == pytest.approx(3e20, rel=1e-6)
    assert np.isfinite(run.engine.theta).all()


def test_engine_in_flight_submission_of_closed_round() -> None:
    run = _run(N3, max_in_flight=2)
    sub = run.engine.begin_submission("c", 0, 4, slot_timeout_s=0.01)
    sub.add(0, 0, G3["c"][:6])
    sub.add(1, 0, G3["c"][6:])
    _submit(run.engine, "a", 0, 1, G3["a"])
    _submit(run.engine, "b", 0, 3, G3["b"])
    run.clock.advance(TIMEOUT_S)
    run.engine.tick()

    with pytest.raises(
        StaleRoundError,
        match=r"party c, round 0: the round closed while the update was in flight",
    ):
        sub.finish(update_digest(G3["c"]))

    assert run.results[0].status == "ok"
    assert run.results[0].late == ("c",)
    # both slots are free again
    s1 = run.engine.begin_submission("a", 1, 1, slot_timeout_s=0.01)
    s2 = run.engine.begin_submission("b", 1, 3, slot_timeout_s=0.01)
    s1.abort()
    s2.abort()


def test_engine_streaming_add_matches_whole_add() -> None:
    rng = np.random.default_rng(3)
    g = rng.normal(size=SIZE).astype(np.float32)
    runs = [_run({"a": 2, "b": 2}), _run({"a": 2, "b": 2})]
    whole = runs[0].engine.begin_submission("a", 0, 2)
    whole.add(0, 0, g[:6])
    whole.add(1, 0, g[6:])
    whole.finish(update_digest(g))
    pieces = runs[1].engine.begin_submission("a", 0, 2)
    pieces.add(1, 2, g[8:9])  # any order the caller validated
    pieces.add(0, 0, g[0:1])
    pieces.add(0, 1, g[1:5])
    pieces.add(1, 0, g[6:8])
    pieces.add(0, 5, g[5:6])
    pieces.finish(update_digest(g))

    for run in runs:
        _submit(run.engine, "b", 0, 2, G3["b"])
        run.engine.tick()

    a0, a1 = (_party(run.results[0], "a") for run in runs)
    assert a1.dot == pytest.approx(a0.dot, rel=1e-12)
    assert a1.dot == pytest.approx(float(V_0 @ g.astype(np.float64)), rel=1e-9)
    assert a1.update_norm == pytest.approx(a0.update_norm, rel=1e-6)
    assert a1.score == pytest.approx(a0.score, rel=1e-12)
    np.testing.assert_array_equal(runs[0].engine.theta, runs[1].engine.theta)


def test_engine_add_overflowing_tensor_refused() -> None:
    run = _run(N3)
    sub = run.engine.begin_submission("a", 0, 1)

    with pytest.raises(InvalidUpdateError, match=r"tensor 'b' overflows at element 2"):
        sub.add(1, 2, np.zeros(2, np.float32))
    sub.abort()


# ---------------------------------------------------------------- callbacks, misc


def test_engine_commit_before_next_publish() -> None:
    run = _run(N3, rounds=2)

    for t in range(2):
        _submit_all(run, G3, N3, rnd=t)
        run.engine.tick()

    assert run.events == [
        ("publish", 0),
        ("commit", 0),
        ("publish", 1),
        ("commit", 1),
        ("finish", RunState.DONE),
    ]


def test_engine_commit_runs_outside_the_lock_closing_round_refuses() -> None:
    """The close (and its commit) runs outside the engine lock: other threads get a
    status and a refusal meanwhile, and see round 0 whole, none of round 1."""
    run = _run(N3, rounds=2)
    seen: dict[str, Any] = {}

    def probe() -> None:
        seen["status"] = run.engine.status()
        seen["theta"] = run.engine.theta.copy()
        with pytest.raises(StaleRoundError) as err:
            run.engine.begin_submission("a", 0, 1, submission_id="new")
        seen["refused"] = str(err.value)

    def from_another_thread(result: RoundResult) -> None:
        worker = threading.Thread(target=probe)
        worker.start()
        worker.join(5.0)
        assert not worker.is_alive(), "status() waited for the round's commit"

    run.commit_hook = from_another_thread
    _submit_all(run, G3, N3)

    run.engine.tick()

    status = seen["status"]
    assert status.state == RunState.TRAINING
    assert status.open_round == 0
    assert status.rounds_done == 0
    assert status.submitted == ("a", "b", "c")
    np.testing.assert_array_equal(seen["theta"], THETA_0)  # nothing applied yet
    assert seen["refused"] == (
        "party a, round 0: round 0 is closing; the next round is 1"
    )
    assert run.events == [("publish", 0), ("commit", 0), ("publish", 1)]
    assert run.engine.open_round == 1
    np.testing.assert_array_equal(
        run.engine.theta, _expected(THETA_0, G3, _sample_weights(N3), LR)
    )


def test_engine_theta_stays_intact_through_its_round_in_two_buffers() -> None:
    """theta_t is not touched while round t runs (v_t, publication, parties); the
    engine alternates two preallocated buffers instead of fresh arrays per round."""
    bufs = (np.full(SIZE, np.nan, np.float32), np.full(SIZE, np.nan, np.float32))
    run = _run(N3, rounds=3, theta_buffers=bufs)
    np.testing.assert_array_equal(bufs[0], THETA_0)  # theta_0 copied into buffer 0

    for t in range(3):
        _, theta_t, snapshot = run.published[t]
        _submit_all(run, G3, N3, rnd=t)
        np.testing.assert_array_equal(theta_t, snapshot)  # folds went elsewhere
        run.engine.tick()

    assert [r for r, _, _ in run.published] == [0, 1, 2]
    for (_, theta_next), (_, _, published) in zip(
        run.commits[:-1], run.published[1:], strict=True
    ):
        np.testing.assert_array_equal(theta_next, published)
    assert not np.array_equal(run.published[0][2], run.published[1][2])
    ptrs = [_address(t) for _, t, _ in run.published]
    assert ptrs == [_address(bufs[0]), _address(bufs[1]), _address(bufs[0])]
    assert _address(run.engine.theta) == _address(bufs[1])  # theta_3


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_engine_rejects_wrong_theta_buffers() -> None:
    with pytest.raises(InvalidUpdateError, match="theta buffers"):
        _run(
            N3,
            start=False,
            theta_buffers=(np.empty(SIZE, np.float32), np.empty(SIZE, np.float64)),
        )


def test_engine_submit_arrays_helper() -> None:
    run = _run(N3)
    layout = FlatLayout.of(SPECS)

    for p in "abc":
        outcome = submit_arrays(
            run.engine, p, 0, N3[p], layout.views(G3[p]), submission_id=f"{p}-0"
        )
        assert outcome == SubmitOutcome(
            True, 0, f"party {p}, round 0: accepted", f"{p}-0"
        )
    run.engine.tick()

    np.testing.assert_array_equal(
        run.engine.theta, _expected(THETA_0, G3, _sample_weights(N3), LR)
    )
    assert _party(run.results[0], "b").digest == update_digest(G3["b"])


def test_engine_submit_arrays_releases_slot_on_error() -> None:
    run = _run(N3, max_in_flight=1)
    bad = G3["a"].copy()
    bad[7] = np.nan
    layout = FlatLayout.of(SPECS)

    with pytest.raises(InvalidUpdateError, match=r"tensor 'b' has a non-finite value"):
        submit_arrays(run.engine, "a", 0, 1, layout.views(bad))
    with pytest.raises(InvalidUpdateError, match=r"missing tensor 'b'"):
        submit_arrays(run.engine, "a", 0, 1, {"w": np.zeros((2, 3), np.float32)})

    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.abort()


def test_engine_status_snapshot() -> None:
    run = _run(N3)
    _submit(run.engine, "a", 0, 1, G3["a"])
    run.clock.advance(2.0)

    status = run.engine.status()

    assert status.state == RunState.TRAINING
    assert status.open_round == 0
    assert status.joined == ("a", "b", "c")
    assert status.submitted == ("a",)
    assert status.elapsed_s == 2.0


def test_engine_stop_ends_run() -> None:
    run = _run(N3)

    run.engine.stop("operator")

    assert run.engine.state == RunState.FAILED
    assert run.finished == [(RunState.FAILED, "operator")]
    with pytest.raises(StaleRoundError, match="the run failed"):
        run.engine.begin_submission("a", 0, 1)


def test_engine_resumed_past_last_round_is_done() -> None:
    engine = RoundEngine(
        _cfg(rounds=2), SPECS, THETA_0, QuadraticValidator(), start_round=2
    )

    assert engine.state == RunState.DONE
    assert engine.finished
