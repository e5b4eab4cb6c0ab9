"""SubmitGradient ingest and GetModel fan-out throughput vs raw loopback TCP.

For each model size P (float32 parameters) and each number K of concurrent sending
*processes* (spawned), measures in the same run:

* ``raw``: K processes each ``sendall`` P*4 bytes from a preallocated buffer to one
  receiving Python process (the parent; a thread per connection ``recv_into`` one
  reusable 4 MiB buffer and acks when all arrived).
* ``api``: K processes each call ``AggregatorClient.submit`` (the real client path,
  including its digest pre-pass) against an in-process ``Aggregator`` whose model
  (``bench_models:flat_model``) has exactly P parameters; ``min_parties`` = K, update
  kind gradient. The round is open, published and its v_t computed before the timer
  starts.
* ``prebuilt``: the same RPC with the messages serialised before the timer (raw bytes
  through a pass-through serializer): the server's ingest capacity without the client's
  encoding cost.

Ingest = K*P*4 payload bytes / (last reply received - first sender start); ratio =
median gRPC / median raw (paired ratio: median of per-repetition ratios). Then GetModel
fan-out: N receiver processes each run ``AggregatorClient.models`` for one version,
against raw TCP fan-out of the same bytes from one process to N. Medians over --reps.

    python scripts/bench_transport.py            # 1M, 16M, 64M params; 1, 4, 16 senders
    python scripts/bench_transport.py --full     # adds 100M
    python scripts/bench_transport.py --sizes 1M,4M --senders 1,4 --reps 2
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import (
    Control,
    WorkerPool,
    client_for,
    emit,
    human,
    load_snapshot,
    machine_info,
    markdown_table,
    median,
    parse_count,
    random_update,
    raw_throughput,
    round_quiet,
    server_config,
    span_gbps,
    wait_until,
    write_val_npz,
)

log = logging.getLogger("bench_transport")

SAMPLES = 100  # num_samples each sender declares


# ------------------------------------------------------------ worker tasks
def _prebuilt(state: dict[str, Any], n_params: int) -> tuple[list[bytes], bytes]:
    """Serialized chunk messages and the trailer of a random update (cached).

    Chunks and digest come from fedgrpc's own encoder, exactly as the client's.
    """
    from fedgrpc import wire
    from fedgrpc.proto import aggregator_pb2

    key = f"prebuilt:{n_params}"
    cached = state.get(key)
    if cached is None:
        for old in [k for k in state if k.startswith(("prebuilt:", "update:"))]:
            del state[old]
        arr = np.random.default_rng(n_params).standard_normal(
            n_params, dtype=np.float32
        )
        bundle = wire.prepare_bundle([("w", arr)])
        chunks = list(bundle.messages())  # serialized SubmitMessage chunks
        trailer = aggregator_pb2.SubmitMessage(
            trailer=aggregator_pb2.SubmitTrailer(digest=bundle.digest)
        ).SerializeToString()
        cached = (chunks, trailer)
        state[key] = cached
    return cached


def _raw_channel(state: dict[str, Any], port: int) -> Any:
    """An insecure channel to localhost:PORT with the client's options (cached)."""
    import grpc

    from fedgrpc.client.stub import CHANNEL_OPTIONS

    key = f"channel:{port}"
    channel = state.get(key)
    if channel is None:
        for old in [k for k in state if k.startswith("channel:")]:
            state.pop(old).close()
        channel = grpc.insecure_channel(f"localhost:{port}", options=CHANNEL_OPTIONS)
        state[key] = channel
    return channel


def task_submit(
    ctl: Control,
    state: dict[str, Any],
    *,
    port: int,
    party: str,
    n_params: int,
    round_index: int,
    mode: str,
) -> dict[str, Any]:
    """One SubmitGradient of P random float32 values; timed from go to the reply."""
    from fedgrpc.proto import aggregator_pb2
    from fedgrpc.types import UpdateKind

    client = client_for(state, port, party)
    sid = f"{party}:{round_index}"
    if client.wire_dtype != "float32":
        import torch  # noqa: F401 - loaded in any party; its casts are the fast path
    if mode == "api":
        for old in [k for k in state if k.startswith("prebuilt:")]:
            del state[old]
        update = {"w": random_update(state, n_params, seed=n_params)}
        ctl.ready()
        c0, t0 = time.process_time(), time.monotonic()
        reply = client.submit(
            round_index,
            update,
            SAMPLES,
            train_loss=0.0,
            kind=UpdateKind.GRADIENT,
            submission_id=sid,
        )
    else:
        chunks, trailer = _prebuilt(state, n_params)
        header = aggregator_pb2.SubmitMessage(
            header=aggregator_pb2.SubmitHeader(
                party_id=party,
                round=round_index,
                num_samples=SAMPLES,
                train_loss=0.0,
                update_kind=aggregator_pb2.GRADIENT,
                submission_id=sid,
            )
        ).SerializeToString()
        service = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name
        call = _raw_channel(state, port).stream_unary(
            f"/{service}/SubmitGradient",
            request_serializer=None,
            response_deserializer=aggregator_pb2.SubmitReply.FromString,
        )
        ctl.ready()
        c0, t0 = time.process_time(), time.monotonic()
        reply = call(iter([header, *chunks, trailer]), timeout=600)
    t1, c1 = time.monotonic(), time.process_time()
    return {
        "t0": t0,
        "t1": t1,
        "cpu_s": c1 - c0,
        "accepted": bool(reply.accepted),
        "message": str(reply.message),
    }


def task_fetch(
    ctl: Control, state: dict[str, Any], *, port: int, party: str
) -> dict[str, Any]:
    """One GetModel stream until the first whole model version arrived."""
    from fedgrpc.client.stub import ModelVersion

    for old in [k for k in state if k.startswith(("prebuilt:", "update:"))]:
        del state[old]
    client = client_for(state, port, party)
    ctl.ready()
    c0, t0 = time.process_time(), time.monotonic()
    stream = client.models(0, timeout_s=600.0)
    got = False
    for item in stream:
        if isinstance(item, ModelVersion):
            got = True
            break
    t1, c1 = time.monotonic(), time.process_time()
    stream.close()
    if not got:
        raise RuntimeError(f"{party}: stream ended without a model")
    return {"t0": t0, "t1": t1, "cpu_s": c1 - c0}


# ------------------------------------------------------------------ parent
def _wait_rounds_done(agg: Any, n: int) -> None:
    wait_until(f"{n} rounds closed", lambda: agg.engine.rounds_done >= n, 300)


def _ingest(
    pool: WorkerPool,
    tmp: Path,
    val: str,
    n_params: int,
    k: int,
    modes: list[str],
    reps: int,
    wire_dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Per rep: raw TCP, then one round per gRPC mode (interleaved: load drifts)."""
    from fedgrpc.server.app import Aggregator

    run_dir = tmp / f"ingest-{n_params}-{k}"
    agg = Aggregator(
        server_config(
            run_dir, val, n_params, k, rounds=reps * len(modes), wire_dtype=wire_dtype
        )
    )
    port = agg.start()
    nbytes = k * n_params * 4
    gbps: dict[str, list[float]] = {m: [] for m in ["raw", *modes]}
    server_cpu: dict[str, list[float]] = {m: [] for m in ["raw", *modes]}
    sender_cpu: dict[str, list[float]] = {m: [] for m in modes}
    r = 0
    cpu0 = [0.0]  # process CPU time at "go"
    try:
        for _ in range(reps):
            c0 = time.process_time()
            gbps["raw"].append(raw_throughput(pool, "ingest", k, n_params * 4))
            server_cpu["raw"].append(time.process_time() - c0)
            for mode in modes:

                def round_open(_infos: list[Any], r: int = r) -> None:
                    wait_until(f"round {r} quiet", lambda: round_quiet(agg, r), 300)
                    cpu0[0] = time.process_time()

                kwargs = [
                    {
                        "port": port,
                        "party": f"s{i}",
                        "n_params": n_params,
                        "round_index": r,
                        "mode": mode,
                    }
                    for i in range(k)
                ]
                res = pool.run(task_submit, kwargs, timeout_s=600, before_go=round_open)
                server_cpu[mode].append(time.process_time() - cpu0[0])
                bad = [x["message"] for x in res if not x["accepted"]]
                if bad:
                    raise RuntimeError(f"rejected: {bad}")
                gbps[mode].append(span_gbps([(x["t0"], x["t1"]) for x in res], nbytes))
                sender_cpu[mode].append(sum(x["cpu_s"] for x in res))
                _wait_rounds_done(agg, r + 1)
                r += 1
    finally:
        agg.shutdown(grace_s=0.5, save_open_round=False)
        shutil.rmtree(run_dir, ignore_errors=True)
    gb = nbytes / 1e9
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        out[mode] = {
            "gbps": median(gbps[mode]),
            "gbps_best": max(gbps[mode]),
            "raw_gbps": median(gbps["raw"]),
            "ratio": median(gbps[mode]) / median(gbps["raw"]),
            "ratio_paired": median(
                g / raw for g, raw in zip(gbps[mode], gbps["raw"], strict=True)
            ),
            "server_cpu_s_per_gb": median(server_cpu[mode]) / gb,
            "raw_receiver_cpu_s_per_gb": median(server_cpu["raw"]) / gb,
            "sender_cpu_s_per_gb": median(sender_cpu[mode]) / gb,
        }
    return out


def _fanout(
    pool: WorkerPool, tmp: Path, val: str, n_params: int, n: int, reps: int
) -> dict[str, Any]:
    """Per rep: raw TCP fan-out, then N GetModel streams of the same version."""
    from fedgrpc.server.app import Aggregator

    run_dir = tmp / f"fanout-{n_params}-{n}"
    agg = Aggregator(server_config(run_dir, val, n_params, n, rounds=1))
    port = agg.start()
    nbytes = n * n_params * 4
    gbps, raw, cpu, server_cpu = [], [], [], []
    cpu0 = [0.0]  # process CPU time at "go"
    try:
        for _ in range(reps):
            raw.append(raw_throughput(pool, "fanout", n, n_params * 4))

            def published(_infos: list[Any]) -> None:
                wait_until("round 0 quiet", lambda: round_quiet(agg, 0), 300)
                cpu0[0] = time.process_time()

            res = pool.run(
                task_fetch,
                [{"port": port, "party": f"r{i}"} for i in range(n)],
                timeout_s=600,
                before_go=published,
            )
            server_cpu.append(time.process_time() - cpu0[0])
            gbps.append(span_gbps([(x["t0"], x["t1"]) for x in res], nbytes))
            cpu.append(sum(x["cpu_s"] for x in res))
    finally:
        agg.shutdown(grace_s=0.5, save_open_round=False)
        shutil.rmtree(run_dir, ignore_errors=True)
    gb = nbytes / 1e9
    return {
        "gbps": median(gbps),
        "gbps_best": max(gbps),
        "raw_gbps": median(raw),
        "ratio": median(gbps) / median(raw),
        "ratio_paired": median(g / r for g, r in zip(gbps, raw, strict=True)),
        "server_cpu_s_per_gb": median(server_cpu) / gb,
        "receiver_cpu_s_per_gb": median(cpu) / gb,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,16M,64M", help="float32 parameter counts")
    p.add_argument("--full", action="store_true", help="also 100M parameters")
    p.add_argument("--senders", default="1,4,16", help="concurrent sender processes")
    p.add_argument("--receivers", default="1,4,16", help="GetModel receiver processes")
    p.add_argument("--modes", default="api,prebuilt", help="gRPC sender modes")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    p.add_argument("--no-fanout", action="store_true")
    p.add_argument(
        "--wire-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="ingest with this wire dtype (api mode; GB/s count float32 bytes)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from fedgrpc.server.app import limit_malloc_arenas

    limit_malloc_arenas()  # the aggregator runs in this process; as fedgrpc serve
    sizes = [parse_count(s) for s in a.sizes.split(",")]
    if a.full and 100_000_000 not in sizes:
        sizes.append(100_000_000)
    senders = [int(s) for s in a.senders.split(",")]
    receivers = [] if a.no_fanout else [int(s) for s in a.receivers.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    if not set(modes) <= {"api", "prebuilt"}:
        p.error("--modes: api and/or prebuilt")
    if a.wire_dtype != "float32" and modes != ["api"]:
        p.error("--wire-dtype other than float32 needs --modes api")
    import fedgrpc.server.app  # noqa: F401 - load the code under test once, now

    info = machine_info()
    emit({"bench": "machine", **info, **load_snapshot()})
    tmp = Path(tempfile.mkdtemp(prefix="bench_transport-"))
    val = write_val_npz(tmp / "val.npz")
    pool = WorkerPool(max([*senders, *receivers]), env={"OMP_NUM_THREADS": "1"})
    ingest: list[dict[str, Any]] = []
    fanout: list[dict[str, Any]] = []
    start = time.monotonic()
    try:
        for n_params in sizes:
            nbytes = n_params * 4
            for k in senders:
                per_mode = _ingest(
                    pool, tmp, val, n_params, k, modes, a.reps, a.wire_dtype
                )
                for mode, stats in per_mode.items():
                    row = {
                        "bench": "transport",
                        "kind": "ingest",
                        "mode": mode,
                        "wire_dtype": a.wire_dtype,
                        "params": n_params,
                        "size": human(n_params),
                        "mib_per_sender": nbytes / (1 << 20),
                        "senders": k,
                        **stats,
                    }
                    emit(row)
                    ingest.append(row)
            for n in receivers:
                row = {
                    "bench": "transport",
                    "kind": "fanout",
                    "params": n_params,
                    "size": human(n_params),
                    "receivers": n,
                    **_fanout(pool, tmp, val, n_params, n, a.reps),
                }
                emit(row)
                fanout.append(row)
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"SubmitGradient ingest (GB/s of payload, median of {a.reps}; raw = loopback "
        "TCP, same senders, same bytes)\n"
    )
    print(
        markdown_table(
            ingest,
            [
                ("size", "params"),
                ("senders", "senders"),
                ("mode", "mode"),
                ("gbps", "gRPC GB/s"),
                ("raw_gbps", "raw TCP GB/s"),
                ("ratio", "ratio"),
                ("ratio_paired", "paired ratio"),
                ("server_cpu_s_per_gb", "server CPU s/GB"),
                ("raw_receiver_cpu_s_per_gb", "raw recv CPU s/GB"),
                ("sender_cpu_s_per_gb", "sender CPU s/GB"),
            ],
        )
    )
    if fanout:
        print("\nGetModel fan-out (GB/s delivered to all receivers)\n")
        print(
            markdown_table(
                fanout,
                [
                    ("size", "params"),
                    ("receivers", "receivers"),
                    ("gbps", "gRPC GB/s"),
                    ("raw_gbps", "raw TCP GB/s"),
                    ("ratio", "ratio"),
                    ("ratio_paired", "paired ratio"),
                    ("server_cpu_s_per_gb", "server CPU s/GB"),
                    ("receiver_cpu_s_per_gb", "receiver CPU s/GB"),
                ],
            )
        )
    emit({"bench": "load_at_end", **load_snapshot()})
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
