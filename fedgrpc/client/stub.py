"""AggregatorClient: channel, deadlines, retries; domain types in and out.

Callers never see grpc or protobuf: replies come back as domain types
(:class:`~fedgrpc.wire.JoinInfo`, :class:`~fedgrpc.types.RunStatus`, ...), and a failed
call as a :class:`~fedgrpc.errors.RemoteError` carrying its :class:`ErrorCode`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

import fedgrpc
from fedgrpc import wire
from fedgrpc.client.credentials import (
    channel_credentials,
    token_call_credentials,
    token_metadata,
)
from fedgrpc.client.probe import cause_from_details, probe
from fedgrpc.config import ClientConfig
from fedgrpc.errors import (
    ConnectionSetupError,
    ErrorCode,
    InvalidUpdateError,
    RemoteError,
)
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.types import (
    ContributionReport,
    ModelHeader,
    RoundSkipped,
    RunStatus,
    SubmitHeader,
    SubmitOutcome,
    TensorSpec,
    TrainingDone,
    UpdateKind,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

KEEPALIVE_TIME_MS = 30_000
"""A party pings an otherwise silent connection every 30 s (a dead link is found
within ~40 s). The aggregator accepts a data-less ping every 10 s
(server.app.KEEPALIVE_OPTIONS): a third, so pings it reads late under load are
never strikes. The old 10 s against the server's 5 s drew GOAWAY "too_many_pings"
on every connection at 1,024 parties (issue 14)."""

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Keep pinging while a model stream waits for the next round (no data).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # we retry ourselves, with idempotent submission ids
]


@dataclass(frozen=True)
class ModelVersion:
    """A global model received from GetModel."""

    round: int
    flat: np.ndarray  # float32 parameters in spec order
    digest: bytes


def remote_error(err: grpc.RpcError) -> RemoteError:
    """A failed call as a RemoteError with the call's status code."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return RemoteError(f"{code.name}: {details}", code=ErrorCode.of(code.name))


class ModelReader:
    """Decodes a GetModel stream one serialized message at a time.

    Each complete model version, skipped round or end of training comes out of
    :meth:`feed` as it completes; a version's digest is checked before it is given.
    The synchronous client and the asyncio load driver (``scripts/bench_scale.py``)
    read their streams with it.

    Args:
        specs: the model's tensors (from Join).
        reuse: decode every version into the same array (the caller is done with a
            version before the next arrives); by default each gets its own.
    """

    def __init__(self, specs: tuple[TensorSpec, ...], *, reuse: bool = False) -> None:
        self._specs = specs
        self._layout = wire.FlatLayout.of(specs)
        self._reuse = reuse
        self._flat = np.empty(self._layout.size if reuse else 0, dtype=np.float32)
        self._header: ModelHeader | None = None
        self._dec: wire.BundleDecoder | None = None

    def feed(self, data: bytes) -> Iterator[ModelVersion | RoundSkipped | TrainingDone]:
        """What ``data`` (one serialized ``ModelMessage``) completes, if anything."""
        for kind, part in wire.read_messages((data,), aggregator_pb2.ModelMessage):
            if kind == "header":
                self._header = wire.model_header_from_proto(part)
                self._dec = wire.BundleDecoder(
                    self._specs,
                    wire_dtype=self._header.wire_dtype,
                    label=f"model of round {self._header.round}",
                )
                if not self._reuse:
                    self._flat = np.empty(self._layout.size, dtype=np.float32)
            elif kind == "chunk":
                if self._dec is None:
                    raise InvalidUpdateError("model chunk before its header")
                idx, off, raw = self._dec.feed(part)
                start = self._layout.offsets[idx] + off
                self._dec.widen(idx, raw, out=self._flat[start : start + raw.size])
            elif kind == "end":
                header, dec = self._header, self._dec
                if dec is None or header is None:
                    raise InvalidUpdateError("model end before its header")
                dec.finish(header.digest)
                self._header, self._dec = None, None
                yield ModelVersion(header.round, self._flat, header.digest)
            elif kind == "skipped":
                yield wire.round_skipped_from_proto(part)
            elif kind == "done":
                yield wire.training_done_from_proto(part)


class AggregatorClient:
    """A party's (or an observer's) connection to the aggregator.

    Every call has a deadline; only UNAVAILABLE is retried, with capped exponential
    backoff and jitter, until ``connect_timeout_s`` has passed without success.
    """

    def __init__(self, cfg: ClientConfig, channel: grpc.Channel | None = None) -> None:
        # A given channel is shared (many virtual parties in one process): its
        # owner closes it, not close().
        self.cfg = cfg
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._own_channel = channel is None
        if cfg.insecure and cfg.token:
            self._metadata = tuple(token_metadata(cfg.token))
        if channel is not None:
            self._channel = channel
        elif cfg.insecure:
            self._channel = grpc.insecure_channel(cfg.server, options=CHANNEL_OPTIONS)
        else:
            assert cfg.tls.ca is not None
            creds = channel_credentials(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
            if cfg.token:
                creds = grpc.composite_channel_credentials(
                    creds, token_call_credentials(cfg.token)
                )
            options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
            if cfg.tls_server_name:
                options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
            self._channel = grpc.secure_channel(cfg.server, creds, options=options)
        self._stub = aggregator_pb2_grpc.AggregatorStub(self._channel)
        # Model streams and uploads move pre-serialized messages: chunks are framed by
        # hand straight from the array buffer, and parsed without copying their data.
        self._get_model_raw: grpc.UnaryStreamMultiCallable[
            aggregator_pb2.GetModelRequest, bytes
        ] = self._channel.unary_stream(
            "/fedgrpc.v1.Aggregator/GetModel",
            request_serializer=aggregator_pb2.GetModelRequest.SerializeToString,
            response_deserializer=None,
        )
        self._submit_raw: grpc.StreamUnaryMultiCallable[
            bytes, aggregator_pb2.SubmitReply
        ] = self._channel.stream_unary(
            "/fedgrpc.v1.Aggregator/SubmitGradient",
            request_serializer=None,
            response_deserializer=aggregator_pb2.SubmitReply.FromString,
        )
        self._jitter = random.Random()
        self._probes_left = 3  # direct probes of an ambiguous "Socket closed"
        self.specs: tuple[TensorSpec, ...] = ()
        self.wire_dtype = "float32"

    def close(self) -> None:
        """Close the channel (unless it was given: its owner closes it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- retries
    def retry(self, fn: Callable[[], T], what: str) -> T:
        """Call ``fn``, retrying UNAVAILABLE with capped exponential backoff."""
        delay = self.cfg.backoff_initial_s
        give_up = time.monotonic() + self.cfg.connect_timeout_s
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._fail_if_permanent(err, what)
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise remote_error(err) from None
                wait = min(delay, self.cfg.backoff_max_s) * (
                    0.5 + self._jitter.random()
                )
                log.info(
                    "%s: aggregator unavailable (%s); retrying in %.1f s",
                    what,
                    err.details() if hasattr(err, "details") else "",
                    wait,
                )
                time.sleep(wait)
                delay = min(delay * 2, self.cfg.backoff_max_s)

    def _fail_if_permanent(self, err: grpc.RpcError, what: str) -> None:
        """Raise ConnectionSetupError if ``err`` can never go away by retrying."""
        details = (err.details() if hasattr(err, "details") else "") or ""
        cfg = self.cfg
        cause = cause_from_details(details, cfg.server, insecure=cfg.insecure)
        if not cause and "Socket closed" in details and self._probes_left > 0:
            self._probes_left -= 1
            cause = probe(
                cfg.server,
                insecure=cfg.insecure,
                has_client_cert=cfg.tls.cert is not None,
            )
        if cause:
            raise ConnectionSetupError(
                f"{what}: cannot connect to the aggregator at {cfg.server}: {cause}"
            ) from None

    # ------------------------------------------------------------------ RPCs
    def join(self, num_samples: int, *, check_only: bool = False) -> wire.JoinInfo:
        """Join (retried while the aggregator is unreachable); learn spec and config.

        With ``check_only`` the aggregator registers nothing: the party learns the
        model and its input shape first, to refuse data that does not fit before
        the run waits for it.
        """
        req = wire.join_request_to_proto(
            self.cfg.party_id, num_samples, fedgrpc.__version__, check_only=check_only
        )
        reply: aggregator_pb2.JoinReply = self.retry(
            lambda: self._stub.Join(
                req, timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            ),
            "Join",
        )
        info = wire.join_reply_from_proto(reply)
        self.specs = info.specs
        self.wire_dtype = info.config.wire_dtype
        return info

    def models(
        self, from_round: int, timeout_s: float
    ) -> Iterator[ModelVersion | RoundSkipped | TrainingDone]:
        """One GetModel stream: each model version from ``from_round`` on, then the end.

        The stream's deadline is ``timeout_s``; the caller reopens it when it expires.
        """
        req = wire.get_model_request_to_proto(self.cfg.party_id, from_round)
        try:
            stream = self._get_model_raw(
                req, timeout=timeout_s, metadata=self._metadata
            )
            yield from self._read_models(stream)
        except grpc.RpcError as err:
            raise remote_error(err) from None

    def _read_models(
        self, stream: Iterator[bytes]
    ) -> Iterator[ModelVersion | RoundSkipped | TrainingDone]:
        reader = ModelReader(self.specs)
        for data in stream:
            for item in reader.feed(data):
                yield item
                if isinstance(item, TrainingDone):
                    return

    def submit(
        self,
        round_index: int,
        update: Mapping[str, np.ndarray],
        num_samples: int,
        *,
        train_loss: float,
        kind: UpdateKind,
        submission_id: str = "",
        model_digest: bytes = b"",
    ) -> SubmitOutcome:
        """Stream an update: header, chunks, trailer; resend on UNAVAILABLE, same id."""
        bundle = wire.prepare_bundle(
            ((s.name, update[s.name]) for s in self.specs), self.wire_dtype
        )
        header = SubmitHeader(
            party_id=self.cfg.party_id,
            round=round_index,
            num_samples=num_samples,
            train_loss=train_loss,
            update_kind=kind,
            submission_id=submission_id
            or f"{self.cfg.party_id}:{round_index}:{bundle.digest.hex()[:16]}",
            model_digest=model_digest,
        )

        def messages() -> Iterator[bytes]:
            yield wire.submit_header_to_proto(header).SerializeToString()
            yield from bundle.messages()
            yield wire.submit_trailer_to_proto(bundle.digest).SerializeToString()

        def call() -> aggregator_pb2.SubmitReply:
            reply: aggregator_pb2.SubmitReply = self._submit_raw(
                messages(), timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            )
            return reply

        reply = self.retry(call, f"SubmitGradient round {round_index}")
        return wire.submit_reply_from_proto(reply)[0]

    def status(self) -> RunStatus:
        """GetStatus."""
        reply: aggregator_pb2.StatusReply = self.retry(
            lambda: self._stub.GetStatus(
                aggregator_pb2.StatusRequest(),
                timeout=self.cfg.rpc_timeout_s,
                metadata=self._metadata,
            ),
            "GetStatus",
        )
        return wire.status_from_proto(reply)

    def contributions(
        self,
        party_ids: list[str] | None = None,
        from_round: int = 0,
        to_round: int | None = None,
        method: str = "digfl-1",
    ) -> ContributionReport:
        """GetContributions."""
        req = wire.contributions_request_to_proto(
            party_ids, from_round, to_round, method
        )
        reply: aggregator_pb2.ContributionsReply = self.retry(
            lambda: self._stub.GetContributions(
                req, timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            ),
            "GetContributions",
        )
        return wire.report_from_proto(reply)
