"""AggregatorServicer: decode -> engine -> encode; domain exceptions -> status codes.

The server listens before the run is ready (the validation worker may still be loading
torch, the data and the model): until :meth:`AggregatorServicer.attach` hands over the
run, GetStatus answers ``starting`` and every other RPC waits for the run, within its
deadline, then gets UNAVAILABLE (which clients retry).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection, Iterator
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
    NotFoundError,
    StaleRoundError,
    UnavailableError,
)
from fedgrpc.proto import aggregator_pb2
from fedgrpc.security.registry import PARTY_ID_RE, Identity, PartyRegistry
from fedgrpc.server.auth import identity_from_context
from fedgrpc.server.broadcast import ModelBroadcaster
from fedgrpc.server.guard import CallGuard, Watchdog
from fedgrpc.types import (
    ContributionReport,
    RoundSkipped,
    RunState,
    RunStatus,
    SubmitHeader,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_SCALE = 4
"""Uploads one connection may have waiting for their header, in units of
``max_streams_per_party`` (the server-wide cap bounds the sum)."""

CANCEL_AFTER_S = 2.0
"""How long a discarded upload's sender has to hear why before its stream is
cancelled (a quiet sender would otherwise hold a worker thread)."""

STARTUP_WAIT_S = 60.0
"""Longest an RPC waits for a starting run (its own deadline may be shorter)."""


def _fail(context: grpc.ServicerContext, err: Exception, method: str) -> NoReturn:
    """Abort with the status of ``err``: a domain error's own, else INTERNAL."""
    if isinstance(err, FedGrpcError):
        context.abort(grpc.StatusCode[err.code.name], str(err))
    # types-grpcio lacks ServicerContext.code() (in grpcio since 1.38).
    status_code = context.code  # type: ignore[attr-defined]
    if isinstance(err, grpc.RpcError) or status_code() is not None:
        raise err  # cancelled by the client, or already aborted with a status
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}")


def _unary(fn: Callable[..., T]) -> Callable[..., T]:
    """Map domain errors to their status, anything else to INTERNAL (never UNKNOWN)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except Exception as err:
            _fail(context, err, fn.__name__)

    return wrapper


def _streaming(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """As :func:`_unary`, for response-streaming methods."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from fn(self, request, context)
        except Exception as err:
            _fail(context, err, fn.__name__)

    return wrapper


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
        stopping: set when the server shuts down (model streams end UNAVAILABLE).
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
        self._streams_lock = threading.Lock()
        self._guard = CallGuard(self._limits)
        self._watchdog = Watchdog()
        self._open_enrolment = open_enrolment
        self.model_streams = 0  # open GetModel streams (the server waits for them)
        self._stopping = stopping or threading.Event()
        self._ready = threading.Event()
        self._run: Run | None = None
        self._start_error = ""

    @property
    def registry(self) -> PartyRegistry | None:
        """The parties file the servicer authenticates against, if any."""
        return self._registry

    # ------------------------------------------------------------- the run
    def attach(self, run: Run) -> None:
        """The run is ready: RPCs are served from now on."""
        self._run = run
        self._ready.set()

    def close(self) -> None:
        """Stop the watchdog thread (after the server stopped)."""
        self._watchdog.stop()

    @property
    def ready(self) -> bool:
        """Whether the run is attached."""
        return self._run is not None

    def start_failed(self, reason: str) -> None:
        """The run could not be set up: RPCs get UNAVAILABLE naming ``reason``."""
        self._start_error = reason
        self._ready.set()

    def _wait_run(self, context: grpc.ServicerContext) -> Run:
        remaining = context.time_remaining()
        # Leave the caller time to hear why, rather than run into its own deadline.
        wait = STARTUP_WAIT_S if remaining is None else min(STARTUP_WAIT_S, remaining)
        self._ready.wait(max(0.0, 0.9 * wait))
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

    # ------------------------------------------------------------- identity
    def _identity(self, context: grpc.ServicerContext) -> Identity | None:
        return identity_from_context(context, self._registry, mtls=self._mtls)

    def _party(self, context: grpc.ServicerContext, claimed: str) -> str:
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

    # ------------------------------------------------------------------ RPCs
    def _caller_key(self, context: grpc.ServicerContext, claimed: str = "") -> str:
        """Whom a call's per-identity cap counts against (authenticates the call)."""
        ident = self._identity(context)
        if ident is not None:
            return f"{'admin' if ident.is_admin else 'party'} {ident.name}"
        if claimed and PARTY_ID_RE.fullmatch(claimed):
            return f"party {claimed}"
        return f"connection {context.peer()}"

    @_unary
    def Join(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinReply:
        """Register the calling party; reply with spec, config and the open round."""
        with self._guard.admit("Join"):
            msg = wire.parse_message(aggregator_pb2.JoinRequest, raw)
            claimed, num_samples, _ = wire.join_request_from_proto(msg)
            party = self._party(context, claimed)
            with self._guard.per_identity(f"party {party}", "Join"):
                run = self._wait_run(context)
                attested = (
                    self._registry.attested_samples(party) if self._registry else None
                )
                if not wire.join_is_check_only(msg):
                    run.engine.join(party, num_samples, attested)
                info = replace(
                    run.join_info, open_round=run.engine.open_round, party_id=party
                )
                return wire.join_reply_to_proto(info)

    @_streaming
    def GetModel(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Stream each model version from ``from_round`` on (pre-encoded), then done."""
        with self._guard.admit("GetModel"):
            claimed, next_round = wire.get_model_request_from_proto(
                wire.parse_message(aggregator_pb2.GetModelRequest, raw)
            )
            party = self._party(context, claimed)
            with self._guard.per_identity(f"party {party}", "GetModel"):
                yield from self._stream_models(party, next_round, context)

    def _stream_models(
        self, party: str, next_round: int, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        run = self._wait_run(context)
        run.engine.touch(party)
        with self._streams_lock:
            self.model_streams += 1
        try:
            while context.is_active():
                item = run.broadcaster.wait_next(next_round, timeout_s=0.5)
                if item is None:
                    if self._stopping.is_set():
                        raise UnavailableError("aggregator shutting down")
                    continue
                if item.done or run.engine.sampled(party, item.round):
                    yield from item.messages
                else:  # client sampling: no model to download, no work to do
                    yield wire.round_skipped_to_proto(
                        RoundSkipped(item.round, f"not sampled for round {item.round}")
                    ).SerializeToString()
                if item.done:
                    return
                next_round = item.round + 1
        finally:
            with self._streams_lock:
                self.model_streams -= 1

    @_unary
    def SubmitGradient(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> aggregator_pb2.SubmitReply:
        """Receive one update: header, chunks, trailer; fold it in only when whole.

        The caller is authenticated and counted against its caps from the call's
        metadata before any message is read; the header must arrive within
        ``upload_grace_s``.
        """
        with self._guard.admit("SubmitGradient"):
            messages = wire.read_messages(
                request_iterator, aggregator_pb2.SubmitMessage
            )
            ident = self._identity(context)
            if ident is not None:
                party = self._party(context, "")
                with self._guard.per_identity(f"party {party}", "SubmitGradient"):
                    first = self._read_header(messages, context)
                    self._party(context, first.party_id)
                    return self._submit(party, first, messages, context)
            # No channel identity: the party id is in the header; until it arrives
            # the connection is what is counted.
            with self._guard.per_identity(
                f"connection {context.peer()}",
                "SubmitGradient",
                # One connection may carry several parties (gRPC shares them
                # within a process): headers only, read within the grace.
                scale=CONNECTION_SCALE,
            ):
                first = self._read_header(messages, context)
            party = self._party(context, first.party_id)
            with self._guard.per_identity(
                f"party {party}",
                "SubmitGradient",
                f"party {party}, round {first.round}",
            ):
                return self._submit(party, first, messages, context)

    def _read_header(
        self, messages: Iterator[tuple[str, Any]], context: grpc.ServicerContext
    ) -> Any:
        """The upload's header message; the stream is cancelled if it is late."""
        grace = self._limits.upload_grace_s
        peer = context.peer()

        def too_late() -> None:
            log.warning("upload from %s sent no header within %g s", peer, grace)
            context.cancel()

        handle = self._watchdog.after(grace, too_late)
        try:
            kind, first = next(messages, ("", None))
        finally:
            self._watchdog.cancel(handle)
        if kind != "header" or first is None:
            raise InvalidUpdateError("submission must start with a header message")
        return first

    def _submit(
        self,
        party: str,
        first: Any,
        messages: Iterator[tuple[str, Any]],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.SubmitReply:
        run = self._wait_run(context)
        hdr = replace(wire.submit_header_from_proto(first), party_id=party)
        done = threading.Event()

        def discarded(why: str) -> None:
            # The engine freed the slot; a sender that keeps quiet still holds this
            # thread, so cancel its stream unless it hears the refusal first.
            def cancel() -> None:
                if not done.is_set():
                    log.warning("party %s: upload stream cancelled: %s", party, why)
                    context.cancel()

            self._watchdog.after(CANCEL_AFTER_S, cancel)

        try:
            return self._receive(run, hdr, messages, discarded)
        finally:
            done.set()

    def _receive(
        self,
        run: Run,
        hdr: SubmitHeader,
        it: Iterator[tuple[str, Any]],
        on_expire: Callable[[str], None] | None = None,
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
            slot_timeout_s=self._limits.upload_slot_timeout_s,
        )
        if isinstance(sub, Submission):
            sub.on_expire = on_expire
        try:
            sub.reserve()  # before reading any chunk: waiting uploads pin no data
            dec = wire.BundleDecoder(
                run.engine.specs,
                wire_dtype=run.join_info.config.wire_dtype,
                limits=self._limits,
                label=label,
            )
            for kind, part in it:
                if kind == "chunk":
                    idx, off, raw = dec.feed(part)
                    sub.add(idx, off, dec.widen(idx, raw))
                elif kind == "trailer":
                    digest = dec.finish(wire.submit_trailer_from_proto(part))
                    if next(it, None) is not None:
                        raise InvalidUpdateError(f"{label}: messages after the trailer")
                    outcome = sub.finish(digest)
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
        except BaseException:
            sub.abort()
            raise

    @_unary
    def GetContributions(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> aggregator_pb2.ContributionsReply:
        """The ledger's contributions; parties see only their own, admins everything."""
        with (
            self._guard.admit("GetContributions"),
            self._guard.per_identity(self._caller_key(context), "GetContributions"),
        ):
            return self._contributions(raw, context)

    def _contributions(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> aggregator_pb2.ContributionsReply:
        wanted, from_round, to_round, method = wire.contributions_request_from_proto(
            wire.parse_message(aggregator_pb2.ContributionsRequest, raw)
        )
        if wanted is not None:
            wanted = list(dict.fromkeys(wanted))  # a repeated id is asked for once
        ident = self._identity(context)
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
        run = self._wait_run(context)
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

    @_unary
    def GetStatus(
        self, raw: bytes, context: grpc.ServicerContext
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
