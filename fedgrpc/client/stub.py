"""AggregatorClient: channel, deadlines, retries; ndarrays in/out, fedgrpc errors."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

import fedgrpc
from fedgrpc import wire
from fedgrpc.config import ClientConfig
from fedgrpc.errors import InvalidUpdateError, RemoteError
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.server.auth import (
    channel_credentials,
    token_call_credentials,
    token_metadata,
)
from fedgrpc.types import TensorSpec, UpdateKind

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL_OPTIONS = [
    # Detect a dead peer on a silent network within ~15 s, without flooding a live one.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # we retry ourselves, with idempotent submission ids
]


@dataclass(frozen=True)
class ModelVersion:
    """A global model received from GetModel."""

    round: int
    flat: np.ndarray  # float32 parameters in spec order
    digest: bytes


@dataclass(frozen=True)
class TrainingOver:
    """GetModel's final message."""

    rounds_completed: int
    reason: str


def _remote(err: grpc.RpcError) -> RemoteError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return RemoteError(f"{code.name}: {details}", code=code.name)


class AggregatorClient:
    """A party's (or an observer's) connection to the aggregator.

    Every call has a deadline; only UNAVAILABLE is retried, with capped exponential
    backoff and jitter, until ``connect_timeout_s`` has passed without success. Errors
    leave as :class:`~fedgrpc.errors.RemoteError` carrying the status name.
    """

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self._metadata: tuple[tuple[str, str], ...] = ()
        if cfg.insecure:
            self._channel = grpc.insecure_channel(cfg.server, options=CHANNEL_OPTIONS)
            if cfg.token:
                self._metadata = tuple(token_metadata(cfg.token))
        else:
            assert cfg.tls.ca is not None
            creds = channel_credentials(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
            if cfg.token:
                creds = grpc.composite_channel_credentials(
                    creds, token_call_credentials(cfg.token)
                )
            self._channel = grpc.secure_channel(
                cfg.server, creds, options=CHANNEL_OPTIONS
            )
        self._stub = aggregator_pb2_grpc.AggregatorStub(self._channel)
        # Uploads send pre-serialized messages: chunks are framed by hand straight from
        # the array buffer (wire.WireBundle.messages), so no serializer runs on them.
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
        self.specs: list[TensorSpec] = []
        self.wire_dtype = "float32"

    def close(self) -> None:
        """Close the channel."""
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
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= give_up:
                    raise _remote(err) from None
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

    # ------------------------------------------------------------------ RPCs
    def join(self, num_samples: int) -> aggregator_pb2.JoinReply:
        """Join (retried while the aggregator is unreachable); learn spec and config."""
        req = aggregator_pb2.JoinRequest(
            party_id=self.cfg.party_id,
            num_samples=num_samples,
            client_version=fedgrpc.__version__,
        )
        reply: aggregator_pb2.JoinReply = self.retry(
            lambda: self._stub.Join(
                req, timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            ),
            "Join",
        )
        self.specs = [wire.spec_from_proto(s) for s in reply.model_spec.tensors]
        self.wire_dtype = (
            wire.dtype_from_proto(reply.config.wire_dtype)
            if reply.config.wire_dtype
            else "float32"
        )
        return reply

    def models(
        self, from_round: int, timeout_s: float
    ) -> Iterator[ModelVersion | TrainingOver]:
        """One GetModel stream: each model version from ``from_round`` on, then the end.

        The stream's deadline is ``timeout_s``; the caller reopens it when it expires.
        """
        req = aggregator_pb2.GetModelRequest(
            party_id=self.cfg.party_id, from_round=from_round
        )
        layout = wire.FlatLayout.of(self.specs)
        try:
            stream = self._get_model_raw(
                req, timeout=timeout_s, metadata=self._metadata
            )
            header: aggregator_pb2.ModelHeader | None = None
            flat = np.empty(0, dtype=np.float32)
            dec: wire.BundleDecoder | None = None
            for raw in stream:
                fast = wire.parse_chunk_message(raw)  # zero-copy view of the chunk
                msg = (
                    None
                    if fast is not None
                    else aggregator_pb2.ModelMessage.FromString(raw)
                )
                kind = "chunk" if msg is None else msg.WhichOneof("kind")
                if kind == "header":
                    assert msg is not None
                    header = msg.header
                    wdt = (
                        wire.dtype_from_proto(header.wire_dtype)
                        if header.wire_dtype
                        else self.wire_dtype
                    )
                    dec = wire.BundleDecoder(
                        self.specs,
                        wire_dtype=wdt,
                        label=f"model of round {header.round}",
                    )
                    flat = np.empty(layout.size, dtype=np.float32)
                elif kind == "chunk":
                    if dec is None or header is None:
                        raise InvalidUpdateError("model chunk before its header")
                    if fast is None:
                        assert msg is not None
                        idx, off, view = dec.feed(msg.chunk)
                    else:
                        idx, off, view = dec.feed(fast)
                    start = layout.offsets[idx] + off
                    wire.from_wire_array(
                        view,
                        dec.wire_dtype_of(self.specs[idx]),
                        "float32",
                        out=flat[start : start + view.size],
                    )
                elif kind == "end":
                    if dec is None or header is None:
                        raise InvalidUpdateError("model end before its header")
                    dec.finish(header.digest)
                    yield ModelVersion(int(header.round), flat, bytes(header.digest))
                    header, dec = None, None
                elif kind == "done":
                    assert msg is not None
                    yield TrainingOver(int(msg.done.rounds_completed), msg.done.reason)
                    return
        except grpc.RpcError as err:
            raise _remote(err) from None

    def submit(
        self,
        round_index: int,
        update: dict[str, np.ndarray],
        num_samples: int,
        *,
        train_loss: float,
        kind: UpdateKind,
        submission_id: str = "",
        model_digest: bytes = b"",
    ) -> aggregator_pb2.SubmitReply:
        """Stream an update: header, chunks, trailer; resend on UNAVAILABLE, same id."""
        bundle = wire.prepare_bundle(
            ((s.name, update[s.name]) for s in self.specs), self.wire_dtype
        )
        trailer_digest = bundle.digest
        sid = (
            submission_id
            or f"{self.cfg.party_id}:{round_index}:{trailer_digest.hex()[:16]}"
        )

        def messages() -> Iterator[bytes]:
            yield aggregator_pb2.SubmitMessage(
                header=aggregator_pb2.SubmitHeader(
                    party_id=self.cfg.party_id,
                    round=round_index,
                    num_samples=num_samples,
                    train_loss=train_loss,
                    update_kind=wire.update_kind_to_proto(kind),
                    submission_id=sid,
                    model_digest=model_digest,
                )
            ).SerializeToString()
            yield from bundle.messages()
            yield aggregator_pb2.SubmitMessage(
                trailer=aggregator_pb2.SubmitTrailer(digest=trailer_digest)
            ).SerializeToString()

        def call() -> aggregator_pb2.SubmitReply:
            reply: aggregator_pb2.SubmitReply = self._submit_raw(
                messages(), timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            )
            return reply

        return self.retry(call, f"SubmitGradient round {round_index}")

    def status(self) -> aggregator_pb2.StatusReply:
        """GetStatus."""
        reply: aggregator_pb2.StatusReply = self.retry(
            lambda: self._stub.GetStatus(
                aggregator_pb2.StatusRequest(),
                timeout=self.cfg.rpc_timeout_s,
                metadata=self._metadata,
            ),
            "GetStatus",
        )
        return reply

    def contributions(
        self,
        party_ids: list[str] | None = None,
        from_round: int = 0,
        to_round: int | None = None,
    ) -> aggregator_pb2.ContributionsReply:
        """GetContributions."""
        req = aggregator_pb2.ContributionsRequest(
            party_ids=party_ids or [],
            from_round=from_round,
            to_round=to_round or 0,
            has_to_round=to_round is not None,
        )
        reply: aggregator_pb2.ContributionsReply = self.retry(
            lambda: self._stub.GetContributions(
                req, timeout=self.cfg.rpc_timeout_s, metadata=self._metadata
            ),
            "GetContributions",
        )
        return reply

    @property
    def channel(self) -> Any:
        """The underlying grpc channel (tests)."""
        return self._channel
