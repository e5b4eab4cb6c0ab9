"""AggregatorServicer: decode -> engine -> encode; domain exceptions -> status codes."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from fedgrpc import wire
from fedgrpc.engine import RoundEngine
from fedgrpc.errors import (
    FedGrpcError,
    ForbiddenError,
    InvalidUpdateError,
    LimitError,
    StaleRoundError,
)
from fedgrpc.proto import aggregator_pb2
from fedgrpc.security import PARTY_ID_RE, Identity, PartyRegistry
from fedgrpc.server.auth import identity_from_context
from fedgrpc.server.broadcast import ModelBroadcaster
from fedgrpc.types import ContributionReport

log = logging.getLogger(__name__)

T = TypeVar("T")


def _abort(context: grpc.ServicerContext, err: FedGrpcError) -> NoReturn:
    code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)
    context.abort(code, str(err))


def _fail(context: grpc.ServicerContext, err: Exception, method: str) -> NoReturn:
    """Abort with the status of ``err``: a domain error's own, else INTERNAL."""
    if isinstance(err, FedGrpcError):
        _abort(context, err)
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


class AggregatorServicer:
    """The Aggregator service. Each RPC decodes, calls the engine, encodes.

    Args:
        engine: the round engine.
        broadcaster: encoded model versions, shared by every GetModel stream.
        join_reply: the run's constant part of JoinReply (spec, config, run id).
        contributions: callable building a ContributionReport for (parties, from, to).
        registry: parties file, or None (no tokens).
        mtls: whether client certificates are required (identity from the certificate).
        limits: decode limits; ``max_streams_per_party`` bounds concurrent uploads.
    """

    def __init__(
        self,
        engine: RoundEngine,
        broadcaster: ModelBroadcaster,
        join_reply: aggregator_pb2.JoinReply,
        contributions: Callable[
            [list[str] | None, int, int | None], ContributionReport
        ],
        *,
        registry: PartyRegistry | None = None,
        mtls: bool = False,
        limits: wire.DecodeLimits | None = None,
        max_streams_per_party: int = 2,
        run_id: str = "",
        stopping: threading.Event | None = None,
    ) -> None:
        self._engine = engine
        self._broadcaster = broadcaster
        self._join_reply = join_reply
        self._contributions = contributions
        self._registry = registry
        self._mtls = mtls
        self._limits = limits or wire.DecodeLimits()
        self._max_streams = max_streams_per_party
        self._streams: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        self.model_streams = 0  # open GetModel streams (the server waits for them)
        self._run_id = run_id
        self._stopping = stopping or threading.Event()
        self._wire_dtype = wire.dtype_from_proto(join_reply.config.wire_dtype)

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
    @_unary
    def Join(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinReply:
        """Register the calling party; reply with spec, config and the open round."""
        request = parse(aggregator_pb2.JoinRequest, raw)
        party = self._party(context, request.party_id)
        self._engine.join(party, int(request.num_samples))
        reply = aggregator_pb2.JoinReply()
        reply.CopyFrom(self._join_reply)
        reply.open_round = self._engine.open_round
        reply.party_id = party
        return reply

    @_streaming
    def GetModel(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Stream each model version from ``from_round`` on (pre-encoded), then done."""
        request = parse(aggregator_pb2.GetModelRequest, raw)
        party = self._party(context, request.party_id)
        self._engine.touch(party)
        next_round = int(request.from_round)
        with self._streams_lock:
            self.model_streams += 1
        try:
            while context.is_active():
                item = self._broadcaster.wait_next(next_round, timeout_s=0.5)
                if item is None:
                    if self._stopping.is_set():
                        context.abort(
                            grpc.StatusCode.UNAVAILABLE, "aggregator shutting down"
                        )
                    continue
                yield from item.messages
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
        """Receive one update: header, chunks, trailer; fold it in only when whole."""
        messages = _submit_messages(request_iterator)
        which, first = next(messages, (None, None))
        if which != "header":
            raise InvalidUpdateError("submission must start with a header message")
        hdr = cast(aggregator_pb2.SubmitHeader, first)
        party = self._party(context, hdr.party_id)
        with self._streams_lock:
            open_streams = self._streams.get(party, 0)
            if open_streams >= self._max_streams:
                raise LimitError(
                    f"party {party}, round {hdr.round}: {open_streams} uploads already "
                    f"open; limit is {self._max_streams}"
                )
            self._streams[party] = open_streams + 1
        try:
            return self._receive(party, hdr, messages)
        finally:
            with self._streams_lock:
                self._streams[party] -= 1

    def _receive(
        self,
        party: str,
        hdr: aggregator_pb2.SubmitHeader,
        it: Iterator[tuple[str | None, Any]],
    ) -> aggregator_pb2.SubmitReply:
        label = f"party {party}, round {hdr.round}"
        kind = wire.update_kind_from_proto(hdr.update_kind)
        if kind is None:
            raise InvalidUpdateError(f"{label}: update kind is unset or unknown")
        latest = self._broadcaster.latest
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
        sub = self._engine.begin_submission(
            party,
            int(hdr.round),
            int(hdr.num_samples),
            train_loss=float(hdr.train_loss),
            update_kind=kind,
            submission_id=hdr.submission_id,
            slot_timeout_s=60.0,
        )
        try:
            sub.reserve()  # before reading any chunk: waiting uploads pin no data
        except BaseException:
            sub.abort()
            raise
        dec = wire.BundleDecoder(
            self._engine.specs,
            wire_dtype=self._wire_dtype,
            limits=self._limits,
            label=label,
        )
        wdt = self._wire_dtype
        # float16/bfloat16 chunks are widened into one reused float32 buffer.
        scratch = None if wdt == "float32" else np.empty(0, dtype=np.float32)
        try:
            for which, payload in it:
                if which == "chunk":
                    idx, off, view = dec.feed(payload)
                    if scratch is not None:
                        if scratch.size < view.size:
                            scratch = np.empty(view.size, dtype=np.float32)
                        view = wire.from_wire_array(
                            view, wdt, "float32", out=scratch[: view.size]
                        )
                    sub.add(idx, off, view)
                elif which == "trailer":
                    digest = dec.finish(payload.digest)
                    if next(it, None) is not None:
                        raise InvalidUpdateError(f"{label}: messages after the trailer")
                    outcome = sub.finish(digest)
                    return aggregator_pb2.SubmitReply(
                        accepted=outcome.accepted,
                        message=outcome.message,
                        round=outcome.round,
                        submission_id=outcome.submission_id,
                        bytes_received=dec.bytes_received,
                    )
                else:
                    raise InvalidUpdateError(
                        f"{label}: unexpected {which or 'empty'} message "
                        "inside the update"
                    )
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
        request = parse(aggregator_pb2.ContributionsRequest, raw)
        ident = self._identity(context)
        wanted = list(request.party_ids) or None
        if ident is not None and not ident.is_admin:
            if wanted is not None and wanted != [ident.name]:
                others = sorted(set(wanted) - {ident.name})
                raise ForbiddenError(
                    f"party {ident.name} may read only its own contributions, not "
                    f"{others}"
                )
            wanted = [ident.name]
        to_round = int(request.to_round) if request.has_to_round else None
        report = self._contributions(wanted, int(request.from_round), to_round)
        viewer = None if ident is None or ident.is_admin else ident.name
        return report_to_proto(report, viewer=viewer)

    @_unary
    def GetStatus(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> aggregator_pb2.StatusReply:
        """Run progress."""
        parse(aggregator_pb2.StatusRequest, raw)
        self._identity(context)  # authenticate when credentials are configured
        st = self._engine.status()
        return aggregator_pb2.StatusReply(
            run_id=self._run_id,
            state=st["state"],
            open_round=st["open_round"],
            rounds_total=st["rounds_total"],
            rounds_done=st["rounds_done"],
            joined=st["joined"],
            submitted=st["submitted"],
            late=st["late"],
            elapsed_s=st["elapsed_s"],
            last_round_s=st["last_round_s"],
            val_loss=st["val_loss"],
            val_acc=st["val_acc"],
        )


M = TypeVar("M", bound=Message)


def _submit_messages(raw: Iterator[bytes]) -> Iterator[tuple[str | None, Any]]:
    """(kind, payload) of each upload message; chunks parse without copying data."""
    for data in raw:
        fast = wire.parse_chunk_message(data)
        if fast is not None:
            yield "chunk", fast
            continue
        msg = parse(aggregator_pb2.SubmitMessage, data)
        which = msg.WhichOneof("kind")
        yield which, getattr(msg, which) if which else None


def parse(cls: type[M], raw: bytes) -> M:
    """Parse a request; malformed bytes are INVALID_ARGUMENT, not INTERNAL."""
    try:
        return cls.FromString(raw)
    except DecodeError as err:
        raise InvalidUpdateError(f"malformed {cls.__name__} message: {err}") from None


def report_to_proto(
    report: ContributionReport, *, viewer: str | None = None
) -> aggregator_pb2.ContributionsReply:
    """Encode a ContributionReport; for a ``viewer`` party, only its part of rounds."""
    reply = aggregator_pb2.ContributionsReply(
        run_id=report.run_id, method=report.method, rounds_done=report.rounds_done
    )
    for pc in report.parties:
        msg = reply.parties.add(
            party_id=pc.party_id,
            total=pc.total,
            share=pc.share,
            reference_share=pc.reference_share,
            attack=pc.attack,
        )
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            msg.rounds.add(
                round=t,
                score=pr.score,
                weight=pr.weight,
                num_samples=pr.num_samples,
                update_norm=pr.update_norm,
                train_loss=pr.train_loss,
            )
    for r in report.rounds:
        # A party sees only its own part of each round: other parties' ids, and a round
        # total from which others' scores could be derived, are for admins.
        seen = [p for p in r.parties if viewer is None or p.party_id == viewer]
        reply.rounds.add(
            round=r.round,
            status=r.status,
            val_loss_before=r.val_loss_before,
            val_acc_before=r.val_acc_before,
            val_loss_after=r.val_loss_after,
            val_acc_after=r.val_acc_after,
            predicted_drop=sum(p.score for p in seen),
            measured_drop=r.measured_drop,
            submitted=[p.party_id for p in seen],
            late=[p for p in r.late if viewer is None or p == viewer],
            duration_s=r.duration_s,
            val_grad_s=r.val_grad_s,
            aggregate_s=r.aggregate_s,
        )
    return reply
