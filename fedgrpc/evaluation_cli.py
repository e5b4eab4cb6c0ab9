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
from fedgrpc.types import UpdateKind

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
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default="digits",
        help="digits, mnist:DIR, npz:FILE or package.module:factory "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--parties",
        type=int,
        default=4,
        help="number of parties (default: %(default)s)",
    )
    data.add_argument(
        "--partition",
        default="iid",
        help="iid, dirichlet:ALPHA, quantity:ALPHA or shards:K (default: %(default)s)",
    )
    data.add_argument(
        "--val-holdout",
        type=int,
        default=None,
        help=f"validation samples held out (default: {DIGITS_VAL_HOLDOUT} "
        f"for digits, {OTHER_VAL_HOLDOUT} otherwise)",
    )
    data.add_argument(
        "--train-count",
        type=int,
        default=0,
        help="keep only this many training samples (default: all)",
    )
    data.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="IDX=SPEC",
        help="attack a party, e.g. 3=label-flip:0.6 (repeatable)",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--model",
        default=_DEFAULTS.model,
        help="logreg, mlp, cnn or package.module:factory (default: %(default)s)",
    )
    train.add_argument(
        "--hidden",
        type=int,
        default=_DEFAULTS.model_hidden,
        help="hidden width of mlp/cnn (default: %(default)s)",
    )
    train.add_argument(
        "--rounds",
        type=int,
        default=_DEFAULTS.rounds,
        help="rounds per training (default: %(default)s)",
    )
    train.add_argument(
        "--update-kind",
        choices=[k.value for k in UpdateKind],
        default=_DEFAULTS.update_kind.value,
        help="gradient (FedSGD) or delta (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=_DEFAULTS.lr,
        help="local SGD step size, delta only (default: %(default)s)",
    )
    train.add_argument(
        "--server-lr",
        type=float,
        default=_DEFAULTS.server_lr,
        help="server step size, gradient only (default: %(default)s)",
    )
    train.add_argument(
        "--local-epochs",
        type=int,
        default=_DEFAULTS.local_epochs,
        help="local epochs, delta (default: %(default)s)",
    )
    train.add_argument(
        "--local-steps",
        type=int,
        default=_DEFAULTS.local_steps,
        help="local steps, delta; 0 = use epochs (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="local mini-batch; 0 = all local data (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="run seed: data split, attacks, model, batches (default: %(default)s)",
    )
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
    holdout = args.val_holdout
    if holdout is None:
        holdout = DIGITS_VAL_HOLDOUT if args.data == "digits" else OTHER_VAL_HOLDOUT
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
    cfg = RoundConfig(
        rounds=args.rounds,
        min_parties=args.parties,
        update_kind=UpdateKind(args.update_kind),
        server_lr=args.server_lr,
        lr=args.lr,
        local_steps=args.local_steps,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        model=args.model,
        model_hidden=args.hidden,
    )
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
