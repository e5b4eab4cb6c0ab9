"""Fixed costs of a run, measured from outside through the console script.

* ``simulate_wall_s``: wall time of the default ``fedgrpc simulate --run-dir D``
  (fresh D each rep), from Popen to exit.
* ``serve_exit_after_done_s``: ``fedgrpc serve --insecure --grace-period 0`` with two
  ``fedgrpc client`` processes on a digits split, 3 rounds: from the moment the last
  party logged that training is over (its log line's timestamp, ms) to the server
  process's exit (polled every 5 ms). Servers older than ``--grace-period`` get
  ``--no-grace`` (pass it for the old layout, which exited by default).

One JSON line per measurement (median, min, max, every sample, the 1-minute load
average before each rep), then a summary line. ``--fedgrpc`` benchmarks another
install (e.g. the checkout before a change):

    python scripts/bench_simulate.py                       # this venv, 5 reps
    python scripts/bench_simulate.py --fedgrpc /x/.venv/bin/fedgrpc --no-grace
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DONE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*training over", re.M)


def _load() -> float:
    return os.getloadavg()[0]


def _summary(name: str, samples: list[float], loads: list[float]) -> dict[str, Any]:
    return {
        "name": name,
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(s, 3) for s in samples],
        "load_1min": [round(x, 2) for x in loads],
    }


def bench_simulate(fedgrpc: str, reps: int) -> dict[str, Any]:
    samples, loads = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            loads.append(_load())
            t0 = time.monotonic()
            res = subprocess.run(
                [fedgrpc, "simulate", "--run-dir", str(Path(tmp) / "sim")],
                cwd=tmp,  # `python -m fedgrpc` must not find a checkout in the cwd
                env=ENV,
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            samples.append(time.monotonic() - t0)
            if res.returncode != 0:
                raise SystemExit(f"simulate failed:\n{res.stdout}\n{res.stderr}")
    return _summary("simulate_wall_s", samples, loads)


def _one_exit(fedgrpc: str, work: Path, no_grace: bool) -> float:
    data = work / "data"
    subprocess.run(
        [
            fedgrpc,
            "split",
            "--parties",
            "2",
            "--val-holdout",
            "300",
            "--out",
            str(data),
        ],
        env=ENV,
        cwd=work,
        check=True,
        capture_output=True,
    )
    port_file = work / "port"
    serve = [
        fedgrpc, "serve", "--insecure", "--address", "localhost:0",
        "--port-file", str(port_file), "--run-dir", str(work / "run"),
        "--val-data", f"npz:{data / 'val.npz'}", "--min-parties", "2",
        "--rounds", "3", "--model", "logreg",
    ]  # fmt: skip
    if not no_grace:
        serve += ["--grace-period", "0"]
    with (work / "serve.log").open("wb") as slog:
        server = subprocess.Popen(
            serve, env=ENV, cwd=work, stdout=slog, stderr=subprocess.STDOUT
        )
    clients = []
    try:
        end = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > end or server.poll() is not None:
                raise SystemExit(
                    f"serve did not start: {(work / 'serve.log').read_text()}"
                )
            time.sleep(0.01)
        port = port_file.read_text().strip()
        for i in range(2):
            log = work / f"c{i}.log"
            with log.open("wb") as f:
                clients.append(
                    subprocess.Popen(
                        [
                            fedgrpc,
                            "client",
                            "--insecure",
                            "--server",
                            f"localhost:{port}",
                            "--party-id",
                            f"party-{i}",
                            "--data",
                            f"npz:{data / f'party-{i}.npz'}",
                        ],
                        env=ENV,
                        cwd=work,
                        stdout=subprocess.DEVNULL,
                        stderr=f,
                    )
                )
        end = time.monotonic() + 300
        while server.poll() is None:
            if time.monotonic() > end:
                raise SystemExit("serve did not exit")
            time.sleep(0.005)
        exited = time.time()
        for c in clients:
            c.wait(timeout=60)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
    done = []
    for i in range(2):
        m = DONE_LINE.search((work / f"c{i}.log").read_text())
        if m is None:
            raise SystemExit(f"party-{i} logged no done message")
        stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        done.append(stamp.timestamp())
    return exited - max(done)


def bench_exit(fedgrpc: str, reps: int, no_grace: bool) -> dict[str, Any]:
    samples, loads = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            loads.append(_load())
            samples.append(_one_exit(fedgrpc, Path(tmp), no_grace))
    return _summary("serve_exit_after_done_s", samples, loads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--fedgrpc",
        default=str(Path(sys.executable).parent / "fedgrpc"),
        help="console script to benchmark",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--no-grace", action="store_true", help="serve has no --grace-period"
    )
    ap.add_argument("--only", choices=["simulate", "exit"], help="run one benchmark")
    args = ap.parse_args()
    results = []
    if args.only in (None, "simulate"):
        results.append(bench_simulate(args.fedgrpc, args.reps))
        print(json.dumps(results[-1]), flush=True)
    if args.only in (None, "exit"):
        results.append(bench_exit(args.fedgrpc, args.reps, args.no_grace))
        print(json.dumps(results[-1]), flush=True)
    print(
        json.dumps(
            {
                "summary": {r["name"]: round(r["median"], 3) for r in results},
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
