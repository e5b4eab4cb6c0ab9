"""DIG-FL reweighted aggregation vs plain sample weighting with heavily flipped labels.

MNIST (../shared/data/mnist, 10,000 images: 2,000 validation, 8,000 over 6 parties),
MLP, most parties holding heavily flipped labels. Runs the same engine in-process twice
(``--aggregation samples`` and ``digfl``) with the same seed and data, and prints
validation accuracy and loss of both, one JSON line per run and a markdown table.

    python scripts/bench_digfl_reweight.py [--rounds 30] [--flip 0.9] [--attacked 4]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from fedgrpc.config import RoundConfig, SplitConfig
from fedgrpc.datasets.split import prepare_parties
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.types import UpdateKind

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"mnist:{ROOT.parent / 'shared/data/mnist'}")
    ap.add_argument("--parties", type=int, default=6)
    ap.add_argument(
        "--attacked", type=int, default=4, help="parties with flipped labels"
    )
    ap.add_argument("--flip", type=float, default=0.9, help="label-flip rate")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--update-kind", default="gradient", choices=["gradient", "delta"])
    ap.add_argument("--server-lr", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.data.startswith("mnist:") and not Path(a.data[6:]).is_dir():
        print(f"MNIST not found at {a.data[6:]}; pass --data digits to run on digits")
        return 0
    holdout = 2000 if a.data.startswith("mnist:") else 360
    specs = [
        f"{i}=label-flip:{a.flip}" for i in range(a.parties - a.attacked, a.parties)
    ]
    split = SplitConfig(
        data=a.data,
        parties=a.parties,
        partition="iid",
        attacks=tuple(specs),
        seed=a.seed,
    )
    parties, val = prepare_parties(split, holdout)
    base = config_for_data(
        RoundConfig(
            rounds=a.rounds,
            min_parties=a.parties,
            update_kind=UpdateKind(a.update_kind),
            server_lr=a.server_lr,
            lr=a.lr,
            batch_size=a.batch_size,
            seed=a.seed,
        ),
        val,
    )
    rows = []
    for aggregation in ("samples", "digfl"):
        t0 = time.perf_counter()
        _, results = run_in_process(
            replace(base, aggregation=aggregation), parties, val
        )
        wall = time.perf_counter() - t0
        last = results[-1]
        best = max(r.val_acc_after for r in results)
        honest = [f"party-{i}" for i in range(a.parties - a.attacked)]
        weight_honest = sum(p.weight for p in last.parties if p.party_id in honest)
        row = {
            "aggregation": aggregation,
            "rounds": a.rounds,
            "attacked": a.attacked,
            "flip": a.flip,
            "val_acc": last.val_acc_after,
            "best_val_acc": best,
            "val_loss": last.val_loss_after,
            "honest_weight_last_round": weight_honest,
            "wall_s": wall,
        }
        print(json.dumps(row))
        rows.append(row)
    print()
    print(
        f"{a.attacked} of {a.parties} parties flip {a.flip:.0%} of labels, "
        f"{a.update_kind}, {a.rounds} rounds"
    )
    print(
        "| aggregation | final val acc | best val acc | final val loss "
        "| honest weight (last round) | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['aggregation']} | {r['val_acc']:.4f} | {r['best_val_acc']:.4f} | "
            f"{r['val_loss']:.4f} | {r['honest_weight_last_round']:.3f} | "
            f"{r['wall_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
