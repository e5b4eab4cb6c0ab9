"""Start-up cost of the fedgrpc console script, measured from outside.

Drives any fedgrpc install only through its console script (subprocesses), so the same
file benchmarks an old and a new layout; it never imports fedgrpc. Per measurement one
JSON line (median, min, max and every sample), then one summary line.

* ``version_s``: wall time of ``fedgrpc --version``.
* ``serve_listen_s``: Popen of ``fedgrpc serve --insecure --address localhost:0
  --port-file F --run-dir D --rounds 1 --min-parties 1 --join-timeout 600
  --val-data digits`` (fresh D each rep) until F holds a port and a TCP connect to
  localhost:PORT succeeds.
* ``serve_first_rpc_s``: until a grpc.health.v1 Check answers with anything but
  UNAVAILABLE / DEADLINE_EXCEEDED (a reply, or any other status).
* ``serve_ready_s``: until that Check returns SERVING.
  Everything is polled every 10 ms (a Check blocks at most ``--rpc-timeout``); the
  server gets SIGTERM after each rep, SIGKILL 10 s later, its process group SIGKILL.
* ``idle_serve``: in the last rep, 2 s after ready: VmRSS/VmHWM of the ``fedgrpc
  serve`` process itself, its /proc/PID/maps lines containing "libtorch", whether any
  mapped path contains "torch", and the same for each descendant process (the
  validation worker, if any).
* ``cli_imports``: ``--version``, ``certs init DIR`` and ``contributions --run-dir D
  --format json`` (D from the last serve rep) run once each under the console
  script's own interpreter (its shebang) with ``-X importtime``: whether torch,
  sklearn and matplotlib were imported (their top-level package appears as a module),
  their cumulative import time, the module count and the wall time (importtime's own
  overhead included).

    python scripts/bench_startup.py                          # fedgrpc of this venv
    python scripts/bench_startup.py --fedgrpc /other/.venv/bin/fedgrpc --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

POLL_S = 0.01
HEAVY = ("torch", "sklearn", "matplotlib")
NOT_ANSWERED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# "import time:   self [us] |  cumulative | imported package" (nesting = indentation)
IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


# ------------------------------------------------------------------ helpers
def emit(result: dict[str, Any]) -> None:
    """Print one result as one JSON line."""
    print(json.dumps(result), flush=True)


def stats(samples: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max and the samples, rounded."""
    if not samples:
        return {"median": None, "min": None, "max": None, "samples": []}
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "samples": [round(s, digits) for s in samples],
    }


def load_snapshot() -> dict[str, Any]:
    """Load average and CPU pressure (other processes share this machine's cores)."""
    out: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        out["cpu_pressure_avg60"] = float(some[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def machine_info() -> dict[str, Any]:
    """nproc, CPU model and RAM."""
    cpu = "unknown"
    mem_gib = float("nan")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_gib, 1)}


def script_python(script: Path) -> Path:
    """The interpreter a console script runs under, from its shebang.

    pip writes either ``#!/path/python`` or, for long paths, a ``#!/bin/sh`` line
    followed by ``'''exec' /path/python "$0" "$@"``.
    """
    with script.open("rb") as f:
        lines = f.read(4096).decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise ValueError(f"{script}: no shebang")
    first = lines[0][2:].strip().split()
    if first and first[0].endswith("/sh") and len(lines) > 1:
        m = re.match(r"^'''exec' (\S+)", lines[1])
        if m:
            return Path(m.group(1))
    if first and Path(first[0]).name == "env" and len(first) > 1:
        found = shutil.which(first[1])
        if found:
            return Path(found)
    return Path(first[0])


def proc_status(pid: int, key: str) -> int | None:
    """An integer field of /proc/PID/status (kB for Vm*); None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_status_mib(pid: int, key: str) -> float | None:
    """A ``kB`` field of /proc/PID/status in MiB; None if unreadable."""
    kib = proc_status(pid, key)
    return None if kib is None else round(kib / 1024, 1)


def torch_mappings(pid: int) -> tuple[int, bool]:
    """Lines of /proc/PID/maps naming libtorch, and whether any path has "torch"."""
    n_libtorch = 0
    loaded = False
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return -1, False
    for line in maps:
        if "libtorch" in line:
            n_libtorch += 1
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "torch" in parts[5]:
            loaded = True
    return n_libtorch, loaded


def children_of(pid: int) -> list[int]:
    """Direct children: /proc/PID/task/*/children, else a scan of /proc/*/stat."""
    kids: set[int] = set()
    files = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if files:
        for f in files:
            with contextlib.suppress(OSError, ValueError):
                kids.update(int(x) for x in f.read_text().split())
        return sorted(kids)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            # comm may hold spaces and parentheses: fields resume after the last ")".
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if ppid == pid:
                kids.add(int(stat.parent.name))
    return sorted(kids)


def descendants_of(pid: int) -> list[tuple[int, int]]:
    """Every descendant as (pid, parent pid), breadth first."""
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for kid in children_of(parent):
            out.append((kid, parent))
            todo.append(kid)
    return out


def cmdline(pid: int, limit: int = 160) -> str:
    """The command line of PID, shortened."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tail(path: Path, n_chars: int = 1500) -> str:
    """The end of a log file."""
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


# ------------------------------------------------------------------ serve
@dataclass
class ServeRep:
    """One ``fedgrpc serve`` start: timings, and the idle probe if taken."""

    run_dir: Path
    listen_s: float | None = None
    first_rpc_s: float | None = None
    ready_s: float | None = None
    port: int | None = None
    first_answer: str = ""
    error: str = ""
    idle: dict[str, Any] = field(default_factory=dict)


def read_port(port_file: Path) -> int | None:
    """The port in the port file, once it is complete."""
    try:
        text = port_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def tcp_ok(port: int) -> bool:
    """Whether a TCP connect to localhost:PORT succeeds."""
    try:
        with socket.create_connection(("localhost", port), timeout=1.0):
            return True
    except OSError:
        return False


def health_check(channel: grpc.Channel, timeout_s: float) -> tuple[bool, str]:
    """One Check(service=""): (answered, status or code name)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as err:
        # Raised RpcErrors are also grpc.Call objects; the stubs don't say so.
        code: grpc.StatusCode = getattr(err, "code", lambda: grpc.StatusCode.UNKNOWN)()
        return code not in NOT_ANSWERED, f"error:{code.name}"
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return True, name


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, SIGKILL after ``grace_s``; then SIGKILL what is left of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=grace_s)
    # start_new_session made the server a group leader: only its own descendants.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def idle_probe(pid: int, wait_s: float) -> dict[str, Any]:
    """RSS and torch mappings of the server and its descendants after ``wait_s``."""
    time.sleep(wait_s)
    n_lib, loaded = torch_mappings(pid)
    kids = []
    for kid, parent in descendants_of(pid):
        k_lib, k_loaded = torch_mappings(kid)
        kids.append(
            {
                "pid": kid,
                "ppid": parent,
                "rss_mib": proc_status_mib(kid, "VmRSS"),
                "torch_mappings": k_lib,
                "torch_loaded": k_loaded,
                "cmdline": cmdline(kid),
            }
        )
    return {
        "idle_wait_s": wait_s,
        "idle_serve_rss_mib": proc_status_mib(pid, "VmRSS"),
        "idle_serve_hwm_mib": proc_status_mib(pid, "VmHWM"),
        "idle_serve_threads": proc_status(pid, "Threads"),
        "idle_serve_torch_mappings": n_lib,
        "idle_serve_torch_loaded": loaded,
        "children_rss_mib": {str(k["pid"]): k["rss_mib"] for k in kids},
        "children": kids,
    }


def serve_once(
    fedgrpc: Path,
    rep_dir: Path,
    *,
    timeout_s: float,
    rpc_timeout_s: float,
    idle_wait_s: float | None,
) -> ServeRep:
    """Start ``fedgrpc serve``, time listen / first RPC / SERVING, then stop it."""
    rep_dir.mkdir(parents=True, exist_ok=True)
    port_file = rep_dir / "port"
    rep = ServeRep(run_dir=rep_dir / "run")
    log_path = rep_dir / "serve.log"
    argv = [
        str(fedgrpc),
        "serve",
        "--insecure",
        "--address",
        "localhost:0",
        "--port-file",
        str(port_file),
        "--run-dir",
        str(rep.run_dir),
        "--rounds",
        "1",
        "--min-parties",
        "1",
        "--join-timeout",
        "600",
        "--val-data",
        "digits",
    ]
    channel: grpc.Channel | None = None
    with log_path.open("wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=rep_dir,
            start_new_session=True,
        )
        try:
            deadline = t0 + timeout_s
            while rep.ready_s is None:
                if proc.poll() is not None:
                    rep.error = f"exited {proc.returncode}: {tail(log_path)}"
                    break
                if time.perf_counter() > deadline:
                    rep.error = f"not ready after {timeout_s:g} s: {tail(log_path)}"
                    break
                if rep.port is None:
                    rep.port = read_port(port_file)
                if rep.port is not None and rep.listen_s is None and tcp_ok(rep.port):
                    rep.listen_s = time.perf_counter() - t0
                if rep.listen_s is not None and rep.port is not None:
                    if channel is None:
                        # Short reconnect backoff: a refused attempt must not cost 1 s.
                        channel = grpc.insecure_channel(
                            f"localhost:{rep.port}",
                            options=[
                                ("grpc.initial_reconnect_backoff_ms", 10),
                                ("grpc.min_reconnect_backoff_ms", 10),
                                ("grpc.max_reconnect_backoff_ms", 100),
                            ],
                        )
                    answered, what = health_check(channel, rpc_timeout_s)
                    now = time.perf_counter() - t0
                    if answered and rep.first_rpc_s is None:
                        rep.first_rpc_s = now
                        rep.first_answer = what
                    if what == "SERVING":
                        rep.ready_s = now
                        break
                time.sleep(POLL_S)
            if rep.ready_s is not None and idle_wait_s is not None:
                rep.idle = idle_probe(proc.pid, idle_wait_s)
        finally:
            if channel is not None:
                channel.close()
            stop_server(proc)
    rep.idle["serve_exit_code"] = proc.returncode
    return rep


# ------------------------------------------------------------------ imports
def cli_imports(
    python: Path, fedgrpc: Path, args: list[str], cwd: Path
) -> dict[str, Any]:
    """Run ``python -X importtime fedgrpc ARGS`` once: heavy imports and wall time."""
    argv = [str(python), "-X", "importtime", str(fedgrpc), *args]
    t0 = time.perf_counter()
    res = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    wall_s = time.perf_counter() - t0
    cumulative: dict[str, int] = {}
    other: list[str] = []
    for line in res.stderr.splitlines():
        m = IMPORTTIME.match(line)
        if m:
            cumulative.setdefault(m.group(4), int(m.group(2)))
        elif not line.startswith("import time:"):
            other.append(line)
    out: dict[str, Any] = {
        "bench": "cli_imports",
        "command": " ".join(["fedgrpc", *args]),
        "exit_code": res.returncode,
        "wall_s": round(wall_s, 4),
        "modules": len(cumulative),
    }
    for mod in HEAVY:
        out[mod] = mod in cumulative
        out[f"{mod}_cumulative_ms"] = (
            round(cumulative[mod] / 1000, 1) if mod in cumulative else None
        )
    out["stdout_head"] = res.stdout[:200]
    if res.returncode != 0:
        out["error"] = ("\n".join(other) or res.stdout)[-1500:]
    return out


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--fedgrpc",
        type=Path,
        default=Path(sys.executable).parent / "fedgrpc",
        help="the fedgrpc console script to test (default: next to this python)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workdir", type=Path, help="kept if given (default: a temp dir)")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds until serve is ready"
    )
    p.add_argument(
        "--rpc-timeout", type=float, default=0.5, help="deadline of one health Check"
    )
    p.add_argument("--idle-wait", type=float, default=2.0)
    a = p.parse_args(argv)
    fedgrpc = a.fedgrpc.absolute()
    if not os.access(fedgrpc, os.X_OK):
        p.error(f"not an executable: {fedgrpc}")
    python = script_python(fedgrpc)
    workdir: Path = a.workdir or Path(tempfile.mkdtemp(prefix="bench_startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    emit(
        {
            "bench": "machine",
            **machine_info(),
            "bench_python": platform.python_version(),
            "fedgrpc": str(fedgrpc),
            "fedgrpc_python": str(python),
            "grpcio": grpc.__version__,
            "workdir": str(workdir),
            **load_snapshot(),
        }
    )
    try:
        return run(a, fedgrpc, python, workdir, start)
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(
    a: argparse.Namespace, fedgrpc: Path, python: Path, workdir: Path, start: float
) -> int:
    """Every measurement, in order; returns the exit code."""
    failures: list[str] = []
    # 1. --version
    version_s: list[float] = []
    version = ""
    for _ in range(a.reps):
        t0 = time.perf_counter()
        res = subprocess.run(
            [str(fedgrpc), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        version_s.append(time.perf_counter() - t0)
        version = (res.stdout or res.stderr).strip()
        if res.returncode != 0:
            failures.append(f"--version exited {res.returncode}")
    emit(
        {
            "bench": "startup",
            "metric": "version_s",
            "version": version,
            **stats(version_s),
        }
    )

    # 2. + 3. serve: listen, first RPC, SERVING; idle probe in the last rep
    reps: list[ServeRep] = []
    for i in range(a.reps):
        rep = serve_once(
            fedgrpc,
            workdir / f"serve-{i}",
            timeout_s=a.timeout,
            rpc_timeout_s=a.rpc_timeout,
            idle_wait_s=a.idle_wait if i == a.reps - 1 else None,
        )
        reps.append(rep)
        if rep.error:
            failures.append(f"serve rep {i}: {rep.error}")
            emit({"bench": "serve_error", "rep": i, "error": rep.error})
    first_answers = sorted({r.first_answer for r in reps if r.first_answer})
    medians: dict[str, float | None] = {}
    for metric, values in (
        ("serve_listen_s", [r.listen_s for r in reps]),
        ("serve_first_rpc_s", [r.first_rpc_s for r in reps]),
        ("serve_ready_s", [r.ready_s for r in reps]),
    ):
        ok = [v for v in values if v is not None]
        row: dict[str, Any] = {"bench": "startup", "metric": metric, **stats(ok)}
        medians[metric] = row["median"]
        row["failed_reps"] = len(values) - len(ok)
        if metric == "serve_first_rpc_s":
            row["first_answers"] = first_answers
        emit(row)
    idle = reps[-1].idle if reps else {}
    emit({"bench": "idle_serve", **idle})

    # 4. imports per command, under the console script's interpreter
    run_dir = reps[-1].run_dir if reps else workdir / "no-run"
    imports = []
    for args in (
        ["--version"],
        ["certs", "init", str(workdir / "certs")],
        ["contributions", "--run-dir", str(run_dir), "--format", "json"],
    ):
        row = cli_imports(python, fedgrpc, args, workdir)
        if row["exit_code"] != 0:
            failures.append(f"{row['command']} exited {row['exit_code']}")
        emit(row)
        imports.append(row)

    emit(
        {
            "bench": "summary",
            "fedgrpc": str(fedgrpc),
            "version": version,
            "reps": a.reps,
            "version_s": stats(version_s)["median"],
            "serve_listen_s": medians["serve_listen_s"],
            "serve_first_rpc_s": medians["serve_first_rpc_s"],
            "serve_ready_s": medians["serve_ready_s"],
            "idle_serve_rss_mib": idle.get("idle_serve_rss_mib"),
            "idle_serve_torch_mappings": idle.get("idle_serve_torch_mappings"),
            "idle_serve_torch_loaded": idle.get("idle_serve_torch_loaded"),
            "children_rss_mib": idle.get("children_rss_mib"),
            "heavy_imports": {
                r["command"].split()[1]: [m for m in HEAVY if r[m]] for r in imports
            },
            "failures": failures,
            "wall_s": round(time.monotonic() - start, 1),
            **load_snapshot(),
        }
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
