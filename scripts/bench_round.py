"""Seconds per FedSGD round for N parties x P parameters, split into its parts.

The aggregator runs as its own (spawned) process: the real ``Aggregator`` on
localhost:0 with the flat benchmark model of exactly P float32 parameters, a 64-sample
validation set and timing probes wrapped around its methods (nothing in fedgrpc is
modified). N party
processes (spawned once, reused) follow ``AggregatorClient.models`` and answer every
model version with ``AggregatorClient.submit`` of a precomputed random update: no local
work, so the round is pure system cost.

Per round t (the first round is warm-up and not counted):

* ``round_s``: publication of theta_t to publication of theta_{t+1} (what a party sees).
* ``transfer_s``: publication of theta_t until the last party's update was accepted
  (download of theta_t to every party + upload of every update, overlapped).
* ``close_s``: the round close on the driver thread: waiting for v_t (``val_grad_s``),
  the step (``aggregate_s`` of RoundResult), the validation loss after the step
  (``val_eval_s``), checkpoint + ledger (``commit_s``) and encoding theta_{t+1}
  (``publish_s``).
* ``fold_s``: weighted accumulation of updates, done as each upload finishes
  (``OpenRound.take``).
* ``scoring_s``: DIG-FL <v_t, u_i> per chunk, N x the dot time of an in-process
  micro-benchmark of ``engine.Submission.add`` with vs. without the dot.
* ``round_excl_val_s`` = round_s - val_grad_s - val_eval_s.
* ``peak_rss_mib``: the aggregator's VmHWM at the end of the run.

    python scripts/bench_round.py            # N in 2,4,8,16,32 x P in 1e5,1e6,1e7
    python scripts/bench_round.py --quick    # N in 2,4,32 x P in 1e5,1e7
    python scripts/bench_round.py --quick --server-env MALLOC_ARENA_MAX=2
    python scripts/bench_round.py --parties 4 --params 1e5 --rounds 8
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import (
    Control,
    WorkerPool,
    channel_option,
    client_for,
    emit,
    human,
    load_snapshot,
    machine_info,
    markdown_table,
    median,
    parse_count,
    proc_status_mib,
    random_update,
    server_config,
    write_val_npz,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
SAMPLES = 100
CHUNK_ELEMS = 1 << 18  # float32 elements per 1 MiB chunk (wire.CHUNK_BYTES)


# ------------------------------------------------------------ server probes
class Probes:
    """Timing wrappers around aggregator methods (installed in the server process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int, float, float]] = []  # (what, round, t0, t1)
        self.cpu_at_publish: dict[int, float] = {}  # round -> process CPU s after it
        self.add_s: dict[int, float] = defaultdict(float)  # round -> sum of add() time
        self.grad_calls: list[tuple[float, float]] = []
        self.closing = -1  # round being closed (driver thread)
        self.rss: list[tuple[float, float]] = []  # (monotonic, VmRSS MiB)
        self.traced_peak_mib = float("nan")  # Python-level allocations (tracemalloc)
        self.traced_top: list[str] = []  # allocation sites at the traced peak
        self._stop = threading.Event()

    def start_rss_sampler(self, period_s: float = 0.01, trace: bool = False) -> None:
        """Sample VmRSS every ``period_s`` until :meth:`stop`.

        With ``trace``, tracemalloc runs too (slower!) and a snapshot is kept whenever
        the traced Python allocations reach a new high (NumPy buffers included; gRPC
        core and allocator fragmentation are not: they are the RSS minus this).
        """
        import tracemalloc

        if trace:
            tracemalloc.start(1)
        best = 0

        def sample() -> None:
            nonlocal best
            while not self._stop.wait(period_s):
                self.rss.append((time.monotonic(), proc_status_mib("VmRSS")))
                if trace:
                    cur = tracemalloc.get_traced_memory()[0]
                    if cur > best * 1.05:
                        best = cur
                        snap = tracemalloc.take_snapshot()
                        self.traced_top = [
                            f"{st.size / 2**20:.1f} MiB {st.traceback[0]}"
                            for st in snap.statistics("lineno")[:8]
                        ]
            if trace:
                self.traced_peak_mib = tracemalloc.get_traced_memory()[1] / 2**20

        self._sampler = threading.Thread(target=sample, name="rss", daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        """Stop the RSS sampler."""
        self._stop.set()
        self._sampler.join(timeout=5)

    def _record(self, what: str, rnd: int, t0: float) -> None:
        t1 = time.monotonic()
        with self.lock:
            self.events.append((what, rnd, t0, t1))
            if what == "publish":
                # CPU of every thread of the aggregator: steadier than wall time
                # on a machine other work shares.
                self.cpu_at_publish[rnd] = time.process_time()

    def install(self, validator: str) -> None:
        """Wrap the methods (class level, before the Aggregator is built)."""
        from fedgrpc import engine as eng
        from fedgrpc.engine import round_state
        from fedgrpc.server import app, broadcast

        val_cls = _validator_class(validator)

        probes = self

        def wrap(
            cls: type, name: str, round_of: Callable[..., int], what: str = ""
        ) -> None:
            orig = getattr(cls, name, None)
            if orig is None:  # renamed in fedgrpc: that part goes unmeasured
                print(f"probe: {cls.__name__}.{name} not found", file=sys.stderr)
                return

            def wrapper(obj: Any, *args: Any, **kw: Any) -> Any:
                rnd = round_of(obj, *args)  # before the call: closing moves the round
                t0 = time.monotonic()
                try:
                    return orig(obj, *args, **kw)
                finally:
                    probes._record(what or name, rnd, t0)

            setattr(cls, name, wrapper)

        def closing_round(_obj: Any, rnd: Any, *_a: Any) -> int:
            probes.closing = int(getattr(rnd, "index", -1))
            return probes.closing

        # _conclude(rnd, ending, now): the close of round rnd outside the engine lock
        # (v_t wait, step, validation, commit), then publishing theta_{t+1}.
        wrap(eng.RoundEngine, "_conclude", closing_round, "close")
        # OpenRound.take folds each whole update into the accumulator (under the
        # engine lock; with --aggregation digfl the fold happens at the close).
        wrap(round_state.OpenRound, "take", lambda o, *_a: int(o.index), "fold")
        wrap(
            broadcast.ModelBroadcaster, "publish", lambda _o, r, *_a: int(r), "publish"
        )
        wrap(app.Aggregator, "_commit", lambda _o, res, *_a: int(res.round), "commit")
        wrap(val_cls, "evaluate", lambda *_a: probes.closing, "val_eval")
        grad = getattr(val_cls, "gradient")  # noqa: B009

        def gradient(obj: Any, flat: np.ndarray) -> Any:
            t0 = time.monotonic()
            try:
                return grad(obj, flat)
            finally:
                with probes.lock:
                    probes.grad_calls.append((t0, time.monotonic()))

        setattr(val_cls, "gradient", gradient)  # noqa: B010
        add = eng.Submission.add

        def timed_add(obj: Any, *args: Any) -> None:
            # Uploads do not wait for v_t (ranges that arrive before it are scored at
            # the upload's end), so this probe only times the call.
            t0 = time.perf_counter()
            try:
                add(obj, *args)
            finally:
                dt = time.perf_counter() - t0
                with probes.lock:
                    probes.add_s[int(obj.round)] += dt

        setattr(eng.Submission, "add", timed_add)  # noqa: B010


def _server_main(
    conn: Connection,
    run_dir: Path,
    val: str,
    n_params: int,
    n_parties: int,
    rounds: int,
    timeout_s: float,
    stub_val: bool,
    trace: bool,
    grpc_args: list[tuple[str, int | str]],
    validator: str,
    max_inflight: int,
) -> None:
    """The aggregator process: serve one run, then report timings and peak RSS."""
    logging.basicConfig(level=logging.WARNING)
    from fedgrpc.server.app import Aggregator, limit_malloc_arenas

    limit_malloc_arenas()  # as ``fedgrpc serve`` does

    if grpc_args:
        _add_server_options(grpc_args)

    if stub_val:
        _stub_validator(validator)
    probes = Probes()
    probes.install(validator)
    probes.start_rss_sampler(trace=trace)
    agg = Aggregator(
        server_config(
            run_dir,
            val,
            n_params,
            n_parties,
            rounds,
            validator=validator,
            max_inflight_uploads=max_inflight,
        )
    )
    port = agg.start()
    conn.send(
        {
            "port": port,
            "rss_ready_mib": proc_status_mib("VmRSS"),
            "hwm_ready_mib": proc_status_mib("VmHWM"),
        }
    )
    finished = agg.wait(timeout_s)
    results = [
        {
            "round": r.round,
            "status": r.status,
            "duration_s": getattr(r, "duration_s", float("nan")),
            "val_grad_s": getattr(r, "val_grad_s", float("nan")),
            "aggregate_s": getattr(r, "aggregate_s", float("nan")),
        }
        for r in agg.ledger.rounds()
    ]
    probes.stop()
    worker_pid = agg.validation.pid if agg.validation is not None else None
    with probes.lock:
        report = {
            "finished": finished,
            "state": agg.engine.state.value,
            "results": results,
            "events": list(probes.events),
            "cpu_at_publish": dict(probes.cpu_at_publish),
            "add_s": dict(probes.add_s),
            "grad_calls": list(probes.grad_calls),
            "rss": list(probes.rss),
            "peak_rss_mib": proc_status_mib("VmHWM"),
            "rss_end_mib": proc_status_mib("VmRSS"),
            # The validation worker (``--validator process``): torch, the model and
            # the validation set live there; the shared regions count in both.
            "worker_peak_rss_mib": (
                proc_status_mib("VmHWM", worker_pid) if worker_pid else float("nan")
            ),
            "traced_peak_mib": probes.traced_peak_mib,
            "traced_top": probes.traced_top,
        }
    conn.send(report)
    agg.shutdown(grace_s=0.5, save_open_round=False)


def _add_server_options(extra: list[tuple[str, int | str]]) -> None:
    """Append channel arguments to every ``grpc.server`` and ``grpc.aio.server`` (the
    aggregator's) made in this process."""
    import grpc
    import grpc.aio

    for module in (grpc, grpc.aio):
        make = module.server

        def server(*args: Any, _make: Any = make, **kw: Any) -> Any:
            kw["options"] = [*(kw.get("options") or []), *extra]
            return _make(*args, **kw)

        setattr(module, "server", server)  # noqa: B010


def _validator_class(validator: str) -> type:
    """The class whose methods run the validation passes in the aggregator process.

    ``thread``: ``learning.validation.FlatValidator`` (imports torch here); ``process``:
    ``validation.RemoteValidator`` (the passes run in the worker; its methods include
    the request round trip).
    """
    if validator == "thread":
        from fedgrpc.learning.validation import FlatValidator

        return FlatValidator
    from fedgrpc.server import validation

    return validation.RemoteValidator


def _stub_validator(validator: str) -> None:
    """Replace the validation passes by constants: the round without them.

    v_t becomes a fixed random vector (returned at once), the loss after the step 0.
    With the worker process, the vector is written into the shared v_t region, so
    the aggregator's memory is what the real passes would leave. What the real
    passes cost is measured by the ``real`` runs.
    """
    cls = _validator_class(validator)
    cache: dict[int, np.ndarray] = {}

    def fixed(obj: Any, size: int) -> np.ndarray:
        v = cache.get(size)
        if v is None:
            v = np.random.default_rng(3).standard_normal(size, dtype=np.float32)
            regions = getattr(obj, "_regions", None)
            if regions is not None:  # the worker's shared v_t region
                regions[2][:] = v
                v = obj._grad
            cache[size] = v
        return v

    def gradient(obj: Any, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        return fixed(obj, flat.size), 0.0, 0.0

    def evaluate(_obj: Any, _flat: np.ndarray) -> tuple[float, float]:
        return 0.0, 0.0

    setattr(cls, "gradient", gradient)  # noqa: B010
    setattr(cls, "evaluate", evaluate)  # noqa: B010


# ------------------------------------------------------------ party task
def task_party(
    ctl: Control,
    state: dict[str, Any],
    *,
    port: int,
    party: str,
    n_params: int,
    seed: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Follow the model stream; answer every version with the precomputed update."""
    from fedgrpc.client.stub import ModelVersion
    from fedgrpc.types import TrainingDone, UpdateKind

    client = client_for(state, port, party)
    update = {"w": random_update(state, n_params, seed)}
    ctl.ready()
    recv: dict[int, float] = {}
    sub: dict[int, tuple[float, float]] = {}
    end = time.monotonic() + timeout_s
    for item in client.models(0, timeout_s=timeout_s):
        if isinstance(item, TrainingDone):
            break
        assert isinstance(item, ModelVersion)
        t = item.round
        recv[t] = t0 = time.monotonic()
        reply = client.submit(
            t,
            update,
            SAMPLES,
            train_loss=0.0,
            kind=UpdateKind.GRADIENT,
            submission_id=f"{party}:{t}",
        )
        sub[t] = (t0, time.monotonic())
        if not reply.accepted:
            raise RuntimeError(f"{party} round {t}: {reply.message}")
        if time.monotonic() > end:
            raise TimeoutError(f"{party}: run longer than {timeout_s:g} s")
    return {"recv": recv, "submit": sub}


# ------------------------------------------------------------ scoring micro
class _FixedValidator:
    """v_t without torch: a fixed random vector."""

    def __init__(self, n: int) -> None:
        self.v = np.random.default_rng(1).standard_normal(n, dtype=np.float32)

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        return self.v, 0.0, 0.0

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        return 0.0, 0.0


def scoring_micro(n_params: int, reps: int = 5) -> dict[str, float]:
    """Seconds per update of ``Submission.add`` over 1 MiB chunks, and of its dot.

    ``add_s`` is the real method; ``dot_s`` the same chunks' ``np.dot(v[s:e], x)``
    alone; add without scoring = add_s - dot_s. Best of ``reps``.
    """
    from fedgrpc.config import RoundConfig
    from fedgrpc.engine import RoundEngine
    from fedgrpc.types import TensorSpec

    val = _FixedValidator(n_params)
    engine = RoundEngine(
        RoundConfig(rounds=1, min_parties=1),
        [TensorSpec("w", "float32", (n_params,))],
        np.zeros(n_params, dtype=np.float32),
        val,
        max_in_flight=1,
    )
    engine.join("p", SAMPLES)
    engine.tick()
    x = np.random.default_rng(2).standard_normal(n_params, dtype=np.float32)
    v = val.v
    bounds = [
        (s, min(n_params, s + CHUNK_ELEMS)) for s in range(0, n_params, CHUNK_ELEMS)
    ]
    add_s, dot_s, sink = [], [], 0.0
    for _ in range(reps):
        sub = engine.begin_submission("p", 0, SAMPLES, submission_id="micro")
        t0 = time.perf_counter()
        for s, e in bounds:
            sub.add(0, s, x[s:e])
        add_s.append(time.perf_counter() - t0)
        sub.abort()
        t0 = time.perf_counter()
        for s, e in bounds:
            sink += float(np.dot(v[s:e], x[s:e]))
        dot_s.append(time.perf_counter() - t0)
    best_add, best_dot = min(add_s), min(dot_s)
    return {
        "add_s": best_add,
        "dot_s": best_dot,
        "add_without_dot_s": best_add - best_dot,
        "dot_share_of_add": best_dot / best_add,
    }


# ------------------------------------------------------------------ parent
def _spans(events: list[tuple[str, int, float, float]]) -> dict[tuple[str, int], Any]:
    out: dict[tuple[str, int], Any] = {}
    for what, rnd, t0, t1 in events:
        if what == "fold":
            out[(what, rnd)] = out.get((what, rnd), 0.0) + (t1 - t0)
        else:
            out[(what, rnd)] = (t0, t1)
    return out


def analyse(
    n_parties: int,
    n_params: int,
    rounds: int,
    server: dict[str, Any],
    parties: list[dict[str, Any]],
    dot_s: float,
) -> dict[str, Any]:
    """Per-round breakdown (rounds 1..R-2), medians."""
    spans = _spans(server["events"])
    res = {r["round"]: r for r in server["results"]}
    rows: list[dict[str, float]] = []
    for t in range(1, rounds - 1):
        pub, pub_next = spans.get(("publish", t)), spans.get(("publish", t + 1))
        if pub is None or pub_next is None or t not in res:
            continue
        recv = [p["recv"][t] for p in parties]
        sub_end = [p["submit"][t][1] for p in parties]
        # Without the close probe: from the last accept to the next publication.
        close = spans.get(("close", t)) or (max(sub_end), pub_next[1])
        rr = res[t]
        val_eval = spans.get(("val_eval", t), (0.0, 0.0))
        commit = spans.get(("commit", t), (0.0, 0.0))
        grad = server["grad_calls"][t] if t < len(server["grad_calls"]) else (0, 0)
        rss_up = [m for ts, m in server["rss"] if pub[1] <= ts < close[0]]
        rss_close = [m for ts, m in server["rss"] if close[0] <= ts <= close[1]]
        cpu = server.get("cpu_at_publish", {})
        row = {
            "round_s": pub_next[1] - pub[1],
            "cpu_s": cpu.get(t + 1, math.nan) - cpu.get(t, math.nan),
            "download_s": max(recv) - pub[1],
            "transfer_s": max(sub_end) - pub[1],
            "close_s": close[1] - close[0],
            "close_latency_s": close[0] - max(sub_end),
            "val_grad_s": rr["val_grad_s"],
            "val_grad_compute_s": grad[1] - grad[0],
            "aggregate_s": rr["aggregate_s"],
            "fold_s": spans.get(("fold", t), 0.0),
            "add_s": server["add_s"].get(t, 0.0),
            "val_eval_s": val_eval[1] - val_eval[0],
            "commit_s": commit[1] - commit[0],
            "publish_s": pub_next[1] - pub_next[0],
            "rss_transfer_mib": max(rss_up, default=float("nan")),
            "rss_close_mib": max(rss_close, default=float("nan")),
        }
        rows.append(row)
    if not rows:
        raise RuntimeError(f"N={n_parties} P={n_params}: no complete round measured")
    out: dict[str, Any] = {
        k: (max if k.startswith("rss") else median)(r[k] for r in rows) for k in rows[0]
    }
    out["upload_s"] = out["transfer_s"] - out["download_s"]
    out["aggregation_s"] = out["fold_s"] + out["aggregate_s"]
    out["scoring_s"] = n_parties * dot_s
    out["scoring_pct"] = 100 * out["scoring_s"] / out["round_s"]
    # With the real validator: the passes' share on the critical path (an estimate;
    # with the stub validator this is round_s itself, give or take microseconds).
    out["round_excl_val_s"] = out["round_s"] - out["val_grad_s"] - out["val_eval_s"]
    out["rounds_measured"] = len(rows)
    return out


def run_config(
    pool: WorkerPool,
    tmp: Path,
    val: str,
    n_parties: int,
    n_params: int,
    rounds: int,
    *,
    timeout_s: float = 900.0,
    dot_s: float = 0.0,
    stub_val: bool = True,
    server_env: dict[str, str] | None = None,
    trace: bool = False,
    grpc_args: list[tuple[str, int | str]] | None = None,
    validator: str = "process",
    max_inflight: int = 0,
) -> dict[str, Any]:
    """One aggregator process, ``n_parties`` party workers, ``rounds`` rounds."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    run_dir = tmp / f"round-{n_parties}-{n_params}-{int(stub_val)}"
    proc = ctx.Process(
        target=_server_main,
        args=(
            child,
            run_dir,
            val,
            n_params,
            n_parties,
            rounds,
            timeout_s,
            stub_val,
            trace,
            grpc_args or [],
            validator,
            max_inflight,
        ),
        daemon=True,
    )
    t_start = time.monotonic()
    saved = {k: os.environ.get(k) for k in server_env or {}}
    os.environ.update(server_env or {})  # inherited by the spawned server only
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    try:
        if not parent.poll(120):
            raise TimeoutError("aggregator did not start within 120 s")
        ready = parent.recv()
        kwargs = [
            {
                "port": ready["port"],
                "party": f"p{i}",
                "n_params": n_params,
                "seed": i,
                "timeout_s": timeout_s,
            }
            for i in range(n_parties)
        ]
        parties = pool.run(task_party, kwargs, timeout_s=timeout_s)
        if not parent.poll(120):
            raise TimeoutError("aggregator did not report within 120 s")
        server = parent.recv()
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)
    if server["state"] != "done":
        raise RuntimeError(f"run ended {server['state']}: {server['results'][-1:]}")
    model_mib = n_params * 4 / (1 << 20)
    row: dict[str, Any] = {
        "bench": "round",
        "val": "stub" if stub_val else "real",
        "parties": n_parties,
        "params": n_params,
        "size": human(n_params),
        "model_mib": model_mib,
        **analyse(n_parties, n_params, rounds, server, parties, dot_s),
        "rss_ready_mib": ready["rss_ready_mib"],
        "peak_rss_mib": server["peak_rss_mib"],
        "rss_limit_mib": 4 * model_mib + 300,
        "validator": validator,
        "worker_peak_rss_mib": server["worker_peak_rss_mib"],
        "traced_peak_mib": server["traced_peak_mib"],
        "traced_top": server["traced_top"],
        "wall_s": time.monotonic() - t_start,
    }
    return row


def default_rounds(n_params: int) -> int:
    """Rounds per configuration: 2 measured for large models, more for small."""
    return 5 if n_params >= 10**7 else 8


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds per round vs N (per P) and vs P (per N), and peak RSS vs N."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    stub = [r for r in rows if r["val"] == "stub"]
    real = [r for r in rows if r["val"] == "real"]
    sizes = sorted({r["params"] for r in rows})
    ns = sorted({r["parties"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(sizes):
        color = colors[i % len(colors)]
        for sel_rows, style, tag in ((stub, "o-", ""), (real, "s--", " +val")):
            sel = sorted(
                (r for r in sel_rows if r["params"] == p), key=lambda r: r["parties"]
            )
            if not sel:
                continue
            xs = [r["parties"] for r in sel]
            label = f"P={human(p)}{tag}"
            axes[0].plot(
                xs, [r["round_s"] for r in sel], style, color=color, label=label
            )
            axes[2].plot(
                xs, [r["peak_rss_mib"] for r in sel], style, color=color, label=label
            )
        limit = 4 * p * 4 / (1 << 20) + 300
        axes[2].axhline(limit, ls=":", lw=0.8, color=color)
        axes[2].annotate(f"limit P={human(p)}", (ns[0], limit), fontsize=7)
    for n in ns:
        sel = sorted((r for r in stub if r["parties"] == n), key=lambda r: r["params"])
        if sel:
            axes[1].plot(
                [r["params"] for r in sel],
                [r["round_s"] for r in sel],
                "o-",
                label=f"N={n}",
            )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="parties N",
        ylabel="seconds per round",
        title="round time vs N (dashed: with validation passes)",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="parameters P (float32)",
        ylabel="seconds per round",
        title="round time vs P (validation stubbed)",
    )
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="parties N",
        ylabel="MiB",
        title="aggregator peak RSS (dotted: 4 x model + 300 MB)",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (axes[0], axes[2]):
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ns, [str(n) for n in ns])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


MS_COLUMNS = [
    ("round_s", "round"),
    ("cpu_s", "aggregator CPU"),
    ("round_excl_val_s", "excl. val"),
    ("transfer_s", "transfer"),
    ("download_s", "download"),
    ("upload_s", "upload"),
    ("close_s", "close"),
    ("aggregation_s", "aggregation"),
    ("scoring_s", "DIG-FL dot"),
    ("commit_s", "commit"),
    ("publish_s", "publish"),
    ("val_grad_s", "v_t wait (close)"),
    ("val_grad_compute_s", "v_t compute"),
    ("val_eval_s", "val eval"),
]


def print_tables(
    rows: list[dict[str, Any]], micro: dict[int, dict[str, float]]
) -> None:
    """The markdown tables."""
    ms_rows = [{**r, **{k + "_ms": 1000 * r[k] for k, _ in MS_COLUMNS}} for r in rows]
    for val, title in (
        ("stub", "validation passes stubbed (the system cost of a round)"),
        ("real", "with the real validation passes of the flat model"),
    ):
        sel = [r for r in ms_rows if r["val"] == val]
        if not sel:
            continue
        cols = MS_COLUMNS if val == "real" else MS_COLUMNS[:11]
        print(f"\nMilliseconds per round, {title}; median of measured rounds\n")
        print(
            markdown_table(
                sel,
                [
                    ("parties", "N"),
                    ("size", "P"),
                    *[(k + "_ms", h) for k, h in cols],
                    ("scoring_pct", "dot % of round"),
                ],
            )
        )
    print("\nAggregator memory (MiB): VmRSS after start, VmHWM at the end, max VmRSS")
    print("sampled during transfers and during the round close\n")
    print(
        markdown_table(
            rows,
            [
                ("val", "validation"),
                ("parties", "N"),
                ("size", "P"),
                ("model_mib", "model"),
                ("rss_ready_mib", "RSS at start"),
                ("rss_transfer_mib", "max in transfer"),
                ("rss_close_mib", "max in close"),
                ("peak_rss_mib", "peak (VmHWM)"),
                ("rss_limit_mib", "4 x model + 300"),
                ("worker_peak_rss_mib", "validation worker peak"),
            ],
        )
    )
    print("\nDIG-FL scoring in Submission.add (one update, 1 MiB chunks, best of 5)\n")
    print(
        markdown_table(
            [{"size": human(k), **v} for k, v in micro.items()],
            [
                ("size", "P"),
                ("add_s", "add s"),
                ("dot_s", "dot s"),
                ("add_without_dot_s", "add without dot s"),
                ("dot_share_of_add", "dot share"),
            ],
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parties", default="2,4,8,16,32", help="values of N")
    p.add_argument("--params", default="1e5,1e6,1e7", help="values of P")
    p.add_argument(
        "--real-val-parties",
        default="4,32",
        help="N values also run with the real validation passes ('' for none)",
    )
    p.add_argument(
        "--quick", action="store_true", help="N in 2,4,32 and P in 1e5,1e7 only"
    )
    p.add_argument("--rounds", type=int, default=0, help="0: 8, or 5 for P >= 1e7")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the aggregator process (e.g. MALLOC_ARENA_MAX=2)",
    )
    p.add_argument(
        "--trace-memory",
        action="store_true",
        help="tracemalloc in the aggregator: Python-level peak and its top sites",
    )
    p.add_argument(
        "--grpc-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gRPC server channel argument (e.g. grpc.http2.bdp_probe=0)",
    )
    p.add_argument(
        "--validator",
        choices=("process", "thread"),
        default="process",
        help="the aggregator's validator (fedgrpc serve --validator)",
    )
    p.add_argument(
        "--max-inflight-uploads",
        type=int,
        default=0,
        help="uploads buffered at once (0: fedgrpc's default)",
    )
    p.add_argument("--plot", type=Path, default=DOCS / "bench_round.png")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.quick:
        a.parties, a.params = "2,4,32", "1e5,1e7"
    ns = [int(x) for x in a.parties.split(",")]
    sizes = [parse_count(x) for x in a.params.split(",")]
    real_ns = [int(x) for x in a.real_val_parties.split(",") if x]
    server_env = dict(kv.split("=", 1) for kv in a.server_env)
    grpc_args = [channel_option(kv) for kv in a.grpc_arg]
    emit(
        {
            "bench": "machine",
            **machine_info(),
            **load_snapshot(),
            "server_env": server_env,
            "grpc_args": grpc_args,
        }
    )
    start = time.monotonic()
    micro: dict[int, dict[str, float]] = {}
    for n_params in sizes:
        micro[n_params] = scoring_micro(n_params)
        emit({"bench": "scoring_micro", "params": n_params, **micro[n_params]})
    tmp = Path(tempfile.mkdtemp(prefix="bench_round-"))
    val = write_val_npz(tmp / "val.npz")
    pool = WorkerPool(max([*ns, *real_ns]), env={"OMP_NUM_THREADS": "1"})
    rows: list[dict[str, Any]] = []
    plan = [(n, p, True) for p in sizes for n in ns]
    plan += [(n, p, False) for p in sizes for n in real_ns]
    try:
        for n, n_params, stub in plan:
            row = run_config(
                pool,
                tmp,
                val,
                n,
                n_params,
                a.rounds or default_rounds(n_params),
                dot_s=micro[n_params]["dot_s"],
                stub_val=stub,
                server_env=server_env,
                trace=a.trace_memory,
                grpc_args=grpc_args,
                validator=a.validator,
                max_inflight=a.max_inflight_uploads,
            )
            emit(row)
            rows.append(row)
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not a.no_plot:
        plot(rows, a.plot)
    print_tables(rows, micro)
    emit({"bench": "load_at_end", **load_snapshot()})
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
