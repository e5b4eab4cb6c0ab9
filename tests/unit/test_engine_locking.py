"""A closing round holds no lock that joins, status queries or uploads wait on.

The commit (checkpoint and ledger fsync) and the validation pass of a closing round
are made to block here; meanwhile the engine must keep answering, refuse updates for
the closing round, and publish the next model only after the commit returned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.engine import RoundEngine, submit_arrays
from fedgrpc.errors import StaleRoundError
from fedgrpc.types import RoundResult, RunState, TensorSpec, UpdateKind

SPECS = [TensorSpec("w", "float32", (4,))]
WAIT_S = 10.0  # a bound for waits that should end at once; never reached when green


class Quadratic:
    """L(theta) = ||theta||^2 / 2; ``evaluate`` can be made to block."""

    def __init__(self) -> None:
        self.evaluating = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        return flat.astype(np.float32), float(flat @ flat) / 2, 0.0

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        self.evaluating.set()
        assert self.release.wait(WAIT_S)
        return float(flat @ flat) / 2, 0.0


class Recorder:
    """on_commit that can block; on_publish that records what it saw and when."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.committing = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def commit(self, result: RoundResult, _theta: np.ndarray) -> None:
        self.committing.set()
        assert self.release.wait(WAIT_S)
        self.events.append(f"commit {result.round}")

    def publish(self, round_index: int, _theta: np.ndarray) -> None:
        self.events.append(f"publish {round_index}")


def _engine(validator: Quadratic, rec: Recorder) -> RoundEngine:
    cfg = RoundConfig(
        rounds=3,
        min_parties=2,
        update_kind=UpdateKind.GRADIENT,
        server_lr=0.5,
        round_timeout_s=1000.0,
    )
    engine = RoundEngine(
        cfg,
        SPECS,
        np.ones(4, np.float32),
        validator,
        on_commit=rec.commit,
        on_publish=rec.publish,
    )
    engine.join("a", 1)
    engine.join("b", 1)
    engine.tick()  # opens round 0
    for p in ("a", "b"):
        submit_arrays(engine, p, 0, 1, {"w": np.ones(4, np.float32)})
    return engine


@contextmanager
def _ticking(engine: RoundEngine) -> Iterator[threading.Thread]:
    driver = threading.Thread(target=engine.tick, daemon=True)
    driver.start()
    try:
        yield driver
    finally:
        driver.join(WAIT_S)


def _answers(fn: object, *args: object) -> bool:
    """Whether ``fn(*args)`` returns within WAIT_S from another thread."""
    done = threading.Event()

    def call() -> None:
        fn(*args)  # type: ignore[operator]
        done.set()

    threading.Thread(target=call, daemon=True).start()
    return done.wait(WAIT_S)


def test_engine_locking_join_and_status_answer_during_the_commit() -> None:
    validator, rec = Quadratic(), Recorder()
    engine = _engine(validator, rec)
    rec.release.clear()

    with _ticking(engine) as driver:
        assert rec.committing.wait(WAIT_S)
        status_ok = _answers(engine.status)
        join_ok = _answers(engine.join, "c", 5)
        st = engine.status()
        events_while_blocked = list(rec.events)
        rec.release.set()

    assert not driver.is_alive()
    assert status_ok and join_ok
    assert st.state is RunState.TRAINING and st.open_round == 0
    assert "c" in st.joined
    assert events_while_blocked == ["publish 0"]  # round 1 not published yet
    assert rec.events == ["publish 0", "commit 0", "publish 1"]
    assert engine.status().open_round == 1


def test_engine_locking_status_answers_during_the_validation_pass() -> None:
    validator, rec = Quadratic(), Recorder()
    engine = _engine(validator, rec)
    validator.release.clear()

    with _ticking(engine):
        assert validator.evaluating.wait(WAIT_S)
        status_ok = _answers(engine.status)
        validator.release.set()

    assert status_ok
    assert rec.events == ["publish 0", "commit 0", "publish 1"]


def test_engine_locking_closing_round_refuses_new_updates() -> None:
    validator, rec = Quadratic(), Recorder()
    engine = _engine(validator, rec)
    rec.release.clear()

    with _ticking(engine):
        assert rec.committing.wait(WAIT_S)
        engine.join("c", 1)  # joins while round 0 closes: too late for round 0
        with pytest.raises(StaleRoundError, match=r"party c, round 0: round 0 is "):
            engine.begin_submission("c", 0, 1)
        rec.release.set()

    assert engine.status().open_round == 1
