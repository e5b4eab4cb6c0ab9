"""Virtual parties on a small pool of Ray actors (``fedgrpc simulate --backend ray``).

One process per party costs a torch import (~2.7 s of CPU) and ~150 MB each, so a
laptop cannot start a thousand. Here a few Ray actors (worker processes, one per core
by default) each import torch once and host many virtual parties, one thread per
party. Every thread runs the party loop of ``fedgrpc client``
(:func:`~fedgrpc.client.party.run_party`) unchanged: its own
:class:`~fedgrpc.client.stub.AggregatorClient`, Join, a GetModel stream, local
training, SubmitGradient, over real gRPC to the real aggregator. A simulated run and a
deployed run are the same protocol; only the processes differ.

Why a thread per party rather than one loop serving all of an actor's parties each
round: the loop is then exactly the deployed one (reconnects, refusals, the done
message), and a party spends nearly all its time blocked on its model stream, where
gRPC releases the GIL; training a round is milliseconds. The one thing shared is
pacing: an actor lets only a few of its parties Join at once (:class:`PacedClient`),
since the aggregator refuses unary calls beyond ``max_concurrent_unary``.

Ray carries only JSON text between this process and the actors (party ids, data file
specs, results); data goes through the split files and models through gRPC. Ray is
started local-only: no dashboard, no usage statistics, and every Ray process bound to
127.0.0.1 (:func:`start_ray`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from fedgrpc.client.stub import AggregatorClient, ModelVersion
from fedgrpc.config import ClientConfig, RayPoolConfig
from fedgrpc.errors import ConfigError, FedGrpcError
from fedgrpc.types import RoundSkipped, SubmitOutcome, TrainingDone
from fedgrpc.wire import JoinInfo

log = logging.getLogger(__name__)

RAY_MISSING = (
    "--backend ray needs Ray, which is not installed: pip install 'fedgrpc[ray]' "
    "(or use --backend processes)"
)

RAY_ENV = {
    # Never report usage to ray.io: a simulation must not reach the network.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Without this Ray treats 127.0.0.1 as "this node" and swaps in the machine's
    # routable address, binding its servers there; with it, every Ray process
    # (GCS, raylet, workers, agents) listens on 127.0.0.1 only.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's own RPCs need a token (a fresh one per run, see start_ray): other local
    # users cannot drive the actors. Set, so Ray does not warn that it is on.
    "RAY_AUTH_MODE": "token",
    # Torch in the actors: one thread each (Ray sets it per actor too).
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""Environment Ray and its processes must start with (read when ray is imported)."""

START_TIMEOUT_S = 120.0
"""How long the actors may take to start and import the party code."""


def check_ray() -> None:
    """Raise ConfigError saying how to install Ray unless it can be imported.

    Cheap (nothing is imported): the import itself, seconds, waits for
    :meth:`RayParties.open`, which overlaps it with the aggregator's start.
    """
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(RAY_MISSING)


def import_ray() -> ModuleType:
    """The ``ray`` module, or ConfigError saying how to install it.

    Sets :data:`RAY_ENV` first: Ray reads it when it is imported, and the processes it
    starts inherit it.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    module: ModuleType = ray
    return module


@dataclass(frozen=True)
class VirtualParty:
    """What an actor needs to run one party (JSON through Ray)."""

    party_id: str
    data: str
    """The party's data spec, e.g. ``npz:run/data/party-3.npz``."""
    attack: str = ""
    """Update attack spec (data attacks are in the data file already)."""


# ---------------------------------------------------------------- in the actors


LOOPBACK_CHANNEL_OPTIONS = (
    # No keepalive pings: the aggregator is on loopback, where a dead peer resets the
    # connection at once; with CHANNEL_OPTIONS' pings every 10 s the aggregator
    # answered a connection carrying 500 parties with GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # as CHANNEL_OPTIONS: we retry ourselves
)
"""Arguments of the one channel the virtual parties of a process share. One channel,
not one each: gRPC runs a thread per channel with calls in flight, and channels with
equal arguments share one connection anyway."""


@dataclass(frozen=True)
class Slots:
    """The semaphores the virtual parties of one process share."""

    join: threading.Semaphore
    """Held for each Join call."""
    work: threading.Semaphore
    """Held from a model's arrival until its update is submitted."""


class PacedClient(AggregatorClient):
    """An AggregatorClient for a virtual party: paced calls, loopback channel.

    The party loop is unchanged; its connection hands it the round's model only once
    a work slot is free, and takes the slot back when the update is submitted. So
    a few of the process's parties train and upload at a time while the rest wait on
    a lock (not for the GIL), and the process never has more uploads waiting for the
    aggregator than it admits per connection. Join waits for a join slot.
    """

    def __init__(self, cfg: ClientConfig, slots: Slots, channel: grpc.Channel) -> None:
        super().__init__(cfg, channel)
        self._slots = slots
        self._holding = False  # this party holds a work slot

    def join(self, num_samples: int, *, check_only: bool = False) -> JoinInfo:
        """Join, once a join slot is free."""
        with self._slots.join:
            return super().join(num_samples, check_only=check_only)

    def models(
        self, from_round: int, timeout_s: float
    ) -> Iterator[ModelVersion | RoundSkipped | TrainingDone]:
        """The model stream; each model version is handed over with a work slot."""
        for item in super().models(from_round, timeout_s):
            if not isinstance(item, ModelVersion):  # done or skipped: no work
                yield item
                continue
            self._slots.work.acquire()
            self._holding = True
            try:
                yield item  # the party trains and submits meanwhile
            finally:
                # Normally released by submit; here if training failed, or the
                # stream was abandoned.
                self._release()

    def submit(self, *args: Any, **kwargs: Any) -> SubmitOutcome:
        """SubmitGradient; the work slot is released when it returns or fails."""
        try:
            return super().submit(*args, **kwargs)
        finally:
            self._release()

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._slots.work.release()


GRPC_WAIT_POLL_S = 5.0
"""How often a party thread blocked in a gRPC call wakes up to look around (s)."""


def _slow_grpc_wait_polls() -> None:
    """Let the threads blocked in gRPC's synchronous calls wake every 5 s, not 0.1 s.

    gRPC wakes every blocked caller every ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` (0.1 s)
    so that a main thread can run signal handlers (grpc/grpc#19464); messages wake
    them through a condition anyway. With 500 parties waiting for their model those
    polls alone cost 0.22 CPU seconds per second (measured: 500 idle parties in one
    process, 0.12 s user + 0.10 s system per second; 0.01 s with 5 s). The party
    threads are never the main thread, and this module runs only in Ray actors.
    """
    common = importlib.import_module("grpc._common")
    now = getattr(common, "MAXIMUM_WAIT_TIMEOUT", None)
    if isinstance(now, float):  # else another gRPC: leave it alone
        setattr(common, "MAXIMUM_WAIT_TIMEOUT", max(now, GRPC_WAIT_POLL_S))  # noqa: B010


class PartyHost:
    """A Ray actor's body: many virtual parties, one thread each, in one process.

    Only :meth:`start`, :meth:`poll` and :meth:`ping` are called through Ray; they
    take and return JSON text.
    """

    def __init__(
        self, log_path: str, log_level: int, join_slots: int, work_slots: int
    ) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
        root.setLevel(log_level)
        _slow_grpc_wait_polls()
        # The slow part of a party's start-up (torch), once per actor; here, not at
        # the top of this module, so the driver that starts the pool never loads it.
        from fedgrpc.client.party import run_party

        self._run_party = run_party
        slots = Slots(
            join=threading.BoundedSemaphore(join_slots),
            work=threading.BoundedSemaphore(work_slots),
        )
        self._slots = slots
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self._results: dict[str, dict[str, Any]] = {}
        self._threads: list[threading.Thread] = []

    def ping(self) -> int:
        """The actor's process id, once it is up."""
        return os.getpid()

    def start(self, server: str, parties_json: str) -> int:
        """Start one thread per party of ``parties_json``; returns how many."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                server, options=list(LOOPBACK_CHANNEL_OPTIONS)
            )
        connect = functools.partial(
            PacedClient, slots=self._slots, channel=self._channel
        )
        for entry in json.loads(parties_json):
            vp = VirtualParty(**entry)
            cfg = ClientConfig(
                server=server,
                party_id=vp.party_id,
                data=vp.data,
                insecure=True,
                attack=vp.attack,
            )
            t = threading.Thread(
                target=self._run, args=(cfg, connect), name=vp.party_id, daemon=True
            )
            t.start()
            self._threads.append(t)
        return len(self._threads)

    def _run(
        self, cfg: ClientConfig, connect: Callable[[ClientConfig], AggregatorClient]
    ) -> None:
        try:
            result = self._run_party(cfg, connect=connect)
            doc: dict[str, Any] = {
                "party_id": cfg.party_id,
                "rounds_submitted": result.rounds_submitted,
                "rounds_completed": result.rounds_completed,
                "reason": result.reason,
                "train_loss": result.last_train_loss,
            }
        except FedGrpcError as err:
            log.error("party %s: error: %s", cfg.party_id, err)
            doc = {"party_id": cfg.party_id, "reason": f"error: {err}"}
        except Exception as err:  # a party's bug must not end its neighbours
            log.error("party %s failed:\n%s", cfg.party_id, traceback.format_exc())
            doc = {"party_id": cfg.party_id, "reason": f"error: {err!r}"}
        with self._lock:
            self._results[cfg.party_id] = doc

    def poll(self) -> str:
        """JSON: the results of the parties that have finished, by party id."""
        with self._lock:
            return json.dumps(self._results)


# ------------------------------------------------------------- in the driver


def pool_size(cfg: RayPoolConfig, n_parties: int) -> int:
    """Actors to start: ``cfg.actors``, or one per core; never more than parties."""
    return max(1, min(n_parties, cfg.actors or os.cpu_count() or 1))


def start_ray(ray: ModuleType, num_cpus: int, cfg: RayPoolConfig) -> None:
    """A new local-only Ray instance: loopback, no dashboard, small object store.

    Its processes inherit a fresh random auth token through the environment (set
    here, after the aggregator was started, so only Ray's processes hold it), so
    Ray writes none to ``~/.ray``.
    """
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    try:
        _init(ray, num_cpus, cfg)
    except Exception as err:  # Ray raises bare Exceptions (e.g. start-up timeouts)
        raise FedGrpcError(f"Ray did not start: {err}") from None


def _init(ray: ModuleType, num_cpus: int, cfg: RayPoolConfig) -> None:
    ray.init(
        address="local",  # never join a cluster named by RAY_ADDRESS
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=cfg.object_store_bytes,
        log_to_driver=False,
        configure_logging=False,
    )


class RayParties:
    """Virtual parties dealt round-robin to a pool of Ray actors.

    Start the pool (:meth:`open`, Ray and the actors: seconds) while the aggregator
    starts, then :meth:`start` the parties once its address is known.
    """

    def __init__(
        self,
        cfg: RayPoolConfig,
        n_parties: int,
        log_dir: Path,
        *,
        log_level: int = logging.INFO,
    ) -> None:
        self.cfg = cfg
        self.n_actors = pool_size(cfg, n_parties)
        self._log_dir = log_dir
        self._log_level = log_level
        self._ray: ModuleType | None = None
        self._actors: list[Any] = []
        self._party_ids: list[str] = []
        self._results: dict[str, dict[str, Any]] = {}
        self._lost: dict[int, str] = {}  # actor index -> why it is gone

    def open(self) -> float:
        """Start Ray and the actors (without waiting for them); returns ray.init's s."""
        t0 = time.monotonic()
        ray = self._ray = import_ray()
        start_ray(ray, self.n_actors, self.cfg)
        init_s = time.monotonic() - t0
        slots = max(1, self.cfg.join_slots // self.n_actors)
        actor = ray.remote(num_cpus=1)(PartyHost)
        self._actors = [
            actor.options(name=f"fedgrpc-parties-{i}").remote(
                str(self._log_dir / f"ray-actor-{i}.log"),
                self._log_level,
                slots,
                self.cfg.work_slots,
            )
            for i in range(self.n_actors)
        ]
        return init_s

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> list[int]:
        """Wait until every actor has imported the party code; their process ids."""
        ray = self._need_ray()
        try:
            pids: list[int] = ray.get(
                [a.ping.remote() for a in self._actors], timeout=timeout_s
            )
        except ray.exceptions.GetTimeoutError:
            raise FedGrpcError(
                f"the Ray actors did not start within {timeout_s:g} s"
            ) from None
        except ray.exceptions.RayError as err:
            raise FedGrpcError(f"a Ray actor failed to start: {err}") from None
        return pids

    def start(self, server: str, parties: Sequence[VirtualParty]) -> None:
        """Deal ``parties`` round-robin to the actors and start them."""
        ray = self._need_ray()
        self._party_ids = [p.party_id for p in parties]
        shares = [parties[i :: self.n_actors] for i in range(self.n_actors)]
        started = ray.get(
            [
                a.start.remote(server, json.dumps([vars(p) for p in share]))
                for a, share in zip(self._actors, shares, strict=True)
            ],
            timeout=START_TIMEOUT_S,
        )
        log.info("ray: %s parties started on %d actors", started, self.n_actors)
        self._shares = [[p.party_id for p in share] for share in shares]

    def poll(self) -> dict[str, dict[str, Any]]:
        """The results of every party that has finished (or was lost with its actor)."""
        ray = self._need_ray()
        for i, a in enumerate(self._actors):
            if i in self._lost:
                continue
            try:
                done: dict[str, dict[str, Any]] = json.loads(
                    ray.get(a.poll.remote(), timeout=60.0)
                )
            except ray.exceptions.RayError as err:
                self._lost[i] = f"its Ray actor died: {err}"
                log.error("ray actor %d lost: %s", i, err)
                for pid in self._shares[i]:
                    self._results.setdefault(
                        pid, {"party_id": pid, "reason": f"error: {self._lost[i]}"}
                    )
                continue
            self._results.update(done)
        return dict(self._results)

    def failed(self) -> list[str]:
        """Parties that ended other than by completing the run."""
        return [pid for pid, r in self.poll().items() if r.get("reason") != "completed"]

    def results(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """Every party's result once all have finished (or ``timeout_s`` passed)."""
        end = time.monotonic() + timeout_s
        while True:
            got = self.poll()
            if len(got) >= len(self._party_ids) or time.monotonic() >= end:
                break
            time.sleep(0.05)
        return {
            pid: got.get(pid, {"party_id": pid, "reason": "still running"})
            for pid in self._party_ids
        }

    def close(self) -> None:
        """Stop the actors and Ray (every process it started)."""
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None

    def _need_ray(self) -> ModuleType:
        if self._ray is None:
            raise FedGrpcError("the Ray pool is not open")
        return self._ray


def virtual_parties(
    party_data: Mapping[str, str], update_attacks: Mapping[str, str]
) -> list[VirtualParty]:
    """One :class:`VirtualParty` per party id, in order."""
    return [
        VirtualParty(pid, data, update_attacks.get(pid, ""))
        for pid, data in party_data.items()
    ]
