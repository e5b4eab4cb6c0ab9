"""``fedgrpc export RUN_DIR``: the run's model as a PyTorch state dict file."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from fedgrpc.errors import ConfigError, NotFoundError

_FORMATS = ("safetensors", "pt")  # = fedgrpc.learning.export.EXPORT_FORMATS (torch)


def add_parsers(sub: Any) -> None:
    """Add ``export``."""
    p = sub.add_parser(
        "export",
        help="write a run's model as a state dict (.safetensors or .pt) that "
        "model.load_state_dict accepts",
    )
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a serve run directory (or a simulate one: its server/ is used)",
    )
    p.add_argument(
        "--format", choices=_FORMATS, default="safetensors", help="file format"
    )
    p.add_argument(
        "--round",
        type=int,
        help="the model after this round (rounds from 0; only the newest "
        "checkpoints are kept); default: the final model",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output file (default RUN_DIR/model-final.EXT or model-round-N.EXT)",
    )
    p.set_defaults(func=_cmd_export)


def _server_dir(run_dir: Path) -> Path:
    for d in (run_dir, run_dir / "server"):
        if (d / "ledger.sqlite").is_file():
            return d
    raise NotFoundError(f"{run_dir} is not a run directory (no ledger.sqlite)")


def _description(meta: dict[str, Any], server_dir: Path) -> dict[str, Any]:
    """Model name, input shape, classes, hidden: from the checkpoint, else the run."""
    if "model" in meta and isinstance(meta["model"], dict):
        return dict(meta["model"])
    from fedgrpc.store.ledger import Ledger

    with Ledger.open_readonly(server_dir / "ledger.sqlite") as ledger:
        info = ledger.run_info() or {}
    rnd = info.get("config", {}).get("round", {})
    if not rnd:
        raise ConfigError(f"{server_dir}: the run recorded no model description")
    return {
        "model": rnd["model"],
        "input_shape": list(rnd["input_shape"]),
        "num_classes": rnd["num_classes"],
        "hidden": rnd["model_hidden"],
    }


def _cmd_export(a: argparse.Namespace) -> int:
    from fedgrpc.learning.export import export_model
    from fedgrpc.store.checkpoint import load_arrays
    from fedgrpc.store.run_dir import CHECKPOINTS, FINAL_MODEL, RunDir

    server_dir = _server_dir(a.run_dir)
    if a.round is None:
        source = server_dir / FINAL_MODEL
        if not source.is_file():
            raise NotFoundError(
                f"{server_dir} has no {FINAL_MODEL} (the run has not finished); "
                "pass --round N for a checkpoint"
            )
        name = "model-final"
    else:
        # The checkpoint of round N+1's start is the model after round N.
        source = RunDir(server_dir).checkpoint_path(a.round + 1)
        if not source.is_file():
            kept = sorted(
                int(m.group(1)) - 1
                for p in (server_dir / CHECKPOINTS).glob("round-*.npz")
                if (m := re.fullmatch(r"round-(\d+)\.npz", p.name)) and int(m.group(1))
            )
            raise NotFoundError(
                f"no checkpoint of the model after round {a.round} in {server_dir}; "
                f"kept: {', '.join(f'after round {r}' for r in kept) or 'none'}"
            )
        name = f"model-round-{a.round}"
    arrays, meta = load_arrays(source)
    desc = _description(meta, server_dir)
    desc["source"] = str(source)
    if a.round is not None:
        desc["after_round"] = a.round
    out = a.out or server_dir / f"{name}.{a.format}"
    export_model(arrays, desc, out, a.format)
    print(json.dumps({"written": str(out), "description": desc}, indent=2))
    return 0
