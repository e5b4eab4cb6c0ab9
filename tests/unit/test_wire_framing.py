"""Hand-framed chunk messages are ordinary protobuf; the fast parser agrees."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgrpc import wire
from fedgrpc.proto import aggregator_pb2, tensor_pb2


def _reference_chunks(
    bundle: wire.WireBundle, chunk_bytes: int
) -> list[tensor_pb2.TensorChunk]:
    """The bundle's chunks built with the generated classes (the reference).

    Each tensor's wire bytes in slices of ``chunk_bytes`` rounded down to whole
    elements (at least one); dtype, shape and total bytes on the first chunk only.
    """
    out = []
    for name, dname, shape, arr in bundle.tensors:
        data = arr.reshape(-1).view(np.uint8).tobytes()
        size = wire.itemsize(dname)
        step = max(size, chunk_bytes - chunk_bytes % size)
        offset = 0
        while True:
            chunk = tensor_pb2.TensorChunk(
                name=name, offset=offset, data=data[offset : offset + step]
            )
            if offset == 0:
                chunk.dtype = wire.dtype_to_proto(dname)
                chunk.shape.extend(shape)
                chunk.total_bytes = len(data)
            out.append(chunk)
            offset += step
            if offset >= len(data):
                break
    return out


def _fields(chunk: tensor_pb2.TensorChunk | wire.RawChunk) -> tuple[object, ...]:
    return (
        chunk.name,
        chunk.dtype,
        tuple(chunk.shape),
        chunk.offset,
        chunk.total_bytes,
        bytes(chunk.data),
    )


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 7), max_size=3),
    chunk_bytes=st.integers(1, 64),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_wire_framed_messages_equal_generated_serialization(
    shape: list[int], chunk_bytes: int, dtype: str
) -> None:
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    bundle = wire.prepare_bundle([("t.weight", arr)], dtype)

    framed = list(bundle.messages(chunk_bytes))
    reference = _reference_chunks(bundle, chunk_bytes)

    assert len(framed) == len(reference)
    for raw, ref in zip(framed, reference, strict=True):
        parsed = aggregator_pb2.SubmitMessage.FromString(raw)
        assert parsed.WhichOneof("kind") == "chunk"
        assert _fields(parsed.chunk) == _fields(ref)
        model = aggregator_pb2.ModelMessage.FromString(raw)
        assert _fields(model.chunk) == _fields(ref)
        fast = wire.parse_chunk_message(raw)
        assert fast is not None
        assert _fields(fast) == _fields(ref)
        generated = aggregator_pb2.SubmitMessage(chunk=ref).SerializeToString()
        fast_generated = wire.parse_chunk_message(generated)
        assert fast_generated is not None
        assert _fields(fast_generated) == _fields(ref)


def test_wire_fast_parser_declines_non_canonical_messages() -> None:
    head = tensor_pb2.TensorChunk(
        name="w", offset=0, dtype=tensor_pb2.FLOAT32, shape=[2], total_bytes=8
    )
    good = wire.encode_chunk_message(head, memoryview(bytes(8)))
    duplicated = good[:1] + bytes([good[1] + 2]) + good[2:] + b"\x10\x01"  # dtype x2
    unknown = good[:1] + bytes([good[1] + 2]) + good[2:] + b"\x38\x01"  # field 7
    header = aggregator_pb2.SubmitMessage(
        header=aggregator_pb2.SubmitHeader(party_id="p")
    ).SerializeToString()

    assert wire.parse_chunk_message(good) is not None
    for raw in (duplicated, unknown, header, b"", b"\x12", b"\x12\x05ab"):
        assert wire.parse_chunk_message(raw) is None
    # The generated parser still reads the declined-but-valid ones.
    assert aggregator_pb2.SubmitMessage.FromString(duplicated).chunk.dtype == 1
    assert aggregator_pb2.SubmitMessage.FromString(unknown).chunk.name == "w"


def test_wire_fast_parser_data_is_a_view_not_a_copy() -> None:
    head = tensor_pb2.TensorChunk(name="w", offset=0)
    raw = wire.encode_chunk_message(head, memoryview(b"\x01\x02\x03\x04"))

    fast = wire.parse_chunk_message(raw)

    assert fast is not None
    assert fast.data.obj is raw
    assert bytes(fast.data) == b"\x01\x02\x03\x04"
