"""One run's directory: naming, checkpoints and their pruning, resume (DESIGN §6).

    ledger.sqlite                 the ledger (WAL)
    checkpoints/round-NNNNNN.npz  theta at the start of round N (+ .sha256 sidecar)
    final_model.npz               the model when the run ended
    summary.json                  state, rounds and final metrics of a finished run

A round's checkpoint is written and fsynced before the ledger commits the round
together with the resume pointer, so the pointer never names a file that is not whole
on disk. Its SHA-256 (in the pointer and the ``.sha256`` sidecar) and the pruning of
older checkpoints may follow once the next model is published
(:meth:`RunDir.seal_checkpoint`): until then the zip's CRC-32s check the file, and a
resumed run seals a pointer a crash left unsealed (docs/faults.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedgrpc.errors import ConfigError
from fedgrpc.layout import FlatLayout
from fedgrpc.store.checkpoint import (
    load_arrays,
    save_arrays,
    seal,
    write_arrays,
    write_sidecar,
)
from fedgrpc.store.files import atomic_write
from fedgrpc.store.ledger import LEDGER_FILE, Ledger

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
"""Checkpoints kept: the newest and the one before it."""
FINAL_MODEL = "final_model.npz"
SUMMARY = "summary.json"
RESUME_KEY = "resume"
"""Ledger state key of the resume pointer: next round, checkpoint file, its SHA-256."""


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def ledger_path(self) -> Path:
        """The ledger file."""
        return self.path / LEDGER_FILE

    def checkpoint_path(self, next_round: int) -> Path:
        """Where theta at the start of ``next_round`` is kept."""
        return self.path / CHECKPOINTS / f"round-{next_round:06d}.npz"

    def save_checkpoint(
        self,
        layout: FlatLayout,
        theta: np.ndarray,
        run_id: str,
        next_round: int,
        model: dict[str, Any] | None = None,
        strategy_state: Mapping[str, np.ndarray] | None = None,
        *,
        sealed: bool = True,
    ) -> dict[str, Any]:
        """Write a checkpoint (fsynced); return the resume pointer the ledger commits.

        ``model`` describes how to rebuild the model (name, input shape, classes,
        hidden width) and is stored with it (``fedgrpc export`` reads it).
        ``strategy_state`` (the server optimiser's moments, the parties' momenta) goes
        beside it, in ``strategy-NNNNNN.npz``, named and checksummed by the pointer.
        With ``sealed=False`` the files are written and fsynced but not hashed: the
        pointer's checksums are None until :meth:`seal_checkpoint`.
        """
        path = self.checkpoint_path(next_round)
        meta: dict[str, Any] = {"run_id": run_id, "next_round": next_round}
        if model is not None:
            meta["model"] = model
        pointer: dict[str, Any] = {
            "next_round": next_round,
            "checkpoint": path.name,
            "checkpoint_sha256": _save(
                path, dict(layout.iter_arrays(theta)), meta, sealed
            ),
        }
        if strategy_state:
            side = self.path / CHECKPOINTS / f"strategy-{next_round:06d}.npz"
            pointer["strategy_state"] = side.name
            pointer["strategy_sha256"] = _save(side, strategy_state, meta, sealed)
        return pointer

    def load_strategy_state(self, ledger: Ledger) -> dict[str, np.ndarray]:
        """The strategy state the resume pointer names (empty when it names none)."""
        state = ledger.get_state(RESUME_KEY)
        if state is None or not state.get("strategy_state"):
            return {}
        arrays, _ = load_arrays(
            self.path / CHECKPOINTS / str(state["strategy_state"]),
            expected_sha256=state.get("strategy_sha256") or None,
        )
        return arrays

    def seal_checkpoint(
        self, pointer: Mapping[str, Any], *, prune: bool = True
    ) -> dict[str, Any]:
        """The committed ``pointer`` with every checksum filled in; then pruning.

        An unhashed file is hashed as it is on disk; a file whose sidecar is
        missing gets it. The caller commits the returned pointer.
        """
        sealed = dict(pointer)
        for key, sha_key in _SHA_KEYS.items():
            if not pointer.get(key):
                continue
            path, digest = self.path / CHECKPOINTS / str(pointer[key]), pointer[sha_key]
            if not digest:
                sealed[sha_key] = seal(path)
            elif not path.with_name(path.name + ".sha256").is_file():
                write_sidecar(path, str(digest))
        if prune:
            self.prune_checkpoints(int(pointer["next_round"]))
        return sealed

    def prune_checkpoints(self, newest: int) -> None:
        """Delete checkpoints older than the last ``KEEP_CHECKPOINTS``."""
        for path in [
            *(self.path / CHECKPOINTS).glob("round-*.npz"),
            *(self.path / CHECKPOINTS).glob("strategy-*.npz"),
        ]:
            if int(path.stem.split("-")[1]) <= newest - KEEP_CHECKPOINTS:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def load_resume(self, ledger: Ledger, layout: FlatLayout) -> tuple[np.ndarray, int]:
        """Theta and the round to continue from, as the ledger's pointer names them."""
        state = ledger.get_state(RESUME_KEY)
        if state is None:
            raise ConfigError(f"--resume {self.path}: no committed checkpoint")
        next_round = int(state["next_round"])
        self.cross_check(next_round, str(state["checkpoint"]))
        path = self.path / CHECKPOINTS / state["checkpoint"]
        # Unsealed (killed before the hash followed the publication): the sidecar,
        # if it was written, or else the zip's CRCs check it.
        arrays, _ = load_arrays(
            path, expected_sha256=state.get("checkpoint_sha256") or None
        )
        return layout.flatten(arrays), next_round

    def cross_check(self, next_round: int, checkpoint: str) -> None:
        """Compare the ledger's resume pointer with the checkpoints on disk.

        A checkpoint one round newer than the pointer is normal (killed between the
        checkpoint and the ledger commit: warned). Newer still means the ledger lost
        committed rounds (a damaged or truncated WAL), and a missing named file means
        the directory was tampered with: both refuse, naming what is where.
        """
        on_disk = sorted(
            int(p.stem.split("-")[1])
            for p in (self.path / CHECKPOINTS).glob("round-*.npz")
            if p.stem.split("-")[1].isdigit()
        )
        listed = ", ".join(f"round-{r:06d}.npz" for r in on_disk) or "none"
        if not (self.path / CHECKPOINTS / checkpoint).is_file():
            raise ConfigError(
                f"--resume {self.path}: the ledger's resume pointer (round "
                f"{next_round}) names checkpoints/{checkpoint}, which is missing; "
                f"checkpoints on disk: {listed}. Restore the run directory from a "
                "backup (fedgrpc backup)"
            )
        newest = on_disk[-1] if on_disk else next_round
        if newest >= next_round + 2:
            raise ConfigError(
                f"--resume {self.path}: checkpoints/round-{newest:06d}.npz is newer "
                f"than the ledger's resume pointer (round {next_round}): the ledger "
                "lost committed rounds (a damaged or truncated WAL?). Restore "
                "ledger.sqlite from a backup (fedgrpc backup) rather than redo rounds"
            )
        if newest == next_round + 1:
            log.warning(
                "%s: checkpoint round-%06d.npz is one round newer than the ledger's "
                "pointer (killed before the round's commit?); resuming at round %d",
                self.path,
                newest,
                next_round,
            )

    def backup(self, ledger: Ledger, dest: Path) -> list[Path]:
        """Copy the run online to ``dest``: a consistent ledger, then its files.

        The ledger copy comes first (SQLite's backup API); the checkpoint its resume
        pointer names (and the strategy state beside it), the final model and the
        summary follow. Returns the files written.
        """
        import shutil

        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise ConfigError(f"backup destination {dest} is not empty")
        ledger.backup(dest / LEDGER_FILE)
        written = [dest / LEDGER_FILE]
        with Ledger(dest / LEDGER_FILE) as copy:
            state = copy.get_state(RESUME_KEY)
        names = []
        for name, _ in _named_files(state or {}):
            names += [f"{CHECKPOINTS}/{name}", f"{CHECKPOINTS}/{name}.sha256"]
        names += [FINAL_MODEL, FINAL_MODEL + ".sha256", SUMMARY]
        for name in names:
            src = self.path / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
                written.append(dest / name)
        if state is not None:
            # Copied before the run sealed its newest checkpoint: seal the copy.
            sealed = RunDir(dest).seal_checkpoint(state, prune=False)
            if sealed != state:
                with Ledger(dest / LEDGER_FILE) as copy:
                    copy.set_state(RESUME_KEY, sealed)
            for name, _ in _named_files(sealed):
                side = dest / CHECKPOINTS / f"{name}.sha256"
                if side not in written:
                    written.append(side)
        return written

    def clean_temp_files(self) -> list[Path]:
        """Delete the temp files of writes a kill interrupted; return them.

        Every file is written as ``.NAME.XXXX.tmp`` beside its target and renamed
        (``store.files.atomic_write``), so a dot-file ending in ``.tmp`` is never a
        finished file. Call only while no aggregator writes to this directory.
        """
        removed = []
        for where in (self.path, self.path / CHECKPOINTS):
            for tmp in where.glob(".*.tmp") if where.is_dir() else ():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        if removed:
            log.warning(
                "%s: removed %d temp files left by an interrupted write",
                self.path,
                len(removed),
            )
        return removed

    def discard_new(self, *, remove_dir: bool) -> None:
        """Remove what a run that never started left (its ledger, checkpoints).

        So a corrected command can use the same ``--run-dir``. Only for a
        directory whose ledger this attempt created; the ledger must be closed.
        """
        for name in (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm"):
            (self.path / name).unlink(missing_ok=True)
        ckpt = self.path / CHECKPOINTS
        if ckpt.is_dir():
            for f in ckpt.iterdir():
                f.unlink(missing_ok=True)
            ckpt.rmdir()
        if remove_dir:
            with contextlib.suppress(OSError):  # only if empty: never others' files
                self.path.rmdir()

    def save_final(
        self, layout: FlatLayout, theta: np.ndarray, meta: dict[str, Any]
    ) -> None:
        """The model as the run ended."""
        save_arrays(self.path / FINAL_MODEL, dict(layout.iter_arrays(theta)), meta)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json`` of a finished run."""
        atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2).encode())


_SHA_KEYS = {"checkpoint": "checkpoint_sha256", "strategy_state": "strategy_sha256"}


def _named_files(pointer: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """The files a resume pointer names under ``checkpoints/``, with their SHA-256.

    None: not sealed yet.
    """
    return [
        (str(pointer[key]), pointer.get(sha) or None)
        for key, sha in _SHA_KEYS.items()
        if pointer.get(key)
    ]


def _save(
    path: Path, arrays: Mapping[str, np.ndarray], meta: dict[str, Any], sealed: bool
) -> str | None:
    if sealed:
        return save_arrays(path, arrays, meta)
    write_arrays(path, arrays, meta)
    return None
