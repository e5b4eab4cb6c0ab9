"""A fault-injecting TCP proxy for tests: latency, a bandwidth cap, mid-stream cuts.

Every accepted connection is forwarded to one upstream ``host:port``. Faults, all
optional:

- ``latency_s``: one-way delay added to every forwarded read. Each direction is a FIFO,
  so order is preserved and throughput is not divided by the delay (reads pipeline).
- ``rate_bytes_s``: a token bucket per direction, shared by all connections (one link).
- cuts: while fewer than ``max_cuts`` cuts happened (or are pending), each new
  connection is armed with a threshold drawn from a seeded ``random.Random`` in
  ``[cut_min_bytes, cut_max_bytes]``; after that many bytes (both directions together)
  it is reset (RST) on both sides, mid-stream. After ``max_cuts`` cuts it behaves.

Importable (``start_proxy(...) -> Proxy``; the loop runs on a daemon thread, ``close()``
stops it) or standalone::

    python -m tests.netfault.proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:50051 \\
        --latency-ms 100 --rate 2000000 --cuts 3 --cut-min 2000 --cut-max 40000 \\
        --port-file PORT --stats-file STATS.json --max-seconds 600

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

READ_BYTES = 64 << 10
QUEUE_ITEMS = 64  # per direction and connection: bounds buffering at 4 MiB


@dataclass(frozen=True)
class Faults:
    """What the proxy does to the traffic."""

    latency_s: float = 0.0
    """One-way delay added to each forwarded read (seconds)."""
    rate_bytes_s: float = 0.0
    """Bandwidth per direction (bytes/s); 0 = unlimited."""
    burst_bytes: int = 16 << 10
    """Token bucket depth (bytes)."""
    max_cuts: int = 0
    """Connections to cut in total; afterwards the proxy behaves."""
    cut_min_bytes: int = 1
    cut_max_bytes: int = 1
    """Range of the bytes a cut connection forwards before it is reset."""
    seed: int = 0
    """Seed of the cut thresholds."""

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.rate_bytes_s < 0 or self.max_cuts < 0:
            raise ValueError("latency, rate and cuts must be >= 0")
        if self.burst_bytes < 1:
            raise ValueError("burst_bytes must be >= 1")
        if not 1 <= self.cut_min_bytes <= self.cut_max_bytes:
            raise ValueError("need 1 <= cut_min_bytes <= cut_max_bytes")


def parse_hostport(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Bucket:
    """Token bucket (bytes/s) on the event loop's clock."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` (<= burst) bytes may pass."""
        while True:
            now = time.monotonic()
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._stamp) * self.rate
            )
            self._stamp = now
            if self._tokens >= n:
                self._tokens -= n
                return
            await asyncio.sleep((n - self._tokens) / self.rate)


_EOF = object()
_CUT = object()


class _Conn:
    """One proxied connection: two ordered, delayed, throttled pumps and maybe a cut."""

    def __init__(
        self,
        proxy: Proxy,
        down_r: asyncio.StreamReader,
        down_w: asyncio.StreamWriter,
        threshold: int | None,
    ) -> None:
        self.proxy = proxy
        self.down_r, self.down_w = down_r, down_w
        self.up_w: asyncio.StreamWriter | None = None
        self.threshold = threshold  # bytes before the cut, or None
        self.forwarded = 0
        self.cut = False

    async def run(self) -> None:
        p = self.proxy
        try:
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(*p.upstream), timeout=10
                )
            except (OSError, TimeoutError) as err:
                log.info("proxy: upstream %s:%d unreachable: %s", *p.upstream, err)
                _reset(self.down_w)
                return
            self.up_w = up_w
            await asyncio.gather(
                self._pump(self.down_r, up_w, p.up_bucket),
                self._pump(up_r, self.down_w, p.down_bucket),
            )
        finally:
            self._close(reset=self.cut)
            p._connection_ended(self)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        bucket: _Bucket | None,
    ) -> None:
        queue: asyncio.Queue[tuple[float, object]] = asyncio.Queue(QUEUE_ITEMS)
        writer = asyncio.ensure_future(self._write(queue, dst, bucket))
        try:
            while not self.cut:
                try:
                    data = await src.read(READ_BYTES)
                except (OSError, asyncio.IncompleteReadError):
                    data = b""
                if not data:
                    await queue.put((time.monotonic(), _EOF))
                    break
                due = time.monotonic() + self.proxy.faults.latency_s
                if self.threshold is not None and not self.cut:
                    left = self.threshold - self.forwarded
                    if len(data) >= left:
                        self.cut = True  # stop reading in both directions
                        if left > 0:
                            await queue.put((due, data[:left]))
                        self.forwarded += max(0, left)
                        await queue.put((due, _CUT))
                        break
                self.forwarded += len(data)
                await queue.put((due, data))
            await writer
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _write(
        self,
        queue: asyncio.Queue[tuple[float, object]],
        dst: asyncio.StreamWriter,
        bucket: _Bucket | None,
    ) -> None:
        while True:
            due, item = await queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if item is _CUT:
                self.proxy._cut(self)
                self._close(reset=True)
                return
            if item is _EOF:
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            assert isinstance(item, bytes)
            try:
                if bucket is None:
                    dst.write(item)
                    await dst.drain()
                else:
                    view = memoryview(item)
                    for s in range(0, len(view), bucket.burst):
                        piece = view[s : s + bucket.burst]
                        await bucket.take(len(piece))
                        dst.write(piece)
                        await dst.drain()
            except (OSError, RuntimeError):
                self._close(reset=True)
                return

    def _close(self, *, reset: bool) -> None:
        for w in (self.down_w, self.up_w):
            if w is None:
                continue
            if reset:
                _reset(w)
            else:
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()


def _reset(w: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a broken network path would look to the peer."""
    sock = w.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError, RuntimeError):
        w.transport.abort()


class Proxy:
    """A running proxy; use :func:`start_proxy`. Stops on :meth:`close` or ``with``."""

    def __init__(
        self, listen: tuple[str, int], upstream: tuple[str, int], faults: Faults
    ) -> None:
        self.listen_host = listen[0]
        self.upstream = upstream
        self.faults = faults
        self.port = 0
        self.cuts = 0
        """Connections cut so far."""
        self.connections = 0
        """Connections accepted so far."""
        self.bytes_forwarded = 0
        self.cut_log: list[tuple[int, int]] = []  # (connection number, bytes forwarded)
        self._rng = random.Random(faults.seed)
        self._armed = 0  # connections carrying a pending cut
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.up_bucket: _Bucket | None = None
        self.down_bucket: _Bucket | None = None
        if faults.rate_bytes_s > 0:
            self.up_bucket = _Bucket(faults.rate_bytes_s, faults.burst_bytes)
            self.down_bucket = _Bucket(faults.rate_bytes_s, faults.burst_bytes)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"netfault-proxy-{upstream[1]}", daemon=True
        )
        self._closed = False
        self.on_cut: Any = None  # optional callback(proxy) after each cut

    # --------------------------------------------------------------- thread
    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as err:  # reported to start()
            self._error = err
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, 0 if self.port == 0 else self.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        tasks = self._tasks
        try:
            await self._stop.wait()
        finally:
            self._server.close()
            for c in list(self._conns):
                c._close(reset=True)
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        f = self.faults
        with self._lock:
            self.connections += 1
            threshold = None
            if self.cuts + self._armed < f.max_cuts:
                threshold = self._rng.randint(f.cut_min_bytes, f.cut_max_bytes)
                self._armed += 1
        conn = _Conn(self, reader, writer, threshold)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # Closing: end quietly (asyncio's stream callback logs a cancelled handler).
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _cut(self, conn: _Conn) -> None:
        with self._lock:
            if conn.threshold is None or conn.threshold < 0:
                return
            self.cuts += 1
            self._armed -= 1
            self.cut_log.append((self.connections, conn.forwarded))
            conn.threshold = -1  # counted
        log.info("proxy: cut a connection after %d bytes", conn.forwarded)
        if self.on_cut is not None:
            self.on_cut(self)

    def _connection_ended(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        with self._lock:
            self.bytes_forwarded += conn.forwarded
            if conn.threshold is not None and conn.threshold >= 0:
                self._armed -= 1  # ended before its cut: the cut goes to a later one

    # ------------------------------------------------------------------ API
    def start(self) -> Proxy:
        """Bind and start forwarding; returns once the port is known."""
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("proxy did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def stats(self) -> dict[str, Any]:
        """Counters as JSON values."""
        with self._lock:
            return {
                "port": self.port,
                "connections": self.connections,
                "cuts": self.cuts,
                "cut_log": list(self.cut_log),
                "bytes_forwarded": self.bytes_forwarded
                + sum(c.forwarded for c in list(self._conns)),
            }

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop thread (bounded)."""
        if self._closed:
            return
        self._closed = True
        stop = self._stop
        if stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_proxy(
    upstream: str | tuple[str, int],
    listen: str | tuple[str, int] = "127.0.0.1:0",
    *,
    latency_s: float = 0.0,
    rate_bytes_s: float = 0.0,
    burst_bytes: int = 16 << 10,
    max_cuts: int = 0,
    cut_range: tuple[int, int] = (1, 1),
    seed: int = 0,
) -> Proxy:
    """Start a proxy on ``listen`` (port 0 = any) forwarding to ``upstream``.

    The returned :class:`Proxy` reports ``.port`` and ``.cuts``; call ``.close()``.
    """
    up = parse_hostport(upstream) if isinstance(upstream, str) else upstream
    lis = parse_hostport(listen) if isinstance(listen, str) else listen
    faults = Faults(
        latency_s=latency_s,
        rate_bytes_s=rate_bytes_s,
        burst_bytes=burst_bytes,
        max_cuts=max_cuts,
        cut_min_bytes=cut_range[0],
        cut_max_bytes=cut_range[1],
        seed=seed,
    )
    proxy = Proxy(lis, up, faults)
    proxy.port = lis[1]
    return proxy.start()


# ------------------------------------------------------------------ standalone
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a proxy until SIGTERM/SIGINT or ``--max-seconds``."""
    p = argparse.ArgumentParser(prog="python -m tests.netfault.proxy")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    p.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    p.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay")
    p.add_argument("--rate", type=float, default=0.0, help="bytes/s per direction")
    p.add_argument("--burst", type=int, default=16 << 10, help="bucket depth (bytes)")
    p.add_argument("--cuts", type=int, default=0, help="connections to cut in total")
    p.add_argument("--cut-min", type=int, default=1, help="bytes before a cut, min")
    p.add_argument("--cut-max", type=int, default=1, help="bytes before a cut, max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port-file", type=Path, help="write the bound port here")
    p.add_argument(
        "--stats-file", type=Path, help="JSON counters, on each cut and exit"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="exit after this long (bounded by default)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proxy = start_proxy(
        a.upstream,
        a.listen,
        latency_s=a.latency_ms / 1000.0,
        rate_bytes_s=a.rate,
        burst_bytes=a.burst,
        max_cuts=a.cuts,
        cut_range=(a.cut_min, a.cut_max),
        seed=a.seed,
    )
    stats_lock = threading.Lock()

    def dump(px: Proxy) -> None:
        if a.stats_file is not None:
            with stats_lock:
                _write_atomic(a.stats_file, json.dumps(px.stats()) + "\n")

    proxy.on_cut = dump
    try:
        dump(proxy)
        if a.port_file is not None:
            _write_atomic(a.port_file, f"{proxy.port}\n")
        log.info(
            "proxy listening on %s:%d -> %s", proxy.listen_host, proxy.port, a.upstream
        )
        stop.wait(a.max_seconds)
    finally:
        proxy.close()
        dump(proxy)
    log.info("proxy stopped: %s", json.dumps(proxy.stats()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
