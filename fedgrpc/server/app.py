"""The aggregator process: wires data, engine, ledger, broadcaster and gRPC server."""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import platform
import signal
import sqlite3
import threading
import time
import uuid
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import fedgrpc
from fedgrpc import wire
from fedgrpc.config import (
    Limits,
    RoundConfig,
    ServerConfig,
    round_config_from_json,
    round_config_to_json,
)
from fedgrpc.engine import RoundEngine
from fedgrpc.engine.second_order import PendingSecond
from fedgrpc.engine.spill import DirSpill
from fedgrpc.errors import ConfigError, FedGrpcError
from fedgrpc.layout import FlatLayout
from fedgrpc.proto import aggregator_pb2
from fedgrpc.security.registry import PartyRegistry
from fedgrpc.server.aioserver import AioServer, ThreadSafeHealth
from fedgrpc.server.auth import server_credentials
from fedgrpc.server.broadcast import ModelBroadcaster
from fedgrpc.server.servicer import AggregatorServicer, Run
from fedgrpc.server.validation import ValidationSetup, open_validation
from fedgrpc.store.checkpoint import load_arrays
from fedgrpc.store.files import atomic_write
from fedgrpc.store.ledger import Ledger
from fedgrpc.store.run_dir import RESUME_KEY, RunDir
from fedgrpc.strategies import build_strategy
from fedgrpc.types import RoundResult, RunState, SecondOrder

if TYPE_CHECKING:
    from fedgrpc.server.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name


def model_description(rcfg: RoundConfig) -> dict[str, Any]:
    """What rebuilding the model needs; stored with every checkpoint."""
    return {
        "model": rcfg.model,
        "input_shape": list(rcfg.input_shape),
        "num_classes": rcfg.num_classes,
        "hidden": rcfg.model_hidden,
    }


def _identity(b: bytes) -> bytes:
    return b


def build_handler(
    servicer: AggregatorServicer, metrics: Metrics | None = None
) -> grpc.GenericRpcHandler:
    """Method handlers: raw-bytes requests and pre-encoded GetModel responses.

    Requests are parsed in the servicer, so malformed input is INVALID_ARGUMENT;
    GetModel responses are encoded once per version.
    """
    enc = {
        "Join": aggregator_pb2.JoinReply.SerializeToString,
        "SubmitGradient": aggregator_pb2.SubmitReply.SerializeToString,
        "GetContributions": aggregator_pb2.ContributionsReply.SerializeToString,
        "GetStatus": aggregator_pb2.StatusReply.SerializeToString,
    }
    submit: Any = servicer.SubmitGradient
    get_model: Any = servicer.GetModel
    if metrics is not None:
        submit = metrics.submit_handler(submit)
        get_model = metrics.model_handler(get_model)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join,
            request_deserializer=_identity,
            response_serializer=enc["Join"],
        ),
        "GetModel": grpc.unary_stream_rpc_method_handler(
            get_model,
            request_deserializer=_identity,
            response_serializer=_identity,
        ),
        "SubmitGradient": grpc.stream_unary_rpc_method_handler(
            submit,
            request_deserializer=_identity,
            response_serializer=enc["SubmitGradient"],
        ),
        "GetContributions": grpc.unary_unary_rpc_method_handler(
            servicer.GetContributions,
            request_deserializer=_identity,
            response_serializer=enc["GetContributions"],
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus,
            request_deserializer=_identity,
            response_serializer=enc["GetStatus"],
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Aggregator:
    """One run of the aggregator: owns the engine, the ledger and the gRPC server.

    ``Aggregator(cfg)`` opens the ledger and checks the run directory; :meth:`start`
    binds the port first and only then sets the run up (the validation worker loads
    torch, the data and the model), so the port answers within a second of launch
    while parties that connect early wait for the run (GetStatus says ``starting``).
    """

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(cfg.run_dir)
        # Everything that can be checked without the run directory is checked
        # before it is created, so a failed start leaves nothing behind.
        self._credentials = None if cfg.insecure else server_credentials(cfg.tls)
        self._registry = (
            PartyRegistry.load(cfg.parties_file) if cfg.parties_file else None
        )
        self._new_dir = not self.run_dir.path.exists()
        self._new_ledger = not self.run_dir.ledger_path.exists()
        self._started = False
        self.failure = ""
        """Why the run stopped in a way ``--resume`` fixes (disk full, the
        validation worker gone): the parties are not told "done" and keep waiting."""
        if cfg.resume and self._new_ledger:
            raise ConfigError(f"--resume {self.run_dir.path}: no run recorded there")
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.clean_temp_files()
        self.ledger = _open_ledger(self.run_dir)
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._closed = False
        self.port = 0
        self.validation: ValidationSetup | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._digfl2_executor: futures.ThreadPoolExecutor | None = None
        # The resume pointer committed last, until its checkpoint is hashed and
        # older ones pruned: on a thread of its own after the model's publication,
        # so not even a short round's uploads wait for it.
        self._unsealed: dict[str, Any] | None = None
        self._sealing: futures.Future[None] | None = None
        self._seal_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="seal")
        try:
            self._open(cfg)
        except BaseException:
            self.ledger.close()
            self._discard_if_new()
            raise

    def _discard_if_new(self) -> None:
        """A fresh run that never started leaves no ledger behind (issue 11)."""
        if not self._started and self._new_ledger and not self.cfg.resume:
            self.run_dir.discard_new(remove_dir=self._new_dir)
            log.info(
                "start failed: removed the new run's files in %s", self.run_dir.path
            )

    def _open(self, cfg: ServerConfig) -> None:
        if cfg.resume:
            info = self.ledger.run_info()
            if info is None:
                raise ConfigError(
                    f"--resume {self.run_dir.path}: no run recorded there"
                )
            self.run_id = str(info["run_id"])
            stored = info["config"]
            self._round_cfg = round_config_from_json(stored["round"])
            self._val = (str(stored["val_data"]), int(stored["val_count"]))
        else:
            if self.ledger.run_info() is not None:
                raise ConfigError(
                    f"{self.run_dir.path} already holds a run; use --resume "
                    f"{self.run_dir.path} or a new --run-dir"
                )
            self.run_id = uuid.uuid4().hex[:12]
            self._round_cfg = cfg.round
            self._val = (cfg.val_data, cfg.val_count)
        self.servicer = AggregatorServicer(
            self.run_id,
            self._round_cfg.rounds,
            registry=self._registry,
            mtls=cfg.tls.require_client_cert,
            limits=cfg.limits,
            stopping=self._stopping,
            publish_to_parties=cfg.publish_to_parties,
            open_enrolment=cfg.open_enrolment,
        )
        if cfg.open_enrolment:
            log.warning(
                "OPEN ENROLMENT: TLS without a parties file or client certificates; "
                "anyone who reaches this port can join and upload as any party id. "
                "Nobody's contributions will be served."
            )
        self.health = ThreadSafeHealth()
        self.metrics: Metrics | None = None
        if cfg.metrics_address is not None:
            from fedgrpc.server.metrics import Metrics  # prometheus: only when asked

            self.metrics = Metrics()
        self.server = _grpc_server(self.servicer, self.health, cfg.limits, self.metrics)
        self._driver = threading.Thread(
            target=self._drive, name="round-driver", daemon=True
        )

    def _setup(self) -> None:
        """Load validation, model and theta; build the engine (after binding)."""
        cfg = self.cfg
        self.validation = validation = open_validation(
            cfg.validator,
            self._round_cfg,
            *self._val,
            None if cfg.resume else cfg.init_model,
            worker_restarts=cfg.worker_restarts,
        )
        rcfg = validation.round_cfg
        self.round_cfg = rcfg
        self.model_info = model_description(rcfg)
        self.layout = FlatLayout.of(validation.specs)
        theta, start_round = validation.theta0, 0
        if cfg.resume:
            theta, start_round = self.run_dir.load_resume(self.ledger, self.layout)
            # Killed before the last checkpoint was hashed: seal it now.
            self._unsealed = self.ledger.get_state(RESUME_KEY)
            self._sealed()
            log.info("resuming run %s at round %d", self.run_id, start_round)
        else:
            config_json = {
                "round": round_config_to_json(rcfg),
                "val_data": self._val[0],
                "val_count": self._val[1],
            }
            self.ledger.start_run(self.run_id, config_json, validation.val_digest)
            state = self.run_dir.save_checkpoint(
                self.layout, theta, self.run_id, 0, self.model_info
            )
            self.ledger.set_state(RESUME_KEY, state)
        self.broadcaster = ModelBroadcaster(self.layout, wire_dtype=rcfg.wire_dtype)
        self._executor = futures.ThreadPoolExecutor(1, thread_name_prefix="val-grad")
        # digfl-2 jobs on a thread of their own: a job still reading the spill never
        # delays the next round's v_t.
        self._digfl2_executor = futures.ThreadPoolExecutor(
            1, thread_name_prefix="digfl-2"
        )
        self.spill = DirSpill(self.run_dir.path / "spill")
        self.engine = RoundEngine(
            rcfg,
            validation.specs,
            theta,
            validation.validator,
            theta_buffers=validation.theta_buffers,
            executor=self._executor,
            on_commit=self._commit,
            on_publish=self._publish,
            on_finish=self._on_finish,
            on_join=self.ledger.upsert_party,
            start_round=start_round,
            max_in_flight=cfg.limits.max_inflight_uploads,
            max_parties=cfg.limits.max_parties,
            upload_idle_s=cfg.limits.upload_idle_s,
            spill=self.spill,
            on_second_order=self.ledger.record_second_order,
            pending_second=self._pending_second(rcfg, start_round),
            max_samples=cfg.limits.max_num_samples,
            upload_min_rate_bytes_s=cfg.limits.upload_min_rate_bytes_s,
            upload_grace_s=cfg.limits.upload_grace_s,
            second_order_executor=self._digfl2_executor,
        )
        if cfg.resume:  # the server optimiser continues where it stopped
            self.engine.load_strategy_state(
                self.run_dir.load_strategy_state(self.ledger)
            )
        self.engine.parties.evicted = self.ledger.evicted()
        registry = self.servicer.registry
        for p in self.ledger.parties():
            pid = str(p["party_id"])
            if pid in self.engine.parties.evicted:
                continue
            attested = registry.attested_samples(pid) if registry else None
            try:
                self.engine.join(pid, max(1, int(p["num_samples"])), attested)
            except FedGrpcError as e:
                # The parties file now attests less than the party joined with.
                raise ConfigError(f"--resume: party {pid}: {e}") from e
        join_info = wire.JoinInfo(
            self.run_id, tuple(validation.specs), rcfg, start_round, ""
        )
        if self.metrics is not None:
            engine = self.engine
            self.metrics.watch(
                engine.status,
                lambda: engine.uploads.in_flight,
                cfg.limits.max_inflight_uploads,
            )
        self.servicer.attach(
            Run(
                self.engine,
                self.broadcaster,
                join_info,
                self.ledger.contributions,
                known_parties=self._known_parties,
            )
        )

    def _pending_second(
        self, rcfg: RoundConfig, start_round: int
    ) -> PendingSecond | None:
        """A resumed run's committed rounds still waiting for digfl-2 scores.

        The close does not wait for a round's digfl-2 job, so the ledger may hold the
        last round and the one before it without them. The last waits for v_t of the
        resumed round like any closed round (returned); the one before is scored now,
        with v at the checkpoint of its next round. Their updates are in the spill if
        the aggregator stopped after the commit; any other spilled round is stale and
        removed.
        """
        rows = (
            self.ledger.rounds(max(0, start_round - 2), start_round - 1)
            if start_round
            else []
        )
        trapezoid = build_strategy(rcfg).trapezoid
        pending = {
            r.round: PendingSecond.of(r, rcfg.server_lr, rcfg.update_kind, trapezoid)
            for r in rows
            if r.ok
            and r.parties
            and not all(math.isfinite(p.score2) for p in r.parties)
        }
        self.spill.drop_all(keep=pending)
        last = pending.pop(start_round - 1, None)
        for t, older in pending.items():
            self.ledger.record_second_order(self._second_order_now(older))
            self.spill.drop(t)
        return last

    def _second_order_now(self, pending: PendingSecond) -> SecondOrder:
        """digfl-2 of a committed round, with v_{t+1} from its next round's checkpoint.

        Without that checkpoint (a run restored from a backup holds only the newest)
        the round keeps its digfl-1 scores, ``dots_next`` NaN saying so.
        """
        if pending.fixed is not None:  # no trapezoid for this strategy: nothing to read
            return pending.first_order()
        path = self.run_dir.checkpoint_path(pending.round + 1)
        assert self.validation is not None
        try:
            arrays, _ = load_arrays(path)
            v_next = self.validation.validator.gradient(self.layout.flatten(arrays))[0]
        except (ConfigError, FedGrpcError, OSError) as e:
            log.warning(
                "round %d: no digfl-2 from %s (%s); its digfl-1 scores stand in",
                pending.round,
                path.name,
                e,
            )
            return pending.first_order()
        log.info("round %d: digfl-2 scored at resume from %s", pending.round, path.name)
        return pending.compute(v_next, self.spill)

    def _known_parties(self) -> set[str]:
        """Every party id of the run: joined now, or recorded in the ledger."""
        return set(self.engine.parties.ids()) | {
            str(p["party_id"]) for p in self.ledger.parties()
        }

    # ------------------------------------------------------------ durability
    def _commit(self, result: RoundResult, theta_next: np.ndarray) -> None:
        """Checkpoint theta_{t+1}; then commit the round and resume pointer at once."""
        self._commit_durably(result, theta_next)
        if self.metrics is not None:
            self.metrics.round_closed(result)

    def _commit_durably(self, result: RoundResult, theta_next: np.ndarray) -> None:
        self._sealed()  # the last pointer first (long done): it is replaced now
        if result.ok:
            # theta_{t+1} whole on disk (fsynced) before the ledger names it: the
            # commit is only as durable as the model it points to. Its SHA-256
            # follows the publication (docs/faults.md).
            state = self.run_dir.save_checkpoint(
                self.layout,
                theta_next,
                self.run_id,
                result.round + 1,
                self.model_info,
                self.engine.strategy_state(),
                sealed=False,
            )
            self.ledger.record_round(result, state={RESUME_KEY: state})
            self._unsealed = state
        else:
            self.ledger.record_round(result)
        # Every round into the database file, not only the WAL (issue 11).
        if not self.ledger.checkpoint_wal():
            log.debug("ledger WAL checkpoint incomplete (a reader holds frames)")

    def _publish(self, round_index: int, theta: np.ndarray) -> None:
        """Publish the model, then seal the checkpoint committed before it.

        Hashing the checkpoint, its sidecar and the pruning of old checkpoints need
        not delay the model (the file is whole and fsynced already), nor the next
        round: they run on the seal thread.
        """
        self.broadcaster.publish(round_index, theta)
        pointer, self._unsealed = self._unsealed, None
        if pointer is not None:
            self._sealing = self._seal_pool.submit(self._seal, pointer)

    def _seal(self, pointer: dict[str, Any]) -> None:
        self.ledger.set_state(RESUME_KEY, self.run_dir.seal_checkpoint(pointer))

    def _sealed(self) -> None:
        """Wait for the last seal and finish one not started; raise its error."""
        sealing, self._sealing = self._sealing, None
        if sealing is not None:
            sealing.result()
        pointer, self._unsealed = self._unsealed, None
        if pointer is not None:
            self._seal(pointer)

    def _on_finish(self, state: RunState, reason: str) -> None:
        meta = {
            "run_id": self.run_id,
            "rounds_done": self.engine.rounds_done,
            "state": state.value,
            "reason": reason,
            "model": self.model_info,
        }
        err = self.engine.stop_error
        if err is not None and not self.failure:
            self.failure = _named_failure(err, self.run_dir)
        try:
            self._sealed()  # the last round publishes no model
            self.run_dir.save_final(self.layout, self.engine.theta, meta)
        except (OSError, sqlite3.Error) as err:
            # Never let a failed write kill the thread that reports the end.
            self.failure = self.failure or _named_failure(err, self.run_dir)
            log.error("cannot write the final model: %s", self.failure)
        if self.failure:
            log.error(
                "run %s stopped: %s; the parties keep waiting: fix the cause and "
                "restart with --resume %s",
                self.run_id,
                self.failure,
                self.run_dir.path,
            )
        else:
            if state is RunState.DONE:  # a failed run keeps its spill for --resume
                self.spill.drop_all()
            self.broadcaster.finish(self.engine.rounds_done, reason)
        self._done.set()

    # -------------------------------------------------------------- running
    def start(self) -> int:
        """Bind and serve, then set the run up and drive rounds; return the port.

        The port (and ``port_file``) is live before the run is set up; a set-up
        failure is raised here, after which RPCs answer UNAVAILABLE naming it.
        """
        try:
            if self._credentials is None:
                port = self.server.add_insecure_port(self.cfg.address)
            else:
                port = self.server.add_secure_port(self.cfg.address, self._credentials)
        except RuntimeError as err:  # grpcio: "Failed to bind to address ..."
            raise ConfigError(
                f"cannot listen on {self.cfg.address}: the port is in use or the "
                "address is not one of this host's"
            ) from err
        if port == 0:
            raise ConfigError(f"cannot listen on {self.cfg.address}")
        self.port = port
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.cfg.port_file is not None:
            atomic_write(self.cfg.port_file, f"{port}\n".encode())
        if self.metrics is not None and self.cfg.metrics_address is not None:
            metrics_port = self.metrics.listen(self.cfg.metrics_address)
            if self.cfg.metrics_port_file is not None:
                atomic_write(self.cfg.metrics_port_file, f"{metrics_port}\n".encode())
        log.info(
            "fedgrpc %s aggregator run %s listening on port %d (%s); setting up",
            fedgrpc.__version__,
            self.run_id,
            port,
            "insecure" if self.cfg.insecure else "TLS",
        )
        try:
            self._setup()
        except BaseException as err:
            self.servicer.start_failed(str(err))
            if self.validation is not None:
                self.validation.close()  # no worker outlives a failed start
            if isinstance(err, sqlite3.DatabaseError):
                raise ConfigError(
                    f"{self.run_dir.ledger_path} is damaged ({err}); restore it from "
                    "a backup (fedgrpc backup) or start a new --run-dir"
                ) from err
            raise
        self._started = True
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("run %s ready", self.run_id)
        if self.engine.finished:
            self._on_finish(self.engine.state, self.engine.reason or "completed")
        self._driver.start()
        return port

    def _drive(self) -> None:
        while not self._stopping.is_set() and not self.engine.finished:
            try:
                self.engine.tick()
            except Exception as err:  # disk full, the validation worker gone, ...
                # Resumable: the ledger holds every committed round. Name the
                # cause, stop, and leave the parties waiting for --resume.
                self.failure = _named_failure(err, self.run_dir)
                if isinstance(err, FedGrpcError | OSError | sqlite3.Error):
                    log.error("round engine stopped: %s", self.failure)
                else:
                    log.exception("round engine failed")
                self.engine.stop(f"failed: {self.failure}")
                break
            self.engine.wait(0.05)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the run finished (or was stopped); True if it finished."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done.is_set() and not self._stopping.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._done.wait(0.2 if left is None else min(0.2, left))
        return self._done.is_set()

    def shutdown(self, grace_s: float = 2.0, *, save_open_round: bool = True) -> None:
        """Stop serving: health NOT_SERVING, save the open round, close the server."""
        if self._closed:
            return
        self._closed = True
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self.servicer.wake_streams()  # model streams end now, not at the grace
        ready = self.servicer.ready
        if save_open_round and ready and not self.engine.finished:
            st = self.engine.status()
            self.ledger.set_state(
                "open_round",
                {
                    "round": st.open_round,
                    "submitted": list(st.submitted),
                    "joined": list(st.joined),
                    "saved_at": time.time(),
                },
            )
            log.info(
                "open round %d saved (%d submitted); resume with --resume %s",
                st.open_round,
                len(st.submitted),
                self.run_dir.path,
            )
        t0 = time.monotonic()
        self.server.stop(grace_s).wait()
        self.servicer.close()
        log.debug("gRPC server stopped in %.3f s", time.monotonic() - t0)
        if self._driver.is_alive():
            self._driver.join(timeout=5)
        for pool in (self._executor, self._digfl2_executor, self._seal_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        spill: DirSpill | None = getattr(self, "spill", None)
        if spill is not None:
            spill.close()  # queued writes reach the disk: --resume reads them
        if self.validation is not None:
            self.validation.close()
            log.debug("validation closed at %.3f s", time.monotonic() - t0)
        if self.metrics is not None:
            self.metrics.close()
        self.ledger.close()
        self._discard_if_new()
        log.debug("shut down in %.3f s", time.monotonic() - t0)

    @property
    def succeeded(self) -> bool:
        """True when the run completed every round (and its final model is saved)."""
        return (
            self.servicer.ready
            and self.engine.state == RunState.DONE
            and not self.failure
        )


def _named_failure(err: BaseException, run_dir: RunDir) -> str:
    """A failure as an operator can act on it: ENOSPC and the path, say."""
    if isinstance(err, OSError):
        name = errno.errorcode.get(err.errno or 0, "OSError")
        where = err.filename or run_dir.path
        return f"{name}: {err.strerror or err} ({where})"
    if isinstance(err, sqlite3.OperationalError) and "full" in str(err):
        return f"ENOSPC: the ledger cannot grow: {err} ({run_dir.ledger_path})"
    if isinstance(err, sqlite3.Error):
        return f"ledger error: {err} ({run_dir.ledger_path})"
    if isinstance(err, FedGrpcError):
        return str(err)
    return f"internal error: {type(err).__name__}: {err}"


def _open_ledger(run_dir: RunDir) -> Ledger:
    """The run's ledger; a damaged file is a named ConfigError, not a traceback."""
    ledger: Ledger | None = None
    try:
        ledger = Ledger(run_dir.ledger_path)
        ledger.run_info()  # reads the first pages: a torn file fails here
        return ledger
    except sqlite3.DatabaseError as err:
        if ledger is not None:
            ledger.close()
        raise ConfigError(
            f"{run_dir.ledger_path} is not a readable fedgrpc ledger ({err}); restore "
            "it from a backup or start a new --run-dir"
        ) from err


KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    # Agreed with the client (client.stub.CHANNEL_OPTIONS, a ping every 30 s): the
    # server accepts a data-less ping every 10 s, a third of the client's interval,
    # so pings a loaded server reads late still never count as strikes. Before
    # issue 14 the client pinged every 10 s against a 5 s minimum, and with 1,024
    # parties every connection got GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A client pinging more often than allowed is still disconnected.
    ("grpc.http2.max_ping_strikes", 3),
    # The server probes silent connections too: a peer that vanished without
    # closing frees its streams within ~40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
"""The server's HTTP/2 keepalive and ping policy."""


READ_BUFFER_BYTES = 64 * 1024
"""The most one connection's pending TCP read may hold allocated.

gRPC sizes a connection's next read buffer from its largest recent burst (doubling,
then decaying by 1 % a read, with no upper bound by default; grpc/grpc#42194) and
keeps it allocated while the connection is idle, so each party that once uploaded
a model kept up to ~1.5 times that upload in empty read slices. With 1,000 parties
x 400 kB updates, 587 MiB of the aggregator's heap was 64 KiB TCP read slices
(heaptrack) and its RSS reached 670-740 MiB. Capped, a read takes at most this much
of what the kernel has buffered; the TCP window is the kernel's and is unchanged
(docs/benchmarks.md, Scale)."""

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),
    # Without BDP probing each stream's HTTP/2 window stays at its default instead
    # of growing per connection: peak RSS with 32 parties x 10 M parameters fell
    # from 1365 to 843 MiB at the same round time.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.experimental.tcp_max_read_buffer_size", READ_BUFFER_BYTES),
    *KEEPALIVE_OPTIONS,
    # Connections with no call for 10 min are closed.
    ("grpc.max_connection_idle_ms", 600_000),
]
"""The aggregator's gRPC server options."""


def _grpc_server(
    servicer: AggregatorServicer,
    health_servicer: ThreadSafeHealth,
    limits: Limits,
    metrics: Metrics | None = None,
) -> AioServer:
    """The gRPC server: the Aggregator service, health checking and reflection.

    An asyncio server (server.aioserver): every call is a coroutine on one event
    loop thread, so 1,000 open model streams and waiting uploads cost no thread each
    (a thread per stream cost 62 % of the aggregator's CPU in the kernel's
    scheduler at 128 parties; docs/benchmarks.md, Scale). ``limits`` bound the calls
    in the servicer (server.guard).
    """
    del limits  # bounded by the servicer's guard, not by a thread pool

    def setup(server: grpc.aio.Server, loop: Any) -> None:
        servicer.bind(loop)
        health_servicer.bind(loop)
        server.add_generic_rpc_handlers((build_handler(servicer, metrics),))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer.servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )

    return AioServer(SERVER_OPTIONS, setup)


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (as ``MALLOC_ARENA_MAX`` would).

    Every gRPC handler thread otherwise gets its own arena (up to 8 per core), and
    each keeps freed 1 MiB chunk buffers cached: with 32 parties x 10 M parameters the
    aggregator's peak RSS fell from 491 to 416 MiB at the same round time. Call it
    before the server's threads start; ``MALLOC_ARENA_MAX`` in the environment wins.
    Returns whether the cap was applied (glibc only).
    """
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def serve(cfg: ServerConfig) -> int:
    """Run the aggregator until training ends or a signal arrives; return an exit code.

    0: every round completed; 1: the run failed (quorum lost, no parties); 128 + signal
    number after SIGTERM/SIGINT (graceful: health NOT_SERVING, open round saved,
    resumable with ``--resume``). A set-up failure raises (the CLI exits 2 with it).
    """
    limit_malloc_arenas()
    agg = Aggregator(cfg)
    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.warning(
            "received %s: shutting down gracefully", signal.Signals(signum).name
        )
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agg.start()
        while not stop.is_set() and not agg.wait(0.2):
            pass
        if not stop.is_set():
            _report(agg)
            if agg.failure:
                pass  # no done message: the parties wait for --resume
            else:
                if _linger(cfg, stop):
                    received.clear()  # a signal ending the grace period: no failure
                # Let every GetModel stream deliver its done message before closing
                # (bounded: a party that vanished must not keep the process alive).
                t0 = time.monotonic()
                end = t0 + DONE_DRAIN_S
                while agg.servicer.model_streams and time.monotonic() < end:
                    time.sleep(0.02)
                if agg.servicer.model_streams == 0:
                    time.sleep(0.05)  # the last done message leaves the socket
                log.debug("model streams drained in %.3f s", time.monotonic() - t0)
    finally:
        agg.shutdown(save_open_round=True)
    if received:
        return 128 + received[0]
    return 0 if agg.succeeded else 1


DONE_DRAIN_S = 10.0
"""After the grace period, how long open model streams get to take their done
message before the server closes (a party that vanished must not hold it up)."""


def _linger(cfg: ServerConfig, stop: threading.Event) -> bool:
    """Keep serving a finished run for its grace period; True if a signal ended it.

    During the grace period GetStatus and GetContributions answer and a party that
    reconnects (Join, GetModel) is told that training is done.
    """
    if cfg.keep_serving:
        log.info("training over; still serving queries until SIGTERM")
        stop.wait()
        return True
    if cfg.grace_period_s <= 0:
        return False
    log.info(
        "training over; answering queries and reconnecting parties for %g s more "
        "(--grace-period; SIGTERM or Ctrl-C ends it now)",
        cfg.grace_period_s,
    )
    return stop.wait(cfg.grace_period_s)


def _report(agg: Aggregator) -> None:
    st = agg.engine.status()
    try:
        agg.run_dir.write_summary(
            {
                "run_id": agg.run_id,
                "state": st.state.value,
                "rounds_done": st.rounds_done,
                "val_loss": st.val_loss,
                "val_acc": st.val_acc,
                "reason": st.reason,
            }
        )
    except OSError as err:
        log.error("cannot write the summary: %s", _named_failure(err, agg.run_dir))
    log.info(
        "run %s %s after %d rounds: val acc %.4f",
        agg.run_id,
        st.state.value,
        st.rounds_done,
        st.val_acc,
    )
