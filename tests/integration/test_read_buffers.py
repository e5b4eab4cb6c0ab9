"""Idle connections do not keep model-sized read buffers in the aggregator (issue 14).

gRPC sizes each connection's next TCP read from its largest recent burst and keeps
that buffer allocated while the connection idles; uncapped, 1,000 parties that each
uploaded 400 kB held ~590 MiB of empty read slices in the aggregator. The server runs
in its own process with the aggregator's real option list (``SERVER_OPTIONS``), and
again in the same test with only the read-buffer cap removed, so the test shows the
cap is what bounds the memory and that this grpcio honours it. Each of 200
connections uploads 1 MiB three times, then all stay open and idle while the
server's RSS is read.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fedgrpc.server.app import READ_BUFFER_BYTES, SERVER_OPTIONS

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 200
UPLOAD_BYTES = 1 << 20
MAX_KIB_PER_CONNECTION = 4 * READ_BUFFER_BYTES // 1024
"""Capped: a connection's read buffer, its HTTP/2 and call state (~150 KiB measured)."""

CAP = "grpc.experimental.tcp_max_read_buffer_size"

SERVER = r"""
import asyncio, sys

import grpc

from fedgrpc.server.app import SERVER_OPTIONS


async def main() -> None:
    options = [o for o in SERVER_OPTIONS if o[0] not in sys.argv[2:]]  # dropped

    async def upload(messages, context):
        async for _ in messages:
            pass
        return b"ok"

    server = grpc.aio.server(
        options=[*options, ("grpc.max_receive_message_length", 8 << 20)]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.Up", {"Up": grpc.stream_unary_rpc_method_handler(upload)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    open(sys.argv[1], "w").write(str(port))
    await server.wait_for_termination()


asyncio.run(main())
"""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def _upload_from(port: int, n: int) -> list[grpc.aio.Channel]:
    """``n`` connections that each upload UPLOAD_BYTES three times, left open."""
    data = b"\x01" * UPLOAD_BYTES
    channels: list[grpc.aio.Channel] = []
    at_once = asyncio.Semaphore(20)

    async def one() -> None:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.use_local_subchannel_pool", 1),  # a connection each
                ("grpc.max_send_message_length", 8 << 20),
            ],
        )
        channels.append(channel)
        up: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            "/t.Up/Up"
        )

        async def messages() -> AsyncIterator[bytes]:
            yield data

        async with at_once:
            for _ in range(3):
                assert await up(messages(), timeout=30) == b"ok"

    await asyncio.gather(*(one() for _ in range(n)))
    return channels


def _growth_kib_per_connection(tmp_path: Path, mode: str) -> float:
    port_file = tmp_path / f"port-{mode}"
    drop = [CAP] if mode == "uncapped" else []
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port_file), *drop])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            assert server.poll() is None, f"{mode} server exited {server.returncode}"
            assert time.monotonic() < deadline, f"{mode} server did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())

        async def measure() -> float:
            for c in await _upload_from(port, 1):  # imports and first-call state
                await c.close()
            before = _rss_mib(server.pid)
            channels = await _upload_from(port, CONNECTIONS)
            await asyncio.sleep(1.0)  # every connection idle, its next read pending
            after = _rss_mib(server.pid)
            for c in channels:
                await c.close()
            return (after - before) * 1024 / CONNECTIONS

        return asyncio.run(measure())
    finally:
        server.kill()
        server.wait(timeout=10)


def test_idle_connections_keep_no_upload_sized_read_buffers(tmp_path: Path) -> None:
    assert (CAP, READ_BUFFER_BYTES) in SERVER_OPTIONS

    capped = _growth_kib_per_connection(tmp_path, "capped")
    uncapped = _growth_kib_per_connection(tmp_path, "uncapped")

    # Uncapped each idle connection holds most of a 1 MiB upload (~900 KiB
    # measured); capped, a small fraction of it.
    assert capped < MAX_KIB_PER_CONNECTION, (capped, uncapped)
    assert capped < uncapped / 3, (capped, uncapped)
