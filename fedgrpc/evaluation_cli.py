"""The ``fedgrpc shapley`` subcommand: exact Shapley ground truth against DIG-FL.

``cli.py`` registers it with :func:`add_shapley_parser`; the parsed arguments go to
:func:`run_shapley`. Output is data, so it goes to stdout (table or JSON); the progress
bar and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from fedgrpc.checkpoint import atomic_write
from fedgrpc.cli_options import add_data_options, add_training_options, round_config
from fedgrpc.config import RoundConfig
from fedgrpc.datasets.attacks import parse_assignments
from fedgrpc.errors import ConfigError
from fedgrpc.evaluation import (
    METHODS,
    evaluate,
    format_table,
    prepare_parties,
    progress_bar,
)

log = logging.getLogger(__name__)

DIGITS_VAL_HOLDOUT = 360
"""Default validation hold-out for digits (20% of 1797)."""
OTHER_VAL_HOLDOUT = 2000
"""Default validation hold-out for every other data set (e.g. MNIST)."""

_DEFAULTS = RoundConfig()


def add_shapley_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``shapley`` subcommand; its ``func`` default is :func:`run_shapley`."""
    p = subparsers.add_parser(
        "shapley",
        help="exact Shapley values by retraining every coalition, against DIG-FL",
        description=(
            "Train every coalition of the parties in process (2^n - 1 runs, same data, "
            "seed and initial model), compute exact Shapley values of the validation-"
            "loss drop, and compare them with DIG-FL's estimate from one full run and "
            "with leave-one-out."
        ),
    )
    add_data_options(p, parties=4)
    add_training_options(p, defaults=_DEFAULTS)
    train = p.add_argument_group("evaluation run")
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per training (default: %(default)s)",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="exact (all coalitions), permutation (Monte Carlo) or auto "
        "(exact up to 10 parties) (default: %(default)s)",
    )
    ev.add_argument(
        "--permutations",
        type=int,
        default=200,
        help="random orders for --method permutation (default: %(default)s)",
    )
    ev.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="stdout format (default: %(default)s)",
    )
    ev.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the JSON report to FILE",
    )
    ev.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr: auto = when stderr is a terminal",
    )
    p.set_defaults(func=run_shapley)
    return p


def run_shapley(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args``; 0 on success, 2 on a config error."""
    try:
        doc, table = _evaluate(args)
    except ConfigError as err:
        sys.stderr.write(f"fedgrpc shapley: {err}\n")
        return 2
    if args.output is not None:
        write_json(args.output, doc)
        log.info("wrote %s", args.output)
    if args.format == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(table + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    holdout = args.val_holdout or (
        DIGITS_VAL_HOLDOUT if args.data == "digits" else OTHER_VAL_HOLDOUT
    )
    attacks = parse_assignments(args.attack)
    parties, val = prepare_parties(
        args.data,
        args.parties,
        args.partition,
        holdout,
        attacks,
        args.seed,
        train_count=args.train_count,
    )
    cfg = round_config(args, min_parties=args.parties, expected=args.parties)
    show = args.progress != "never"
    progress = (
        partial(progress_bar, stream=sys.stderr, force=args.progress == "always")
        if show
        else None
    )
    report = evaluate(
        cfg,
        parties,
        val,
        attacks,
        method=args.method,
        permutations=args.permutations,
        rng_seed=args.seed,
        progress=progress,
        threads=args.threads,
    )
    report.setup.update(
        data=args.data,
        parties=args.parties,
        partition=args.partition,
        val_holdout=holdout,
        train_count=args.train_count,
        attacks=list(args.attack),
        seed=args.seed,
    )
    return report.to_json(), format_table(report)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (temp file, fsync, rename)."""
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))
