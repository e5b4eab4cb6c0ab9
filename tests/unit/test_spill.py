"""DirSpill's background writer: back-pressure, recycled buffers, reads that wait for
their write, failures that surface, and the engine stopping on them."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.engine import RoundEngine
from fedgrpc.engine import spill as spill_module
from fedgrpc.engine.spill import DirSpill
from fedgrpc.layout import update_digest
from fedgrpc.types import RoundResult, RunState, TensorSpec

SIZE = 1000


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SIZE).astype(np.float32)


class SlowDisk:
    """Replaces the spill's raw writer: each write waits for ``release``.

    With ``fail`` set, a released write raises it instead (the disk filled meanwhile).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.fail: OSError | None = None
        real = spill_module._write_at

        def write_at(fd: int, buffer: np.ndarray, offset: int) -> None:
            self.started.release()
            assert self.release.acquire(timeout=10), "write never released"
            if self.fail is not None:
                raise self.fail
            real(fd, buffer, offset)

        monkeypatch.setattr(spill_module, "_write_at", write_at)


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def go() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_spill_stage_waits_for_a_free_buffer_back_pressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    spill = DirSpill(tmp_path, buffers=2)
    for p in ("a", "b"):
        spill.commit(spill.stage(0, p, _vec(ord(p))))
    assert disk.started.acquire(timeout=5)  # "a" is being written, "b" queued

    third, out = _in_thread(lambda: spill.stage(0, "c", _vec(3)))
    third.join(0.2)
    waited = third.is_alive()
    disk.release.release()  # "a" reaches the disk: its buffer frees
    third.join(5)
    spill.commit(out[0])
    for _ in range(2):
        disk.release.release()
    spill.flush()

    assert waited
    assert not third.is_alive()
    for p, seed in (("a", ord("a")), ("b", ord("b")), ("c", 3)):
        got = spill.read(0, p)
        assert got is not None
        np.testing.assert_array_equal(got, _vec(seed))


def test_spill_buffers_are_recycled(tmp_path: Path) -> None:
    spill = DirSpill(tmp_path, buffers=2)
    seen = set()

    for t in range(6):
        staged = spill.stage(t, "p", _vec(t))
        seen.add(id(staged.buffer))
        spill.commit(staged)
        spill.flush()

    assert len(seen) <= 2
    np.testing.assert_array_equal(spill.read(5, "p"), _vec(5))


def test_spill_read_and_dot_wait_for_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    spill = DirSpill(tmp_path)
    u, v = _vec(1), _vec(2)
    spill.commit(spill.stage(4, "p", u))
    assert disk.started.acquire(timeout=5)

    reader, out = _in_thread(lambda: spill.dot(4, "p", v))
    reader.join(0.2)
    waited = reader.is_alive()
    disk.release.release()
    reader.join(5)

    assert waited
    assert out == [pytest.approx(float(v.astype(np.float64) @ u), rel=1e-5)]
    assert spill.dot(4, "nobody", v) is None


def test_spill_dot_reads_in_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill_module, "_READ_BLOCK", 7)  # 1000 = 142 x 7 + 6
    spill = DirSpill(tmp_path)
    u, v = _vec(5), _vec(6).astype(np.float64)
    spill.commit(spill.stage(0, "p", u))

    got = spill.dot(0, "p", v)

    assert got == pytest.approx(float(v @ u.astype(np.float64)), rel=1e-6)


def test_spill_drop_cancels_queued_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    spill = DirSpill(tmp_path, buffers=3)
    for p in ("a", "b"):
        spill.commit(spill.stage(1, p, _vec(0)))
    spill.commit(spill.stage(2, "a", _vec(9)))
    assert disk.started.acquire(timeout=5)  # round 1, "a": in progress

    dropping, _ = _in_thread(lambda: spill.drop(1))
    time.sleep(0.05)
    disk.release.release()  # the write in progress ends; "b" is skipped
    dropping.join(5)
    disk.release.release()  # round 2
    spill.flush()

    assert not dropping.is_alive()
    assert not (tmp_path / "round-000001").exists()
    assert spill.read(1, "b") is None
    assert spill.read(2, "a") is not None
    assert spill.error is None


def test_spill_write_failure_surfaces(tmp_path: Path) -> None:
    blocker = tmp_path / "spill"
    blocker.write_bytes(b"a file where the spill directory should be")
    spill = DirSpill(blocker)
    v = _vec(1)

    spill.commit(spill.stage(0, "p", _vec(0)))
    spill.flush()
    with pytest.raises(OSError) as refused:
        spill.stage(0, "q", _vec(1))
    with pytest.raises(OSError):
        spill.read(0, "p")  # the close cannot fold what was never written

    assert spill.error is not None
    assert refused.value.errno == spill.error.errno
    assert spill.dot(0, "p", v) is None  # digfl-2 falls back to digfl-1


def test_spill_disk_full_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "spill/updates.f32")

    monkeypatch.setattr(spill_module, "_write_at", full)
    spill = DirSpill(tmp_path)

    spill.commit(spill.stage(0, "p", _vec(0)))
    spill.flush()

    assert spill.error is not None and spill.error.errno == errno.ENOSPC
    # Nothing names the update that was not written.
    assert (tmp_path / "round-000000" / "index.txt").read_text() == ""
    with pytest.raises(OSError, match="No space left"):
        spill.stage(1, "p", _vec(0))


# ------------------------------------------------------------ the engine
class _Zero:
    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        return np.ones_like(flat), 0.0, 0.0

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        return 0.0, 0.0


def test_spill_failed_write_stops_the_engine_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(monkeypatch)
    commits: list[RoundResult] = []
    engine = RoundEngine(
        RoundConfig(rounds=3, min_parties=1, join_timeout_s=5, round_timeout_s=5),
        [TensorSpec("w", "float32", (SIZE,))],
        np.zeros(SIZE, np.float32),
        _Zero(),
        on_commit=lambda r, _t: commits.append(r),
        spill=DirSpill(tmp_path),
    )
    engine.join("p", 10)
    engine.tick()
    u = _vec(0)
    sub = engine.begin_submission("p", 0, 10)
    sub.add(0, 0, u)

    accepted = sub.finish(update_digest(u)).accepted  # acknowledged before the write
    assert disk.started.acquire(timeout=5)
    disk.fail = OSError(errno.ENOSPC, "No space left on device", "updates.f32")
    disk.release.release()  # the disk filled while the write waited
    engine.spill.flush()  # type: ignore[attr-defined]
    with pytest.raises(OSError):
        engine.tick()

    assert accepted
    assert commits == []
    assert engine.state == RunState.TRAINING  # the owner stops it, naming the cause


def test_spill_buffers_follow_the_model_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill_module, "WRITE_BUFFER_BYTES", 40_000)
    small, mid, big = (DirSpill(tmp_path / n) for n in ("s", "m", "b"))

    small.discard(small.stage(0, "p", np.zeros(10, np.float32)))  # 40 bytes
    mid.discard(mid.stage(0, "p", np.zeros(1000, np.float32)))  # 4 kB
    big.discard(big.stage(0, "p", np.zeros(10_000, np.float32)))  # the budget

    assert small.buffers == 64  # at most 64, however small
    assert mid.buffers == 10
    assert big.buffers == spill_module.WRITE_BUFFERS
