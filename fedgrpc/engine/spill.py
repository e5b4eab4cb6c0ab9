"""Where a round's accepted updates wait after they were streamed (pure NumPy + files).

Two things need an update again after its upload ended, without the aggregator holding
parties x model size in memory:

* the norm bound B_t is known only when the round closes (it is derived from all the
  round's norms), so an update too large to fold on arrival is folded at the close,
  scaled by its clip factor;
* the second-order score ``digfl-2`` needs ⟨v_{t+1}, u_{t,i}⟩, and v_{t+1} exists only
  once θ_{t+1} does: the round's updates are read once more in the next round, while
  the parties train.

:class:`DirSpill` appends each round's updates to one raw float32 file per round
(``round-NNNNNN/updates.f32``) and indexes them in a text file beside it (party, offset,
size, checksum; nothing pickled), deleted once both uses are done: RAM stays O(model);
the page cache and the disk hold the rest. One file per round, not per update: at
1,000 parties the file creations alone (ext4 inode allocation) were 8 % of the
aggregator's CPU (issue 14). The writes happen on a background thread, off the
upload's path: an upload is copied into one of a few recycled model-sized buffers (a
memcpy) and acknowledged; when every buffer waits for the disk, the next upload waits
for one (back-pressure, never unbounded memory). A read waits for its own update's
write, so nothing reads an update before it is whole.
:class:`MemorySpill` keeps copies in memory, for in-process runs of small models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import xxhash

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

    def has_room(self) -> bool:
        """Whether :meth:`stage` would copy at once (a buffer is free)."""
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

    def has_room(self) -> bool:
        """Memory is never full here."""
        return True

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


@dataclass(frozen=True)
class _Where:
    """Where a stored update is in its round's file, and its checksum."""

    offset: int  # bytes
    size: int  # float32 elements
    checksum: str  # XXH3-64 of its bytes, hex


DATA_FILE = "updates.f32"
INDEX_FILE = "index.txt"


class _RoundFile:
    """The open data and index files of one round (written by the writer thread)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.data = os.open(folder / DATA_FILE, flags, 0o600)
        try:
            self.index = os.open(folder / INDEX_FILE, flags | os.O_APPEND, 0o600)
        except BaseException:
            os.close(self.data)
            raise
        self.end = os.fstat(self.data).st_size  # a resumed run appends after

    def close(self) -> None:
        for fd in (self.data, self.index):
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_at(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Write ``buffer``'s raw bytes at ``offset`` of ``fd`` (short writes retried)."""
    view = buffer.data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class DirSpill:
    """Each round's updates in one file, ``root/round-NNNNNN/updates.f32``.

    Updates are written by one background thread, then named in the round's
    ``index.txt`` (``<party id in hex> <byte offset> <elements> <xxh3-64>`` per line),
    and are not fsynced: they serve the open round and the next one, and a resumed
    run that finds one missing, or whose checksum does not match, records that
    party's second-order score as unknown. Reads wait for the update's write;
    :meth:`flush` waits for all of them.

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
        self._where: dict[tuple[int, str], _Where] = {}  # written by this process
        self._files: dict[int, _RoundFile] = {}  # rounds open for writing
        self._on_disk: dict[int, dict[str, _Where]] = {}  # indexes read back (resume)
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

    def has_room(self) -> bool:
        """Whether a buffer is free (or none was sized yet)."""
        with self._cond:
            return self._error is not None or self._held < (self.buffers or 1)

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
        with self._cond:
            f = self._files.get(w.round)
        if f is None:
            f = _RoundFile(self._dir(w.round))
            with self._cond:
                self._files[w.round] = f
        offset = f.end
        _write_at(f.data, w.buffer, offset)
        f.end = offset + w.buffer.nbytes
        where = _Where(offset, w.buffer.size, xxhash.xxh3_64_hexdigest(w.buffer.data))
        # Named only once whole: a kill between the two leaves it unnamed (missing).
        line = f"{w.party.encode().hex()} {offset} {where.size} {where.checksum}\n"
        os.write(f.index, line.encode())
        with self._cond:
            self._where[(w.round, w.party)] = where

    def flush(self) -> None:
        """Wait until every committed update is on disk (or failed)."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def close(self) -> None:
        """Finish the queued writes, stop the writer thread and close the files."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            files, self._files = self._files, {}
        for f in files.values():
            f.close()

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

    def _locate(self, round_index: int, party_id: str) -> _Where | None:
        """Where the update is (written by this process, or named in the index)."""
        with self._cond:
            where = self._where.get((round_index, party_id))
            if where is not None:
                return where
            known = self._on_disk.get(round_index)
        if known is None:
            known = _read_index(self._dir(round_index))
            with self._cond:
                self._on_disk[round_index] = known
        return known.get(party_id)

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """Memory-map the stored update (read-only), or None if it is missing/bad.

        Used by the close for the updates it folds late; the second-order pass reads
        in blocks (:meth:`dot`), so its pages are not mapped into the process.
        """
        failed = self._settled(round_index, party_id)
        if failed is not None:
            raise _again(failed)
        where = self._locate(round_index, party_id)
        if where is None:
            return None
        path = self._dir(round_index) / DATA_FILE
        try:
            arr: np.ndarray = np.memmap(
                path, dtype="<f4", mode="r", offset=where.offset, shape=(where.size,)
            )
        except (OSError, ValueError) as e:
            log.warning(
                "spilled update of %s in %s is unreadable: %s", party_id, path, e
            )
            return None
        if xxhash.xxh3_64_hexdigest(arr.data) != where.checksum:
            log.warning("spilled update of %s in %s is corrupt", party_id, path)
            return None
        return arr

    def dot(self, round_index: int, party_id: str, v: np.ndarray) -> float | None:
        """⟨v, u⟩ read in blocks into one reused buffer; None if missing or bad."""
        if self._settled(round_index, party_id) is not None:
            return None
        where = self._locate(round_index, party_id)
        if where is None:
            return None
        path = self._dir(round_index) / DATA_FILE
        if where.size != v.size:
            log.warning(
                "spilled update of %s in %s has %d elements, not %d",
                party_id,
                path,
                where.size,
                v.size,
            )
            return None
        try:
            with open(path, "rb") as f, self._read_lock:
                f.seek(where.offset)
                return self._blocked_read_dot(f, v, where, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning(
                "spilled update of %s in %s is unreadable: %s", party_id, path, e
            )
            return None

    def _blocked_read_dot(
        self, f: BinaryIO, v: np.ndarray, where: _Where, path: Path
    ) -> float | None:
        if self._read_buf is None:
            self._read_buf = np.empty(_READ_BLOCK, dtype=np.float32)
        buf = self._read_buf
        raw = buf.view(np.uint8).data
        check = xxhash.xxh3_64()
        total = 0.0
        for s in range(0, v.size, buf.size):
            n = min(buf.size, v.size - s)
            if _read_exactly(f, raw[: 4 * n]) < 4 * n:
                log.warning("spilled update in %s is truncated", path)
                return None
            check.update(raw[: 4 * n])
            total += float(np.dot(v[s : s + n], buf[:n]))
        if check.hexdigest() != where.checksum:
            log.warning("spilled update in %s is corrupt (checksum)", path)
            return None
        return total

    # ------------------------------------------------------------ dropping
    def drop(self, round_index: int) -> None:
        """Delete the round's files (queued writes of it are cancelled)."""
        with self._cond:
            for w in self._queue:
                if w.round == round_index:
                    w.cancelled = True
            while any(r == round_index for r, _ in self._pending):
                self._cond.wait()
            self._forget({round_index})
        shutil.rmtree(self._dir(round_index), ignore_errors=True)

    def drop_all(self, keep: Collection[int] = ()) -> None:
        """Delete every spilled round but ``keep`` (a resumed run's pending ones)."""
        self.flush()
        with self._cond:
            known = {r for r, _ in self._where} | set(self._files) | set(self._on_disk)
            self._forget(known - set(keep))
        if not self.root.is_dir():
            return
        kept = {self._dir(r).name for r in keep}
        for d in self.root.iterdir():
            if d.name not in kept:
                shutil.rmtree(d, ignore_errors=True)

    def _forget(self, rounds: Collection[int]) -> None:
        """Close and forget what is known of ``rounds`` (under the condition)."""
        for table in (self._failed, self._where):
            for key in [k for k in table if k[0] in rounds]:
                del table[key]
        for r in rounds:
            self._on_disk.pop(r, None)
            f = self._files.pop(r, None)
            if f is not None:
                f.close()


def _read_index(folder: Path) -> dict[str, _Where]:
    """A round's index as written (the last line of a party wins); {} if none.

    A line that does not parse (a kill mid-line) is skipped: that update is missing.
    """
    out: dict[str, _Where] = {}
    try:
        text = (folder / INDEX_FILE).read_text(encoding="ascii", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) != 4 or len(parts[3]) != 16:
            continue
        try:
            party = bytes.fromhex(parts[0]).decode()
            where = _Where(int(parts[1]), int(parts[2]), parts[3])
        except ValueError:
            continue
        if where.offset >= 0 and where.size >= 0:
            out[party] = where
    return out


def _again(err: OSError) -> OSError:
    """A fresh exception naming the same failure (one per thread that raises it)."""
    return OSError(err.errno, err.strerror or str(err), err.filename)


def _memory_handle(staged: object) -> tuple[int, str, np.ndarray]:
    assert isinstance(staged, tuple) and len(staged) == 3
    return staged


def _dir_handle(staged: object) -> _Staged:
    assert isinstance(staged, _Staged)
    return staged


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
