from __future__ import annotations

import inspect
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedgrpc import wire
from fedgrpc.config import Limits
from fedgrpc.errors import FedGrpcError, InvalidUpdateError, LimitError
from fedgrpc.proto import tensor_pb2
from fedgrpc.types import TensorSpec
from fedgrpc.wire import tensors
from tests.wirehelp import bundle_chunks, decode, tensor_chunks

# Three float32 tensors; with 16-byte chunks fc1.w takes 3 chunks, fc1.b 1, fc2.w 2.
SPECS = (
    TensorSpec("fc1.w", "float32", (4, 3)),
    TensorSpec("fc1.b", "float32", (3,)),
    TensorSpec("fc2.w", "float32", (2, 3)),
)
SMALL_CHUNK = 16

# Wire dtypes whose NumPy dtype has the same name (bfloat16 has no NumPy dtype).
NUMPY_WIRE_DTYPES = tuple(d for d in wire.dtype_names() if d != "bfloat16")
MULTIBYTE_DTYPES = ("float32", "float16", "float64", "int64", "int32")

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
CHUNK_SIZES = st.sampled_from([1, 3, 8, 16, 40, wire.CHUNK_BYTES])


def _xxh(data: bytes) -> bytes:
    h = wire.stream_digest()
    h.update(data)
    return bytes(h.digest())


def _le_bytes(arr: np.ndarray) -> bytes:
    """Little-endian C-order bytes of ``arr`` (the oracle for what travels)."""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.normal(size=s.shape).astype(np.float32) for s in SPECS}


def _stream(
    arrays: dict[str, np.ndarray], chunk_bytes: int = SMALL_CHUNK
) -> list[tensor_pb2.TensorChunk]:
    return bundle_chunks(arrays.items(), chunk_bytes=chunk_bytes)


def _wire_digest(chunks: Iterable[tensor_pb2.TensorChunk]) -> bytes:
    h = wire.stream_digest()
    for c in chunks:
        h.update(c.data)
    return h.digest()


def _decode_bundle(
    dec: wire.BundleDecoder,
    specs: Sequence[TensorSpec],
    chunks: Iterable[tensor_pb2.TensorChunk],
    digest: bytes | None = None,
) -> dict[str, np.ndarray]:
    """Feed every chunk, finish, and reassemble the tensors as their wire arrays."""
    parts: dict[int, np.ndarray] = {}
    for chunk in chunks:
        idx, elem_offset, view = dec.feed(chunk)
        if idx not in parts:
            parts[idx] = np.zeros(specs[idx].numel, dtype=view.dtype)
        parts[idx][elem_offset : elem_offset + view.size] = view
    dec.finish(digest)
    return {s.name: parts[i].reshape(s.shape) for i, s in enumerate(specs)}


def _chunk(tensor: str = "fc1.w", **fields: Any) -> tensor_pb2.TensorChunk:
    """A first chunk of a SPECS tensor, correct unless ``fields`` override it."""
    spec = next(s for s in SPECS if s.name == tensor)
    msg = tensor_pb2.TensorChunk(
        name=tensor,
        dtype=tensor_pb2.FLOAT32,
        shape=list(spec.shape),
        offset=0,
        data=bytes(SMALL_CHUNK),
        total_bytes=spec.numel * 4,
    )
    for key, value in fields.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return msg


def _bf16_oracle_bits(x: np.ndarray) -> list[int | None]:
    """float32 -> bfloat16, round to nearest even, per element; None for NaN."""
    out: list[int | None] = []
    for bits in np.ascontiguousarray(x, dtype="<f4").reshape(-1).view("<u4").tolist():
        exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        if exponent == 0xFF and mantissa:
            out.append(None)
            continue
        upper, lower = bits >> 16, bits & 0xFFFF
        if lower > 0x8000 or (lower == 0x8000 and upper & 1):
            upper += 1
        out.append(upper << 16)
    return out


# --------------------------------------------------------------------- round trips


def test_wire_dtype_names_are_the_contract() -> None:
    assert wire.dtype_names() == (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "uint8",
        "bool",
    )


@pytest.mark.parametrize("name", wire.dtype_names())
def test_wire_dtype_proto_round_trip(name: str) -> None:
    assert wire.dtype_from_proto(wire.dtype_to_proto(name)) == name


def test_wire_dtype_proto_unknown_refused() -> None:
    with pytest.raises(InvalidUpdateError, match="'complex64' cannot travel"):
        wire.dtype_to_proto("complex64")
    with pytest.raises(InvalidUpdateError, match="unknown wire dtype enum 99"):
        wire.dtype_from_proto(99)
    with pytest.raises(InvalidUpdateError, match="unknown wire dtype enum 0"):
        wire.dtype_from_proto(tensor_pb2.DTYPE_UNSPECIFIED)


@pytest.mark.parametrize("name", NUMPY_WIRE_DTYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), chunk_bytes=CHUNK_SIZES)
def test_wire_tensor_round_trip_every_dtype(
    name: str, data: st.DataObject, chunk_bytes: int
) -> None:
    arr = data.draw(hnp.arrays(np.dtype(name), SHAPES), label="arr")

    chunks = tensor_chunks("t", arr, chunk_bytes=chunk_bytes)
    out = decode(chunks)

    assert out.dtype == np.dtype(name)
    assert out.shape == arr.shape
    assert _le_bytes(out) == _le_bytes(arr)  # bit-exact, NaN payloads included


@pytest.mark.parametrize("name", NUMPY_WIRE_DTYPES)
def test_wire_tensor_zero_d_and_empty(name: str) -> None:
    scalar = np.array(7, dtype=name) if name != "bool" else np.array(True)
    empty = np.zeros((0, 3), dtype=name)

    s_chunks = tensor_chunks("s", scalar)
    e_chunks = tensor_chunks("e", empty)

    assert len(s_chunks) == 1
    assert list(s_chunks[0].shape) == []
    assert s_chunks[0].total_bytes == np.dtype(name).itemsize
    s_out = decode(s_chunks)
    assert s_out.shape == ()
    assert s_out.dtype == np.dtype(name)
    assert s_out == scalar
    assert len(e_chunks) == 1
    assert e_chunks[0].total_bytes == 0
    assert e_chunks[0].data == b""
    assert list(e_chunks[0].shape) == [0, 3]
    e_out = decode(e_chunks)
    assert e_out.shape == (0, 3)
    assert e_out.dtype == np.dtype(name)


@pytest.mark.parametrize("name", MULTIBYTE_DTYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), chunk_bytes=CHUNK_SIZES)
def test_wire_big_endian_input_round_trips_to_same_values(
    name: str, data: st.DataObject, chunk_bytes: int
) -> None:
    big = np.dtype(name).newbyteorder(">")
    arr = data.draw(hnp.arrays(big, SHAPES), label="arr")

    chunks = tensor_chunks("t", arr, chunk_bytes=chunk_bytes)
    out = decode(chunks)

    assert out.dtype == np.dtype(name).newbyteorder("<")
    assert out.shape == arr.shape
    assert b"".join(c.data for c in chunks) == _le_bytes(arr)
    np.testing.assert_array_equal(out, arr)  # NaN == NaN here


def test_wire_big_endian_bytes_on_the_wire_are_little_endian() -> None:
    arr = np.array([1, 2], dtype=">i4")

    (chunk,) = tensor_chunks("t", arr)

    assert chunk.data == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_wire_non_contiguous_input_is_sent_in_c_order() -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran-ordered view

    out = decode(tensor_chunks("t", arr, chunk_bytes=8))

    np.testing.assert_array_equal(out, arr)


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(np.uint32, SHAPES, elements=st.integers(0, 2**32 - 1)).map(
        lambda a: a.view(np.float32)
    ),
    chunk_bytes=CHUNK_SIZES,
)
def test_wire_bfloat16_round_trip_follows_round_to_nearest_even(
    arr: np.ndarray, chunk_bytes: int
) -> None:
    chunks = tensor_chunks("t", arr, chunk_bytes=chunk_bytes, wire_dtype="bfloat16")
    out = decode(chunks)

    assert chunks[0].dtype == tensor_pb2.BFLOAT16
    assert chunks[0].total_bytes == 2 * arr.size
    assert out.dtype == np.float32
    assert out.shape == arr.shape
    got = out.reshape(-1).view("<u4").tolist()
    for i, (want, bits) in enumerate(zip(_bf16_oracle_bits(arr), got, strict=True)):
        if want is None:
            assert np.isnan(out.reshape(-1)[i]), f"element {i}: NaN must stay NaN"
        else:
            assert bits == want, f"element {i}: {bits:#010x} != {want:#010x}"


def test_wire_bfloat16_relative_error_is_at_most_half_an_ulp() -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=1000) * 10.0 ** rng.integers(-30, 30, size=1000)).astype(
        np.float32
    )

    out = decode(tensor_chunks("t", arr, wire_dtype="bfloat16"))

    np.testing.assert_allclose(out, arr, rtol=2.0**-8, atol=0)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (1.0, 1.0),
        (1.0 + 2**-8, 1.0),  # tie: round to even (down)
        (1.0 + 3 * 2**-8, 1.0 + 2**-6),  # tie: round to even (up)
        (1.0 + 2**-8 + 2**-20, 1.0 + 2**-7),  # above the tie
        (float(np.finfo(np.float32).max), np.inf),  # overflows bfloat16
        (-np.inf, -np.inf),
        (-0.0, -0.0),
    ],
)
def test_wire_bfloat16_rounding_examples(value: float, want: float) -> None:
    arr = np.array([value], dtype=np.float32)

    out = decode(tensor_chunks("t", arr, wire_dtype="bfloat16"))

    assert out[0] == np.float32(want)
    assert np.signbit(out[0]) == np.signbit(np.float32(want))


def test_wire_float16_wire_dtype_converts_float32() -> None:
    arr = np.array([0.1, 6e4, -3.0], dtype=np.float32)

    chunks = tensor_chunks("t", arr, wire_dtype="float16")
    out = decode(chunks)

    assert chunks[0].dtype == tensor_pb2.FLOAT16
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, arr.astype(np.float16))


def test_wire_wire_dtype_leaves_non_float32_tensors_alone() -> None:
    arrays = {"i": np.arange(3, dtype=np.int64), "d": np.array([0.1, 0.2])}

    chunks = bundle_chunks(arrays.items(), wire_dtype="bfloat16")

    assert [c.dtype for c in chunks] == [tensor_pb2.INT64, tensor_pb2.FLOAT64]


@pytest.mark.parametrize(
    "arr",
    [
        np.array([1, None, "x"], dtype=object),
        np.array([{"a": 1}], dtype=object),
        np.zeros(2, dtype=np.complex64),
        np.zeros(2, dtype=np.uint16),
        np.zeros(2, dtype=np.int8),
        np.array(["ab"]),
        np.zeros(2, dtype="datetime64[s]"),
    ],
    ids=["object", "object-dict", "complex64", "uint16", "int8", "str", "datetime"],
)
def test_wire_unsupported_dtype_refused(arr: np.ndarray) -> None:
    with pytest.raises(InvalidUpdateError, match="cannot travel on the wire"):
        tensor_chunks("t", arr)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), chunk_bytes=CHUNK_SIZES)
def test_wire_chunks_are_contiguous_and_bounded(
    data: st.DataObject, chunk_bytes: int
) -> None:
    name = data.draw(st.sampled_from(NUMPY_WIRE_DTYPES), label="dtype")
    arr = data.draw(hnp.arrays(np.dtype(name), SHAPES), label="arr")
    size = np.dtype(name).itemsize
    step = max(size, chunk_bytes - chunk_bytes % size)

    chunks = tensor_chunks("t", arr, chunk_bytes=chunk_bytes)

    assert len(chunks) == max(1, -(-arr.nbytes // step))
    assert [c.offset for c in chunks] == [i * step for i in range(len(chunks))]
    assert all(len(c.data) <= step and len(c.data) % size == 0 for c in chunks)
    assert all(c.name == "t" for c in chunks)
    assert chunks[0].total_bytes == arr.nbytes
    assert list(chunks[0].shape) == list(arr.shape)
    # dtype, shape and total travel on the first chunk only
    assert all(not c.dtype and not c.shape and not c.total_bytes for c in chunks[1:])


@settings(max_examples=30, deadline=None)
@given(data=st.data(), chunk_bytes=CHUNK_SIZES)
def test_wire_bundle_decoder_round_trip_every_dtype(
    data: st.DataObject, chunk_bytes: int
) -> None:
    arrays = {
        f"t.{name}": data.draw(hnp.arrays(np.dtype(name), SHAPES), label=name)
        for name in NUMPY_WIRE_DTYPES
    }
    specs = [TensorSpec(k, str(a.dtype), a.shape) for k, a in arrays.items()]
    chunks = _stream(arrays, chunk_bytes)
    dec = wire.BundleDecoder(specs)

    out = _decode_bundle(dec, specs, chunks, _wire_digest(chunks))

    for name, arr in arrays.items():
        assert out[name].shape == arr.shape
        assert _le_bytes(out[name].astype(arr.dtype)) == _le_bytes(arr)
    assert dec.bytes_received == sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_wire_bundle_decoder_float_wire_dtypes(wire_dtype: str) -> None:
    rng = np.random.default_rng(1)
    arrays = _model(rng)
    arrays["steps"] = np.array(5, dtype=np.int64)
    specs = [*SPECS, TensorSpec("steps", "int64", ())]
    chunks = bundle_chunks(arrays.items(), chunk_bytes=10, wire_dtype=wire_dtype)
    dec = wire.BundleDecoder(specs, wire_dtype=wire_dtype)

    raw = _decode_bundle(dec, specs, chunks, _wire_digest(chunks))

    for s in SPECS:
        got = wire.from_wire_array(raw[s.name], dec.wire_dtype_of(s), "float32")
        want = wire.from_wire_array(
            wire.to_wire_array(arrays[s.name], wire_dtype),
            dec.wire_dtype_of(s),
            "float32",
        )
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.reshape(s.shape))
        np.testing.assert_allclose(got, arrays[s.name], rtol=2**-7, atol=1e-6)
    assert raw["steps"] == 5


def test_wire_bundle_decoder_views_are_read_only() -> None:
    arrays = _model(np.random.default_rng(2))
    dec = wire.BundleDecoder(SPECS)

    _, _, view = dec.feed(_stream(arrays)[0])

    assert not view.flags.writeable


def test_wire_bundle_decoder_finish_returns_hex_digest() -> None:
    chunks = _stream(_model(np.random.default_rng(3)))
    dec = wire.BundleDecoder(SPECS)

    _decode_bundle(dec, SPECS, chunks)

    assert dec.finish() == _wire_digest(chunks).hex()


# ------------------------------------------------------------- decoder rejections


def _feed(dec: wire.BundleDecoder, chunks: Iterable[tensor_pb2.TensorChunk]) -> None:
    for c in chunks:
        dec.feed(c)


@pytest.fixture
def chunks() -> list[tensor_pb2.TensorChunk]:
    stream = _stream(_model(np.random.default_rng(4)))
    assert [(c.name, c.offset, len(c.data)) for c in stream] == [
        ("fc1.w", 0, 16),
        ("fc1.w", 16, 16),
        ("fc1.w", 32, 16),
        ("fc1.b", 0, 12),
        ("fc2.w", 0, 16),
        ("fc2.w", 16, 8),
    ]
    return stream


def test_wire_decoder_truncated_tensor_at_finish(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS, label="party p3, round 4")
    _feed(dec, chunks[:-1])

    with pytest.raises(
        InvalidUpdateError,
        match=r"^party p3, round 4: tensor 'fc2\.w' truncated: got 16 of 24 bytes$",
    ):
        dec.finish()


def test_wire_decoder_truncated_tensor_before_next(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks[:2])

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' truncated: 32 of 48 bytes before tensor 'fc1\.b' began",
    ):
        dec.feed(chunks[3])


def test_wire_decoder_missing_tensor(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks[:4])

    with pytest.raises(
        InvalidUpdateError,
        match=r"missing tensor 'fc2\.w': update ended after 2 of 3 tensors",
    ):
        dec.finish()


def test_wire_decoder_no_chunks_at_all() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(InvalidUpdateError, match=r"missing tensor 'fc1\.w'.* 0 of 3"):
        dec.finish()


def test_wire_decoder_unknown_tensor_name() -> None:
    dec = wire.BundleDecoder(SPECS, label="party p1, round 0")

    with pytest.raises(
        InvalidUpdateError,
        match=r"^party p1, round 0: unknown tensor 'fc3\.w'; expected 'fc1\.w'$",
    ):
        dec.feed(_chunk("fc1.w", name="fc3.w"))


def test_wire_decoder_wrong_dtype() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError, match=r"tensor 'fc1\.w' has dtype float64; expected float32"
    ):
        dec.feed(_chunk(dtype=tensor_pb2.FLOAT64, total_bytes=96, data=bytes(16)))


def test_wire_decoder_unset_dtype() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError, match=r"tensor 'fc1\.w' has dtype <unset>; expected float32"
    ):
        dec.feed(_chunk(dtype=tensor_pb2.DTYPE_UNSPECIFIED))


def test_wire_decoder_float32_sent_for_bfloat16_wire() -> None:
    dec = wire.BundleDecoder(SPECS, wire_dtype="bfloat16")

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' has dtype float32; expected bfloat16",
    ):
        dec.feed(_chunk())


def test_wire_decoder_unknown_dtype_enum_names_tensor() -> None:
    dec = wire.BundleDecoder(SPECS, label="party p1, round 0")

    with pytest.raises(
        InvalidUpdateError, match=r"^party p1, round 0: .*tensor 'fc1\.w'.*float32"
    ):
        dec.feed(_chunk(dtype=99))


def test_wire_decoder_wrong_shape() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' has shape \[3, 4\]; expected \[4, 3\]",
    ):
        dec.feed(_chunk(shape=[3, 4]))


def test_wire_decoder_declared_total_bytes_mismatch() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' declares 40 bytes; shape \[4, 3\] float32 needs 48",
    ):
        dec.feed(_chunk(total_bytes=40))


def test_wire_decoder_chunk_overlap(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)
    dec.feed(chunks[0])
    bad = tensor_pb2.TensorChunk()
    bad.CopyFrom(chunks[1])
    bad.offset = 8

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' at offset 8 overlaps; expected offset 16",
    ):
        dec.feed(bad)


def test_wire_decoder_first_chunk_resent_overlaps(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)
    dec.feed(chunks[0])

    with pytest.raises(
        InvalidUpdateError, match=r"offset 0 overlaps; expected offset 16"
    ):
        dec.feed(chunks[0])


def test_wire_decoder_chunk_gap(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)
    dec.feed(chunks[0])

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' at offset 32 leaves a gap; expected offset 16",
    ):
        dec.feed(chunks[2])


def test_wire_decoder_out_of_order_tensor(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.b' arrived out of order; expected 'fc1\.w'",
    ):
        dec.feed(chunks[3])


def test_wire_decoder_skipped_tensor_is_out_of_order(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks[:3])

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc2\.w' arrived out of order; expected 'fc1\.b'",
    ):
        dec.feed(chunks[4])


def test_wire_decoder_earlier_tensor_again_is_out_of_order(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks[:4])

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' arrived out of order; expected 'fc2\.w'",
    ):
        dec.feed(chunks[0])


def test_wire_decoder_continuation_without_first_chunk(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"chunk of tensor 'fc1\.w' at offset 16 arrived out of order; "
        r"expected the first chunk of 'fc1\.w'",
    ):
        dec.feed(chunks[1])


def test_wire_decoder_chunk_not_multiple_of_itemsize() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' has 6 bytes, not a multiple of 4 \(float32\)",
    ):
        dec.feed(_chunk(data=bytes(6)))


def test_wire_decoder_overflow_beyond_total() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc1\.w' overflows: 52 bytes > 48 expected for shape \[4, 3\]",
    ):
        dec.feed(_chunk(data=bytes(52)))


def test_wire_decoder_overflow_on_later_chunk(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks[:2])
    big = tensor_pb2.TensorChunk(name="fc1.w", offset=32, data=bytes(20))

    with pytest.raises(InvalidUpdateError, match=r"'fc1\.w' overflows: 52 bytes > 48"):
        dec.feed(big)


def test_wire_decoder_chunk_above_max_chunk_bytes() -> None:
    dec = wire.BundleDecoder(SPECS, limits=Limits(max_chunk_bytes=8))

    with pytest.raises(
        LimitError, match=r"chunk of tensor 'fc1\.w' has 16 bytes; limit is 8"
    ):
        dec.feed(_chunk())


def test_wire_decoder_tensor_above_max_tensor_bytes_before_allocation() -> None:
    # 4 TiB declared: a decoder that allocated first would die before raising.
    huge = TensorSpec("huge", "float32", (1 << 20, 1 << 20))
    dec = wire.BundleDecoder([huge], label="party p2, round 1")
    first = tensor_pb2.TensorChunk(
        name="huge",
        dtype=tensor_pb2.FLOAT32,
        shape=[1 << 20, 1 << 20],
        data=bytes(16),
        total_bytes=1 << 42,
    )

    with pytest.raises(
        LimitError,
        match=r"^party p2, round 1: tensor 'huge' has 4398046511104 bytes; "
        r"limit is 8589934592$",
    ):
        dec.feed(first)


def test_wire_decoder_total_above_max_total_bytes_before_allocation() -> None:
    # "b" declares 1 GiB: under the tensor limit, over the update limit.
    specs = [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (1 << 28,))]
    dec = wire.BundleDecoder(specs, limits=Limits(max_submission_bytes=1 << 20))
    dec.feed(
        tensor_pb2.TensorChunk(
            name="a", dtype=tensor_pb2.FLOAT32, shape=[2], data=bytes(8), total_bytes=8
        )
    )

    with pytest.raises(LimitError, match=r"update exceeds 1048576 bytes at tensor 'b'"):
        dec.feed(
            tensor_pb2.TensorChunk(
                name="b",
                dtype=tensor_pb2.FLOAT32,
                shape=[1 << 28],
                data=bytes(16),
                total_bytes=1 << 30,
            )
        )


def test_wire_decoder_total_counts_received_bytes(
    chunks: list[tensor_pb2.TensorChunk],
) -> None:
    dec = wire.BundleDecoder(SPECS, limits=Limits(max_submission_bytes=60))
    _feed(dec, chunks[:4])  # 48 + 12 = 60 bytes: at the limit, still fine

    with pytest.raises(LimitError, match=r"update exceeds 60 bytes at tensor 'fc2\.w'"):
        dec.feed(chunks[4])


def test_wire_decoder_digest_mismatch(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS, label="party p3, round 4")
    _feed(dec, chunks)

    with pytest.raises(
        InvalidUpdateError,
        match=r"^party p3, round 4: digest mismatch: "
        r"trailer says 0000000000000000\.\.\., "
        rf"data hashes to {_wire_digest(chunks).hex()[:16]}\.\.\.$",
    ):
        dec.finish(bytes(32))


def test_wire_decoder_digest_match(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)
    _feed(dec, chunks)

    assert dec.finish(_wire_digest(chunks)) == _wire_digest(chunks).hex()


def test_wire_decoder_empty_first_chunk_for_non_empty_tensor() -> None:
    dec = wire.BundleDecoder(SPECS)

    with pytest.raises(InvalidUpdateError, match=r"empty chunk for tensor 'fc1\.w'"):
        dec.feed(_chunk(data=b""))


def test_wire_decoder_empty_later_chunk(chunks: list[tensor_pb2.TensorChunk]) -> None:
    dec = wire.BundleDecoder(SPECS)
    dec.feed(chunks[0])

    with pytest.raises(InvalidUpdateError, match=r"empty chunk for tensor 'fc1\.w'"):
        dec.feed(tensor_pb2.TensorChunk(name="fc1.w", offset=16, data=b""))


def test_wire_decoder_zero_size_tensor_sent_twice() -> None:
    specs = [TensorSpec("empty", "float32", (0, 3)), TensorSpec("b", "float32", (1,))]
    (first,) = tensor_chunks("empty", np.zeros((0, 3), np.float32))
    dec = wire.BundleDecoder(specs)
    dec.feed(first)

    with pytest.raises(
        InvalidUpdateError, match=r"tensor 'empty' has no bytes but was sent twice"
    ):
        dec.feed(first)


def test_wire_decoder_zero_size_tensor_then_next() -> None:
    arrays = {"empty": np.zeros((0, 3), np.float32), "b": np.ones(1, np.float32)}
    specs = [TensorSpec(k, "float32", a.shape) for k, a in arrays.items()]
    chunks = _stream(arrays)

    out = _decode_bundle(wire.BundleDecoder(specs), specs, chunks, _wire_digest(chunks))

    assert out["empty"].shape == (0, 3)
    np.testing.assert_array_equal(out["b"], [1.0])


def test_wire_decoder_accepts_tensor_over_2_gib_without_allocating() -> None:
    spec = TensorSpec("big", "uint8", (3 << 30,))
    dec = wire.BundleDecoder([spec])
    first = tensor_pb2.TensorChunk(
        name="big",
        dtype=tensor_pb2.UINT8,
        shape=[3 << 30],
        data=bytes(1 << 20),
        total_bytes=3 << 30,
    )

    tracemalloc.start()
    try:
        dec.feed(first)
        dec.feed(
            tensor_pb2.TensorChunk(name="big", offset=1 << 20, data=bytes(1 << 20))
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert dec.bytes_received == 2 << 20
    assert peak < 16 << 20
    with pytest.raises(InvalidUpdateError, match=r"got 2097152 of 3221225472 bytes"):
        dec.finish()


@pytest.mark.parametrize("shape", [[1 << 32, 1 << 32], [3, 1 << 62]])
def test_wire_decoder_size_that_wraps_to_zero_refused(shape: list[int]) -> None:
    # Both sizes are 0 modulo 2**64: a decoder with wrapping integer arithmetic would
    # take the empty chunk as the whole tensor.
    dec = wire.BundleDecoder([TensorSpec("huge", "float32", tuple(shape))])
    first = tensor_pb2.TensorChunk(
        name="huge", dtype=tensor_pb2.FLOAT32, shape=shape, data=b"", total_bytes=0
    )

    with pytest.raises((LimitError, InvalidUpdateError), match="'huge'"):
        dec.feed(first)


def test_wire_decode_with_spec_checks_it() -> None:
    chunks = tensor_chunks("t", np.zeros((2, 2), np.float32))

    with pytest.raises(InvalidUpdateError, match=r"expected \[4\]"):
        decode(chunks, TensorSpec("t", "float32", (4,)))


def test_wire_spec_proto_round_trip() -> None:
    spec = TensorSpec("conv.w", "float16", (8, 1, 3, 3))

    assert wire.spec_from_proto(wire.spec_to_proto(spec)) == spec


def test_wire_spec_from_proto_negative_dimension() -> None:
    msg = tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.FLOAT32, shape=[2, -3])

    with pytest.raises(
        InvalidUpdateError, match=r"tensor 'x' has a negative dimension"
    ):
        wire.spec_from_proto(msg)


# --------------------------------------------------------------- mutated streams

_INDEX = st.integers(0, 63)
_MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), _INDEX),
        st.tuples(st.just("dup"), _INDEX, _INDEX),
        st.tuples(st.just("swap"), _INDEX, _INDEX),
        st.tuples(st.just("flip"), _INDEX, st.integers(0, 63), st.integers(1, 255)),
        st.tuples(st.just("offset"), _INDEX, st.integers(0, 80)),
        st.tuples(st.just("trim"), _INDEX, st.integers(1, 7)),
        st.tuples(st.just("extend"), _INDEX, st.integers(1, 8)),
        st.tuples(st.just("rename"), _INDEX, st.sampled_from(["fc1.w", "fc1.b", "zz"])),
        st.tuples(st.just("dtype"), _INDEX, st.integers(0, 9)),
        st.tuples(st.just("shape"), _INDEX, st.lists(st.integers(0, 5), max_size=3)),
        st.tuples(st.just("total"), _INDEX, st.integers(0, 100)),
    ),
    max_size=4,
)


def _mutate(
    chunks: list[tensor_pb2.TensorChunk], ops: Sequence[tuple[Any, ...]]
) -> list[tensor_pb2.TensorChunk]:
    out = []
    for c in chunks:
        copy = tensor_pb2.TensorChunk()
        copy.CopyFrom(c)
        out.append(copy)
    for op, i, *args in ops:
        if not out:
            break
        i %= len(out)
        c = out[i]
        if op == "drop":
            del out[i]
        elif op == "dup":
            dup = tensor_pb2.TensorChunk()
            dup.CopyFrom(c)
            out.insert(args[0] % (len(out) + 1), dup)
        elif op == "swap":
            j = args[0] % len(out)
            out[i], out[j] = out[j], out[i]
        elif op == "flip" and c.data:
            data = bytearray(c.data)
            data[args[0] % len(data)] ^= args[1]
            c.data = bytes(data)
        elif op == "offset":
            c.offset = args[0]
        elif op == "trim":
            c.data = c.data[: -args[0]]
        elif op == "extend":
            c.data = c.data + bytes(args[0])
        elif op == "rename":
            c.name = args[0]
        elif op == "dtype":
            c.dtype = args[0]
        elif op == "shape":
            del c.shape[:]
            c.shape.extend(args[0])
        elif op == "total":
            c.total_bytes = args[0]
    return out


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    chunk_bytes=st.sampled_from([4, 8, 16, 20]),
    ops=_MUTATIONS,
    check_digest=st.booleans(),
)
def test_wire_mutated_stream_decodes_exactly_or_raises(
    seed: int, chunk_bytes: int, ops: list[tuple[Any, ...]], check_digest: bool
) -> None:
    arrays = _model(np.random.default_rng(seed))
    original = _stream(arrays, chunk_bytes)
    digest = _wire_digest(original)
    mutated = _mutate(original, ops)
    note(f"mutated: {[(c.name, c.offset, len(c.data)) for c in mutated]}")

    try:
        out = _decode_bundle(
            wire.BundleDecoder(SPECS), SPECS, mutated, digest if check_digest else None
        )
    except FedGrpcError:
        return  # refused: fine (any other exception fails the test)

    if check_digest:
        for name, arr in arrays.items():
            assert _le_bytes(out[name]) == _le_bytes(arr), name


# --------------------------------------------------------------------- FlatLayout

LAYOUT_SPECS = (
    TensorSpec("w", "float32", (3, 4)),
    TensorSpec("scalar", "float32", ()),
    TensorSpec("empty", "float32", (0, 2)),
    TensorSpec("b", "float32", (4,)),
)


def test_wire_flat_layout_offsets_and_size() -> None:
    layout = wire.FlatLayout.of(LAYOUT_SPECS)

    assert layout.offsets == (0, 12, 13, 13)
    assert layout.size == 17
    assert layout.specs == LAYOUT_SPECS


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_wire_flat_layout_flatten_views_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layout = wire.FlatLayout.of(LAYOUT_SPECS)
    arrays = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in LAYOUT_SPECS}

    flat = layout.flatten(arrays)
    views = layout.views(flat)

    assert flat.dtype == np.float32
    assert flat.shape == (17,)
    assert list(views) == [s.name for s in LAYOUT_SPECS]
    for name, arr in arrays.items():
        np.testing.assert_array_equal(views[name], arr)
    assert [n for n, _ in layout.iter_arrays(flat)] == list(views)
    np.testing.assert_array_equal(layout.flatten(views), flat)


def test_wire_flat_layout_views_share_memory() -> None:
    layout = wire.FlatLayout.of(LAYOUT_SPECS)
    flat = np.zeros(layout.size, dtype=np.float32)

    views = layout.views(flat)
    views["b"][2] = 5.0

    assert flat[13 + 2] == 5.0
    assert np.shares_memory(views["w"], flat)


def test_wire_flat_layout_flatten_into_out() -> None:
    layout = wire.FlatLayout.of(SPECS)
    arrays = _model(np.random.default_rng(5))
    out = np.full(layout.size, np.nan, dtype=np.float32)

    flat = layout.flatten(arrays, out=out)

    assert flat is out
    assert not np.isnan(out).any()


def test_wire_flat_layout_missing_tensor() -> None:
    layout = wire.FlatLayout.of(SPECS)
    arrays = _model(np.random.default_rng(6))
    del arrays["fc1.b"]

    with pytest.raises(InvalidUpdateError, match=r"missing tensor 'fc1\.b'"):
        layout.flatten(arrays)


def test_wire_flat_layout_wrong_shape() -> None:
    layout = wire.FlatLayout.of(SPECS)
    arrays = _model(np.random.default_rng(7))
    arrays["fc2.w"] = arrays["fc2.w"].T

    with pytest.raises(
        InvalidUpdateError,
        match=r"tensor 'fc2\.w' has shape \[3, 2\]; expected \[2, 3\]",
    ):
        layout.flatten(arrays)


def test_wire_flat_layout_unexpected_tensor() -> None:
    layout = wire.FlatLayout.of(SPECS)
    arrays = _model(np.random.default_rng(8))
    arrays["extra"] = np.zeros(1, np.float32)

    with pytest.raises(InvalidUpdateError, match=r"unexpected tensors \['extra'\]"):
        layout.flatten(arrays)


# ---------------------------------------------------------------------- laziness


def test_wire_bundle_messages_are_lazy() -> None:
    arr = np.zeros(16 << 20, dtype=np.float32)  # 64 MiB

    tracemalloc.start()
    try:
        bundle = wire.prepare_bundle([("big", arr)])  # a view of arr, not a copy
        gen = bundle.messages(1 << 20)
        is_generator = inspect.isgenerator(gen)
        first = wire.parse_chunk_message(next(gen))
        assert first is not None
        count, total = 1, len(first.data)
        for raw in gen:
            chunk = wire.parse_chunk_message(raw)
            assert chunk is not None
            count += 1
            total += len(chunk.data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert is_generator
    assert len(first.data) == 1 << 20
    assert first.total_bytes == 64 << 20
    assert bundle.total_bytes == 64 << 20
    assert count == 64
    assert total == 64 << 20
    assert peak < 8 << 20  # a few chunks at a time, never all 64 MiB of them


def _special_float32() -> np.ndarray:
    rng = np.random.default_rng(11)
    edge = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            1e-45,
            -1e-40,
            6e-8,
            65504.0,
            65520.0,
            7e4,
            3.4e38,
            1.00390625,
            1.01171875,
            -2.5e-5,
        ],
        dtype=np.float32,
    )
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(4096, dtype=np.float32)
    return np.concatenate([edge, bits.view(np.float32), normal])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_wire_torch_and_numpy_casts_agree_bit_for_bit(
    wire_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parties cast with torch (loaded there), the aggregator with NumPy: same bytes."""
    import torch  # noqa: F401 - the parties' fast path needs it loaded

    x = _special_float32()
    assert tensors._loaded_torch() is not None
    fast = wire.to_wire_array(x, wire_dtype)
    out_fast = wire.from_wire_array(fast, wire_dtype, "float32", out=np.empty_like(x))
    monkeypatch.setattr(tensors, "_loaded_torch", lambda: None)
    slow = wire.to_wire_array(x, wire_dtype)
    out_slow = wire.from_wire_array(slow, wire_dtype, "float32", out=np.empty_like(x))
    assert fast.dtype == slow.dtype
    nan = np.isnan(x)
    assert nan.sum() > 10  # random bit patterns: some NaNs, signalling ones too
    # Every non-NaN bit pattern is identical; NaNs stay NaN (torch quiets signalling
    # NaNs, NumPy keeps their bits; the aggregator refuses NaN either way).
    assert fast[~nan].tobytes() == slow[~nan].tobytes()
    assert out_fast[~nan].tobytes() == out_slow[~nan].tobytes()
    assert np.isnan(out_fast[nan]).all() and np.isnan(out_slow[nan]).all()
    np.testing.assert_array_equal(
        out_slow, wire.from_wire_array(slow, wire_dtype, "float32")
    )


def test_wire_from_wire_array_out_is_checked() -> None:
    raw = np.zeros(4, dtype="<f2")
    with pytest.raises(ValueError, match="same size"):
        wire.from_wire_array(raw, "float16", "float32", out=np.empty(3, np.float32))
    with pytest.raises(ValueError, match="float32"):
        wire.from_wire_array(raw, "float16", "float32", out=np.empty(4, np.float64))


def test_wire_float16_widening_without_torch_is_exact_for_every_bit_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    halves = np.arange(1 << 16, dtype=np.uint32).astype("<u2").view("<f2")
    want = halves.astype(np.float32)
    monkeypatch.setattr(tensors, "_loaded_torch", lambda: None)  # the aggregator's path
    got = wire.from_wire_array(halves, "float16", "float32", out=np.empty_like(want))
    nan = np.isnan(want)
    assert got[~nan].tobytes() == want[~nan].tobytes()  # +-0, subnormals, inf
    assert np.isnan(got[nan]).all()
    assert np.array_equal(np.signbit(got[nan]), np.signbit(want[nan]))
