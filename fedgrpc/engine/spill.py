"""Where a round's accepted updates wait after they were streamed (pure NumPy + files).

Two things need an update again after its upload ended, without the aggregator holding
parties x model size in memory:

* the norm bound B_t is known only when the round closes (it is derived from all the
  round's norms), so an update too large to fold on arrival is folded at the close,
  scaled by its clip factor;
* the second-order score ``digfl-2`` needs ⟨v_{t+1}, u_{t,i}⟩, and v_{t+1} exists only
  once θ_{t+1} does: the round's updates are read once more in the next round, while
  the parties train.

:class:`DirSpill` writes each update as an ``.npy`` file (raw float32, loaded with
``allow_pickle=False`` and memory-mapped), one directory per round, deleted once both
uses are done: RAM stays O(model); the page cache and the disk hold the rest.
:class:`MemorySpill` keeps copies in memory, for in-process runs of small models.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

_READ_BLOCK = 1 << 20  # elements per block of a dot product read back from a spill


class Spill(Protocol):
    """Per-round storage of accepted updates (raw float32 vectors).

    An upload is staged (the copy, outside the engine lock) and committed only once
    the round accepted it (a rename, under the lock): an upload that is refused, or
    a second stream of the same party, never replaces what was accepted.
    """

    def stage(self, round_index: int, party_id: str, update: np.ndarray) -> object:
        """Copy ``update`` (1-D float32) aside; returns a handle for commit/discard."""
        ...

    def commit(self, staged: object) -> None:
        """Make a staged update the party's stored update of its round."""
        ...

    def discard(self, staged: object) -> None:
        """Forget a staged update that was not accepted."""
        ...

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """The stored update (read-only), or None if it is not there."""
        ...

    def drop(self, round_index: int) -> None:
        """Forget every update of round ``round_index``."""
        ...


class MemorySpill:
    """Copies in memory (in-process simulation and ground truth: small models)."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, np.ndarray]] = {}

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

    def drop(self, round_index: int) -> None:
        """Free the round's copies."""
        self._rounds.pop(round_index, None)


class DirSpill:
    """One ``.npy`` file per update under ``root/round-NNNNNN/`` (the aggregator's).

    Files are not fsynced: they serve the open round and the next one, and a resumed
    run that finds one missing records that party's second-order score as unknown.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, round_index: int) -> Path:
        return self.root / f"round-{round_index:06d}"

    def _path(self, round_index: int, party_id: str) -> Path:
        # Hex of the id: any party id is a safe, distinct file name.
        return self._dir(round_index) / f"{party_id.encode().hex()}.npy"

    def stage(
        self, round_index: int, party_id: str, update: np.ndarray
    ) -> tuple[Path, Path]:
        """Write the update under a name of its own (concurrent uploads never meet)."""
        path = self._path(round_index, party_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(update, dtype=np.float32), allow_pickle=False)
        return tmp, path

    def commit(self, staged: object) -> None:
        """Rename the staged file into place (atomic: a reader never sees half)."""
        tmp, path = _dir_handle(staged)
        tmp.replace(path)

    def discard(self, staged: object) -> None:
        """Delete the staged file."""
        tmp, _ = _dir_handle(staged)
        tmp.unlink(missing_ok=True)

    def read(self, round_index: int, party_id: str) -> np.ndarray | None:
        """Memory-map the stored update (read-only), or None if it is missing/bad."""
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

    def drop(self, round_index: int) -> None:
        """Delete the round's directory."""
        shutil.rmtree(self._dir(round_index), ignore_errors=True)

    def drop_all(self, keep: int | None = None) -> None:
        """Delete every spilled round but ``keep`` (a resumed run's pending one)."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if keep is None or d.name != self._dir(keep).name:
                shutil.rmtree(d, ignore_errors=True)


def _memory_handle(staged: object) -> tuple[int, str, np.ndarray]:
    assert isinstance(staged, tuple) and len(staged) == 3
    return staged


def _dir_handle(staged: object) -> tuple[Path, Path]:
    assert isinstance(staged, tuple) and len(staged) == 2
    return staged


def blocked_dot(v: np.ndarray, u: np.ndarray) -> float:
    """⟨v, u⟩ read in blocks (u may be memory-mapped), summed in float64."""
    total = 0.0
    for s in range(0, u.size, _READ_BLOCK):
        e = min(u.size, s + _READ_BLOCK)
        total += float(np.dot(v[s:e], u[s:e]))
    return total
