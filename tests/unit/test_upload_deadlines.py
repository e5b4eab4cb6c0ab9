"""UploadPool: the minimum rate, the overall deadline and each party's slot share."""

from __future__ import annotations

import numpy as np
import pytest

from fedgrpc.engine.uploads import UploadPool
from fedgrpc.errors import LimitError, StaleRoundError
from fedgrpc.layout import update_digest
from tests.unit.test_engine import G3, N3, Run, _run, _submit


def _engine_with_rate(**kw: float) -> tuple[Run, UploadPool]:
    run = _run(N3, max_in_flight=2, round_timeout_s=1000.0)
    pool = run.engine.uploads
    pool.min_rate_bytes_s = kw.get("rate", 1.0)  # 9 elements x 4 bytes: 36 bytes
    pool.grace_s = kw.get("grace", 10.0)
    return run, pool


def test_upload_drip_feed_below_the_minimum_rate_is_discarded() -> None:
    run, pool = _engine_with_rate(rate=1.0, grace=10.0)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, np.full(1, 1.0, np.float32))  # 4 bytes

    # Each piece resets the idle timer, but 4 bytes in 20 s is below 1 B/s after
    # the 10 s grace (10 bytes owed).
    run.clock.advance(20.0)
    run.engine.tick()

    with pytest.raises(LimitError, match=r"party a, round 0: upload too slow: 4 bytes"):
        sub.add(0, 1, np.full(1, 1.0, np.float32))
    assert pool.in_flight == 0


def test_upload_at_the_minimum_rate_is_kept() -> None:
    run, _pool = _engine_with_rate(rate=1.0, grace=10.0)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, G3["a"][:6])  # 24 bytes

    run.clock.advance(20.0)  # 10 bytes owed
    run.engine.tick()
    sub.add(1, 0, G3["a"][6:])

    assert sub.finish(update_digest(G3["a"])).accepted


def test_upload_overall_deadline_scales_with_the_model() -> None:
    run, pool = _engine_with_rate(rate=4.0, grace=10.0)
    assert pool.deadline_s == pytest.approx(10.0 + 36 / 4.0)
    sub = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    sub.add(0, 0, G3["a"][:6])
    sub.add(1, 0, G3["a"][6:])  # everything but the trailer

    run.clock.advance(pool.deadline_s + 1)
    run.engine.tick()

    with pytest.raises(LimitError, match=r"upload not finished after 20 s \(deadline"):
        sub.finish(update_digest(G3["a"]))


def test_upload_one_party_holds_at_most_its_share_of_the_slots() -> None:
    run, _pool = _engine_with_rate()
    first = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.01)
    first.reserve()
    second = run.engine.begin_submission("a", 0, 1, slot_timeout_s=0.05)

    with pytest.raises(LimitError, match=r"already holds 1 of the 2 upload slots"):
        second.reserve()
    assert _submit(run.engine, "b", 0, 3, G3["b"]).accepted  # the other slot


def test_upload_of_a_closing_round_is_aborted_at_the_close() -> None:
    run = _run(N3, max_in_flight=3, round_timeout_s=5.0)
    sub = run.engine.begin_submission("c", 0, 4, slot_timeout_s=0.01)
    sub.add(0, 0, G3["c"][:6])
    _submit(run.engine, "a", 0, 1, G3["a"])
    _submit(run.engine, "b", 0, 3, G3["b"])
    run.clock.advance(5.0)  # the deadline, well inside the idle limit
    run.engine.tick()

    assert run.results[0].status == "ok"
    assert run.engine.uploads.in_flight == 0
    with pytest.raises(StaleRoundError, match="the round closed while the update"):
        sub.add(1, 0, G3["c"][6:])
