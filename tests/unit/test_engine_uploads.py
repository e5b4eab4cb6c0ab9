"""Engine: stalled uploads, slot accounting and non-finite aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrpc.engine import RunState
from fedgrpc.errors import LimitError
from tests.unit.test_engine import G3, N3, _run, _submit


def test_engine_idle_upload_expires_and_frees_its_slot() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    stalled = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    stalled.add(0, 0, np.full(6, 1.0, np.float32))

    run.clock.advance(run.engine.upload_idle_s + 1)
    run.engine.tick()

    with pytest.raises(LimitError, match="party a, round 0: upload idle"):
        stalled.add(1, 0, np.full(3, 1.0, np.float32))
    assert _submit(run.engine, "b", 0, 3, G3["b"]).accepted  # the slot is free again
    assert run.engine.submitted() == ["b"]


def test_engine_active_upload_is_not_expired() -> None:
    run = _run(N3, max_in_flight=1, round_timeout_s=1000.0)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, np.full(6, 1.0, np.float32))
    run.clock.advance(run.engine.upload_idle_s - 1)
    run.engine.tick()
    sub.add(1, 0, np.full(3, 1.0, np.float32))
    run.clock.advance(run.engine.upload_idle_s - 1)

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
