"""Property tests: random and mutated messages at the decoders and at a live servicer.

The decoders may accept cleanly or raise a ``FedGrpcError``, nothing else. A live server
answers every garbage upload with a domain status (never UNKNOWN or INTERNAL) within the
deadline, accepts an update only when its bytes were a well-formed update (checked by an
independent oracle below), and keeps working afterwards (DESIGN §2, §3, §5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from fedgrpc import wire
from fedgrpc.config import Limits
from fedgrpc.errors import FedGrpcError
from fedgrpc.proto import aggregator_pb2, tensor_pb2
from fedgrpc.server.app import Aggregator
from fedgrpc.types import RunState, TensorSpec
from fedgrpc.wire import parse_message
from tests.conftest import MakeServer
from tests.wirehelp import bundle_chunks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_SERVICE = "/fedgrpc.v1.Aggregator/"
_TIMEOUT_S = 10.0
_FUZZ = "fuzz"
_HONEST = "honest"
_VALID_SID = "fuzz-valid"
_DECLARED = 50  # samples both parties declare at Join
_EXAMPLES = 60

# Statuses a garbage upload may get; UNKNOWN, INTERNAL, DEADLINE_EXCEEDED, UNAVAILABLE
# and CANCELLED mean the server mishandled it.
_REJECT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_DTYPE_ENUM = {
    "float32": tensor_pb2.FLOAT32,
    "float16": tensor_pb2.FLOAT16,
    "bfloat16": tensor_pb2.BFLOAT16,
    "float64": tensor_pb2.FLOAT64,
    "int64": tensor_pb2.INT64,
    "int32": tensor_pb2.INT32,
    "uint8": tensor_pb2.UINT8,
    "bool": tensor_pb2.BOOL,
}
_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}
_U64 = 2**64 - 1
_I64 = 2**63 - 1
_HUGE_DIMS = [2**31, 2**32, 2**62, _I64, -1, -(2**63)]


def _xxh(data: bytes) -> bytes:
    h = wire.stream_digest()
    h.update(data)
    return bytes(h.digest())


# ------------------------------------------------------------------ the oracle
def _chunks_oracle(
    chunks: Sequence[tensor_pb2.TensorChunk],
    specs: Sequence[TensorSpec],
    wire_dtype: str,
    *,
    finite: bool,
) -> bytes | None:
    """The update's raw bytes if ``chunks`` are exactly a well-formed update, else None.

    Written from DESIGN §2 without the decoder's code: tensors in spec order, each as
    contiguous non-empty chunks from offset 0 (one empty chunk for an empty tensor); the
    first declares dtype, shape and total bytes.
    """
    out = bytearray()
    pos = 0
    for spec in specs:
        wdt = wire_dtype if spec.dtype == "float32" else spec.dtype
        need = math.prod(spec.shape) * _ITEMSIZE[wdt]
        got = bytearray()
        first = True
        while pos < len(chunks) and chunks[pos].name == spec.name:
            c = chunks[pos]
            data = c.data
            if c.offset != len(got):
                return None
            if first:
                if (
                    c.dtype != _DTYPE_ENUM[wdt]
                    or tuple(c.shape) != spec.shape
                    or c.total_bytes != need
                ):
                    return None
            elif not data:
                return None
            if (not data and need) or len(data) % _ITEMSIZE[wdt]:
                return None
            got += data
            if len(got) > need:
                return None
            first = False
            pos += 1
            if len(got) == need and (
                pos >= len(chunks) or chunks[pos].name != spec.name or need == 0
            ):
                break
        if first or len(got) != need:
            return None
        values = np.frombuffer(bytes(got), "<f4") if wdt == "float32" else None
        if finite and values is not None and not np.isfinite(values).all():
            return None
        out += got
    if pos != len(chunks):
        return None
    return bytes(out)


def _submit_oracle(
    raws: Sequence[bytes],
    specs: Sequence[TensorSpec],
    open_round: int,
    kind: int,
) -> bytes | None:
    """The update's bytes if ``raws`` are a well-formed upload by the fuzz party."""
    try:
        msgs = [aggregator_pb2.SubmitMessage.FromString(r) for r in raws]
    except DecodeError:
        return None
    if len(msgs) < 2 or msgs[0].WhichOneof("kind") != "header":
        return None
    h = msgs[0].header
    if (
        h.party_id != _FUZZ
        or h.round != open_round
        or h.num_samples != _DECLARED  # the count declared at Join (fixed)
        or h.update_kind != kind
        or math.isinf(h.train_loss)
    ):
        return None
    if msgs[-1].WhichOneof("kind") != "trailer":
        return None
    body = msgs[1:-1]
    if any(m.WhichOneof("kind") != "chunk" for m in body):
        return None
    data = _chunks_oracle([m.chunk for m in body], specs, "float32", finite=True)
    if data is None or _xxh(data) != msgs[-1].trailer.digest:
        return None
    return data


# -------------------------------------------------------------- pure decoders
_SPECS = (
    TensorSpec("w", "float32", (3, 5)),
    TensorSpec("empty", "float32", (0, 4)),
    TensorSpec("b", "float32", (5,)),
    TensorSpec("steps", "int64", (2,)),
    TensorSpec("mask", "bool", (3,)),
)
_NAMES = [s.name for s in _SPECS]

_dims = st.one_of(
    st.integers(0, 6), st.sampled_from(_HUGE_DIMS), st.integers(-_I64 - 1, _I64)
)
_shapes = st.one_of(
    st.sampled_from([list(s.shape) for s in _SPECS]),
    st.lists(_dims, max_size=4),
)


@st.composite
def _random_chunk(draw: st.DrawFn) -> tensor_pb2.TensorChunk:
    return tensor_pb2.TensorChunk(
        name=draw(st.sampled_from(_NAMES) | st.text(max_size=6)),
        dtype=draw(st.integers(0, 9) | st.integers(-(2**31), 2**31 - 1)),  # type: ignore[arg-type]
        shape=draw(_shapes),
        offset=draw(st.integers(0, 80) | st.integers(0, _U64)),
        data=draw(st.binary(max_size=80)),
        total_bytes=draw(st.integers(0, 96) | st.integers(0, _U64)),
    )


def _valid_chunks(wire_dtype: str, chunk_bytes: int) -> list[tensor_pb2.TensorChunk]:
    rng = np.random.default_rng(0)
    arrays = []
    for s in _SPECS:
        if s.dtype == "float32":
            arrays.append((s.name, rng.standard_normal(s.shape).astype(np.float32)))
        elif s.dtype == "bool":
            arrays.append((s.name, rng.integers(0, 2, s.shape).astype(bool)))
        else:
            arrays.append((s.name, rng.integers(-9, 9, s.shape).astype(s.dtype)))
    return bundle_chunks(arrays, chunk_bytes=chunk_bytes, wire_dtype=wire_dtype)


_FIELDS = ("name", "dtype", "shape", "offset", "total_bytes", "data")


@st.composite
def _mutated_chunks(
    draw: st.DrawFn, chunks: list[tensor_pb2.TensorChunk]
) -> list[tensor_pb2.TensorChunk]:
    out = [tensor_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "dup", "swap", "insert", "field", "flip"]))
        if not out:
            out.append(draw(_random_chunk()))
            continue
        i = draw(st.integers(0, len(out) - 1))
        j = draw(st.integers(0, len(out) - 1))
        if op == "drop":
            del out[i]
        elif op == "dup":
            out.insert(j, tensor_pb2.TensorChunk.FromString(out[i].SerializeToString()))
        elif op == "swap":
            out[i], out[j] = out[j], out[i]
        elif op == "insert":
            out.insert(i, draw(_random_chunk()))
        elif op == "flip" and out[i].data:
            data = bytearray(out[i].data)
            k = draw(st.integers(0, len(data) - 1))
            data[k] ^= 1 << draw(st.integers(0, 7))
            out[i].data = bytes(data)
        else:
            donor = draw(_random_chunk())
            name = draw(st.sampled_from(_FIELDS))
            if name == "shape":
                del out[i].shape[:]
                out[i].shape.extend(donor.shape)
            else:
                setattr(out[i], name, getattr(donor, name))
    return out


def _decode_all(
    chunks: Sequence[tensor_pb2.TensorChunk], digest: bytes | None, wire_dtype: str
) -> bool:
    """Feed every chunk and finish; True when accepted, False on a FedGrpcError."""
    dec = wire.BundleDecoder(
        _SPECS,
        wire_dtype=wire_dtype,
        limits=Limits(
            max_chunk_bytes=64, max_tensor_bytes=1 << 10, max_submission_bytes=1 << 12
        ),
        label="fuzz",
    )
    try:
        for c in chunks:
            idx, off, view = dec.feed(c)
            assert 0 <= idx < len(_SPECS)
            assert off >= 0 and off + view.size <= _SPECS[idx].numel
        dec.finish(digest)
    except FedGrpcError:
        return False
    return True


@settings(max_examples=_EXAMPLES * 2, deadline=5000, database=None)
@given(
    wire_dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    chunks=st.lists(_random_chunk(), max_size=6),
    with_digest=st.booleans(),
)
def test_bundle_decoder_random_chunks_raise_only_fedgrpc_errors(
    wire_dtype: str, chunks: list[tensor_pb2.TensorChunk], with_digest: bool
) -> None:
    digest = _xxh(b"".join(c.data for c in chunks))

    accepted = _decode_all(chunks, digest if with_digest else None, wire_dtype)

    assert accepted == (
        _chunks_oracle(chunks, _SPECS, wire_dtype, finite=False) is not None
    )


@settings(max_examples=_EXAMPLES * 2, deadline=5000, database=None)
@given(data=st.data())
def test_bundle_decoder_mutated_streams_accept_only_well_formed(
    data: st.DataObject,
) -> None:
    wire_dtype = data.draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    valid = _valid_chunks(wire_dtype, data.draw(st.sampled_from([2, 8, 24, 1 << 20])))
    chunks = data.draw(_mutated_chunks(valid))
    want = _xxh(b"".join(c.data for c in valid))

    accepted = _decode_all(chunks, want, wire_dtype)

    oracle = _chunks_oracle(chunks, _SPECS, wire_dtype, finite=False)
    assert accepted == (oracle is not None and _xxh(oracle) == want)


def _chunk(shape: list[int], data: bytes = b"") -> tensor_pb2.TensorChunk:
    return tensor_pb2.TensorChunk(
        name="t",
        dtype=tensor_pb2.FLOAT32,
        shape=shape,
        data=data,
        total_bytes=len(data),
    )


@settings(max_examples=_EXAMPLES * 2, deadline=5000, database=None)
@given(chunks=st.lists(_random_chunk(), min_size=1, max_size=4))
@example(chunks=[_chunk([2**31, 2**32])])  # int64 product wraps to -2**63
@example(chunks=[_chunk([2**32, 2**32])])  # wraps to 0 elements
@example(chunks=[_chunk([0, 2**62])])  # 0 elements, but no array has this shape
def test_bundle_decoder_declared_specs_raise_only_fedgrpc_errors(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    """A spec as a party gets it (first chunk's declaration) is checked, never trusted.

    The declared name, dtype and shape travel as a TensorSpec message and become the
    decoder's spec; the decoder must refuse what breaks the limits before allocating.
    """
    first = chunks[0]
    limits = Limits(max_chunk_bytes=64, max_tensor_bytes=1 << 10)
    try:
        spec = wire.spec_from_proto(
            tensor_pb2.TensorSpec(name=first.name, dtype=first.dtype, shape=first.shape)
        )
        dec = wire.BundleDecoder([spec], limits=limits)  # float16 stays float16
        for c in chunks:
            idx, off, view = dec.feed(c)
            assert idx == 0
            assert off >= 0 and off + view.size <= spec.numel
        dec.finish()
    except FedGrpcError:
        return
    assert tuple(first.shape) == spec.shape
    need = spec.numel * wire.itemsize(spec.dtype)
    assert dec.bytes_received == need <= limits.max_tensor_bytes


@settings(max_examples=_EXAMPLES * 2, deadline=5000, database=None)
@given(raw=st.binary(max_size=200))
def test_parse_random_bytes_as_submit_message(raw: bytes) -> None:
    try:
        msg = parse_message(aggregator_pb2.SubmitMessage, raw)
    except FedGrpcError as err:
        assert err.code == "INVALID_ARGUMENT"
        return
    # Parsed: every field reads back without surprises.
    msg.WhichOneof("kind")
    msg.SerializeToString()


# -------------------------------------------------------------- live servicer
def _identity(b: bytes) -> bytes:
    return b


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, err)  # what a channel raises is both an RpcError and a Call
    return call.code(), call.details() or ""


def _raw_call(channel: grpc.Channel, method: str, arg: Any) -> tuple[Any, bytes]:
    """Call ``method`` with raw bytes; return (status code, reply bytes or details)."""
    if method == "SubmitGradient":
        fn: Callable[..., bytes] = channel.stream_unary(
            _SERVICE + method,
            request_serializer=_identity,
            response_deserializer=_identity,
        )
    else:
        fn = channel.unary_unary(
            _SERVICE + method,
            request_serializer=_identity,
            response_deserializer=_identity,
        )
    t0 = time.monotonic()
    try:
        reply = fn(arg, timeout=_TIMEOUT_S)
    except grpc.RpcError as err:
        code, details = _status(err)
        assert time.monotonic() - t0 < _TIMEOUT_S + 1
        return code, details.encode()
    return grpc.StatusCode.OK, reply


def _started(make_server: MakeServer) -> tuple[Aggregator, grpc.Channel]:
    """A server with the fuzz and the honest party joined and round 0 open."""
    agg = make_server(rounds=3, round_timeout_s=600.0, join_timeout_s=600.0)
    channel = grpc.insecure_channel(f"localhost:{agg.port}")
    for party in (_FUZZ, _HONEST):
        req = aggregator_pb2.JoinRequest(party_id=party, num_samples=_DECLARED)
        code, _ = _raw_call(channel, "Join", req.SerializeToString())
        assert code == grpc.StatusCode.OK
    end = time.monotonic() + _TIMEOUT_S
    while agg.engine.status().state != RunState.TRAINING:
        assert time.monotonic() < end, "round 0 did not open"
        time.sleep(0.02)
    return agg, channel


def _valid_upload(agg: Aggregator, party: str, sid: str, seed: int) -> list[bytes]:
    specs = agg.engine.specs
    rng = np.random.default_rng(seed)
    arrays = [
        (s.name, (0.01 * rng.standard_normal(s.shape)).astype(np.float32))
        for s in specs
    ]
    chunks = bundle_chunks(arrays, chunk_bytes=1024)
    digest = _xxh(b"".join(c.data for c in chunks))
    msgs: list[Message] = [
        aggregator_pb2.SubmitMessage(
            header=aggregator_pb2.SubmitHeader(
                party_id=party,
                round=agg.engine.open_round,
                num_samples=_DECLARED,
                train_loss=0.5,
                update_kind=_kind(agg),  # type: ignore[arg-type]
                submission_id=sid,
            )
        ),
        *(aggregator_pb2.SubmitMessage(chunk=c) for c in chunks),
        aggregator_pb2.SubmitMessage(
            trailer=aggregator_pb2.SubmitTrailer(digest=digest)
        ),
    ]
    return [m.SerializeToString() for m in msgs]


def _kind(agg: Aggregator) -> int:
    return int(wire.update_kind_to_proto(agg.round_cfg.update_kind))


_HEADER_FIELDS = ("party_id", "round", "num_samples", "train_loss", "update_kind")


@st.composite
def _mutated_upload(draw: st.DrawFn, valid: list[bytes]) -> list[bytes]:
    """Drop, duplicate, swap, corrupt or rewrite messages of a valid upload."""
    out = list(valid)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(
            st.sampled_from(
                [
                    "drop",
                    "dup",
                    "swap",
                    "bytes",
                    "flip",
                    "cut",
                    "header",
                    "chunk",
                    "nan",
                ]
            )
        )
        if not out:
            out.append(draw(st.binary(max_size=40)))
            continue
        i = draw(st.integers(0, len(out) - 1))
        j = draw(st.integers(0, len(out) - 1))
        if op == "drop":
            del out[i]
        elif op == "dup":
            out.insert(j, out[i])
        elif op == "swap":
            out[i], out[j] = out[j], out[i]
        elif op == "bytes":
            out.insert(i, draw(st.binary(max_size=60)))
        elif op == "flip" and out[i]:
            raw = bytearray(out[i])
            k = draw(st.integers(0, len(raw) - 1))
            raw[k] ^= 1 << draw(st.integers(0, 7))
            out[i] = bytes(raw)
        elif op == "cut" and out[i]:
            out[i] = out[i][: draw(st.integers(0, len(out[i]) - 1))]
        else:
            out[i] = _rewrite(draw, out[i], op)
    if draw(st.booleans()):
        out = _fix_trailer(out)
    return out


def _rewrite(draw: st.DrawFn, raw: bytes, op: str) -> bytes:
    """Rewrite one field of a message that still parses (else leave it)."""
    try:
        msg = aggregator_pb2.SubmitMessage.FromString(raw)
    except DecodeError:
        return raw
    kind = msg.WhichOneof("kind")
    if kind == "header":
        field = draw(st.sampled_from(_HEADER_FIELDS))
        value: Any = {
            "party_id": st.sampled_from(["", "nobody", "../x", "é" * 70]),
            "round": st.integers(0, 2**32 - 1),
            "num_samples": st.integers(0, _U64),
            "train_loss": st.floats(allow_nan=True, allow_infinity=True),
            "update_kind": st.integers(-(2**31), 2**31 - 1),
        }[field]
        setattr(msg.header, field, draw(value))
    elif kind == "chunk" and op == "nan":
        data = bytearray(msg.chunk.data)
        if len(data) >= 4:
            k = draw(st.integers(0, len(data) // 4 - 1)) * 4
            bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            data[k : k + 4] = np.float32(bad).tobytes()
            msg.chunk.data = bytes(data)
    elif kind == "chunk":
        field = draw(st.sampled_from(_FIELDS))
        if field == "shape":
            del msg.chunk.shape[:]
            msg.chunk.shape.extend(
                draw(st.lists(st.sampled_from(_HUGE_DIMS), max_size=3))
            )
        else:
            donor = draw(_random_chunk())
            setattr(msg.chunk, field, getattr(donor, field))
        if draw(st.booleans()):
            msg.chunk.total_bytes = draw(st.sampled_from([_U64, 2**40, 2**33]))
    elif kind == "trailer":
        msg.trailer.digest = draw(st.binary(max_size=40))
    return msg.SerializeToString()


def _fix_trailer(raws: list[bytes]) -> list[bytes]:
    """Recompute a final trailer's digest, so that data edits reach the engine."""
    try:
        msgs = [aggregator_pb2.SubmitMessage.FromString(r) for r in raws]
    except DecodeError:
        return raws
    if not msgs or msgs[-1].WhichOneof("kind") != "trailer":
        return raws
    h = wire.stream_digest()
    for m in msgs[:-1]:
        if m.WhichOneof("kind") == "chunk":
            h.update(m.chunk.data)
    last = aggregator_pb2.SubmitMessage(
        trailer=aggregator_pb2.SubmitTrailer(digest=h.digest())
    )
    return [*raws[:-1], last.SerializeToString()]


def _accepted(code: Any, reply: bytes) -> bool:
    if code != grpc.StatusCode.OK:
        return False
    return bool(aggregator_pb2.SubmitReply.FromString(reply).accepted)


def test_live_submit_fuzz_rejects_garbage_and_keeps_serving(
    make_server: MakeServer,
) -> None:
    agg, channel = _started(make_server)
    specs, kind = agg.engine.specs, _kind(agg)
    valid = _valid_upload(agg, _FUZZ, _VALID_SID, seed=1)
    good_digests: set[str] = (
        set()
    )  # digests of well-formed fuzz uploads the server took

    def check(raws: list[bytes]) -> None:
        code, reply = _raw_call(channel, "SubmitGradient", iter(raws))

        event(f"status {code.name}")
        assert code == grpc.StatusCode.OK or code in _REJECT, (code, reply)
        oracle = _submit_oracle(raws, specs, 0, kind)
        if _accepted(code, reply):
            assert oracle is not None, "the server accepted a malformed upload"
            good_digests.add(_xxh(oracle).hex())
        elif oracle is not None:
            # Well formed, refused only because another update of ours already counts.
            assert code == grpc.StatusCode.ALREADY_EXISTS, (code, reply)

    @settings(max_examples=_EXAMPLES, deadline=None, database=None)
    @given(
        raws=_mutated_upload(valid)
        | st.lists(st.binary(max_size=120), max_size=6)
        | st.lists(st.sampled_from(valid) | st.binary(max_size=40), max_size=8)
    )
    def fuzz(raws: list[bytes]) -> None:
        check(raws)

    try:
        fuzz()

        # Nothing garbage counts: the fuzz party's update, if any, was well formed.
        status = agg.engine.status()
        assert status.open_round == 0
        accepted = status.submitted
        if _FUZZ in accepted:
            # The accepted update's digest is only on the open round (private).
            rnd = agg.engine._round
            assert rnd is not None
            assert rnd.accepted[_FUZZ].digest in good_digests
        else:
            assert not good_digests
        assert _HONEST not in accepted
        # The server still answers and still takes valid uploads.
        code, _ = _raw_call(channel, "GetStatus", b"")
        assert code == grpc.StatusCode.OK
        code, reply = _raw_call(channel, "SubmitGradient", iter(valid))
        if _FUZZ in accepted:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS), reply
        else:
            assert _accepted(code, reply), reply
        honest = _valid_upload(agg, _HONEST, "honest-1", seed=2)
        code, reply = _raw_call(channel, "SubmitGradient", iter(honest))
        assert _accepted(code, reply), (code, reply)
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Join", aggregator_pb2.JoinRequest),
        ("GetStatus", aggregator_pb2.StatusRequest),
        ("GetContributions", aggregator_pb2.ContributionsRequest),
    ],
)
def test_live_unary_random_bytes_are_invalid_argument(
    make_server: MakeServer, method: str, message: type[Message]
) -> None:
    agg, channel = _started(make_server)

    @settings(max_examples=_EXAMPLES, deadline=None, database=None)
    @given(
        raw=st.binary(min_size=1, max_size=120)
        | st.binary(min_size=1, max_size=8).map(lambda b: b"\xff" + b)
    )
    def fuzz(raw: bytes) -> None:
        code, reply = _raw_call(channel, method, raw)

        try:
            message.FromString(raw)
        except DecodeError:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, reply)
            assert b"malformed" in reply
            return
        # It parsed: a reply or a domain status, never UNKNOWN or INTERNAL.
        assert code == grpc.StatusCode.OK or code in _REJECT, (code, reply)

    try:
        fuzz()
        code, _ = _raw_call(channel, "GetStatus", b"")
        assert code == grpc.StatusCode.OK
        assert agg.engine.status().state == RunState.TRAINING
    finally:
        channel.close()
