"""Where a round's accepted updates wait after they were streamed (pure NumPy + files).

Two things need an update again after its upload ended, without the aggregator holding
parties x model size in memory:

* the norm bound B_t is known only when the round closes (it is derived from all the
  round's norms), so an update too large to fold on arrival is folded at the close,
  scaled by its clip factor;
* the second-order score ``digfl-2`` needs ⟨v_{t+1}, u_{t,i}⟩, and v_{t+1} exists only
  once θ_{t+1} does: the round's updates are read once more in the next round, while
  the parties train.

:class:`DirSpill` writes each update as an ``.npy`` file (raw float32, read back with
``allow_pickle=False``), one directory per round, deleted once both uses are done: RAM
stays O(model); the page cache and the disk hold the rest. The writes happen on a
background thread, off the upload's path: an upload is copied into one of a few
recycled model-sized buffers (a memcpy) and acknowledged; when every buffer waits for
the disk, the next upload waits for one (back-pressure, never unbounded memory). A
read waits for its own file's write, so nothing reads a file before it is whole.
:class:`MemorySpill` keeps copies in memory, for in-process runs of small models.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from numpy.lib import format as npy_format

log = logging.getLogger(__name__)

_READ_BLOCK = 1 << 20  # elements per block of a dot product read back from a spill
WRITE_BUFFERS = 2
"""The fewest model-sized buffers of a :class:`DirSpill` (copies waiting for the disk).

Two: as many as the default upload slots, so two uploads finishing together do not
wait for the disk."""
WRITE_BUFFER_BYTES = 64 << 20
"""Small models get more buffers, up to this many bytes in all (and 64 buffers): many
small uploads that finish together then wait for nobody."""


class Spill(Protocol):
    """Per-round storage of accepted updates (raw float32 vectors).

    An upload is staged (the copy, outside the engine lock; it may wait for room) and
    committed only once the round accepted it (quick, under the lock): an upload that
    is refused, or a second stream of the same party, never replaces what was
    accepted. A background write that failed is kept in :attr:`error`.
    """

    def stage(self, round_index: int, party_id: str, update: np.ndarray) -> object:
        """Copy ``update`` (1-D float32) aside; returns a handle for commit/discard.

        Raises:
            OSError: the spill cannot store updates (a write failed: disk full).
        """
        ...

    def commit(self, staged: object) -> None:
        """Make a staged update the party's stored update of its round."""
        ...

    def discard(self, staged: object) -> None:
        """Forget a staged update that was not accepted."""
        ...

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """The stored update (read-only), or None if it is not there.

        Raises:
            OSError: its write failed (the round cannot use it).
        """
        ...

    def dot(self, round_index: int, party_id: str, v: np.ndarray) -> float | None:
        """⟨v, u⟩ of the stored update u, read in blocks; None if it is not there."""
        ...

    def drop(self, round_index: int) -> None:
        """Forget every update of round ``round_index``."""
        ...

    @property
    def error(self) -> OSError | None:
        """The first background write that failed, if any (the run must stop)."""
        ...


class MemorySpill:
    """Copies in memory (in-process simulation and ground truth: small models)."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, np.ndarray]] = {}

    @property
    def error(self) -> OSError | None:
        """Memory does not fail."""
        return None

    def stage(
        self, round_index: int, party_id: str, update: np.ndarray
    ) -> tuple[int, str, np.ndarray]:
        """A private copy."""
        copy = np.array(update, dtype=np.float32, copy=True)
        copy.flags.writeable = False
        return round_index, party_id, copy

    def commit(self, staged: object) -> None:
        """Keep the copy as the party's update."""
        round_index, party_id, copy = _memory_handle(staged)
        self._rounds.setdefault(round_index, {})[party_id] = copy

    def discard(self, staged: object) -> None:
        """Nothing to do: the copy is garbage."""

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """The copy, or None."""
        return self._rounds.get(round_index, {}).get(party_id)

    def dot(self, round_index: int, party_id: str, v: np.ndarray) -> float | None:
        """⟨v, u⟩ of the copy, or None."""
        u = self.read(round_index, party_id)
        return None if u is None else blocked_dot(v, u)

    def drop(self, round_index: int) -> None:
        """Free the round's copies."""
        self._rounds.pop(round_index, None)


@dataclass(eq=False)
class _Write:
    """One committed update on its way to the disk."""

    round: int
    party: str
    buffer: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # its round was dropped before the write started
    error: OSError | None = None


@dataclass(frozen=True, eq=False)
class _Staged:
    round: int
    party: str
    buffer: np.ndarray


class DirSpill:
    """One ``.npy`` file per update under ``root/round-NNNNNN/`` (the aggregator's).

    Files are written by one background thread, to a temp name and renamed when
    whole, and are not fsynced: they serve the open round and the next one, and a
    resumed run that finds one missing records that party's second-order score as
    unknown. Reads wait for the file's write; :meth:`flush` waits for all of them.

    Args:
        root: the directory (created on the first write).
        buffers: model-sized copies that may wait for the disk at once; by default
            :data:`WRITE_BUFFERS`, or more for a small model (up to
            :data:`WRITE_BUFFER_BYTES` in all), fixed at the first upload.
    """

    def __init__(self, root: Path, buffers: int | None = None) -> None:
        self.root = Path(root)
        self.buffers = 0 if buffers is None else max(1, buffers)
        self._cond = threading.Condition()
        self._free: list[np.ndarray] = []  # recycled copies
        self._held = 0  # buffers staged or waiting for the disk (<= buffers)
        self._queue: deque[_Write] = deque()
        self._pending: dict[tuple[int, str], _Write] = {}  # committed, not on disk yet
        self._failed: dict[tuple[int, str], OSError] = {}  # writes that did not happen
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._read_lock = threading.Lock()
        self._read_buf: np.ndarray | None = None

    @property
    def error(self) -> OSError | None:
        """The first write that failed (then every later stage raises it)."""
        return self._error

    def _dir(self, round_index: int) -> Path:
        return self.root / f"round-{round_index:06d}"

    def _path(self, round_index: int, party_id: str) -> Path:
        # Hex of the id: any party id is a safe, distinct file name.
        return self._dir(round_index) / f"{party_id.encode().hex()}.npy"

    # ------------------------------------------------------------- writing
    def stage(self, round_index: int, party_id: str, update: np.ndarray) -> _Staged:
        """Copy the update into a free buffer; waits while every buffer is taken."""
        u = np.asarray(update)
        with self._cond:
            if not self.buffers:
                fit = WRITE_BUFFER_BYTES // max(1, 4 * u.size)
                self.buffers = max(WRITE_BUFFERS, min(64, fit))
            while self._error is None and self._held >= self.buffers:
                self._cond.wait()
            if self._error is not None:
                raise _again(self._error)
            self._held += 1
            buf = self._free.pop() if self._free else None
        try:
            if buf is None or buf.shape != (u.size,):
                buf = np.empty(u.size, dtype=np.float32)
            np.copyto(buf, u.reshape(-1), casting="same_kind")
        except BaseException:
            self._give_back(buf)
            raise
        return _Staged(round_index, party_id, buf)

    def commit(self, staged: object) -> None:
        """Queue the staged copy for its write (never blocks: its buffer is held)."""
        s = _dir_handle(staged)
        w = _Write(s.round, s.party, s.buffer)
        with self._cond:
            self._pending[(s.round, s.party)] = w
            self._queue.append(w)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="spill-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def discard(self, staged: object) -> None:
        """Return a staged copy's buffer."""
        self._give_back(_dir_handle(staged).buffer)

    def _give_back(self, buf: np.ndarray | None) -> None:
        with self._cond:
            self._held -= 1
            if buf is not None and len(self._free) < max(1, self.buffers):
                self._free.append(buf)
            self._cond.notify_all()

    def _run(self) -> None:
        """The writer thread: queued copies to disk, in order."""
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                w = self._queue.popleft()
                if self._error is not None and not w.cancelled:
                    w.error = self._error  # the disk already refused one: stop
            try:
                if not w.cancelled and w.error is None:
                    self._write(w)
            except OSError as err:
                w.error = err
                log.error(
                    "cannot spill the update of party %s, round %d: %s",
                    w.party,
                    w.round,
                    err,
                )
            except BaseException as err:  # never let the writer die silently
                w.error = OSError(f"spill writer failed: {type(err).__name__}: {err}")
                log.exception("spill writer failed")
            finally:
                with self._cond:
                    if w.error is not None:
                        self._failed[(w.round, w.party)] = w.error
                        self._error = self._error or w.error
                    if self._pending.get((w.round, w.party)) is w:
                        del self._pending[(w.round, w.party)]
                    w.done.set()
                self._give_back(w.buffer)

    def _write(self, w: _Write) -> None:
        path = self._path(w.round, w.party)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                # A real file: NumPy writes straight from the buffer (no copy).
                npy_format.write_array(f, w.buffer, allow_pickle=False)
            tmp.replace(path)  # atomic: a reader never sees half a file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def flush(self) -> None:
        """Wait until every committed update is on disk (or failed)."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # ------------------------------------------------------------- reading
    def _settled(self, round_index: int, party_id: str) -> OSError | None:
        """Wait for the write of this update, if one is queued; why it failed."""
        key = (round_index, party_id)
        with self._cond:
            w = self._pending.get(key)
        if w is not None:
            w.done.wait()
        with self._cond:
            return self._failed.get(key)

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """Memory-map the stored update (read-only), or None if it is missing/bad.

        Used by the close for the few updates it folds late; the second-order pass
        reads in blocks (:meth:`dot`), so its pages are not mapped into the process.
        """
        failed = self._settled(round_index, party_id)
        if failed is not None:
            raise _again(failed)
        path = self._path(round_index, party_id)
        if not path.is_file():
            return None
        try:
            arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("spilled update %s is unreadable: %s", path, e)
            return None
        if arr.dtype != np.float32 or arr.ndim != 1:
            log.warning("spilled update %s is not a float32 vector", path)
            return None
        return arr

    def dot(self, round_index: int, party_id: str, v: np.ndarray) -> float | None:
        """⟨v, u⟩ read in blocks into one reused buffer; None if missing or bad."""
        if self._settled(round_index, party_id) is not None:
            return None
        path = self._path(round_index, party_id)
        try:
            with open(path, "rb") as f, self._read_lock:
                if not _npy_vector(f, v.size):
                    log.warning(
                        "spilled update %s is not a float32 vector of %d", path, v.size
                    )
                    return None
                return self._blocked_read_dot(f, v, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("spilled update %s is unreadable: %s", path, e)
            return None

    def _blocked_read_dot(self, f: BinaryIO, v: np.ndarray, path: Path) -> float | None:
        if self._read_buf is None:
            self._read_buf = np.empty(_READ_BLOCK, dtype=np.float32)
        buf = self._read_buf
        raw = buf.view(np.uint8).data
        total = 0.0
        for s in range(0, v.size, buf.size):
            n = min(buf.size, v.size - s)
            if _read_exactly(f, raw[: 4 * n]) < 4 * n:
                log.warning("spilled update %s is truncated", path)
                return None
            total += float(np.dot(v[s : s + n], buf[:n]))
        return total

    # ------------------------------------------------------------ dropping
    def drop(self, round_index: int) -> None:
        """Delete the round's directory (queued writes of it are cancelled)."""
        with self._cond:
            for w in self._queue:
                if w.round == round_index:
                    w.cancelled = True
            while any(r == round_index for r, _ in self._pending):
                self._cond.wait()
            for key in [k for k in self._failed if k[0] == round_index]:
                del self._failed[key]
        shutil.rmtree(self._dir(round_index), ignore_errors=True)

    def drop_all(self, keep: Collection[int] = ()) -> None:
        """Delete every spilled round but ``keep`` (a resumed run's pending ones).

        Temp files of writes a kill interrupted go too, in kept rounds as well.
        """
        self.flush()
        if not self.root.is_dir():
            return
        kept = {self._dir(r).name for r in keep}
        for d in self.root.iterdir():
            if d.name not in kept:
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir():
                for tmp in d.glob("*.tmp"):
                    tmp.unlink(missing_ok=True)


def _again(err: OSError) -> OSError:
    """A fresh exception naming the same failure (one per thread that raises it)."""
    return OSError(err.errno, err.strerror or str(err), err.filename)


def _memory_handle(staged: object) -> tuple[int, str, np.ndarray]:
    assert isinstance(staged, tuple) and len(staged) == 3
    return staged


def _dir_handle(staged: object) -> _Staged:
    assert isinstance(staged, _Staged)
    return staged


def _npy_vector(f: BinaryIO, size: int) -> bool:
    """Read an ``.npy`` header; True if it is a little-endian float32 vector of size.

    The header is parsed by NumPy's reader, which refuses anything but a literal
    dict (never pickled objects).
    """
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        return False
    return dtype == np.dtype("<f4") and shape == (size,) and (not fortran or size <= 1)


def _read_exactly(f: BinaryIO, out: memoryview) -> int:
    """Fill ``out`` from ``f`` (short reads are retried); bytes read."""
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def blocked_dot(v: np.ndarray, u: np.ndarray) -> float:
    """⟨v, u⟩ read in blocks (u may be memory-mapped), summed in float64."""
    total = 0.0
    for s in range(0, u.size, _READ_BLOCK):
        e = min(u.size, s + _READ_BLOCK)
        total += float(np.dot(v[s:e], u[s:e]))
    return total
