"""Benchmark: every strategy on MNIST, clean and with label flippers, and its scoring.

Part 1, training (issue 13): MNIST, 10 parties, an IID split and a Dirichlet(0.3)
label-skew split, each clean and with 2 parties flipping 80 % of their labels. Per
strategy: final validation accuracy, rounds to 90 %, the close's time per round (the
aggregator's own work: reading the round back, combining, stepping, scoring) and the
aggregator's strategy state (optimiser moments and the parties' momenta, bytes).
Every run is the real engine in process (``fedgrpc.learning.inprocess``), the same
code ``fedgrpc serve`` runs, without the network.

Part 2, scoring: 6 IID parties, 2 flipping 80 %; per strategy, Pearson of DIG-FL
(digfl-1 and digfl-2) against exact Shapley (all 63 coalitions retrained under the
same strategy, ``fedgrpc shapley``'s ground truth), and the credits' sum against the
measured total loss drop.

FedBuff is not here: its staleness depends on arrival times, which an in-process run
does not have (tests/integration/test_strategies_grpc.py runs it over gRPC).

    python scripts/bench_strategies.py [--rounds 40] [--output FILE.json]
    python scripts/bench_strategies.py --only fedavg,fedadam --skip-fidelity

Needs the MNIST IDX files in ../shared/data/mnist; exits 0 saying so when absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedgrpc.config import RoundConfig, SplitConfig
from fedgrpc.datasets.attacks import parse_assignments
from fedgrpc.datasets.split import prepare_parties
from fedgrpc.learning.ground_truth import evaluate
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.types import UpdateKind

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
FLIP = ("3=label-flip:0.8", "7=label-flip:0.8")
FLIP6 = ("1=label-flip:0.8", "4=label-flip:0.8")

# name -> RoundConfig overrides (on top of the FedAvg base below).
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"prox_mu": 0.01},
    "fedavgm": {"server_opt": "avgm", "server_beta1": 0.9, "server_opt_lr": 0.3},
    "fedadagrad": {"server_opt": "adagrad", "server_beta1": 0.0},
    "fedadam": {"server_opt": "adam"},
    "fedyogi": {"server_opt": "yogi"},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean", "trim_beta": 0.2},
    "krum": {"aggregation": "krum", "krum_f": 2},
    "fltrust": {"aggregation": "fltrust"},
    "sampled-50%": {"sample_fraction": 0.5},
}


def base_config(rounds: int, seed: int, parties: int) -> RoundConfig:
    """FedAvg: local SGD (10 steps of 32), sample weights, the default bounds."""
    return RoundConfig(
        rounds=rounds, min_parties=parties, seed=seed, model="mlp", model_hidden=64,
        update_kind=UpdateKind.DELTA, lr=0.05, local_steps=10, batch_size=32,
        input_shape=(1, 28, 28),
    )  # fmt: skip


def train_row(
    cfg: RoundConfig, split: SplitConfig, holdout: int, target: float
) -> dict[str, Any]:
    """One training run: accuracy per round, rounds to ``target``, close time, state."""
    # Label flipping is a data attack: prepare_parties applies it.
    parties, val = prepare_parties(split, holdout)
    t0 = time.perf_counter()
    engine, results = run_in_process(
        replace(
            cfg, min_parties=replace(cfg, min_parties=1).asked_per_round(len(parties))
        ),
        parties,
        val,
    )
    wall = time.perf_counter() - t0
    accs = [r.val_acc_after for r in results if r.ok]
    reach = next((i + 1 for i, a in enumerate(accs) if a >= target), None)
    state = engine.strategy_state()
    return {
        "final_acc": accs[-1] if accs else math.nan,
        "best_acc": max(accs) if accs else math.nan,
        "rounds_to_target": reach,
        "close_ms": 1e3 * sum(r.aggregate_s for r in results) / max(1, len(results)),
        "state_bytes": int(sum(v.nbytes for v in state.values())),
        "wall_s": wall,
        "acc_curve": [round(a, 4) for a in accs],
    }


def fidelity_row(cfg: RoundConfig, split: SplitConfig, holdout: int) -> dict[str, Any]:
    """DIG-FL against exact Shapley under ``cfg``'s strategy (6 parties)."""
    parties, val = prepare_parties(split, holdout)
    report = evaluate(
        replace(cfg, min_parties=len(parties)),
        parties,
        val,
        parse_assignments(list(split.attacks)),
        method="exact",
    )
    return {
        "pearson1": report.pearson,
        "pearson2": report.pearson2,
        "sum1": sum(report.digfl.values()),
        "sum2": sum(report.digfl2.values()),
        "measured": report.grand_loss_drop,
        "acc": report.final_val_acc,
        "shapley_s": report.shapley_s,
        "digfl1": report.digfl,
        "shapley": report.shapley,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--fidelity-rounds", type=int, default=15)
    ap.add_argument("--train-count", type=int, default=9000)
    ap.add_argument("--fidelity-train-count", type=int, default=2400)
    ap.add_argument("--val-holdout", type=int, default=1000)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated strategy names")
    ap.add_argument("--splits", default="iid,dirichlet:0.3")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--output", type=Path, help="write all results as one JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not args.mnist.is_dir():
        print(f"skipped: no MNIST directory at {args.mnist}")
        return 0
    names = [n for n in STRATEGIES if not args.only or n in args.only.split(",")]
    t0 = time.perf_counter()
    training: list[dict[str, Any]] = []
    fidelity: list[dict[str, Any]] = []
    data = f"mnist:{args.mnist}"
    if not args.skip_training:
        base = base_config(args.rounds, args.seed, 10)
        for partition in args.splits.split(","):
            for flip in (False, True):
                split = SplitConfig(
                    data=data, parties=10, partition=partition,
                    train_count=args.train_count, seed=args.seed,
                    attacks=FLIP if flip else (),
                )  # fmt: skip
                for name in names:
                    cfg = replace(base, **STRATEGIES[name])
                    row = {"strategy": name, "split": partition, "flippers": 2 * flip}
                    row.update(train_row(cfg, split, args.val_holdout, args.target))
                    training.append(row)
                    print(json.dumps({"bench": "training", **row}), flush=True)
    if not args.skip_fidelity:
        base = base_config(args.fidelity_rounds, args.seed, 6)
        split = SplitConfig(
            data=data, parties=6, train_count=args.fidelity_train_count,
            seed=args.seed, attacks=FLIP6,
        )  # fmt: skip
        for name in names:
            cfg = replace(base, **STRATEGIES[name])
            row = {"strategy": name}
            row.update(fidelity_row(cfg, split, args.val_holdout))
            fidelity.append(row)
            print(json.dumps({"bench": "fidelity", **row}), flush=True)
    print(
        "\n".join(tables(training, fidelity, args, time.perf_counter() - t0)),
        file=sys.stderr,
    )
    if args.output is not None:
        args.output.write_text(
            json.dumps({"training": training, "fidelity": fidelity}, indent=2) + "\n"
        )
    return 0


def tables(
    training: list[dict[str, Any]],
    fidelity: list[dict[str, Any]],
    args: argparse.Namespace,
    seconds: float,
) -> list[str]:
    """The Markdown tables docs/benchmarks.md quotes."""
    lines = [
        f"MNIST, {args.train_count} training images, 10 parties, {args.rounds} rounds "
        f"(delta: 10 local steps of 32, lr 0.05); total {seconds:.0f} s",
    ]
    if training:
        cases = list(dict.fromkeys((r["split"], r["flippers"]) for r in training))
        head = " | ".join(f"{s} {'flip' if f else 'clean'}" for s, f in cases)
        lines += [
            "",
            f"final accuracy (rounds to {args.target:.0%})",
            "",
            f"| strategy | {head} | close ms | state |",
            "|---|" + "---|" * len(cases) + "---|---|",
        ]
        for name in dict.fromkeys(r["strategy"] for r in training):
            cells = []
            rows = [r for r in training if r["strategy"] == name]
            for s, f in cases:
                r = next(x for x in rows if x["split"] == s and x["flippers"] == f)
                reach = r["rounds_to_target"] or "-"
                cells.append(f"{r['final_acc']:.3f} ({reach})")
            close = sum(r["close_ms"] for r in rows) / len(rows)
            state = max(r["state_bytes"] for r in rows)
            lines.append(
                f"| {name} | {' | '.join(cells)} | {close:.1f} | {state / 1e6:.1f} MB |"
            )
    if fidelity:
        lines += [
            "",
            f"DIG-FL vs exact Shapley, 6 IID parties, 2 flipping 80 %, "
            f"{args.fidelity_rounds} rounds",
            "",
            "| strategy | Pearson digfl-1 | Pearson digfl-2 | sum digfl-1 | "
            "sum digfl-2 | measured drop | accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fidelity:
            lines.append(
                f"| {r['strategy']} | {r['pearson1']:.4f} | {r['pearson2']:.4f} | "
                f"{r['sum1']:.4f} | {r['sum2']:.4f} | {r['measured']:.4f} | "
                f"{r['acc']:.3f} |"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
