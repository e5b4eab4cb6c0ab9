"""How far apart are the final models of seeded simulate runs, by backend?

Runs ``fedgrpc simulate`` (24 parties, two attacked, 5 rounds, seed 3) with the
processes backend, then Ray, then both again, and compares each final model and each
party's DIG-FL total with the first run's: bitwise equality, parameters differing,
largest absolute and relative differences. One JSON line per run.

    python scripts/compare_backends.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedgrpc.store.checkpoint import load_arrays

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parties", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--order", default="processes,ray,processes,ray")
    a = ap.parse_args()
    args = ["--parties", str(a.parties), "--rounds", str(a.rounds), "--seed", "3"]
    args += ["--attack", "5=label-flip:1.0", "--attack", "9=scale:-1"]
    args += ["-q", "--format", "json"]
    ref: tuple[np.ndarray, dict[str, float]] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, backend in enumerate(a.order.split(",")):
            run_dir = Path(tmp) / f"run{i}"
            res = subprocess.run(
                [sys.executable, "-m", "fedgrpc", "simulate", "--backend", backend,
                 *args, "--run-dir", str(run_dir)],
                capture_output=True, text=True, env=ENV, cwd=tmp, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            arrays, _ = load_arrays(run_dir / "server" / "final_model.npz")
            flat = np.concatenate([arrays[k].ravel() for k in sorted(arrays)])
            totals = json.loads(res.stdout)["totals"]
            if ref is None:
                ref = (flat, totals)
            diff = np.abs(flat - ref[0])
            rel = diff / np.maximum(np.abs(ref[0]), 1e-12)
            trel = max(
                abs(totals[p] - ref[1][p]) / max(abs(ref[1][p]), 1e-12) for p in totals
            )
            row = {
                "run": i,
                "backend": backend,
                "bitwise_equal": bool(np.array_equal(flat, ref[0])),
                "differing": int((flat != ref[0]).sum()),
                "parameters": int(flat.size),
                "max_abs_diff": float(diff.max()),
                "max_rel_diff": float(rel.max()),
                "totals_max_rel_diff": float(trel),
                "load_1min": os.getloadavg()[0],
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
