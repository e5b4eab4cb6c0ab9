"""SCALE TEST (issue 14): 1,024 real connections to one ``fedgrpc serve``, ~45 s.

1,024 parties (``AggregatorClient``, one TCP connection each, the real channel
options) join, open their model streams and wait more than one client keepalive
period (30 s) with no data before the run starts, so every connection pings the
aggregator at least once while more than 1,000 streams are open; then two rounds
run. No connection may be refused or dropped (the old 10 s / 5 s keepalive drew
GOAWAY "too_many_pings" on every connection at 1,024 parties), and the aggregator
must hold the 1,024 waiting streams without a thread each.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgrpc.client import stub
from fedgrpc.client.stub import AggregatorClient, ModelVersion
from fedgrpc.config import ClientConfig
from fedgrpc.errors import RemoteError
from fedgrpc.types import TrainingDone, UpdateKind
from tests.e2e.helpers import processes, read_port, wait_exit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

N_PARTIES = 1024
ROUNDS = 2
DRIVERS = 4  # processes running the parties as threads, as deployed parties have
JOINS_AT_ONCE = 4  # per driver (the server caps unary calls at 32)
SAMPLES = 10
MAX_SERVER_THREADS = 100
"""The aggregator's threads with 1,023 open model streams (a thread per stream
would be over 1,000)."""


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def _drive(port: int, first: int, count: int, late_s: float, out: Any) -> None:
    """Parties ``first`` .. ``first + count - 1`` as threads (a spawned process).

    With ``late_s`` the last of them joins that much later than the others.
    """
    # The real client options; a local subchannel pool gives each party its own
    # connection (gRPC would share one between the channels of a process).
    stub.CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    lock = threading.Lock()
    joins = threading.Semaphore(JOINS_AT_ONCE)
    result: dict[str, Any] = {"models": Counter(), "done": 0, "errors": []}
    rng = np.random.default_rng(first)

    def party(i: int, delay_s: float) -> None:
        pid = f"p{i:04d}"
        cfg = ClientConfig(
            server=f"localhost:{port}",
            party_id=pid,
            data="",
            insecure=True,
            rpc_timeout_s=120.0,
            connect_timeout_s=60.0,
        )
        try:
            time.sleep(delay_s)
            with AggregatorClient(cfg) as client:
                with joins:
                    client.join(SAMPLES)
                update = {
                    s.name: rng.standard_normal(s.shape).astype(np.float32) * 1e-3
                    for s in client.specs
                }
                if not delay_s:
                    out.put(("open", 1))
                for item in client.models(0, timeout_s=180.0):
                    if isinstance(item, TrainingDone):
                        with lock:
                            result["done"] += 1
                        return
                    assert isinstance(item, ModelVersion)
                    with lock:
                        result["models"][item.round] += 1
                    client.submit(
                        item.round,
                        update,
                        SAMPLES,
                        train_loss=0.0,
                        kind=UpdateKind.GRADIENT,
                        submission_id=f"{pid}:{item.round}",
                    )
        except RemoteError as err:
            with lock:
                result["errors"].append(str(err))

    threads = [
        threading.Thread(
            target=party, args=(i, late_s if i == first + count - 1 else 0.0)
        )
        for i in range(first, first + count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    out.put(("result", result))


def test_scale_1024_connections_hold_across_keepalive_pings(tmp_path: Path) -> None:
    port_file, log = tmp_path / "port", tmp_path / "serve.log"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
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
                "--rounds",
                str(ROUNDS),
                "--min-parties",
                str(N_PARTIES),
                "--round-timeout",
                "120",
                "--join-timeout",
                "180",
                "--max-parties",
                str(N_PARTIES),
                "--grace-period",
                "0",
                # This test is about connections, not slow senders: a machine
                # shared with other jobs may delay 2,048 uploads by many seconds.
                "--upload-grace",
                "150",
                "--upload-slot-timeout",
                "150",
                "-q",
            ],
            log,
        )
        port = read_port(port_file, server, log)
        t0 = time.monotonic()
        try:
            # The last party joins after a keepalive period: until then 1,023 model
            # streams wait with no data, and every connection pings.
            late_s = stub.KEEPALIVE_TIME_MS / 1000 + 8
            per = N_PARTIES // DRIVERS
            for k in range(DRIVERS):
                proc = ctx.Process(
                    target=_drive,
                    args=(port, k * per, per, late_s if k == DRIVERS - 1 else 0.0, out),
                    daemon=True,
                )
                proc.start()
                drivers.append(proc)
            results: list[dict[str, Any]] = []
            opened = 0
            waiting: dict[str, int] = {}
            while len(results) < DRIVERS:
                kind, value = out.get(timeout=max(1.0, 220 - (time.monotonic() - t0)))
                if kind == "open":
                    opened += 1
                    if opened == N_PARTIES - 1:
                        time.sleep(1.0)  # the last streams reach the server
                        waiting = _status(server.pid)
                else:
                    results.append(value)
            code = wait_exit(server, 60, log)
            took_s = time.monotonic() - t0
        finally:
            for proc in drivers:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()

    errors = [e for r in results for e in r["errors"]]
    models: Counter[int] = sum((r["models"] for r in results), Counter())
    assert not errors, (len(errors), errors[:3])
    assert code == 0, log.read_text()[-2000:]
    assert sorted(models.items()) == [(r, N_PARTIES) for r in range(ROUNDS)]
    assert sum(r["done"] for r in results) == N_PARTIES
    assert took_s > stub.KEEPALIVE_TIME_MS / 1000  # the streams lived past a ping
    assert waiting and waiting["Threads"] < MAX_SERVER_THREADS, waiting
