"""``fedgrpc shapley``: exact Shapley ground truth against DIG-FL, and its output.

The parsed arguments go to :func:`run_shapley`, which imports the torch wing
(:mod:`fedgrpc.learning.ground_truth`) only when the command runs. Output is data, so
it goes to stdout (table or JSON); the progress bar and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fedgrpc.cli.options import (
    add_data_options,
    add_training_options,
    round_config,
    split_config,
)
from fedgrpc.config import SHAPLEY_METHODS, RoundConfig, ShapleyConfig, SplitConfig
from fedgrpc.errors import ConfigError
from fedgrpc.security.registry import PARTY_ID_RE
from fedgrpc.store.files import atomic_write

if TYPE_CHECKING:
    from fedgrpc.learning.ground_truth import ShapleyReport

log = logging.getLogger(__name__)

_SHAPLEY = ShapleyConfig()


def add_parsers(sub: Any) -> None:
    """Add ``shapley``; its ``func`` default is :func:`run_shapley`."""
    p = sub.add_parser(
        "shapley",
        help="exact Shapley values by retraining every coalition, against DIG-FL",
        description=(
            "Train every coalition of the parties in process (2^n - 1 runs, same data, "
            "seed and initial model), compute exact Shapley values of the validation-"
            "loss drop, and compare them with DIG-FL's estimate from one full run and "
            "with leave-one-out."
        ),
    )
    add_data_options(
        p,
        defaults=SplitConfig(parties=_SHAPLEY.parties),
        holdout_help=f"{_SHAPLEY.digits_val_holdout} for digits, else "
        f"{_SHAPLEY.val_holdout}",
    )
    own = p.add_argument_group(
        "own data (instead of splitting --data)",
        "Each party brings its own data set and the validation set is given "
        "explicitly; --data, --parties, --partition, --val-holdout and "
        "--train-count then do not apply.",
    )
    own.add_argument(
        "--party-data",
        action="append",
        default=[],
        metavar="ID=npz:FILE",
        help="one party's data: arrays x (N, *input_shape) and y (N,) in an .npz "
        "file, as fedgrpc client --data takes (or any other --data spec); repeat per "
        "party, in the order to report them. Needs --val-data",
    )
    own.add_argument(
        "--val-data",
        default=None,
        metavar="npz:FILE",
        help="the validation set (arrays x and y) for --party-data",
    )
    p.add_argument(
        "--init-model",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="start every coalition from these weights (the file fedgrpc serve "
        "--init-model takes) instead of the seeded initialisation",
    )
    add_training_options(p, defaults=RoundConfig())
    train = p.add_argument_group("evaluation run")
    train.add_argument(
        "--threads",
        type=int,
        default=_SHAPLEY.threads,
        help="torch threads per training (default: %(default)s)",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--method",
        choices=SHAPLEY_METHODS,
        default=_SHAPLEY.method,
        help="exact (all coalitions), permutation (Monte Carlo) or auto "
        "(exact up to 10 parties) (default: %(default)s)",
    )
    ev.add_argument(
        "--permutations",
        type=int,
        default=_SHAPLEY.permutations,
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
    from fedgrpc.datasets.attacks import parse_assignments
    from fedgrpc.datasets.split import load_parties, prepare_parties
    from fedgrpc.learning.ground_truth import evaluate  # torch: only here
    from fedgrpc.learning.validation import config_for_data, setup_model

    split = split_config(args)
    attacks = parse_assignments(split.attacks)
    own = parse_party_data(args.party_data)
    setup: dict[str, Any]
    if own or args.val_data is not None:
        _check_own_data(args, own, split)
        parties, val = load_parties(own, args.val_data, attacks, args.seed)
        setup = {"party_data": own, "val_data": args.val_data}
    else:
        holdout = split.val_holdout or _SHAPLEY.holdout_for(split.data)
        parties, val = prepare_parties(split, holdout)
        setup = {
            "data": args.data,
            "parties": args.parties,
            "partition": args.partition,
            "val_holdout": holdout,
            "train_count": args.train_count,
        }
    cfg = round_config(args, min_parties=len(parties), expected=len(parties))
    # The same loader and checks as `fedgrpc serve --init-model`.
    theta0 = (
        None
        if args.init_model is None
        else setup_model(config_for_data(cfg, val), args.init_model).theta0
    )
    show = args.progress != "never"
    progress = (
        eta_progress(stream=sys.stderr, force=args.progress == "always")
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
        theta0=theta0,
    )
    report.setup.update(
        setup,
        init_model=None if args.init_model is None else str(args.init_model),
        attacks=list(args.attack),
        seed=args.seed,
    )
    return report.to_json(), format_table(report)


def parse_party_data(items: list[str]) -> dict[str, str]:
    """``ID=SPEC`` assignments as party id -> data spec, in the order given.

    Raises:
        ConfigError: an item without ``=`` or a spec, an invalid id, or a repeated id.
    """
    out: dict[str, str] = {}
    for item in items:
        pid, sep, spec = item.partition("=")
        pid, spec = pid.strip(), spec.strip()
        if not sep or not spec:
            raise ConfigError(
                f"--party-data {item!r}: expected ID=npz:FILE, e.g. alice=npz:alice.npz"
            )
        if not PARTY_ID_RE.fullmatch(pid):
            raise ConfigError(
                f"--party-data {item!r}: party id {pid!r} is invalid: need 1-64 of "
                "[A-Za-z0-9_.-]"
            )
        if pid in out:
            raise ConfigError(f"--party-data: party {pid} is given twice")
        out[pid] = spec
    return out


def _check_own_data(
    args: argparse.Namespace, own: dict[str, str], split: SplitConfig
) -> None:
    """--party-data and --val-data come together, and without the split options.

    Raises:
        ConfigError: one without the other, or a split option set with them.
    """
    if not own:
        raise ConfigError("--val-data needs --party-data ID=npz:FILE (one per party)")
    if args.val_data is None:
        raise ConfigError("--party-data needs --val-data npz:FILE (the validation set)")
    base = SplitConfig(parties=_SHAPLEY.parties)
    for option, value, default in (
        ("--data", split.data, base.data),
        ("--parties", split.parties, base.parties),
        ("--partition", split.partition, base.partition),
        ("--val-holdout", split.val_holdout, base.val_holdout),
        ("--train-count", split.train_count, base.train_count),
    ):
        if value != default:
            raise ConfigError(
                f"{option} splits --data; with --party-data each file is one party's "
                "data and --val-data the validation set"
            )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (NaN refused: JSON has none)."""
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))


def format_table(report: ShapleyReport) -> str:
    """An aligned text table per party, then correlations and timings."""
    rs, rd, rl = (
        report.ranks(report.shapley),
        report.ranks(report.digfl),
        report.ranks(report.loo),
    )
    label = "exact" if report.method == "exact" else f"MC/{report.permutations}"
    header = [
        "party",
        "attack",
        "samples",
        f"shapley({label})",
        "shapley(acc)",
        "digfl-1",
        "digfl-2",
        "loo",
        "rank S",
        "rank D",
        "rank L",
    ]
    rows = [
        [
            p,
            report.attacks.get(p) or "-",
            str(report.samples[p]),
            f"{report.shapley[p]:+.5f}",
            f"{report.shapley_acc[p]:+.4f}",
            f"{report.digfl[p]:+.5f}",
            f"{report.digfl2[p]:+.5f}",
            f"{report.loo[p]:+.5f}",
            str(rs[p]),
            str(rd[p]),
            str(rl[p]),
        ]
        for p in report.parties
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    n = len(report.parties)
    what = (
        f"exact, {2**n - 1} coalitions"
        if report.method == "exact"
        else f"{report.permutations} permutations, "
        f"{report.coalitions_trained} coalitions"
    )
    out += [
        "",
        f"Shapley ({what} x {report.rounds} rounds): sum "
        f"{sum(report.shapley.values()):+.5f}"
        f" = v(N) {report.grand_loss_drop:+.5f}; digfl-1 sum "
        f"{sum(report.digfl.values()):+.5f}, digfl-2 sum "
        f"{sum(report.digfl2.values()):+.5f}",
        f"digfl-1 vs Shapley: Pearson {_fmt(report.pearson)}, Spearman "
        f"{_fmt(report.spearman)}; digfl-2: Pearson {_fmt(report.pearson2)}, "
        f"Spearman {_fmt(report.spearman2)}   (LOO vs Shapley: Pearson "
        f"{_fmt(report.loo_pearson)}, "
        f"Spearman {_fmt(report.loo_spearman)})",
        f"validation (all parties): loss {report.val_loss0:.4f} -> "
        f"{report.final_val_loss:.4f}, accuracy {report.val_acc0:.4f} -> "
        f"{report.final_val_acc:.4f}",
        f"time: DIG-FL run {report.digfl_run_s:.2f} s (scoring "
        f"{report.digfl_scoring_s:.3f} s), Shapley {report.shapley_s:.2f} s, "
        f"LOO {report.loo_s:.2f} s; "
        f"Shapley/DIG-FL {_fmt(report.time_ratio, '.1f')}x "
        f"({_fmt(report.scoring_ratio, '.0f')}x the scoring alone)",
        f"CPU time: DIG-FL run {report.digfl_run_cpu_s:.2f} s, Shapley "
        f"{report.shapley_cpu_s:.2f} s; Shapley/DIG-FL "
        f"{_fmt(report.cpu_ratio, '.1f')}x",
    ]
    return "\n".join(out)


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if not math.isfinite(x) else format(x, spec)


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """`` 12 s, ETA 51 s`` (or `` in 63.0 s`` once done; no ETA before the first)."""
    if done >= total:
        return f" in {elapsed_s:.1f} s"
    if done <= 0:
        return f" {elapsed_s:.0f} s"
    left = elapsed_s / done * (total - done)
    return f" {elapsed_s:.0f} s, ETA {left:.0f} s"


def eta_progress(
    *, stream: TextIO | None = None, force: bool = False, unit: str = "coalitions"
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback: :func:`progress_bar` with an ETA.

    Elapsed time is measured from this call.
    """
    started = time.monotonic()

    def draw(done: int, total: int) -> None:
        progress_bar(
            done,
            total,
            stream=stream,
            force=force,
            unit=unit,
            elapsed_s=time.monotonic() - started,
        )

    return draw


def progress_bar(
    done: int,
    total: int,
    *,
    stream: TextIO | None = None,
    force: bool = False,
    width: int = 30,
    unit: str = "coalitions",
    elapsed_s: float | None = None,
) -> None:
    """Draw ``[#####.....] 12/63 coalitions`` over the line on ``stream`` (stderr).

    Draws only when the stream is a TTY, unless ``force``; ends the line at
    ``done >= total``. With ``elapsed_s`` (time since the work began) it adds the
    elapsed time and an ETA (the mean time per item so far times the items left).
    """
    out = sys.stderr if stream is None else stream
    if not force and not (hasattr(out, "isatty") and out.isatty()):
        return
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    filled = round(frac * width)
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}"
    if elapsed_s is not None:
        line += eta_text(done, total, elapsed_s)
    out.write(line)
    if done >= total:
        out.write("\n")
    out.flush()
