"""Wire compression: float32 vs float16 vs bfloat16 updates and models.

Two measurements per wire dtype, each with its float32 baseline from the same run:

1. Accuracy and contribution cost: a real `fedgrpc simulate` run on MNIST
   (../shared/data/mnist; 8,000 images over 6 parties, 2,000 held out, MLP, delta
   updates, one local epoch, parties 4 and 5 flipping 40 % / 80 % of their labels),
   reporting final validation accuracy and the Pearson/Spearman correlation of each
   party's DIG-FL total with the float32 run's. The server always aggregates and scores
   in float32.
2. Speed: seconds for one party process (torch loaded, as in any party) to upload
   one update of P float32 parameters (default 16 M) to the aggregator in this
   process (no torch here, as in ``fedgrpc serve``) over loopback, best of a few
   tries, and the resulting ingest rate in float32-equivalent GB/s.

    python scripts/bench_wire_dtype.py [--rounds 30] [--params 16000000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import round_quiet

from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import ClientConfig, Limits, RoundConfig, ServerConfig
from fedgrpc.scoring.shapley import pearson, spearman
from fedgrpc.server.app import Aggregator
from fedgrpc.types import UpdateKind

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")


def accuracy_run(dtype: str, rounds: int, work: Path) -> dict[str, Any]:
    run_dir = work / f"sim-{dtype}"
    cmd = [
        sys.executable,
        "-m",
        "fedgrpc",
        "simulate",
        "--data",
        f"mnist:{ROOT.parent / 'shared/data/mnist'}",
        "--parties",
        "6",
        "--val-holdout",
        "2000",
        "--rounds",
        str(rounds),
        "--update-kind",
        "delta",
        "--lr",
        "0.1",
        "--batch-size",
        "32",
        "--wire-dtype",
        dtype,
        "--attack",
        "4=label-flip:0.4",
        "--attack",
        "5=label-flip:0.8",
        "--run-dir",
        str(run_dir),
        "--format",
        "json",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "contributions.json").read_text())
    return {"val_acc": summary["val_acc"], "totals": summary["totals"], "wall_s": wall}


def _party_uploads(port: int, conn: Connection) -> None:
    """A party process (torch loaded, as in any party): one upload per round asked."""
    import torch  # noqa: F401 - parties have it; the client casts with it

    client = AggregatorClient(
        ClientConfig(
            server=f"localhost:{port}",
            party_id="p",
            data="",
            insecure=True,
            rpc_timeout_s=300.0,
        )
    )
    client.join(1)
    update = {
        s.name: np.random.default_rng(0).standard_normal(s.shape).astype(np.float32)
        for s in client.specs
    }
    conn.send("ready")
    while (t := conn.recv()) is not None:
        t0 = time.perf_counter()
        client.submit(t, update, 1, train_loss=0.0, kind=UpdateKind.GRADIENT)
        conn.send(time.perf_counter() - t0)
    client.close()


def upload_seconds(dtype: str, params: int, tries: int, work: Path) -> float:
    """Best seconds for one party process to upload ``params`` values to the server.

    The aggregator runs here (no torch in this process, as in ``fedgrpc serve``); the
    party is a spawned process with torch loaded, as a real party has.
    """
    cfg = ServerConfig(
        round=RoundConfig(
            rounds=tries,
            min_parties=1,
            model="bench_models:flat_model",
            model_hidden=params,
            update_kind=UpdateKind.GRADIENT,
            wire_dtype=dtype,
            round_timeout_s=300.0,
        ),
        address="localhost:0",
        run_dir=work / f"up-{dtype}",
        val_data="digits",
        val_count=64,
        insecure=True,
        limits=Limits(),
    )
    agg = Aggregator(cfg)
    agg.start()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    party = ctx.Process(target=_party_uploads, args=(agg.port, there), daemon=True)
    party.start()
    try:
        if not here.poll(120) or here.recv() != "ready":
            raise RuntimeError("party process did not join")
        best = float("inf")
        for t in range(tries):
            # Open, published and v_t computed: the validation worker's pass must
            # not share the 2 cores with the upload being timed.
            while not round_quiet(agg, t):
                time.sleep(0.01)
            here.send(t)
            best = min(best, float(here.recv()))
        here.send(None)
        party.join(timeout=30)
        return best
    finally:
        if party.is_alive():
            party.kill()
        agg.shutdown(grace_s=0.5, save_open_round=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--params", type=int, default=16_000_000)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--skip-accuracy", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # bench_models for the flat model
    mnist = (ROOT.parent / "shared/data/mnist").is_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wire-dtype-") as tmp:
        work = Path(tmp)
        base: dict[str, Any] | None = None
        for dtype in DTYPES:
            row: dict[str, Any] = {"wire_dtype": dtype}
            secs = upload_seconds(dtype, a.params, a.tries, work)
            row.update(upload_s=secs, ingest_gbps_f32_equiv=a.params * 4 / secs / 1e9)
            if mnist and not a.skip_accuracy:
                acc = accuracy_run(dtype, a.rounds, work)
                base = base or acc
                parties = sorted(base["totals"])
                x = [base["totals"][p] for p in parties]
                y = [acc["totals"][p] for p in parties]
                row.update(
                    val_acc=acc["val_acc"],
                    pearson_vs_f32=pearson(x, y),
                    spearman_vs_f32=spearman(x, y),
                    sim_wall_s=acc["wall_s"],
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
    f32 = rows[0]["upload_s"]
    print()
    print(
        f"| wire dtype | upload of {a.params / 1e6:g} M params (s) | speed-up | "
        "val acc (MNIST) | Pearson vs f32 | Spearman vs f32 |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['wire_dtype']} | {r['upload_s']:.3f} | {f32 / r['upload_s']:.2f}x | "
            f"{r.get('val_acc', float('nan')):.4f} | "
            f"{r.get('pearson_vs_f32', float('nan')):.7f} | "
            f"{r.get('spearman_vs_f32', float('nan')):.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
