"""Chunk messages for tests, built and read by the production wire code.

The package streams bundles as serialized messages (``WireBundle.messages``) and reads
them with ``BundleDecoder``; tests that poke at single ``TensorChunk`` messages get
them from the same bytes through the generated parser.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedgrpc import wire
from fedgrpc.config import Limits
from fedgrpc.errors import InvalidUpdateError
from fedgrpc.proto import aggregator_pb2, tensor_pb2
from fedgrpc.types import TensorSpec


def bundle_chunks(
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    chunk_bytes: int = wire.CHUNK_BYTES,
    wire_dtype: str | None = None,
) -> list[tensor_pb2.TensorChunk]:
    """The chunk messages a sender streams for ``arrays``, tensor after tensor."""
    bundle = wire.prepare_bundle(arrays, wire_dtype)
    return [
        aggregator_pb2.SubmitMessage.FromString(m).chunk
        for m in bundle.messages(chunk_bytes)
    ]


def tensor_chunks(
    name: str,
    arr: np.ndarray,
    *,
    chunk_bytes: int = wire.CHUNK_BYTES,
    wire_dtype: str | None = None,
) -> list[tensor_pb2.TensorChunk]:
    """The chunk messages of one tensor."""
    return bundle_chunks([(name, arr)], chunk_bytes=chunk_bytes, wire_dtype=wire_dtype)


def decode(
    chunks: Iterable[tensor_pb2.TensorChunk],
    spec: TensorSpec | None = None,
    *,
    limits: Limits | None = None,
) -> np.ndarray:
    """Reassemble one tensor with ``BundleDecoder``; bfloat16 comes back as float32.

    Without ``spec`` the first chunk's declared name, dtype and shape are expected.
    """
    items = list(chunks)
    if not items:
        raise InvalidUpdateError("no chunks for tensor")
    first = items[0]
    if spec is None:
        spec = TensorSpec(
            first.name,
            wire.dtype_from_proto(first.dtype),
            tuple(int(d) for d in first.shape),
        )
    bf16 = spec.dtype == "bfloat16"  # no NumPy dtype: widened to float32
    dec = wire.BundleDecoder([spec], limits=limits)
    out = np.empty(spec.numel, dtype=np.float32 if bf16 else spec.dtype)
    for chunk in items:
        idx, off, raw = dec.feed(chunk)
        if bf16:
            dec.widen(idx, raw, out=out[off : off + raw.size])
        else:
            out[off : off + raw.size] = raw
    dec.finish()
    return out.reshape(spec.shape)
