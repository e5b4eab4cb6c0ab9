"""SCALE TEST (issue 14): 1,024 real connections to one ``fedgrpc serve``, ~60 s.

1,024 parties (``AggregatorClient``, one TCP connection each, the real channel
options) join and open their model streams, which then wait with no data for more
than a client keepalive period (30 s; the run waits for a 1,025th party), so every
connection pings the aggregator while 1,024 streams are open. No call may fail (the
old 10 s / 5 s keepalive drew GOAWAY "too_many_pings" on every connection at 1,024
parties) and the aggregator must hold the streams without a thread each. Rounds
with 1,000 parties are measured by scripts/bench_scale.py (docs/benchmarks.md):
the parties' own CPU makes them too slow for a test.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedgrpc.client import stub
from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import ClientConfig
from fedgrpc.errors import RemoteError
from tests.e2e.helpers import processes, read_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

N_PARTIES = 1024
DRIVERS = 4  # processes running the parties as threads, as deployed parties have
JOINS_AT_ONCE = 4  # per driver (the server caps unary calls at 32)
SAMPLES = 10
MAX_SERVER_THREADS = 100
"""The aggregator's threads with 1,024 open model streams (a thread per stream
would be over 1,000)."""


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def _drive(port: int, first: int, count: int, out: Any, stop: Any) -> None:
    """Parties ``first`` .. ``first + count - 1`` as threads (a spawned process)."""
    # The real client options; a local subchannel pool gives each party its own
    # connection (gRPC would share one between the channels of a process).
    stub.CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    lock = threading.Lock()
    joins = threading.Semaphore(JOINS_AT_ONCE)
    clients: list[AggregatorClient] = []
    errors: list[str] = []

    def party(i: int) -> None:
        cfg = ClientConfig(
            server=f"localhost:{port}",
            party_id=f"p{i:04d}",
            data="",
            insecure=True,
            rpc_timeout_s=120.0,
            connect_timeout_s=60.0,
        )
        client = AggregatorClient(cfg)
        with lock:
            clients.append(client)
        try:
            with joins:
                client.join(SAMPLES)
            out.put(("open", 1))
            for item in client.models(0, timeout_s=300.0):
                with lock:  # the run waits for one more party: nothing may come
                    errors.append(f"{cfg.party_id}: unexpected {item!r}")
                return
        except RemoteError as err:
            if not stop.is_set():
                with lock:
                    errors.append(f"{cfg.party_id}: {err}")

    threads = [
        threading.Thread(target=party, args=(i,), daemon=True)
        for i in range(first, first + count)
    ]
    for t in threads:
        t.start()
    stop.wait(300)
    with lock:
        for client in clients:
            client.close()
    for t in threads:
        t.join(timeout=5)
    out.put(("result", errors))


def test_scale_1024_connections_hold_across_keepalive_pings(tmp_path: Path) -> None:
    port_file, log = tmp_path / "port", tmp_path / "serve.log"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    drivers = []
    with processes() as procs:
        server = procs.start(
            [
                "serve",
                "--insecure",
                "--address",
                "localhost:0",
                "--port-file",
                str(port_file),
                "--run-dir",
                str(tmp_path / "run"),
                "--val-data",
                "digits",
                "--val-count",
                "200",
                "--model",
                "logreg",
                "--min-parties",
                str(N_PARTIES + 1),
                "--join-timeout",
                "600",
                "--max-parties",
                str(N_PARTIES + 1),
                "-q",
            ],
            log,
        )
        port = read_port(port_file, server, log)
        results: list[list[str]] = []
        try:
            per = N_PARTIES // DRIVERS
            for k in range(DRIVERS):
                proc = ctx.Process(
                    target=_drive, args=(port, k * per, per, out, stop), daemon=True
                )
                proc.start()
                drivers.append(proc)
            for _ in range(N_PARTIES):
                out.get(timeout=150)
            opened = time.monotonic()
            # Every connection's keepalive fires while 1,024 streams wait.
            time.sleep(stub.KEEPALIVE_TIME_MS / 1000 + 8)
            held = _status(server.pid)
            alive = server.poll() is None
            held_s = time.monotonic() - opened
            stop.set()
            while len(results) < DRIVERS:
                kind, value = out.get(timeout=60)
                if kind == "result":
                    results.append(value)
        finally:
            stop.set()
            for proc in drivers:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()

    errors = [e for r in results for e in r]
    assert not errors, (len(errors), errors[:3])
    assert alive, log.read_text()[-2000:]
    assert held_s > stub.KEEPALIVE_TIME_MS / 1000
    assert held["Threads"] < MAX_SERVER_THREADS, held
