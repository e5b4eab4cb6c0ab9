"""Shared benchmark helpers: machine facts, output, a spawn worker pool, raw TCP.

Every wait here is bounded; every server listens on localhost only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
MODEL = "bench_models:flat_model"
"""The benchmark model (scripts/bench_models.py); only the aggregator imports it."""
RECV_BUF = 4 << 20  # bytes of the reusable receive buffer (raw TCP)


# ------------------------------------------------------------------ output
def emit(result: dict[str, Any]) -> None:
    """Print one result as one JSON line."""
    print(json.dumps(result, sort_keys=False), flush=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell."""
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1 or value == 0:
            return f"{value:.{digits - 1}f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]
) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows
    ]
    return "\n".join([head, rule, *body])


def median(values: Iterable[float]) -> float:
    """Median, NaN when empty."""
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM, Python and library versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "numpy", "grpcio", "protobuf"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "-"
    try:
        code = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=SCRIPTS,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        code = "-"
    return {
        "code": code or "-",
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        **versions,
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


def channel_option(kv: str) -> tuple[str, int | str]:
    """A gRPC channel argument from ``NAME=VALUE`` (an int when it is one)."""
    key, _, value = kv.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def proc_cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (/proc/PID/stat).

    Raises:
        OSError: the process is gone.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_mib(field: str, pid: int | str = "self") -> float:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in MiB; NaN if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def wait_until(what: str, pred: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``pred`` every 5 ms until true; raise after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.005)


# ------------------------------------------------------------- worker pool
# A task is a function ``task(ctl, **kwargs) -> result`` run in a worker process. It
# prepares (connect, allocate), calls ``ctl.ready()`` which blocks until the parent says
# go (so every timed phase of every worker starts together), and returns its result.
# time.monotonic is CLOCK_MONOTONIC: comparable across processes on one machine.

Task = Callable[..., Any]


class Control:
    """The worker's side of the ready/go handshake."""

    def __init__(self, conn: Connection, timeout_s: float) -> None:
        self._conn = conn
        self._timeout_s = timeout_s

    def ready(self, info: Any = None) -> None:
        """Report ready; block until go."""
        self._conn.send(("ready", info))
        if not self._conn.poll(self._timeout_s):
            raise TimeoutError("no go from the parent")
        msg = self._conn.recv()
        if msg != "go":
            raise RuntimeError(f"expected go, got {msg!r}")


def _worker_loop(
    conn: Connection, env: dict[str, str], preload: tuple[str, ...]
) -> None:
    os.environ.update(env)
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    for name in preload:  # every process runs the code as it was at start-up
        importlib.import_module(name)
    state: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        task, kwargs, timeout_s = msg
        try:
            result = task(Control(conn, timeout_s), state, **kwargs)
            conn.send(("done", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


@dataclass
class _Worker:
    proc: Any
    conn: Connection


class WorkerPool:
    """Persistent spawn workers, reused across configurations (start-up not timed).

    A task receives ``(ctl, state, **kwargs)``; ``state`` is a per-worker dict that
    lives as long as the worker (clients, cached arrays).
    """

    def __init__(
        self,
        n: int,
        env: dict[str, str] | None = None,
        preload: tuple[str, ...] = ("fedgrpc.client.stub",),
    ) -> None:
        ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        env = env or {}
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_loop, args=(child, env, preload), daemon=True
            )
            proc.start()
            child.close()
            self.workers.append(_Worker(proc, parent))

    def __len__(self) -> int:
        return len(self.workers)

    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [int(w.proc.pid) for w in self.workers]

    def run(
        self,
        task: Task,
        kwargs_list: Sequence[dict[str, Any]],
        *,
        timeout_s: float,
        before_go: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Run ``task`` on the first ``len(kwargs_list)`` workers; ready/go/done."""
        ws = self.workers[: len(kwargs_list)]
        for w, kw in zip(ws, kwargs_list, strict=True):
            w.conn.send((task, kw, timeout_s))
        infos = [self._expect(w, "ready", timeout_s) for w in ws]
        if before_go is not None:
            before_go(infos)
        for w in ws:
            w.conn.send("go")
        return [self._expect(w, "done", timeout_s) for w in ws]

    def _expect(self, w: _Worker, kind: str, timeout_s: float) -> Any:
        if not w.conn.poll(timeout_s):
            raise TimeoutError(f"worker {w.proc.pid}: no {kind} within {timeout_s:g} s")
        tag, payload = w.conn.recv()
        if tag == "error":
            raise RuntimeError(f"worker {w.proc.pid} failed:\n{payload}")
        if tag != kind:
            raise RuntimeError(f"worker {w.proc.pid}: expected {kind}, got {tag}")
        return payload

    def close(self) -> None:
        """Stop the workers (politely, then by their own pid)."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=5)


# ---------------------------------------------------------------- raw TCP
class RawServer:
    """Loopback TCP peer in the parent process, one thread per connection.

    ``ingest``: each connection sends ``nbytes``; we ``recv_into`` one reusable buffer
    and answer one byte when all arrived. ``fanout``: each connection sends one byte;
    we answer with ``nbytes`` from one preallocated shared buffer.
    """

    def __init__(self, mode: str, n_conns: int, nbytes: int) -> None:
        self.mode = mode
        self.nbytes = nbytes
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(n_conns)
        self._sock.settimeout(60)
        self.port = int(self._sock.getsockname()[1])
        self._payload = np.ones(nbytes, dtype=np.uint8) if mode == "fanout" else None
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self._acceptor = threading.Thread(target=self._accept, args=(n_conns,))
        self._acceptor.start()

    def _accept(self, n: int) -> None:
        try:
            for _ in range(n):
                conn, _ = self._sock.accept()
                conn.settimeout(120)
                t = threading.Thread(target=self._serve, args=(conn,))
                t.start()
                self._threads.append(t)
        except OSError as err:
            self.errors.append(f"accept: {err}")

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self.mode == "ingest":
                    buf = memoryview(bytearray(RECV_BUF))
                    left = self.nbytes
                    while left > 0:
                        got = conn.recv_into(buf, min(left, RECV_BUF))
                        if got == 0:
                            raise ConnectionError("peer closed early")
                        left -= got
                    conn.sendall(b"k")
                else:
                    if conn.recv(1) != b"g":
                        raise ConnectionError("bad request")
                    assert self._payload is not None
                    conn.sendall(self._payload.data)
                    conn.recv(1)  # wait for the peer's close
        except OSError as err:
            self.errors.append(f"{self.mode}: {err}")

    def close(self) -> None:
        """Join the threads (bounded) and close the listener."""
        self._acceptor.join(timeout=60)
        for t in self._threads:
            t.join(timeout=120)
        self._sock.close()
        if self.errors:
            raise RuntimeError("; ".join(self.errors))


def task_raw_send(
    ctl: Control, state: dict[str, Any], *, port: int, nbytes: int
) -> tuple[float, float]:
    """Send ``nbytes`` from a preallocated buffer with one sendall; wait for the ack."""
    buf = state.get("raw_buf")
    if buf is None or buf.size != nbytes:
        state.pop("raw_buf", None)
        buf = np.ones(nbytes, dtype=np.uint8)  # touched: no page faults while timed
        state["raw_buf"] = buf
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        ctl.ready()
        t0 = time.monotonic()
        sock.sendall(buf.data)
        if sock.recv(1) != b"k":
            raise ConnectionError("no ack")
        t1 = time.monotonic()
    return t0, t1


def task_raw_fetch(
    ctl: Control, state: dict[str, Any], *, port: int, nbytes: int
) -> tuple[float, float]:
    """Ask for ``nbytes`` and ``recv_into`` one reusable buffer until all arrived."""
    buf = memoryview(bytearray(RECV_BUF))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        ctl.ready()
        t0 = time.monotonic()
        sock.sendall(b"g")
        left = nbytes
        while left > 0:
            got = sock.recv_into(buf, min(left, RECV_BUF))
            if got == 0:
                raise ConnectionError("server closed early")
            left -= got
        t1 = time.monotonic()
    return t0, t1


def raw_throughput(pool: WorkerPool, mode: str, n: int, nbytes: int) -> float:
    """Aggregate GB/s of ``n`` raw loopback TCP streams of ``nbytes`` each."""
    server = RawServer(mode, n, nbytes)
    task = task_raw_send if mode == "ingest" else task_raw_fetch
    try:
        times = pool.run(
            task, [{"port": server.port, "nbytes": nbytes}] * n, timeout_s=300
        )
    finally:
        server.close()
    return span_gbps(times, n * nbytes)


def span_gbps(times: Sequence[tuple[float, float]], total_bytes: int) -> float:
    """GB/s over the span from the first start to the last end."""
    span = max(t1 for _, t1 in times) - min(t0 for t0, _ in times)
    return total_bytes / span / 1e9


# ------------------------------------------------------------- aggregator
def server_config(
    run_dir: Path,
    val_spec: str,
    n_params: int,
    min_parties: int,
    rounds: int,
    validator: str = "process",
    max_inflight_uploads: int = 0,
    wire_dtype: str = "float32",
) -> Any:
    """An insecure localhost ServerConfig for the flat model of ``n_params``.

    ``max_inflight_uploads`` 0 keeps fedgrpc's default.
    """
    from fedgrpc.config import Limits, RoundConfig, ServerConfig
    from fedgrpc.types import UpdateKind

    return ServerConfig(
        round=RoundConfig(
            rounds=rounds,
            min_parties=min_parties,
            update_kind=UpdateKind.GRADIENT,
            model=MODEL,
            model_hidden=n_params,
            round_timeout_s=600.0,
            join_timeout_s=300.0,
            wire_dtype=wire_dtype,
        ),
        address="localhost:0",
        run_dir=run_dir,
        val_data=val_spec,
        insecure=True,
        validator=validator,
        limits=(
            Limits(max_inflight_uploads=max_inflight_uploads)
            if max_inflight_uploads
            else Limits()
        ),
    )


def client_for(state: dict[str, Any], port: int, party: str) -> Any:
    """A joined AggregatorClient for (port, party), cached in the worker's state."""
    from fedgrpc.client.stub import AggregatorClient
    from fedgrpc.config import ClientConfig

    key = f"client:{port}:{party}"
    client = state.get(key)
    if client is None:
        for old in [k for k in state if k.startswith("client:")]:
            state.pop(old).close()
        client = AggregatorClient(
            ClientConfig(
                server=f"localhost:{port}",
                party_id=party,
                data="",
                insecure=True,
                rpc_timeout_s=600.0,
                connect_timeout_s=60.0,
            )
        )
        client.join(100)
        state[key] = client
    return client


def random_update(state: dict[str, Any], n_params: int, seed: int) -> np.ndarray:
    """A cached random float32 update of ``n_params`` (small values, all finite)."""
    key = f"update:{n_params}:{seed}"
    arr = state.get(key)
    if arr is None:
        for old in [k for k in state if k.startswith("update:")]:
            del state[old]
        rng = np.random.default_rng(seed)
        arr = rng.standard_normal(n_params, dtype=np.float32)
        arr *= np.float32(1e-3)
        state[key] = arr
    return arr


def parse_count(text: str) -> int:
    """A parameter count: '100000', '1e5', '100k' and '16M' (decimal) are accepted."""
    t = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    if t[-1:] in "kmg":
        t = t[:-1]
    return int(float(t) * mult)


def human(n: int) -> str:
    """16000000 -> '16M'."""
    for div, suf in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= div and n % (div // 10 or 1) == 0:
            v = n / div
            return f"{v:g}{suf}"
    return str(n)


def write_val_npz(path: Path, n: int = 64, features: int = 16, seed: int = 0) -> str:
    """A tiny validation set (n samples, 10 classes); returns its ``npz:`` spec."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 10
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def round_quiet(agg: Any, r: int) -> bool:
    """True once round ``r`` is open, published, and its v_t computed.

    In a real run the parties train meanwhile; here nothing would hide that work, so
    the timer starts only after it. Reads private attributes of the engine; if they
    are renamed, only the public checks remain.
    """
    from fedgrpc.types import RunState

    eng = agg.engine
    latest = agg.broadcaster.latest
    if eng.state != RunState.TRAINING or eng.open_round != r:
        return False
    if latest is None or latest.round != r:
        return False
    if not hasattr(eng, "_round"):
        return True
    fut = getattr(eng._round, "val_grad", None)
    return fut is not None and bool(fut.done())
