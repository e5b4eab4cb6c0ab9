"""One run's directory: naming, checkpoints and their pruning, resume (DESIGN §6).

    ledger.sqlite                 the ledger (WAL)
    checkpoints/round-NNNNNN.npz  theta at the start of round N (+ .sha256 sidecar)
    final_model.npz               the model when the run ended
    summary.json                  state, rounds and final metrics of a finished run

A round's checkpoint is written before the ledger commits the round together with
the resume pointer, so the pointer never names a file that is not whole on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedgrpc.errors import ConfigError
from fedgrpc.layout import FlatLayout
from fedgrpc.store.checkpoint import load_arrays, save_arrays
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
    ) -> dict[str, Any]:
        """Write a checkpoint; return the resume pointer the ledger commits.

        ``model`` describes how to rebuild the model (name, input shape, classes,
        hidden width) and is stored with it (``fedgrpc export`` reads it).
        """
        path = self.checkpoint_path(next_round)
        meta: dict[str, Any] = {"run_id": run_id, "next_round": next_round}
        if model is not None:
            meta["model"] = model
        digest = save_arrays(path, dict(layout.iter_arrays(theta)), meta)
        return {
            "next_round": next_round,
            "checkpoint": path.name,
            "checkpoint_sha256": digest,
        }

    def prune_checkpoints(self, newest: int) -> None:
        """Delete checkpoints older than the last ``KEEP_CHECKPOINTS``."""
        for path in (self.path / CHECKPOINTS).glob("round-*.npz"):
            if int(path.stem.split("-")[1]) <= newest - KEEP_CHECKPOINTS:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def load_resume(self, ledger: Ledger, layout: FlatLayout) -> tuple[np.ndarray, int]:
        """Theta and the round to continue from, as the ledger's pointer names them."""
        state = ledger.get_state(RESUME_KEY)
        if state is None:
            raise ConfigError(f"--resume {self.path}: no committed checkpoint")
        arrays, _ = load_arrays(
            self.path / CHECKPOINTS / state["checkpoint"],
            expected_sha256=state["checkpoint_sha256"],
        )
        return layout.flatten(arrays), int(state["next_round"])

    def save_final(
        self, layout: FlatLayout, theta: np.ndarray, meta: dict[str, Any]
    ) -> None:
        """The model as the run ended."""
        save_arrays(self.path / FINAL_MODEL, dict(layout.iter_arrays(theta)), meta)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json`` of a finished run."""
        atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2).encode())
