"""``fedgrpc split``: each party's partition and the validation set as ``.npz``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedgrpc.cli.options import add_data_options, split_config
from fedgrpc.config import SplitConfig

_SPLIT = SplitConfig()


def add_parsers(sub: Any) -> None:
    """Add ``split``."""
    p = sub.add_parser(
        "split", help="write each party's partition and the validation set"
    )
    add_data_options(p, defaults=_SPLIT, holdout_help="20%% of the data")
    p.add_argument(
        "--seed",
        type=int,
        default=_SPLIT.seed,
        help="seed of the split, the partition and the attacks",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (one line per item) or json",
    )
    p.set_defaults(func=_cmd_split)


def _cmd_split(a: argparse.Namespace) -> int:
    from fedgrpc.datasets.split import VALIDATION_FILE, prepare_parties, write_split

    split = split_config(a)
    parties, val = prepare_parties(split)
    manifest = write_split(a.out, split, parties, val)
    if a.format == "json":
        doc = {
            "parties": [
                {**entry, "file": str(a.out / entry["file"])}
                for entry in manifest["parties"]
            ],
            "validation": {"samples": len(val), "file": str(a.out / VALIDATION_FILE)},
        }
        print(json.dumps(doc, indent=2))
        return 0
    for entry in manifest["parties"]:
        attack = f" (attack {entry['attack']})" if entry["attack"] else ""
        print(
            f"{entry['party_id']}: {entry['samples']} samples -> "
            f"{a.out / entry['file']}{attack}"
        )
    print(f"validation: {len(val)} samples -> {a.out / VALIDATION_FILE}")
    return 0
