"""Kill the aggregator (SIGKILL) at random points of a seeded run, resume, compare.

For each trial: `fedgrpc serve` + N `fedgrpc client` processes on loopback; at a random
point (after a random number of committed rounds, plus a random delay that lands inside
the next round or its commit) the aggregator is SIGKILLed, restarted with
`fedgrpc serve --resume RUN_DIR` on the same port, and the parties reconnect by
themselves. The final model and the ledger (every round's status and validation loss,
every per-party score) must equal an uninterrupted in-process run of the same engine
with the same seed, within the stated tolerance. Prints one JSON line per trial and a
summary table.

    python scripts/kill_resume.py --trials 10 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrpc.config import RoundConfig
from fedgrpc.datasets.sources import load_dataset
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.validation import config_for_data
from fedgrpc.store.checkpoint import load_arrays
from fedgrpc.types import RoundResult, UpdateKind

RTOL, ATOL = 1e-4, 1e-5
FEDGRPC = [sys.executable, "-m", "fedgrpc"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [*FEDGRPC, *args], stdout=f, stderr=subprocess.STDOUT, env=ENV
        )


def _wait_port(port_file: Path, timeout_s: float = 60) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text())
        time.sleep(0.05)
    raise TimeoutError("server did not write its port")


def _wait_ready(port: int, timeout_s: float = 120) -> None:
    """Wait until the server's run is set up (health SERVING).

    ``fedgrpc serve`` writes its port file as soon as it listens, before the run is
    recorded in the ledger: a kill before this point leaves nothing to resume.
    """
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                reply = None
            if (
                reply is not None
                and reply.status == health_pb2.HealthCheckResponse.SERVING
            ):
                return
            time.sleep(0.05)
    raise TimeoutError("server did not finish setting up its run")


def _ledger(
    run_dir: Path,
) -> tuple[dict[int, tuple[str, float]], dict[tuple[int, str], float]]:
    con = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        rounds = {
            int(r): (str(s), float(v))
            for r, s, v in con.execute(
                "SELECT round, status, val_loss_after FROM rounds"
            )
        }
        scores = {
            (int(r), str(p)): float(s)
            for r, p, s in con.execute(
                "SELECT round, party_id, score FROM party_rounds"
            )
        }
    finally:
        con.close()
    return rounds, scores


def _committed(run_dir: Path) -> int:
    try:
        return len(_ledger(run_dir)[0])
    except sqlite3.Error:
        return 0


def trial(
    i: int,
    after_rounds: int,
    delay_s: float,
    data: Path,
    work: Path,
    args: argparse.Namespace,
    reference: tuple[np.ndarray, list[RoundResult]],
    layout_names: list[str],
) -> dict[str, Any]:
    run_dir, port_file, log = (
        work / f"run{i}",
        work / f"port{i}",
        work / f"server{i}.log",
    )
    train = [
        "--rounds",
        str(args.rounds),
        "--update-kind",
        "delta",
        "--lr",
        "0.1",
        "--batch-size",
        "16",
        "--model",
        "mlp",
        "--hidden",
        "32",
        "--seed",
        str(args.seed),
        "--min-parties",
        str(args.parties),
        "--round-timeout",
        "60",
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = _start(
            [
                "serve",
                "--insecure",
                "--address",
                "localhost:0",
                "--port-file",
                str(port_file),
                "--run-dir",
                str(run_dir),
                "--val-data",
                f"npz:{data / 'val.npz'}",
                "--grace-period",
                "0",
                *train,
            ],
            log,
        )
        procs.append(server)
        port = _wait_port(port_file)
        _wait_ready(port)
        for p in range(args.parties):
            procs.append(
                _start(
                    [
                        "client",
                        "--insecure",
                        "--server",
                        f"localhost:{port}",
                        "--party-id",
                        f"party-{p}",
                        "--data",
                        f"npz:{data / f'party-{p}.npz'}",
                        "--connect-timeout",
                        "120",
                    ],
                    work / f"c{i}-{p}.log",
                )
            )
        end = time.monotonic() + 120
        while _committed(run_dir) < after_rounds and time.monotonic() < end:
            time.sleep(0.005)
        time.sleep(delay_s)  # somewhere inside the next round (or its commit)
        killed_at = _committed(run_dir)
        finished_before_kill = server.poll() is not None
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        resumed = _start(
            [
                "serve",
                "--insecure",
                "--address",
                f"localhost:{port}",
                "--resume",
                str(run_dir),
                "--grace-period",
                "0",
            ],
            log,
        )
        procs.append(resumed)
        codes = [c.wait(timeout=300) for c in procs[1 : 1 + args.parties]]
        code = resumed.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    theta_ref, results = reference
    arrays, _ = load_arrays(run_dir / "final_model.npz")
    got = np.concatenate([arrays[n].reshape(-1) for n in layout_names])
    model_err = float(np.max(np.abs(got - theta_ref)))
    model_ok = bool(np.allclose(got, theta_ref, rtol=RTOL, atol=ATOL))
    rounds, scores = _ledger(run_dir)
    want_scores = {(r.round, p.party_id): p.score for r in results for p in r.parties}
    ledger_ok = (
        sorted(rounds) == list(range(args.rounds))
        and all(s == "ok" for s, _ in rounds.values())
        and set(scores) == set(want_scores)
        and all(
            abs(scores[k] - v) <= 1e-3 * abs(v) + 1e-6 for k, v in want_scores.items()
        )
        and all(
            abs(rounds[r.round][1] - r.val_loss_after)
            <= 1e-4 * abs(r.val_loss_after) + 1e-5
            for r in results
        )
    )
    return {
        "trial": i,
        "kill_after_rounds": after_rounds,
        "extra_delay_s": round(delay_s, 3),
        "rounds_committed_at_kill": killed_at,
        "run_over_before_kill": finished_before_kill,
        "client_exit_codes": codes,
        "resumed_exit_code": code,
        "max_abs_model_diff": model_err,
        "model_equal": model_ok,
        "ledger_equal": ledger_ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run(
            [
                *FEDGRPC,
                "split",
                "--parties",
                str(a.parties),
                "--val-holdout",
                "300",
                "--seed",
                str(a.seed),
                "--out",
                str(data),
            ],
            check=True,
            env=ENV,
            capture_output=True,
        )
        parties = {
            f"party-{p}": load_dataset(f"npz:{data / f'party-{p}.npz'}")
            for p in range(a.parties)
        }
        val = load_dataset(f"npz:{data / 'val.npz'}")
        cfg = config_for_data(
            RoundConfig(
                rounds=a.rounds,
                min_parties=a.parties,
                update_kind=UpdateKind.DELTA,
                lr=0.1,
                batch_size=16,
                model="mlp",
                model_hidden=32,
                seed=a.seed,
            ),
            val,
        )
        engine, results = run_in_process(cfg, parties, val)
        names = [s.name for s in engine.layout.specs]
        # Kill points spread over the run: after a random number of committed rounds,
        # plus a random delay that lands anywhere in the next round or its commit.
        rng = random.Random(a.seed)
        rows = []
        for i in range(a.trials):
            after = 0 if i == 0 else rng.randrange(a.rounds)
            row = trial(
                i,
                after,
                rng.uniform(0.0, 0.1),
                data,
                work,
                a,
                (engine.theta, results),
                names,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    ok = sum(r["model_equal"] and r["ledger_equal"] for r in rows)
    print()
    print(
        f"| trial | waited for rounds | extra delay s | rounds committed at kill | "
        f"max abs model diff | model equal (rtol {RTOL}, atol {ATOL}) | ledger equal |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trial']} | {r['kill_after_rounds']} | {r['extra_delay_s']} | "
            f"{r['rounds_committed_at_kill']} | {r['max_abs_model_diff']:.2e} | "
            f"{r['model_equal']} | {r['ledger_equal']} |"
        )
    print(
        f"\n{ok} of {len(rows)} kill points resumed to the same final model and ledger"
    )
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
