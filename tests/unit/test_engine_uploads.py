"""Engine: stalled uploads, slot accounting and non-finite aggregates."""

from __future__ import annotations

from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgrpc.engine import RoundEngine
from fedgrpc.engine.spill import DirSpill
from fedgrpc.errors import LimitError
from fedgrpc.layout import update_digest
from fedgrpc.types import RunState
from tests.unit.test_engine import (
    G3,
    N3,
    SPECS,
    THETA_0,
    V_0,
    QuadraticValidator,
    _cfg,
    _run,
    _submit,
)


def test_engine_idle_upload_expires_and_frees_its_slot() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    stalled = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    stalled.add(0, 0, np.full(6, 1.0, np.float32))

    run.clock.advance(run.engine.uploads.idle_s + 1)
    run.engine.tick()

    with pytest.raises(LimitError, match="party a, round 0: upload idle"):
        stalled.add(1, 0, np.full(3, 1.0, np.float32))
    assert _submit(run.engine, "b", 0, 3, G3["b"]).accepted  # the slot is free again
    assert run.engine.status().submitted == ("b",)


def test_engine_active_upload_is_not_expired() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, np.full(6, 1.0, np.float32))
    # Within the idle limit and the upload's rate grace (after which a slow upload
    # goes: tests/unit/test_upload_deadlines.py).
    step = min(run.engine.uploads.idle_s, run.engine.uploads.grace_s) / 2 - 1
    run.clock.advance(step)
    run.engine.tick()
    sub.add(1, 0, np.full(3, 1.0, np.float32))
    run.clock.advance(step)

    run.engine.tick()

    assert sub.finish("d").accepted


def test_engine_non_finite_aggregate_fails_round_instead_of_committing() -> None:
    theta0 = np.full(9, -3e38, np.float32)
    run = _run({"a": 1, "b": 1}, init=theta0, rounds=2)
    huge = np.full(9, 3e38, np.float32)  # finite, but theta - 0.5 * huge overflows

    _submit(run.engine, "a", 0, 1, huge)
    _submit(run.engine, "b", 0, 1, huge)
    run.engine.tick()

    result = run.results[0]
    assert result.status.startswith(
        "failed: round 0: the aggregated model is not finite"
    )
    assert result.parties == ()
    np.testing.assert_array_equal(run.engine.theta, theta0)
    assert run.engine.state == RunState.FAILED
    assert run.engine.reason.startswith("aggregation failed")


class _LaterExecutor(Executor):
    """Runs submitted calls only when told to: v_t is 'still computing' until then."""

    def __init__(self) -> None:
        self.calls: list[tuple[Future[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.calls.append((fut, fn, args))
        return fut

    def run_all(self) -> None:
        for fut, fn, args in self.calls:
            if not fut.done():
                fut.set_result(fn(*args))


def test_engine_upload_streams_before_v_t_is_ready_and_scores_at_finish() -> None:
    later = _LaterExecutor()
    validator = QuadraticValidator()
    engine = RoundEngine(_cfg(), SPECS, THETA_0, validator, executor=later)
    for p, n in N3.items():
        engine.join(p, n)
    engine.tick()
    g = G3["b"]
    sub = engine.begin_submission("b", 0, 3, slot_timeout_s=1.0)

    sub.add(0, 0, g[:4])  # v_t not computed yet: must not block
    sub.add(0, 4, g[4:6])
    later.run_all()
    sub.add(1, 0, g[6:])
    outcome = sub.finish(update_digest(g))

    assert outcome.accepted
    entry = engine._round.accepted["b"]  # type: ignore[union-attr]
    assert entry.dot == pytest.approx(float(np.dot(V_0, g)), rel=1e-6)


def test_engine_reserve_takes_the_slot_before_any_piece() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    first = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    first.reserve()  # header only: the slot is taken
    second = run.engine.begin_submission("b", 0, 3, slot_timeout_s=0.01)
    with pytest.raises(LimitError, match="1 uploads in flight"):
        second.reserve()
    first.abort()  # releases it
    assert _submit(run.engine, "b", 0, 3, G3["b"]).accepted


def test_engine_reserve_for_a_resend_needs_no_slot() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    assert _submit(run.engine, "a", 0, 1, G3["a"], submission_id="s").accepted
    holder = run.engine.begin_submission("b", 0, 3, slot_timeout_s=0.01)
    holder.reserve()
    resend = run.engine.begin_submission("a", 0, 1, submission_id="s")
    resend.reserve()  # would time out if it needed the only slot
    flat = G3["a"]
    resend.add(0, 0, flat[:6])
    resend.add(1, 0, flat[6:])
    assert resend.finish(update_digest(flat)).duplicate


# ------------------------------------------- finishing on the servicer's loop
def test_engine_finishes_now_only_when_nothing_would_wait(tmp_path: Path) -> None:
    later = _LaterExecutor()
    spill = DirSpill(tmp_path, buffers=1)
    engine = RoundEngine(
        _cfg(), SPECS, THETA_0, QuadraticValidator(), executor=later, spill=spill
    )
    for p, n in N3.items():
        engine.join(p, n)
    engine.tick()
    g = G3["b"]
    sub = engine.begin_submission("b", 0, 3, slot_timeout_s=1.0)
    sub.add(0, 0, g[:6])
    sub.add(1, 0, g[6:])
    waits_for_v = not sub.finishes_now()  # v_t still computing: finish would wait
    later.run_all()
    ready = sub.finishes_now()
    held = spill.stage(0, "someone", g)  # the spill's only buffer is taken
    waits_for_disk = not sub.finishes_now()
    spill.discard(held)

    assert waits_for_v and ready and waits_for_disk
    assert sub.finishes_now()
    assert sub.finish(update_digest(g)).accepted


def test_engine_fedbuff_never_finishes_on_the_loop() -> None:
    run = _run(N3, buffer_size=2)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=1.0)
    sub.add(0, 0, G3["a"][:6])
    sub.add(1, 0, G3["a"][6:])

    assert not sub.finishes_now()  # its version may close under it: it may wait
    assert sub.finish(update_digest(G3["a"])).accepted


def test_engine_wakes_its_driver_only_when_the_round_can_close() -> None:
    run = _run(N3, round_timeout_s=1000.0)
    woken: list[int] = []
    changed = run.engine._changed
    real = changed.notify_all

    def notify_all() -> None:
        woken.append(len(run.engine.status().submitted))
        real()

    changed.notify_all = notify_all  # type: ignore[method-assign]
    for p, n in N3.items():
        assert _submit(run.engine, p, 0, n, G3[p]).accepted

    assert woken == [len(N3)]  # not once per upload: the last one completes it
