"""The floor of a round in Python gRPC: the same calls as fedgrpc, doing nothing else.

A bare ``grpc.aio`` server with two generic methods shaped like fedgrpc's round
traffic (issue 14): a server stream that sends each party three messages per round
(header, one chunk of P float32, end; ``GetModel``) and a client stream that reads three
(header, chunk, trailer; ``SubmitGradient``) and answers a short reply. N parties run
as asyncio tasks over a few client processes (one TCP connection each), every round:
wait for the model, upload, wait for the next. Nothing is decoded, folded, scored or
stored. What this costs per round is what any Python gRPC aggregator pays before
doing any work, so it bounds the round time fedgrpc can reach on the same cores.

    python scripts/bench_grpc_floor.py --parties 1000 --params 100000 --rounds 6
    python scripts/bench_grpc_floor.py --parties 1000 --rounds 8 \
        --server-option=grpc.http2.bdp_probe=0 \
        --server-option=grpc.experimental.tcp_max_read_buffer_size=65536

Prints, per N: the median round time, the server's and the clients' CPU seconds per
round (user + system, from /proc) and the server's peak RSS (sampled every 20 ms),
with the load average before and after. ``--server-option`` adds a channel option to
the bare server (gRPC's defaults otherwise), e.g. those of fedgrpc's aggregator
(``fedgrpc.server.app.SERVER_OPTIONS``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench_common import (
    channel_option,
    emit,
    load_snapshot,
    machine_info,
    markdown_table,
    proc_cpu_s,
    proc_status_mib,
)

HEADER = b"h" * 64
END = b"e" * 48
REPLY = b"r" * 32
OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


# ------------------------------------------------------------------- server
async def serve(a: argparse.Namespace) -> None:
    import grpc

    chunk = b"\0" * (4 * a.params)
    version = asyncio.Condition()
    state = {"round": 0, "uploads": 0}
    done = asyncio.Event()

    async def get_model(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        for t in range(a.rounds):
            async with version:
                await version.wait_for(lambda t=t: state["round"] >= t)  # type: ignore[misc]
            for message in (HEADER, chunk, END):
                await context.write(message)

    async def submit(
        request_iterator: object, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        n = 0
        async for _ in request_iterator:  # type: ignore[attr-defined]
            n += 1
        state["uploads"] += 1
        if state["uploads"] == a.parties:
            state["uploads"] = 0
            async with version:
                state["round"] += 1
                version.notify_all()
            if state["round"] >= a.rounds:
                done.set()
        return REPLY

    handler = grpc.method_handlers_generic_handler(
        "floor.Round",
        {
            "GetModel": grpc.unary_stream_rpc_method_handler(get_model),
            "Submit": grpc.stream_unary_rpc_method_handler(submit),
        },
    )
    extra = [channel_option(o) for o in a.server_option]
    server = grpc.aio.server(
        options=[*OPTIONS, ("grpc.max_concurrent_streams", 1 << 16), *extra]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(a.port_file).write_text(str(port))
    await done.wait()
    await asyncio.sleep(0.5)
    await server.stop(1)


# ------------------------------------------------------------------ clients
async def clients(a: argparse.Namespace) -> None:
    import grpc

    update = b"\1" * (4 * a.params)
    receipts: dict[int, float] = {}

    async def party(i: int) -> None:
        options = [*OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{a.port}", options=options
        ) as channel:
            get_model: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = (
                channel.unary_stream("/floor.Round/GetModel")
            )
            stream = get_model(b"")
            submit: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = (
                channel.stream_unary("/floor.Round/Submit")
            )
            t, got = 0, 0
            async for _ in stream:
                got += 1
                if got % 3:
                    continue
                receipts.setdefault(t, time.monotonic())

                async def messages() -> AsyncIterator[bytes]:
                    for m in (HEADER, update, END):
                        yield m

                await submit(messages())
                t += 1

    await asyncio.gather(*(party(i) for i in range(a.count)))
    Path(a.out).write_text(json.dumps(receipts))


# ------------------------------------------------------------------- parent
def run(n: int, a: argparse.Namespace, tmp: Path) -> dict[str, object]:
    port_file = tmp / f"port-{n}"
    here = Path(__file__).resolve()
    load0 = load_snapshot()
    server = subprocess.Popen(
        [
            sys.executable,
            str(here),
            "--as-server",
            "--port-file",
            str(port_file),
            "--parties",
            str(n),
            "--params",
            str(a.params),
            "--rounds",
            str(a.rounds),
            *(f"--server-option={o}" for o in a.server_option),
        ]
    )
    while not port_file.exists():
        time.sleep(0.05)
    time.sleep(0.1)
    port = port_file.read_text()
    per = [n // a.drivers + (1 if d < n % a.drivers else 0) for d in range(a.drivers)]
    drivers = []
    for d, count in enumerate(per):
        out = tmp / f"recv-{n}-{d}.json"
        drivers.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        str(here),
                        "--as-clients",
                        "--port",
                        port,
                        "--count",
                        str(count),
                        "--params",
                        str(a.params),
                        "--out",
                        str(out),
                    ]
                ),
                out,
            )
        )
    client_cpu: list[float] = [0.0] * len(drivers)
    samples: list[tuple[float, float, float]] = []  # (time, server, clients) CPU s
    rss_mib = 0.0
    while server.poll() is None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            server_cpu = proc_cpu_s(server.pid)
            rss_mib = max(rss_mib, proc_status_mib("VmRSS", server.pid))
            for i, (p, _) in enumerate(drivers):
                if p.poll() is None:
                    client_cpu[i] = proc_cpu_s(p.pid)
            samples.append((time.monotonic(), server_cpu, sum(client_cpu)))
        time.sleep(0.02)
    for p, _ in drivers:
        p.wait(timeout=60)
    first: dict[int, float] = {}
    for _, out in drivers:
        for t, when in json.loads(out.read_text()).items():
            first[int(t)] = min(first.get(int(t), when), when)
    # Rounds 1 .. R-1 (round 0 includes the connections and start-up).
    last = a.rounds - 1
    times = [first[t + 1] - first[t] for t in range(1, last) if t + 1 in first]

    def at(t: float) -> tuple[float, float]:
        s = min(samples, key=lambda x: abs(x[0] - t))
        return s[1], s[2]

    (s0, c0), (s1, c1) = at(first[1]), at(first[last])
    measured = last - 1
    return {
        "bench": "grpc_floor",
        "parties": n,
        "params": a.params,
        "round_s": round(statistics.median(times), 4) if times else float("nan"),
        "server_cpu_s_per_round": round((s1 - s0) / measured, 3),
        "client_cpu_s_per_round": round((c1 - c0) / measured, 3),
        "server_ms_per_party_round": round(1e3 * (s1 - s0) / measured / n, 3),
        "server_rss_mib": round(rss_mib, 1),
        "server_options": " ".join(a.server_option) or "-",
        "load_1m_before": load0["loadavg_1m"],
        "load_1m_after": load_snapshot()["loadavg_1m"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parties", default="100,500,1000")
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--drivers", type=int, default=4)
    ap.add_argument(
        "--server-option",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="a channel option for the server (e.g. grpc.http2.bdp_probe=0)",
    )
    ap.add_argument("--as-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--as-clients", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--port", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.as_server:
        a.parties = int(a.parties)
        asyncio.run(serve(a))
        return 0
    if a.as_clients:
        asyncio.run(clients(a))
        return 0
    import tempfile

    emit(machine_info())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.parties.split(",")):
            row = run(n, a, Path(tmp))
            emit(row)
            rows.append(row)
    print()
    for r in rows:
        r["load"] = f"{r['load_1m_before']}-{r['load_1m_after']}"
    print(
        markdown_table(
            rows,
            [
                ("parties", "N"),
                ("round_s", "round s"),
                ("server_cpu_s_per_round", "server CPU s/round"),
                ("server_ms_per_party_round", "server ms/party-round"),
                ("server_rss_mib", "server peak RSS MiB"),
                ("client_cpu_s_per_round", "clients CPU s/round"),
                ("load", "load 1m"),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
