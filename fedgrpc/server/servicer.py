"""AggregatorServicer: decode -> engine -> encode; domain exceptions -> status codes.

Every RPC is a coroutine on the server's one event loop (server.aioserver): an open
GetModel stream or a waiting upload costs a suspended coroutine, not a thread, so
the aggregator's cost per connected party stays small (issue 14). Engine calls
that may block (a ledger write at Join, the fold and v_t wait at the end of an
upload, a ledger query) run on a small thread pool; the quick ones (a chunk's
copy, dot and norm, a status snapshot) run on the loop.

The server listens before the run is ready (the validation worker may still be loading
torch, the data and the model): until :meth:`AggregatorServicer.attach` hands over the
run, GetStatus answers ``starting`` and every other RPC waits for the run, within its
deadline, then gets UNAVAILABLE (which clients retry).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent import futures
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeVar

import grpc

from fedgrpc import wire
from fedgrpc.config import Limits
from fedgrpc.engine import RoundEngine
from fedgrpc.engine.uploads import Submission
from fedgrpc.errors import (
    FedGrpcError,
    ForbiddenError,
    InvalidUpdateError,
    LimitError,
    NotFoundError,
    StaleRoundError,
    UnavailableError,
)
from fedgrpc.proto import aggregator_pb2
from fedgrpc.security.registry import PARTY_ID_RE, Identity, PartyRegistry
from fedgrpc.server.auth import identity_from_context
from fedgrpc.server.broadcast import ModelBroadcaster, VersionWaiter
from fedgrpc.server.guard import CallGuard, pool_size
from fedgrpc.types import (
    ContributionReport,
    RoundSkipped,
    RunState,
    RunStatus,
    SubmitHeader,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

CONNECTION_SCALE = 4
"""Uploads one connection may have waiting for their header, in units of
``max_streams_per_party`` (the server-wide cap bounds the sum)."""

CANCEL_AFTER_S = 2.0
"""How long a discarded upload's sender has to hear why before its stream is
cancelled (a quiet sender would otherwise hold its stream slot)."""

STARTUP_WAIT_S = 60.0
"""Longest an RPC waits for a starting run (its own deadline may be shorter)."""

FANOUT_STREAMS = 32
"""Model streams writing a message at once. Every write copies the (shared,
encoded-once) message into the stream's own transport buffer, so this bounds that
memory to FANOUT_STREAMS x chunk size instead of parties x chunk size; 32 loopback
streams already keep both cores busy."""

INLINE_ELEMS = 1 << 20
"""Models of at most this many elements (4 MiB of float32) are accepted on the loop
when nothing would wait: the copy to the spill and the fold take well under a
millisecond, less than the hop to a pool thread and back (issue 14)."""

OFFLOAD_ELEMS = 1 << 17
"""Chunks of at least this many elements (512 KiB of float32) are folded on the
blocking-call pool; smaller ones on the loop, where a thread hop would cost more
than the fold (4 x 10 M parameters: 1 MiB chunks; 1,000 x 100 k: one 400 kB chunk)."""

SLOW_WRITE_S = 5.0
"""A stream whose version takes longer to write (a slow or non-reading party) gives
its fan-out place to the next stream and finishes on its own."""


async def _fail(context: Context, err: Exception, method: str) -> NoReturn:
    """Abort with the status of ``err``: a domain error's own, else INTERNAL."""
    if isinstance(err, grpc.aio.AbortError):
        raise err  # context.abort already set the status
    if isinstance(err, FedGrpcError):
        await context.abort(grpc.StatusCode[err.code.name], str(err))
    if context.cancelled() or context.done():
        raise err  # cancelled by the client: nobody hears a status
    log.exception("internal error in %s", method)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}"
    )


def _rpc(
    fn: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    """Map domain errors to their status, anything else to INTERNAL (never UNKNOWN)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Context) -> T:
        try:
            return await fn(self, request, context)
        except Exception as err:
            await _fail(context, err, fn.__name__)

    return wrapper


async def _messages(
    raw: AsyncIterator[bytes], cls: type[Any]
) -> AsyncIterator[tuple[str, Any]]:
    """(kind, payload) of each serialized message of a request stream."""
    async for data in raw:
        for item in wire.read_messages((data,), cls):
            yield item


async def _next(it: AsyncIterator[Any], default: T) -> Any | T:
    """The next item of ``it``, or ``default`` at its end.

    Not ``anext(it, default)``: on CPython 3.11 its wrapper turns the end of an
    async generator over a grpc.aio request stream into a SystemError.
    """
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return default


@dataclass(frozen=True)
class Run:
    """What the RPCs serve once the run is ready."""

    engine: RoundEngine
    broadcaster: ModelBroadcaster
    join_info: wire.JoinInfo  # the run's constant part of every JoinReply
    contributions: Callable[..., ContributionReport]  # Ledger.contributions
    known_parties: Callable[[], Collection[str]] | None = None
    """Every party id the run knows (GetContributions refuses others, NOT_FOUND)."""


class AggregatorServicer:
    """The Aggregator service. Each RPC decodes, calls the engine, encodes.

    Args:
        run_id: the run's id.
        rounds_total: rounds of the run (GetStatus while starting).
        registry: parties file, or None (no tokens).
        mtls: whether client certificates are required (identity from the certificate).
        limits: decode limits and the caps on concurrent calls (server.guard).
        stopping: set when the server shuts down (model streams end UNAVAILABLE;
            call :meth:`wake_streams` after setting it).
        publish_to_parties: let a party see the global figures (shares, round
            metrics, other party ids); by default it sees only its own (DESIGN §5).
        open_enrolment: TLS without any caller identity, asked for explicitly:
            nobody's contributions are served.
    """

    def __init__(
        self,
        run_id: str,
        rounds_total: int,
        *,
        registry: PartyRegistry | None = None,
        mtls: bool = False,
        limits: Limits | None = None,
        stopping: threading.Event | None = None,
        publish_to_parties: bool = False,
        open_enrolment: bool = False,
    ) -> None:
        self._run_id = run_id
        self._publish = publish_to_parties
        self._rounds_total = rounds_total
        self._registry = registry
        self._mtls = mtls
        self._limits = limits or Limits()
        self._guard = CallGuard(self._limits)
        self._open_enrolment = open_enrolment
        self.model_streams = 0  # open GetModel streams (the server waits for them)
        self._stopping = stopping or threading.Event()
        self._run: Run | None = None
        self._start_error = ""
        self._blocking = futures.ThreadPoolExecutor(
            pool_size(self._limits), thread_name_prefix="rpc-blocking"
        )
        # Bound by bind(), on the server's loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._versions: VersionWaiter | None = None
        self._fanout: asyncio.Semaphore | None = None
        # Uploads waiting for an engine upload slot, oldest first; one is woken per
        # freed slot. Those refused for their party's share (not for a full pool)
        # wait apart and are all woken at every release: their own party frees it.
        self._slot_waiters: collections.deque[asyncio.Future[None]] = (
            collections.deque()
        )
        self._share_waiters: list[asyncio.Future[None]] = []

    @property
    def registry(self) -> PartyRegistry | None:
        """The parties file the servicer authenticates against, if any."""
        return self._registry

    # ------------------------------------------------------------- the run
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the RPCs run on (called once, on that loop)."""
        self._loop = loop
        self._ready = asyncio.Event()
        self._fanout = asyncio.Semaphore(FANOUT_STREAMS)
        if self._run is not None or self._start_error:
            self._ready.set()

    def _set_ready(self) -> None:
        if self._loop is not None and self._ready is not None:
            self._loop.call_soon_threadsafe(self._ready.set)

    def attach(self, run: Run) -> None:
        """The run is ready: RPCs are served from now on."""
        if self._loop is not None:
            self._versions = VersionWaiter(run.broadcaster, self._loop)
        self._run = run
        self._set_ready()

    def wake_streams(self) -> None:
        """Wake every waiting model stream (the server is stopping)."""
        if self._versions is not None:
            self._versions.wake()

    def close(self) -> None:
        """Release the blocking-call threads (after the server stopped)."""
        self._blocking.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        """Whether the run is attached."""
        return self._run is not None

    def start_failed(self, reason: str) -> None:
        """The run could not be set up: RPCs get UNAVAILABLE naming ``reason``."""
        self._start_error = reason
        self._set_ready()

    async def _wait_run(self, context: Context) -> Run:
        if self._run is None and not self._start_error and self._ready is not None:
            remaining = context.time_remaining()
            # Leave the caller time to hear why, rather than run into its deadline.
            wait = (
                STARTUP_WAIT_S if remaining is None else min(STARTUP_WAIT_S, remaining)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), max(0.0, 0.9 * wait))
        if self._run is not None:
            return self._run
        if self._start_error:
            raise UnavailableError(
                f"aggregator run {self._run_id} failed to start: {self._start_error}"
            )
        raise UnavailableError(
            f"aggregator run {self._run_id} is starting (loading the validation data "
            "and model); try again"
        )

    async def _blocking_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an engine call that may block (disk, locks held long) off the loop."""
        assert self._loop is not None
        return await self._loop.run_in_executor(
            self._blocking, functools.partial(fn, *args)
        )

    # ------------------------------------------------------------- identity
    def _identity(self, context: Context) -> Identity | None:
        return identity_from_context(context, self._registry, mtls=self._mtls)

    def _party(self, context: Context, claimed: str) -> str:
        """The caller's party id: from the channel when configured, else the payload."""
        ident = self._identity(context)
        if ident is None:
            if not PARTY_ID_RE.fullmatch(claimed or ""):
                raise InvalidUpdateError(
                    f"party id {claimed!r} is invalid: need 1-64 of [A-Za-z0-9_.-]"
                )
            return claimed
        if ident.is_admin:
            raise ForbiddenError(f"admin {ident.name} cannot act as a party")
        if claimed and claimed != ident.name:
            raise ForbiddenError(
                f"authenticated as party {ident.name} but the request names party "
                f"{claimed}"
            )
        return ident.name

    def _caller_key(self, context: Context, claimed: str = "") -> str:
        """Whom a call's per-identity cap counts against (authenticates the call)."""
        ident = self._identity(context)
        if ident is not None:
            return f"{'admin' if ident.is_admin else 'party'} {ident.name}"
        if claimed and PARTY_ID_RE.fullmatch(claimed):
            return f"party {claimed}"
        return f"connection {context.peer()}"

    # ------------------------------------------------------------------ RPCs
    @_rpc
    async def Join(self, raw: bytes, context: Context) -> aggregator_pb2.JoinReply:
        """Register the calling party; reply with spec, config and the open round."""
        with self._guard.admit("Join"):
            msg = wire.parse_message(aggregator_pb2.JoinRequest, raw)
            claimed, num_samples, _ = wire.join_request_from_proto(msg)
            party = self._party(context, claimed)
            with self._guard.per_identity(f"party {party}", "Join"):
                run = await self._wait_run(context)
                attested = (
                    self._registry.attested_samples(party) if self._registry else None
                )
                if not wire.join_is_check_only(msg):
                    # The ledger's fsync: off the loop.
                    await self._blocking_call(
                        run.engine.join, party, num_samples, attested
                    )
                info = replace(
                    run.join_info, open_round=run.engine.open_round, party_id=party
                )
                return wire.join_reply_to_proto(info)

    @_rpc
    async def GetModel(self, raw: bytes, context: Context) -> None:
        """Stream each model version from ``from_round`` on (pre-encoded), then done."""
        with self._guard.admit("GetModel"):
            claimed, next_round = wire.get_model_request_from_proto(
                wire.parse_message(aggregator_pb2.GetModelRequest, raw)
            )
            party = self._party(context, claimed)
            with self._guard.per_identity(f"party {party}", "GetModel"):
                await self._stream_models(party, next_round, context)

    async def _stream_models(
        self, party: str, next_round: int, context: Context
    ) -> None:
        run = await self._wait_run(context)
        versions = self._versions
        assert versions is not None, "attach() runs after bind()"
        run.engine.touch(party)
        self.model_streams += 1  # only the loop thread writes it
        try:
            while True:
                # Sleeps until a version is published, the run ends, the server
                # stops, or the call is cancelled (which cancels this coroutine).
                item = await versions.next(next_round, self._stopping.is_set)
                if item is None:
                    raise UnavailableError("aggregator shutting down")
                if item.done or run.engine.sampled(party, item.round):
                    await self._send(context, item.messages)
                else:  # client sampling: no model to download, no work to do
                    await context.write(
                        wire.round_skipped_to_proto(
                            RoundSkipped(
                                item.round, f"not sampled for round {item.round}"
                            )
                        ).SerializeToString()
                    )
                if item.done:
                    return
                next_round = item.round + 1
        finally:
            self.model_streams -= 1

    async def _send(self, context: Context, messages: tuple[bytes, ...]) -> None:
        """Write one version's messages, holding a FANOUT_STREAMS place meanwhile.

        A stream writes one message at a time, so each place pins at most one
        message copy in the transport.
        """
        fanout, loop = self._fanout, self._loop
        assert fanout is not None and loop is not None
        await fanout.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                fanout.release()

        # A party that does not read keeps only its own write waiting, not the
        # fan-out to everyone else.
        timer = loop.call_later(SLOW_WRITE_S, release)
        try:
            for message in messages:
                await context.write(message)
        finally:
            timer.cancel()
            release()

    @_rpc
    async def SubmitGradient(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> aggregator_pb2.SubmitReply:
        """Receive one update: header, chunks, trailer; fold it in only when whole.

        The caller is authenticated and counted against its caps from the call's
        metadata before any message is read; the header must arrive within
        ``upload_grace_s``.
        """
        with self._guard.admit("SubmitGradient"):
            messages = _messages(request_iterator, aggregator_pb2.SubmitMessage)
            ident = self._identity(context)
            if ident is not None:
                party = self._party(context, "")
                with self._guard.per_identity(f"party {party}", "SubmitGradient"):
                    first = await self._read_header(messages, context)
                    self._party(context, first.party_id)
                    return await self._submit(party, first, messages, context)
            # No channel identity: the party id is in the header; until it arrives
            # the connection is what is counted.
            with self._guard.per_identity(
                f"connection {context.peer()}",
                "SubmitGradient",
                # One connection may carry several parties (gRPC shares them
                # within a process): headers only, read within the grace.
                scale=CONNECTION_SCALE,
            ):
                first = await self._read_header(messages, context)
            party = self._party(context, first.party_id)
            with self._guard.per_identity(
                f"party {party}",
                "SubmitGradient",
                f"party {party}, round {first.round}",
            ):
                return await self._submit(party, first, messages, context)

    async def _read_header(
        self, messages: AsyncIterator[tuple[str, Any]], context: Context
    ) -> Any:
        """The upload's header message; the stream is cancelled if it is late."""
        grace = self._limits.upload_grace_s
        assert self._loop is not None
        task = asyncio.current_task()
        assert task is not None
        late: list[bool] = []

        def too_late() -> None:
            late.append(True)
            task.cancel()

        timer = self._loop.call_later(grace, too_late)
        try:
            kind, first = await _next(messages, ("", None))
        except asyncio.CancelledError:
            if not late:
                raise
            task.uncancel()
            log.warning(
                "upload from %s sent no header within %g s", context.peer(), grace
            )
            await context.abort(
                grpc.StatusCode.CANCELLED,
                f"upload stream cancelled: no header within {grace:g} s",
            )
        finally:
            timer.cancel()
        if kind != "header" or first is None:
            raise InvalidUpdateError("submission must start with a header message")
        return first

    async def _submit(
        self,
        party: str,
        first: Any,
        messages: AsyncIterator[tuple[str, Any]],
        context: Context,
    ) -> aggregator_pb2.SubmitReply:
        run = await self._wait_run(context)
        hdr = replace(wire.submit_header_from_proto(first), party_id=party)
        return await self._receive(run, hdr, messages)

    async def _receive(
        self,
        run: Run,
        hdr: SubmitHeader,
        it: AsyncIterator[tuple[str, Any]],
    ) -> aggregator_pb2.SubmitReply:
        label = f"party {hdr.party_id}, round {hdr.round}"
        latest = run.broadcaster.latest
        if (
            hdr.model_digest
            and latest is not None
            and latest.round == hdr.round
            and hdr.model_digest != latest.digest
        ):
            raise StaleRoundError(
                f"{label}: update computed from model "
                f"{hdr.model_digest.hex()[:16]}...; "
                f"round {hdr.round}'s model is {latest.digest.hex()[:16]}..."
            )
        sub = run.engine.begin_submission(
            hdr.party_id,
            hdr.round,
            hdr.num_samples,
            train_loss=hdr.train_loss,
            update_kind=hdr.update_kind,
            submission_id=hdr.submission_id,
            # The servicer waits for a slot itself (without a thread): the
            # engine's pool only answers whether one is free now.
            slot_timeout_s=0.0,
        )
        loop = self._loop
        task = asyncio.current_task()
        assert loop is not None and task is not None
        discarded: list[str] = []
        finished = False

        def cancel_if_quiet(why: str) -> None:
            # The engine freed the slot; a sender that keeps quiet would still hold
            # this stream, so cancel it unless it hears the refusal first.
            if not finished:
                log.warning("%s: upload stream cancelled: %s", label, why)
                discarded.append(why)
                task.cancel()

        def on_expire(why: str) -> None:  # the engine's driver thread
            loop.call_soon_threadsafe(self._slot_freed)
            loop.call_soon_threadsafe(
                loop.call_later, CANCEL_AFTER_S, cancel_if_quiet, why
            )

        if isinstance(sub, Submission):
            sub.on_expire = on_expire
        try:
            # Before reading any chunk: waiting uploads pin no data.
            await self._reserve(sub, run)
            dec = wire.BundleDecoder(
                run.engine.specs,
                wire_dtype=run.join_info.config.wire_dtype,
                limits=self._limits,
                label=label,
            )
            async for kind, part in it:
                if kind == "chunk":
                    idx, off, raw = dec.feed(part)
                    values = dec.widen(idx, raw)
                    if values.size >= OFFLOAD_ELEMS:
                        # Copy, norm and dot of a big chunk: on a pool thread
                        # (NumPy releases the GIL), so uploads use both cores.
                        await self._blocking_call(sub.add, idx, off, values)
                    else:
                        sub.add(idx, off, values)
                elif kind == "trailer":
                    digest = dec.finish(wire.submit_trailer_from_proto(part))
                    if await _next(it, None) is not None:
                        raise InvalidUpdateError(f"{label}: messages after the trailer")
                    if sub.finishes_now() and run.engine.layout.size <= INLINE_ELEMS:
                        outcome = sub.finish(digest)  # a copy and a fold: no hop
                    else:  # the wait for v_t or the disk, or a big model's copy
                        outcome = await self._blocking_call(sub.finish, digest)
                    return wire.submit_reply_to_proto(outcome, dec.bytes_received)
                else:
                    raise InvalidUpdateError(
                        f"{label}: unexpected {kind or 'empty'} message inside the "
                        "update"
                    )
            sub.check_open()  # discarded meanwhile: say why, not just "truncated"
            raise InvalidUpdateError(
                f"{label}: stream ended without its trailer after {dec.bytes_received} "
                "bytes"
            )
        except asyncio.CancelledError:
            sub.abort()
            if not discarded:
                raise
            task.uncancel()
            sub.check_open()  # the engine's reason (idle, too slow, round closed)
            raise LimitError(f"{label}: upload discarded: {discarded[0]}") from None
        except BaseException:
            sub.abort()
            raise
        finally:
            finished = True
            self._slot_freed()

    async def _reserve(self, sub: Any, run: Run) -> None:
        """Take the engine upload slot, waiting (FIFO, no thread) while none is free."""
        loop = self._loop
        assert loop is not None
        timeout = self._limits.upload_slot_timeout_s
        deadline = loop.time() + timeout
        front = False
        while True:
            try:
                sub.reserve()
            except LimitError as err:
                left = deadline - loop.time()
                if left <= 0:
                    raise LimitError(_slot_refusal(str(err), timeout)) from None
                pool = run.engine.uploads
                share_bound = pool.in_flight < pool.slots
                waiter: asyncio.Future[None] = loop.create_future()
                if share_bound:
                    # Refused for its party's share while slots are free: let the
                    # next upload in line try the slot it was woken for.
                    self._share_waiters.append(waiter)
                    self._wake_one()
                elif front:
                    self._slot_waiters.appendleft(waiter)  # keeps its place
                else:
                    self._slot_waiters.append(waiter)
                timer = loop.call_later(left, _resolve, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                front = True
                continue
            return

    def _wake_one(self) -> None:
        """Wake the oldest upload waiting for a slot."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _slot_freed(self) -> None:
        """An upload slot may be free: wake the oldest waiter (and share waiters)."""
        self._wake_one()
        share, self._share_waiters = self._share_waiters, []
        for waiter in share:
            if not waiter.done():
                waiter.set_result(None)

    @_rpc
    async def GetContributions(
        self, raw: bytes, context: Context
    ) -> aggregator_pb2.ContributionsReply:
        """The ledger's contributions; parties see only their own, admins everything."""
        with (
            self._guard.admit("GetContributions"),
            self._guard.per_identity(self._caller_key(context), "GetContributions"),
        ):
            ident = self._identity(context)
            run = await self._wait_run(context)
            # A ledger query: off the loop.
            return await self._blocking_call(self._contributions, raw, ident, run)

    def _contributions(
        self, raw: bytes, ident: Identity | None, run: Run
    ) -> aggregator_pb2.ContributionsReply:
        wanted, from_round, to_round, method = wire.contributions_request_from_proto(
            wire.parse_message(aggregator_pb2.ContributionsRequest, raw)
        )
        if wanted is not None:
            wanted = list(dict.fromkeys(wanted))  # a repeated id is asked for once
        if ident is None and self._open_enrolment:
            raise ForbiddenError(
                "open enrolment: callers have no verified identity, so no party's "
                "contributions are served; give the aggregator a parties file or "
                "client certificates"
            )
        if ident is not None and not ident.is_admin:
            if wanted is not None and wanted != [ident.name]:
                others = sorted(set(wanted) - {ident.name})
                raise ForbiddenError(
                    f"party {ident.name} may read only its own contributions, not "
                    f"{others}"
                )
            wanted = [ident.name]
        if wanted is not None and run.known_parties is not None:
            known = set(run.known_parties())
            unknown = [p for p in wanted if p not in known]
            if unknown:
                raise NotFoundError(
                    f"no party {unknown[0]!r} in run {self._run_id}"
                    + (f" (and {len(unknown) - 1} more unknown)" if unknown[1:] else "")
                )
        report = run.contributions(wanted, from_round, to_round, method)
        viewer = None if ident is None or ident.is_admin else ident.name
        if viewer is not None and not self._publish:
            report = report.party_view(viewer)
        return wire.report_to_proto(report, viewer=viewer)

    @_rpc
    async def GetStatus(
        self, raw: bytes, context: Context
    ) -> aggregator_pb2.StatusReply:
        """Run progress (``starting`` while the run is being set up)."""
        with self._guard.admit("GetStatus"):
            wire.parse_message(aggregator_pb2.StatusRequest, raw)
            # Authenticates when credentials are configured.
            with self._guard.per_identity(self._caller_key(context), "GetStatus"):
                ident = self._identity(context)
                if self._run is None:
                    state = RunState.FAILED if self._start_error else RunState.STARTING
                    st = RunStatus(
                        state, 0, self._rounds_total, 0, reason=self._start_error
                    )
                else:
                    st = self._run.engine.status()
                if ident is not None and not ident.is_admin and not self._publish:
                    st = st.party_view(ident.name)
                return wire.status_to_proto(replace(st, run_id=self._run_id))


def _resolve(waiter: asyncio.Future[None]) -> None:
    """Wake ``waiter`` (its time is up) unless it is done already."""
    if not waiter.done():
        waiter.set_result(None)


def _slot_refusal(engine_message: str, timeout_s: float) -> str:
    """The engine's refusal (asked without waiting) as the waited-for refusal."""
    # The engine was asked with a zero timeout; the upload waited timeout_s.
    head, sep, _ = engine_message.partition(" for 0 s")
    if not sep:
        return engine_message
    return f"{head} for {timeout_s:g} s; try again"
