"""The same FedSGD round over a naive transport: Python lists as str() over a socket.

A deliberately bad baseline, written only for this benchmark: the aggregator (this
process) sends ``str(model)`` of a Python list of floats to every party over loopback
TCP (8-byte length prefix), each party parses it back and answers ``str(update)`` of a
precomputed list, and the aggregator parses every update, checks its length and
finiteness, accumulates ``p_i * u_i`` and the DIG-FL dot ``<v_t, u_i>`` in pure Python,
and steps the model. Parsing uses ``ast.literal_eval`` (not ``eval``: same cost, and the
lint rule S307 stays on); nothing else in fedgrpc ever turns text into values.

The fedgrpc round of the same N and P is measured in the same run with
``bench_round.run_config`` (validation passes stubbed on both sides: the baseline uses a
fixed v_t too), and the speed-up factor is baseline / fedgrpc seconds per round.

    python scripts/bench_baseline.py                      # N=4; P in 1e4, 1e5, 1e6
    python scripts/bench_baseline.py --params 1e4,1e5 --cap-s 30
"""

from __future__ import annotations

import argparse
import ast
import math
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import (
    Control,
    WorkerPool,
    emit,
    human,
    load_snapshot,
    machine_info,
    markdown_table,
    median,
    parse_count,
    write_val_npz,
)

_LEN = struct.Struct(">Q")  # frame length prefix (bytes)
SERVER_LR = 0.5
DONE = b"done"


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, max_bytes: int) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > max_bytes:
        raise ValueError(f"frame of {n} bytes; limit {max_bytes}")
    return _recv_exact(sock, n)


def _parse_floats(payload: bytes, n: int) -> list[float]:
    """The naive decoder: text -> Python list, then checked."""
    values = ast.literal_eval(payload.decode("ascii"))
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"expected a list of {n} floats")
    if not all(isinstance(x, float) and math.isfinite(x) for x in values):
        raise ValueError("non-float or non-finite value")
    return values


def task_naive_party(
    ctl: Control,
    state: dict[str, Any],
    *,
    port: int,
    party: str,
    n_params: int,
    seed: int,
    timeout_s: float,
) -> int:
    """Connect; for every model received, parse it and answer the precomputed update."""
    rng = np.random.default_rng(seed)
    update_text = str((rng.standard_normal(n_params) * 1e-3).tolist()).encode()
    limit = 64 * n_params + 1024
    rounds = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        _send(sock, party.encode())
        ctl.ready()
        while True:
            payload = _recv(sock, limit)
            if payload == DONE:
                return rounds
            _parse_floats(payload, n_params)  # the party "uses" theta_t
            _send(sock, update_text)
            rounds += 1


def naive_rounds(
    pool: WorkerPool, n_parties: int, n_params: int, rounds: int, cap_s: float
) -> list[float]:
    """Run the naive aggregator here; seconds per round (stops past ``cap_s``)."""
    rng = np.random.default_rng(0)
    model = (rng.standard_normal(n_params) * 0.05).tolist()
    v = (rng.standard_normal(n_params) * 1e-3).tolist()  # fixed v_t, as the stub
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(120)
    port = int(listener.getsockname()[1])
    conns: list[socket.socket] = []
    times: list[float] = []
    timeout_s = max(600.0, 4 * cap_s)
    limit = 64 * n_params + 1024

    errors: list[BaseException] = []

    def serve() -> None:
        nonlocal model
        try:
            for _ in range(rounds):
                t0 = time.monotonic()
                text = str(model).encode()
                for c in conns:
                    _send(c, text)
                acc = [0.0] * n_params
                scores = []
                for c in conns:
                    u = _parse_floats(_recv(c, limit), n_params)
                    w = 1.0 / n_parties  # equal samples: p_i = 1/N
                    # DIG-FL eq.: phi_i = eta * p_i * <v_t, u_i>
                    scores.append(
                        SERVER_LR * w * sum(a * b for a, b in zip(v, u, strict=True))
                    )
                    acc = [a + w * x for a, x in zip(acc, u, strict=True)]
                model = [m - SERVER_LR * a for m, a in zip(model, acc, strict=True)]
                times.append(time.monotonic() - t0)
                if times[-1] > cap_s:
                    break
            for c in conns:
                _send(c, DONE)
        except BaseException as err:  # reported by the caller
            errors.append(err)
            for c in conns:
                c.close()

    server = threading.Thread(target=serve, name="naive-aggregator")

    def accept_and_serve(_infos: list[Any]) -> None:
        # Every party connected and said hello before it reported ready.
        for _ in range(n_parties):
            c, _addr = listener.accept()
            c.settimeout(timeout_s)
            _recv(c, 1024)  # hello
            conns.append(c)
        server.start()  # the parties start reading once they get "go"

    try:
        pool.run(
            task_naive_party,
            [
                {
                    "port": port,
                    "party": f"n{i}",
                    "n_params": n_params,
                    "seed": i,
                    "timeout_s": timeout_s,
                }
                for i in range(n_parties)
            ],
            timeout_s=timeout_s,
            before_go=accept_and_serve,
        )
        server.join(timeout=timeout_s)
    finally:
        for c in conns:
            c.close()
        listener.close()
    if errors:
        raise RuntimeError(f"naive aggregator failed: {errors[0]!r}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parties", type=int, default=4)
    p.add_argument("--params", default="1e4,1e5,1e6", help="values of P")
    p.add_argument("--rounds", type=int, default=3, help="naive rounds per size")
    p.add_argument(
        "--cap-s",
        type=float,
        default=60.0,
        help="stop a size after a naive round this long; skip larger sizes",
    )
    a = p.parse_args(argv)
    from bench_round import default_rounds, run_config

    sizes = sorted(parse_count(x) for x in a.params.split(","))
    emit({"bench": "machine", **machine_info(), **load_snapshot()})
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench_baseline-"))
    val = write_val_npz(tmp / "val.npz")
    pool = WorkerPool(a.parties, env={"OMP_NUM_THREADS": "1"})
    rows: list[dict[str, Any]] = []
    skipped = False
    try:
        for n_params in sizes:
            if skipped:
                rows.append(
                    {"size": human(n_params), "params": n_params, "note": "skipped"}
                )
                continue
            fed = run_config(
                pool, tmp, val, a.parties, n_params, default_rounds(n_params)
            )
            naive = naive_rounds(pool, a.parties, n_params, a.rounds, a.cap_s)
            # Round 0 includes connection warm-up on both sides; drop it when we can.
            naive_s = median(naive[1:] if len(naive) > 1 else naive)
            row = {
                "bench": "baseline",
                "parties": a.parties,
                "params": n_params,
                "size": human(n_params),
                "naive_round_s": naive_s,
                "naive_rounds": len(naive),
                "fedgrpc_round_s": fed["round_s"],
                "speedup": naive_s / fed["round_s"],
                "naive_mb_per_s": 2 * a.parties * n_params * 4 / naive_s / 1e6,
                "fedgrpc_mb_per_s": 2 * a.parties * n_params * 4 / fed["round_s"] / 1e6,
            }
            emit(row)
            rows.append(row)
            skipped = max(naive) > a.cap_s
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nSeconds per round, N={a.parties} parties, naive str()/literal_eval "
        "transport vs fedgrpc (float32 payload MB/s counts model down + updates up)\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("size", "P"),
                ("naive_round_s", "naive s/round"),
                ("fedgrpc_round_s", "fedgrpc s/round"),
                ("speedup", "speed-up"),
                ("naive_mb_per_s", "naive MB/s"),
                ("fedgrpc_mb_per_s", "fedgrpc MB/s"),
                ("note", "note"),
            ],
        )
    )
    emit({"bench": "load_at_end", **load_snapshot()})
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
