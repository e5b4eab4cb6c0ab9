"""Round time, payload throughput, aggregator RSS and threads vs N parties (issue 14).

N real gRPC parties (one connection each, the real channel options and wire protocol)
run in a few driver processes against a real ``fedgrpc serve`` subprocess with the
flat benchmark model of P float32 parameters. ``--driver aio`` (the default) runs a
driver's parties as asyncio tasks on one ``grpc.aio`` event loop, speaking the
protocol as ``fedgrpc.client.AggregatorClient`` does (raw model stream decoded and
verified by ``fedgrpc.wire``, pre-serialized uploads); ``--driver threads`` runs each
party as a thread with the synchronous ``AggregatorClient`` itself, whose CPU limits
the round from a few hundred parties on. A party's local work is trivial: it
answers every model version with a precomputed update, so the round is pure system
cost. Every configuration runs for each code tree given (``--code NAME=DIR``; by
default this tree as ``new`` and ``git archive`` of ``--baseline-ref`` as
``baseline``), interleaved, so both see the same machine load. The aggregator is the
tree's; the aio driver is this tree's code (the instrument, the same for every tree)
with the tree's ``CHANNEL_OPTIONS`` (its keepalive pings, windows); the threads
driver runs the tree's own ``AggregatorClient``.

Per configuration (rounds 1..R-2 measured; round 0 includes the joins):

* ``round_s``: median over rounds t of (first receipt of model t+1) - (first receipt
  of model t), across all parties (what the federation sees);
* ``payload_mb_s``: parties asked x 2 x P x 4 bytes (model down, update up) per
  ``round_s`` (all N without client sampling);
* ``server_cpu_s``: the aggregator process's user+system CPU seconds per round;
* ``driver``: which driver ran; ``driver_cpu_s``: the driver processes' CPU seconds
  over the whole run (imports and joins included); ``driver_cpu_round_s``: theirs
  per measured round, sampled like the aggregator's;
* ``rss_mib`` / ``hwm_mib``: the aggregator's largest sampled VmRSS and its VmHWM;
  ``threads``: its largest sampled thread count (the validation worker is another
  process and is not counted);
* ``errors``: failed calls seen by the parties, by status (and the first message);
  a party that stopped on anything else counts as ``party stopped <Error>``.

``--trace-dir DIR`` also writes, per run, ``DIR/<code>-<N>.json``: the aggregator's
sampled RSS (MiB) and threads over time and each round's first and last model receipt,
in seconds from its start. ``--serve-wrap 'heaptrack -o DIR/serve'`` runs the
aggregator under a heap profiler (where the 1,000-party memory was found).

    python scripts/bench_scale.py                          # N in 2..1000, P = 100 k
    python scripts/bench_scale.py --parties 1024 --code baseline=auto --rounds 3
    python scripts/bench_scale.py --parties 128 --code new=. --driver threads
    python scripts/bench_scale.py --parties 1000 --code new=. \
        --serve-arg=--sample-count=100 --serve-arg=--min-parties=100  # sampling
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
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
    proc_cpu_s,
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
GET_MODEL = "/fedgrpc.v1.Aggregator/GetModel"
SUBMIT = "/fedgrpc.v1.Aggregator/SubmitGradient"
DISTINCT_UPDATES = 8
"""Parties share this many precomputed updates (party i sends number i % 8)."""


class Tally:
    """What one driver's parties saw: receipt times, acceptances, failed calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # uncontended with the aio driver
        self.recv: dict[int, list[float]] = {}  # round -> receipt times of its model
        self.sent: dict[int, list[float]] = {}  # round -> times the update was accepted
        self.models: dict[int, int] = {}  # round -> parties that got the model
        self.errors: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.finished = 0

    def error(self, where: str, code: str, text: str) -> None:
        """Count a failed call (or a party that stopped) by place and status."""
        key = f"{where} {code}"
        with self.lock:
            self.errors[key] += 1
            self.first_error.setdefault(key, text[:300])

    def asked(self, t: int) -> None:
        """A party received model ``t`` to train on (it was sampled)."""
        with self.lock:
            self.models[t] = self.models.get(t, 0) + 1

    def got(self, t: int, when: float) -> None:
        """A party is through round ``t`` (update sent, or told to sit it out)."""
        with self.lock:
            self.recv.setdefault(t, []).append(when)

    def accepted(self, t: int) -> None:
        """A party's update for round ``t`` was accepted."""
        with self.lock:
            self.sent.setdefault(t, []).append(time.monotonic())

    def done(self) -> None:
        """A party received TrainingDone."""
        with self.lock:
            self.finished += 1

    def result(self, driver: str, parties: int, cpu_s: float) -> dict[str, Any]:
        """The driver's JSON output."""
        import fedgrpc

        return {
            "fedgrpc": fedgrpc.__file__,
            "driver": driver,
            "parties": parties,
            "finished": self.finished,
            "recv": {t: [min(v), max(v), len(v)] for t, v in self.recv.items()},
            "sent": {t: [max(v), len(v)] for t, v in self.sent.items()},
            "models": self.models,
            "errors": dict(self.errors),
            "first_error": self.first_error,
            "cpu_s": cpu_s,
        }


def driver_main(a: argparse.Namespace) -> int:
    """One driver process: ``a.count`` parties (threads or aio tasks); write timings."""
    import numpy as np

    from fedgrpc.client import stub

    if a.channel_options:  # the tree under test's (this tree's code runs the parties)
        stub.CHANNEL_OPTIONS[:] = [tuple(o) for o in json.loads(a.channel_options)]
    if not a.shared_connections:
        # One TCP connection per party, as deployed parties have (gRPC otherwise
        # shares one connection between the channels of a process).
        stub.CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    rng = np.random.default_rng(a.first)
    updates = [
        {"w": rng.standard_normal(a.params, dtype=np.float32) * np.float32(1e-3)}
        for _ in range(DISTINCT_UPDATES)
    ]
    tally = Tally()
    cpu0 = time.process_time()
    if a.driver == "aio":
        import asyncio

        asyncio.run(_aio_parties(a, updates, tally))
    else:
        _thread_parties(a, updates, tally)
    out = tally.result(a.driver, a.count, time.process_time() - cpu0)
    Path(a.out).write_text(json.dumps(out))
    return 0


def _client_config(a: argparse.Namespace, pid: str) -> Any:
    from fedgrpc.config import ClientConfig

    return ClientConfig(
        server=f"localhost:{a.port}",
        party_id=pid,
        data="",
        insecure=True,
        rpc_timeout_s=a.timeout,
        connect_timeout_s=a.timeout,
    )


def _thread_parties(
    a: argparse.Namespace, updates: list[dict[str, Any]], tally: Tally
) -> None:
    """Today's driver: each party a thread with a synchronous AggregatorClient."""
    from fedgrpc.client.stub import AggregatorClient, ModelVersion
    from fedgrpc.errors import ErrorCode, RemoteError
    from fedgrpc.types import TrainingDone, UpdateKind

    threading.stack_size(512 << 10)
    joins = threading.Semaphore(max(1, JOINS_AT_ONCE // a.drivers))
    end = time.monotonic() + a.timeout

    def note_error(err: RemoteError, where: str) -> None:
        tally.error(where, err.code.name if err.code else "UNKNOWN", str(err))

    def party(i: int) -> None:
        pid = f"p{i:05d}"
        update = updates[i % len(updates)]
        with AggregatorClient(_client_config(a, pid)) as client:
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
                            tally.done()
                            return
                        t = item.round
                        got = time.monotonic()
                        if not isinstance(item, ModelVersion):  # not sampled
                            tally.got(t, got)
                            next_round = t + 1
                            continue
                        tally.asked(t)
                        reply = client.submit(
                            t,
                            update,
                            SAMPLES,
                            train_loss=0.0,
                            kind=UpdateKind.GRADIENT,
                            submission_id=f"{pid}:{t}",
                        )
                        tally.got(t, got)
                        if reply.accepted:
                            tally.accepted(t)
                        next_round = t + 1
                except RemoteError as err:
                    # As the real party does: reconnect and ask for the round it needs.
                    note_error(err, "GetModel/Submit")
                    time.sleep(0.5)

    def guarded(i: int) -> None:
        try:
            party(i)
        except Exception as err:  # a party that stops is a result, not a crash
            tally.error("party stopped", type(err).__name__, str(err))

    threads = [
        threading.Thread(target=guarded, args=(i,), daemon=True)
        for i in range(a.first, a.first + a.count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()) + 5)


async def _aio_parties(
    a: argparse.Namespace, updates: list[dict[str, Any]], tally: Tally
) -> None:
    """Each party an asyncio task on this process's one event loop (grpc.aio).

    The same wire protocol and client options as ``AggregatorClient``: Join through
    the proto stub, GetModel read as raw bytes and decoded and verified by
    ``fedgrpc.wire`` (BundleDecoder, digest), SubmitGradient as pre-serialized
    messages, ``stub.CHANNEL_OPTIONS``, the same deadlines and retries (UNAVAILABLE
    with capped backoff; Join also on RESOURCE_EXHAUSTED, as the thread driver).
    Each party's upload is framed once (its chunk messages and trailer are the same
    bytes every round); only the header, which names the round, is built per round.
    """
    import asyncio
    import random
    from collections.abc import Awaitable, Callable

    import grpc
    import grpc.aio

    import fedgrpc
    from fedgrpc import wire
    from fedgrpc.client.stub import (
        CHANNEL_OPTIONS,
        ModelReader,
        ModelVersion,
        remote_error,
    )
    from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
    from fedgrpc.types import SubmitHeader, SubmitOutcome, TrainingDone, UpdateKind

    joins = asyncio.Semaphore(max(1, JOINS_AT_ONCE // a.drivers))
    end = time.monotonic() + a.timeout
    jitter = random.Random(a.first)
    framed: dict[int, tuple[list[bytes], bytes]] = {}  # update -> (chunks, trailer)

    def note_error(err: grpc.aio.AioRpcError, where: str) -> None:
        remote = remote_error(err)
        tally.error(where, remote.code.name, str(remote))

    async def retry(call: Callable[[], Awaitable[Any]], cfg: Any) -> Any:
        # AggregatorClient.retry: only UNAVAILABLE, capped exponential backoff.
        delay = cfg.backoff_initial_s
        give_up = time.monotonic() + cfg.connect_timeout_s
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if (
                    err.code() != grpc.StatusCode.UNAVAILABLE
                    or time.monotonic() >= give_up
                ):
                    raise
                await asyncio.sleep(
                    min(delay, cfg.backoff_max_s) * (0.5 + jitter.random())
                )
                delay = min(delay * 2, cfg.backoff_max_s)

    def upload(k: int, info: wire.JoinInfo) -> tuple[list[bytes], bytes]:
        if k not in framed:
            update = updates[k]
            bundle = wire.prepare_bundle(
                ((s.name, update[s.name]) for s in info.specs),
                info.config.wire_dtype,
            )
            trailer = wire.submit_trailer_to_proto(bundle.digest).SerializeToString()
            framed[k] = (list(bundle.messages()), trailer)
        return framed[k]

    async def party(i: int) -> None:
        pid = f"p{i:05d}"
        cfg = _client_config(a, pid)
        async with grpc.aio.insecure_channel(
            cfg.server, options=CHANNEL_OPTIONS
        ) as channel:
            join = aggregator_pb2_grpc.AggregatorStub(channel).Join
            get_model: grpc.aio.UnaryStreamMultiCallable[
                aggregator_pb2.GetModelRequest, bytes
            ] = channel.unary_stream(
                GET_MODEL,
                request_serializer=aggregator_pb2.GetModelRequest.SerializeToString,
                response_deserializer=None,
            )
            submit: grpc.aio.StreamUnaryMultiCallable[
                bytes, aggregator_pb2.SubmitReply
            ] = channel.stream_unary(
                SUBMIT,
                request_serializer=None,
                response_deserializer=aggregator_pb2.SubmitReply.FromString,
            )
            request = wire.join_request_to_proto(pid, SAMPLES, fedgrpc.__version__)
            while True:
                try:
                    async with joins:
                        reply = await retry(
                            lambda: join(request, timeout=cfg.rpc_timeout_s),
                            cfg,
                        )
                    break
                except grpc.aio.AioRpcError as err:
                    note_error(err, "Join")
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.2)
            info = wire.join_reply_from_proto(reply)
            chunks, trailer = upload(i % len(updates), info)

            def messages(t: int) -> list[bytes]:
                header = SubmitHeader(
                    party_id=pid,
                    round=t,
                    num_samples=SAMPLES,
                    train_loss=0.0,
                    update_kind=UpdateKind.GRADIENT,
                    submission_id=f"{pid}:{t}",
                )
                head = wire.submit_header_to_proto(header).SerializeToString()
                return [head, *chunks, trailer]

            async def send(t: int) -> SubmitOutcome:
                reply = await retry(
                    lambda: submit(iter(messages(t)), timeout=cfg.rpc_timeout_s),
                    cfg,
                )
                return wire.submit_reply_from_proto(reply)[0]

            next_round = 0
            while time.monotonic() < end:
                try:
                    left = end - time.monotonic()
                    req = wire.get_model_request_to_proto(pid, next_round)
                    reader = ModelReader(info.specs, reuse=True)
                    async for data in get_model(req, timeout=left):
                        for item in reader.feed(data):
                            if isinstance(item, TrainingDone):
                                tally.done()
                                return
                            t = item.round
                            got = time.monotonic()
                            if isinstance(item, ModelVersion):
                                tally.asked(t)
                                outcome = await send(t)
                                tally.got(t, got)
                                if outcome.accepted:
                                    tally.accepted(t)
                            else:  # not sampled
                                tally.got(t, got)
                            next_round = t + 1
                except grpc.aio.AioRpcError as err:
                    # As the real party does: reconnect and ask for the round it needs.
                    note_error(err, "GetModel/Submit")
                    await asyncio.sleep(0.5)

    async def guarded(i: int) -> None:
        try:
            await party(i)
        except Exception as err:  # a party that stops is a result, not a crash
            tally.error("party stopped", type(err).__name__, str(err))

    tasks = [asyncio.create_task(guarded(i)) for i in range(a.first, a.first + a.count)]
    _, pending = await asyncio.wait(tasks, timeout=a.timeout + 5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


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
        out["cpu_s"] = proc_cpu_s(pid)
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


@functools.cache
def _channel_options(code: Path) -> str:
    """``fedgrpc.client.stub.CHANNEL_OPTIONS`` of the tree at ``code``, as JSON."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from fedgrpc.client.stub import CHANNEL_OPTIONS as o; "
            "print(json.dumps(o))",
        ],
        env=_env(code),
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


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
        *shlex.split(a.serve_wrap),
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
    driver_samplers: list[Sampler] = []
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
                "--as-driver",
                "--driver",
                a.driver,
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
            driver_env = env
            if a.driver == "aio":
                # The instrument is this tree's; the client options are the
                # measured tree's (they decide e.g. its keepalive pings).
                cmd += ["--channel-options", _channel_options(code)]
                driver_env = _env(REPO)
            proc = subprocess.Popen(cmd, env=driver_env, cwd=run)
            drivers.append((proc, out))
            driver_samplers.append(Sampler(proc.pid))
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
        for s in driver_samplers:
            s.stop()
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
    row = analyse(
        name, n, a, results, sampler, driver_samplers, wall_s, load0, server.returncode
    )
    row["served_by"] = served_by
    if a.trace_dir is not None:
        write_trace(a.trace_dir / f"{name}-{n}.json", sampler, results, t0)
    if not served_by.startswith(str(code)):
        raise RuntimeError(f"{name}: the aggregator ran {served_by}, not {code}")
    return row


def receipts(results: list[dict[str, Any]]) -> dict[int, tuple[float, float, int]]:
    """Per round, over all drivers: its first and last model receipt, and how many."""
    out: dict[int, tuple[float, float, int]] = {}
    for r in results:
        for key, (lo, hi, cnt) in r["recv"].items():
            t = int(key)
            lo0, hi0, cnt0 = out.get(t, (lo, hi, 0))
            out[t] = (min(lo0, lo), max(hi0, hi), cnt0 + cnt)
    return out


def write_trace(
    path: Path, sampler: Sampler, results: list[dict[str, Any]], t0: float
) -> None:
    """The aggregator's sampled RSS and threads over time, and each round's first and
    last model receipt (seconds from the aggregator's start), as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = {
        "samples": [
            [round(t - t0, 3), s.get("VmRSS"), s.get("Threads")]
            for t, s in sampler.samples
        ],
        "rounds": {
            t: [round(lo - t0, 3), round(hi - t0, 3)]
            for t, (lo, hi, _) in receipts(results).items()
        },
    }
    path.write_text(json.dumps(trace))


def analyse(
    name: str,
    n: int,
    a: argparse.Namespace,
    results: list[dict[str, Any]],
    sampler: Sampler,
    driver_samplers: list[Sampler],
    wall_s: float,
    load0: dict[str, Any],
    exit_code: int | None,
) -> dict[str, Any]:
    """One result row from the drivers' timings and the aggregator's samples."""
    spans = receipts(results)
    first = {t: lo for t, (lo, _, _) in spans.items()}
    got = {t: cnt for t, (_, _, cnt) in spans.items()}
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    for r in results:
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
    cpu = driver_cpu = float("nan")
    if measured:
        lo, hi = first[measured[0]], first[measured[-1] + 1]
        cpu = (sampler.at(hi, "cpu_s") - sampler.at(lo, "cpu_s")) / len(measured)
        driver_cpu = sum(
            s.at(hi, "cpu_s") - s.at(lo, "cpu_s") for s in driver_samplers
        ) / len(measured)
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
        "driver": a.driver,
        "driver_cpu_s": sum(r["cpu_s"] for r in results),
        "driver_cpu_round_s": driver_cpu,
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
    ("driver", "driver"),
    ("driver_cpu_round_s", "driver CPU s/round"),
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
    p.add_argument(
        "--driver",
        choices=("aio", "threads"),
        default="aio",
        help="how a driver process runs its parties: asyncio tasks on one grpc.aio "
        "event loop (default), or a thread each with the synchronous "
        "AggregatorClient",
    )
    p.add_argument("--shared-connections", action="store_true")
    p.add_argument("--py-spy", help="py-spy binary: profile the aggregator")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"))
    p.add_argument("--json-out", type=Path, help="append the rows here (JSON lines)")
    p.add_argument(
        "--serve-wrap",
        default="",
        metavar="CMD",
        help="run the aggregator under this command (e.g. 'heaptrack -o DIR/serve'); "
        "its RSS and CPU are then the wrapper's",
    )
    p.add_argument(
        "--trace-dir",
        type=Path,
        help="write each run's RSS and threads over time, with its rounds, here",
    )
    # Driver mode (internal).
    p.add_argument("--as-driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--channel-options", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.as_driver:
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
    print(f"P = {human(a.params)} float32, {a.drivers} driver processes ({a.driver})")
    print(markdown_table(table, COLUMNS))
    emit({"bench": "load_at_end", **load_snapshot()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
