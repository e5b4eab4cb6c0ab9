"""Round time, payload throughput, aggregator RSS and threads vs N parties (issue 14).

N real gRPC parties (``fedgrpc.client.AggregatorClient``, one connection each) run as
threads of a few driver processes against a real ``fedgrpc serve`` subprocess with the
flat benchmark model of P float32 parameters. A party's local work is trivial: it
answers every model version with a precomputed update, so the round is pure system
cost. Every configuration runs for each code tree given (``--code NAME=DIR``; by
default this tree as ``new`` and ``git archive`` of ``--baseline-ref`` as
``baseline``), interleaved, so both see the same machine load.

Per configuration (rounds 1..R-2 measured; round 0 includes the joins):

* ``round_s``: median over rounds t of (first receipt of model t+1) - (first receipt
  of model t), across all parties (what the federation sees);
* ``payload_mb_s``: parties asked x 2 x P x 4 bytes (model down, update up) per
  ``round_s`` (all N without client sampling);
* ``server_cpu_s``: the aggregator process's user+system CPU seconds per round;
* ``rss_mib`` / ``hwm_mib``: the aggregator's largest sampled VmRSS and its VmHWM;
  ``threads``: its largest sampled thread count (the validation worker is another
  process and is not counted);
* ``errors``: failed calls seen by the parties, by status (and the first message).

    python scripts/bench_scale.py                          # N in 2..1000, P = 100 k
    python scripts/bench_scale.py --parties 1024 --code baseline=auto --rounds 3
    python scripts/bench_scale.py --parties 1000 --code new=. \
        --serve-arg=--sample-count=100 --serve-arg=--min-parties=100  # sampling
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_common import (
    emit,
    human,
    load_snapshot,
    machine_info,
    markdown_table,
    median,
    parse_count,
    write_val_npz,
)

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
BASELINE_REF = "2240c86"
"""main before issue 14: a GetModel thread per stream, polling every 0.5 s."""
SAMPLES = 100
SERVE_MAIN = (
    "import sys, fedgrpc; print('fedgrpc from', fedgrpc.__file__, flush=True); "
    "from fedgrpc.cli.main import main; sys.argv[0] = 'fedgrpc'; sys.exit(main())"
)
"""``fedgrpc serve``, saying which code tree it imported (checked per run)."""
JOINS_AT_ONCE = 24
"""Concurrent Join calls over all drivers (the server caps unary calls at 32)."""


# ------------------------------------------------------------------ driver
def driver_main(a: argparse.Namespace) -> int:
    """One driver process: ``a.count`` parties as threads; write their timings."""
    import numpy as np

    import fedgrpc
    from fedgrpc.client import stub
    from fedgrpc.client.stub import AggregatorClient, ModelVersion
    from fedgrpc.config import ClientConfig
    from fedgrpc.errors import ErrorCode, RemoteError
    from fedgrpc.types import TrainingDone, UpdateKind

    if not a.shared_connections:
        # One TCP connection per party, as deployed parties have (gRPC otherwise
        # shares one connection between the channels of a process).
        stub.CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    threading.stack_size(512 << 10)
    rng = np.random.default_rng(a.first)
    updates = [
        {"w": rng.standard_normal(a.params, dtype=np.float32) * np.float32(1e-3)}
        for _ in range(8)
    ]
    joins = threading.Semaphore(max(1, JOINS_AT_ONCE // a.drivers))
    lock = threading.Lock()
    recv: dict[int, list[float]] = {}  # round -> receipt times of its model
    sent: dict[int, list[float]] = {}  # round -> times the update was accepted
    models: dict[int, int] = {}  # round -> parties that got the model (sampled)
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    done = [0]
    end = time.monotonic() + a.timeout
    cpu0 = time.process_time()

    def note_error(err: RemoteError, where: str) -> None:
        key = f"{where} {err.code.name if err.code else 'UNKNOWN'}"
        with lock:
            errors[key] += 1
            first_error.setdefault(key, str(err)[:300])

    def party(i: int) -> None:
        pid = f"p{i:05d}"
        update = updates[i % len(updates)]
        cfg = ClientConfig(
            server=f"localhost:{a.port}",
            party_id=pid,
            data="",
            insecure=True,
            rpc_timeout_s=a.timeout,
            connect_timeout_s=a.timeout,
        )
        with AggregatorClient(cfg) as client:
            while True:
                try:
                    with joins:
                        client.join(SAMPLES)
                    break
                except RemoteError as err:
                    note_error(err, "Join")
                    if err.code != ErrorCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.2)
            next_round = 0
            while time.monotonic() < end:
                try:
                    left = end - time.monotonic()
                    for item in client.models(next_round, left):
                        if isinstance(item, TrainingDone):
                            with lock:
                                done[0] += 1
                            return
                        t = item.round
                        got = time.monotonic()
                        if not isinstance(item, ModelVersion):  # not sampled
                            with lock:
                                recv.setdefault(t, []).append(got)
                            next_round = t + 1
                            continue
                        with lock:
                            models[t] = models.get(t, 0) + 1
                        reply = client.submit(
                            t,
                            update,
                            SAMPLES,
                            train_loss=0.0,
                            kind=UpdateKind.GRADIENT,
                            submission_id=f"{pid}:{t}",
                        )
                        with lock:
                            recv.setdefault(t, []).append(got)
                            if reply.accepted:
                                sent.setdefault(t, []).append(time.monotonic())
                        next_round = t + 1
                except RemoteError as err:
                    # As the real party does: reconnect and ask for the round it needs.
                    note_error(err, "GetModel/Submit")
                    time.sleep(0.5)

    threads = [
        threading.Thread(target=party, args=(i,), daemon=True)
        for i in range(a.first, a.first + a.count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()) + 5)
    out = {
        "fedgrpc": fedgrpc.__file__,
        "parties": a.count,
        "finished": done[0],
        "recv": {t: [min(v), max(v), len(v)] for t, v in recv.items()},
        "sent": {t: [max(v), len(v)] for t, v in sent.items()},
        "models": models,
        "errors": dict(errors),
        "first_error": first_error,
        "cpu_s": time.process_time() - cpu0,
    }
    Path(a.out).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------ parent
def _proc_status(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(value)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return out


class Sampler:
    """Samples the aggregator's /proc status every ``period_s`` while it lives."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        self.pid = pid
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._period_s = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _proc_status(self.pid)
            if s:
                self.samples.append((time.monotonic(), s))
            self._stop.wait(self._period_s)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(timeout=5)

    def peak(self, key: str) -> float:
        """Largest sampled value of ``key``."""
        return max((s[key] for _, s in self.samples if key in s), default=float("nan"))

    def at(self, t: float, key: str) -> float:
        """The sampled value of ``key`` nearest to time ``t``."""
        best = min(self.samples, key=lambda ts: abs(ts[0] - t), default=None)
        return float("nan") if best is None else best[1].get(key, float("nan"))


def baseline_tree(ref: str, cache: Path) -> Path:
    """``git archive`` of ``ref`` unpacked under ``cache`` (made once, reused)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", ref],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = cache / f"fedgrpc-{sha}"
    if not (out / "fedgrpc" / "__init__.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha], cwd=REPO, capture_output=True
        )
        archive.check_returncode()
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _env(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The code under test first; scripts/ for the flat model (bench_models).
    env["PYTHONPATH"] = os.pathsep.join([str(code), str(code / "scripts")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MALLOC_ARENA_MAX", None)
    return env


def run_config(
    name: str,
    code: Path,
    n: int,
    a: argparse.Namespace,
    tmp: Path,
    val: str,
) -> dict[str, Any]:
    """One ``fedgrpc serve`` with ``n`` parties over ``a.drivers`` drivers."""
    run = tmp / f"{name}-{n}-{time.monotonic_ns()}"
    run.mkdir()
    port_file = run / "port"
    serve = [
        sys.executable,
        "-c",
        SERVE_MAIN,
        "serve",
        "--insecure",
        "--address",
        "localhost:0",
        "--port-file",
        str(port_file),
        "--run-dir",
        str(run / "run"),
        "--val-data",
        val,
        "--model",
        "bench_models:flat_model",
        "--hidden",
        str(a.params),
        "--rounds",
        str(a.rounds),
        "--min-parties",
        str(n),
        "--expected-parties",
        str(n),
        "--round-timeout",
        str(a.timeout),
        "--join-timeout",
        str(a.timeout),
        "--max-parties",
        str(max(1024, n)),
        "--grace-period",
        "0",
        "-q",
        *a.serve_arg,
    ]
    env = _env(code)
    load0 = load_snapshot()
    t0 = time.monotonic()
    log = (run / "serve.log").open("wb")
    # cwd: ``python -m`` puts it first on sys.path, before PYTHONPATH's code tree.
    server = subprocess.Popen(
        serve, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run
    )
    sampler = Sampler(server.pid)
    spy = None
    if a.py_spy:
        # Collapsed stacks of the aggregator (GIL holders and waiters), to read.
        a.profile_dir.mkdir(parents=True, exist_ok=True)
        folded = a.profile_dir / f"{name}-{n}.folded"
        spy = subprocess.Popen(
            [
                a.py_spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "50",
                "--nonblocking",
                "--pid",
                str(server.pid),
                "-o",
                str(folded),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    drivers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        end = time.monotonic() + 120
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"{name}: serve did not start: {(run / 'serve.log').read_text()}"
                )
            time.sleep(0.05)
        port = int(port_file.read_text())
        d = min(a.drivers, n)
        for k in range(d):
            first, count = k * n // d, (k + 1) * n // d - k * n // d
            out = run / f"driver{k}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--driver",
                "--port",
                str(port),
                "--first",
                str(first),
                "--count",
                str(count),
                "--params",
                str(a.params),
                "--timeout",
                str(a.timeout),
                "--out",
                str(out),
                "--drivers",
                str(d),
            ]
            if a.shared_connections:
                cmd.append("--shared-connections")
            drivers.append((subprocess.Popen(cmd, env=env, cwd=run), out))
        for proc, _ in drivers:
            proc.wait(timeout=a.timeout + 60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
    finally:
        for proc, _ in drivers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        sampler.stop()
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        log.close()
    wall_s = time.monotonic() - t0
    served_by = "-"
    for line in (run / "serve.log").read_text(errors="replace").splitlines():
        if line.startswith("fedgrpc from "):
            served_by = line.removeprefix("fedgrpc from ")
            break
    results = [json.loads(out.read_text()) for _, out in drivers if out.exists()]
    row = analyse(name, n, a, results, sampler, wall_s, load0, server.returncode)
    row["served_by"] = served_by
    if not served_by.startswith(str(code)):
        raise RuntimeError(f"{name}: the aggregator ran {served_by}, not {code}")
    return row


def analyse(
    name: str,
    n: int,
    a: argparse.Namespace,
    results: list[dict[str, Any]],
    sampler: Sampler,
    wall_s: float,
    load0: dict[str, Any],
    exit_code: int | None,
) -> dict[str, Any]:
    """One result row from the drivers' timings and the aggregator's samples."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    got: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    for r in results:
        for key, (lo, hi, cnt) in r["recv"].items():
            t = int(key)
            first[t] = min(first.get(t, lo), lo)
            last[t] = max(last.get(t, hi), hi)
            got[t] += cnt
        errors.update(r["errors"])
        for k, v in r["first_error"].items():
            first_error.setdefault(k, v)
    sampled: Counter[int] = Counter()
    for r in results:
        for key, cnt in r.get("models", {}).items():
            sampled[int(key)] += cnt
    complete = [t for t in sorted(first) if got[t] == n]
    measured = [t for t in range(1, a.rounds - 1) if t in first and t + 1 in first]
    rounds = [first[t + 1] - first[t] for t in measured]
    round_s = median(rounds)
    cpu = float("nan")
    if measured:
        lo, hi = first[measured[0]], first[measured[-1] + 1]
        cpu = (sampler.at(hi, "cpu_s") - sampler.at(lo, "cpu_s")) / len(measured)
    # Model down and update up, for the parties asked (all, without sampling).
    asked = median(sampled[t] for t in measured) if measured else float(n)
    payload = asked * 2 * a.params * 4
    row: dict[str, Any] = {
        "bench": "scale",
        "code": name,
        "parties": n,
        "params": a.params,
        "size": human(a.params),
        "rounds": a.rounds,
        "rounds_complete": len(complete),
        "asked_per_round": asked,
        "finished": sum(r["finished"] for r in results),
        "round_s": round_s,
        "round_max_s": max(rounds, default=float("nan")),
        "ms_per_party": 1000 * round_s / n,
        "payload_mb_s": payload / round_s / 1e6 if rounds else float("nan"),
        "server_cpu_s": cpu,
        "driver_cpu_s": sum(r["cpu_s"] for r in results),
        "rss_mib": sampler.peak("VmRSS"),
        "hwm_mib": sampler.peak("VmHWM"),
        "threads": sampler.peak("Threads"),
        "errors": dict(errors),
        "first_error": first_error,
        "exit_code": exit_code,
        "wall_s": wall_s,
        "load_1m_before": load0.get("loadavg_1m"),
        "load_1m_after": load_snapshot().get("loadavg_1m"),
        "fedgrpc": results[0]["fedgrpc"] if results else "-",
    }
    return row


def _codes(a: argparse.Namespace, cache: Path) -> list[tuple[str, Path]]:
    specs = a.code or ["new=.", "baseline=auto"]
    out = []
    for spec in specs:
        name, _, where = spec.partition("=")
        if where == "auto":
            path = baseline_tree(a.baseline_ref, cache)
        else:
            path = (REPO / where).resolve() if where in (".", "") else Path(where)
        out.append((name, path))
    return out


COLUMNS = [
    ("code", "code"),
    ("parties", "N"),
    ("round_s", "round s"),
    ("ms_per_party", "ms/party"),
    ("payload_mb_s", "payload MB/s"),
    ("server_cpu_s", "server CPU s/round"),
    ("rss_mib", "RSS MiB"),
    ("hwm_mib", "VmHWM MiB"),
    ("threads", "threads"),
    ("rounds_complete", "rounds done"),
    ("err", "errors"),
    ("load", "load 1m"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parties", default="2,16,128,512,1000", help="values of N")
    p.add_argument("--params", type=parse_count, default=100_000, help="P")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 3)")
    p.add_argument("--drivers", type=int, default=4, help="driver processes")
    p.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a code tree to measure ('.' this one, 'auto' the baseline ref); "
        "default: new=. and baseline=auto",
    )
    p.add_argument("--baseline-ref", default=BASELINE_REF)
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for fedgrpc serve (e.g. --serve-arg=--sample-count=100)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per run (s)")
    p.add_argument("--shared-connections", action="store_true")
    p.add_argument("--py-spy", help="py-spy binary: profile the aggregator")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"))
    p.add_argument("--json-out", type=Path, help="append the rows here (JSON lines)")
    # Driver mode (internal).
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.driver:
        return driver_main(a)
    ns = [int(x) for x in a.parties.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    codes = _codes(a, Path(tempfile.gettempdir()))
    val = write_val_npz(tmp / "val.npz")
    emit({"bench": "machine", **machine_info(), **load_snapshot()})
    rows = []
    for i, n in enumerate(ns):
        # Interleaved, alternating which code goes first.
        for name, path in codes if i % 2 == 0 else codes[::-1]:
            row = run_config(name, path, n, a, tmp, val)
            emit(row)
            if a.json_out is not None:
                with a.json_out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    table = [
        {
            **r,
            "err": sum(r["errors"].values()),
            "load": f"{r['load_1m_before']}-{r['load_1m_after']}",
        }
        for r in rows
    ]
    print()
    print(f"P = {human(a.params)} float32, {a.drivers} driver processes")
    print(markdown_table(table, COLUMNS))
    emit({"bench": "load_at_end", **load_snapshot()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
