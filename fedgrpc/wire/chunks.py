"""Tensor bundles in chunks: encode once, decode and check every chunk (DESIGN §2).

Large tensors are split into ``TensorChunk`` messages of at most ``CHUNK_BYTES``; the
first chunk of a tensor carries its dtype, shape and total bytes. :class:`WireBundle`
converts a set of tensors to wire form once (with their digest) and frames the chunk
messages straight from the array buffers. :class:`BundleDecoder` is the one decoder,
used by the aggregator for uploads and by parties for models: it checks every declared
size against the expected spec and the configured limits *before* anything is
allocated, and hands out zero-copy element views.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fedgrpc.config import Limits
from fedgrpc.errors import InvalidUpdateError, LimitError
from fedgrpc.layout import stream_digest
from fedgrpc.proto import tensor_pb2
from fedgrpc.types import TensorSpec
from fedgrpc.wire.framing import RawChunk, encode_chunk_message
from fedgrpc.wire.tensors import (
    FROM_PROTO,
    STORAGE,
    dtype_name_of,
    dtype_to_proto,
    from_wire_array,
    itemsize,
    to_wire_array,
)

CHUNK_BYTES = 1 << 20
"""Default chunk payload (bytes); 1 MiB measured best here (DESIGN §9)."""

MAX_TENSOR_NAME_CHARS = 256
"""Longest tensor name a decoder accepts (a name must match the model's anyway)."""


def _chunk_heads(
    name: str, dname: str, shape: tuple[int, ...], wire: np.ndarray, chunk_bytes: int
) -> Iterator[tuple[tensor_pb2.TensorChunk, memoryview]]:
    """(chunk fields without data, the data's slice of the buffer) for one tensor."""
    size = itemsize(dname)
    step = max(size, chunk_bytes - chunk_bytes % size)
    buf = wire.reshape(-1).view(np.uint8).data
    total = len(buf)
    offset = 0
    while True:
        end = min(total, offset + step)
        head = tensor_pb2.TensorChunk(name=name, offset=offset)
        if offset == 0:
            head.dtype = dtype_to_proto(dname)
            head.shape.extend(int(d) for d in shape)
            head.total_bytes = total
        yield head, buf[offset:end]
        offset = end
        if offset >= total:
            return


def _wire_name(arr: np.ndarray, wire: np.ndarray) -> str:
    return "bfloat16" if wire.dtype == np.dtype("<u2") else dtype_name_of(wire)


@dataclass(frozen=True)
class WireBundle:
    """Tensors converted to their wire form once, with the digest of their bytes.

    Lets a sender hash first (the trailer or header needs the digest) and chunk later
    without converting or copying the tensors twice.
    """

    tensors: tuple[tuple[str, str, tuple[int, ...], np.ndarray], ...]
    digest: bytes  # XXH3-128 of every tensor's wire bytes, in order
    total_bytes: int

    def messages(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """Serialized chunk messages (``SubmitMessage``/``ModelMessage`` chunks).

        Each is built straight from the array buffer with a single copy.
        """
        for name, dname, shape, wire in self.tensors:
            for head, data in _chunk_heads(name, dname, shape, wire, chunk_bytes):
                yield encode_chunk_message(head, data)


def prepare_bundle(
    arrays: Iterable[tuple[str, np.ndarray]], wire_dtype: str | None = None
) -> WireBundle:
    """Convert tensors to wire form (views where possible) and digest their bytes."""
    h = stream_digest()
    tensors = []
    total = 0
    for name, arr in arrays:
        wire = to_wire_array(arr, wire_dtype)
        raw = wire.reshape(-1).view(np.uint8)
        h.update(raw.data)
        total += raw.size
        tensors.append((name, _wire_name(arr, wire), tuple(arr.shape), wire))
    return WireBundle(tuple(tensors), h.digest(), total)


class BundleDecoder:
    """Validates a stream of chunks against the expected specs and yields element views.

    Tensors must arrive in spec order, each as contiguous chunks in increasing offset
    with no gap or overlap; the first chunk of a tensor declares dtype, shape and total
    bytes, which must match the spec (float tensors in ``wire_dtype``). A running
    XXH3-128 digest covers every data byte in arrival order.

    Args:
        specs: expected tensors, in order.
        wire_dtype: dtype of float tensors on the wire (float32, float16 or bfloat16).
        limits: size limits.
        label: prefix for error messages, e.g. ``"party p3, round 4"``.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        *,
        wire_dtype: str = "float32",
        limits: Limits | None = None,
        label: str = "",
    ) -> None:
        self._specs = list(specs)
        self._index = {s.name: i for i, s in enumerate(self._specs)}
        self._wire_dtype = wire_dtype
        self._limits = limits or Limits()
        self._label = f"{label}: " if label else ""
        self._current = -1  # index of the tensor being received
        self._received = 0  # bytes of the current tensor received
        self._expected_bytes = 0
        self._total = 0
        self._hash = stream_digest()
        self._scratch = np.empty(0, dtype=np.float32)

    def wire_dtype_of(self, spec: TensorSpec) -> str:
        """Dtype in which ``spec``'s bytes travel."""
        if spec.dtype == "float32":
            return self._wire_dtype
        return spec.dtype

    def widen(
        self, index: int, raw: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """A fed chunk's elements as float32: into ``out``, or a view/reused buffer.

        Without ``out``, float32 chunks come back as the zero-copy view itself and
        float16/bfloat16 chunks are widened into one buffer reused for every chunk
        (valid until the next call).
        """
        wdt = self.wire_dtype_of(self._specs[index])
        if out is None:
            if wdt == "float32":
                return raw
            if self._scratch.size < raw.size:
                self._scratch = np.empty(raw.size, dtype=np.float32)
            out = self._scratch[: raw.size]
        return from_wire_array(raw, wdt, "float32", out=out)

    @property
    def bytes_received(self) -> int:
        """Data bytes accepted so far."""
        return self._total

    def _err(self, text: str) -> InvalidUpdateError:
        return InvalidUpdateError(self._label + text)

    def feed(
        self, chunk: tensor_pb2.TensorChunk | RawChunk
    ) -> tuple[int, int, np.ndarray]:
        """Check one chunk; return (tensor index, element offset, wire-dtype view)."""
        data = chunk.data  # read once: upb returns a new bytes object on every access
        name = chunk.name
        if len(name) > MAX_TENSOR_NAME_CHARS:  # never echo it: it may be huge
            raise self._err(
                f"tensor name has {len(name)} characters; the limit is "
                f"{MAX_TENSOR_NAME_CHARS}"
            )
        if len(data) > self._limits.max_chunk_bytes:
            raise LimitError(
                f"{self._label}chunk of tensor {name!r} has {len(data)} bytes; "
                f"limit is {self._limits.max_chunk_bytes}"
            )
        idx = self._index.get(name)
        if idx is None:
            expected = self._next_name()
            raise self._err(f"unknown tensor {name!r}; expected {expected!r}")
        if chunk.offset == 0 and idx != self._current:
            self._start_tensor(idx, chunk)
        elif idx != self._current:
            raise self._err(
                f"chunk of tensor {name!r} at offset {chunk.offset} arrived out of "
                f"order; expected the first chunk of {self._next_name()!r}"
            )
        elif not self._expected_bytes:
            raise self._err(f"tensor {name!r} has no bytes but was sent twice")
        spec = self._specs[idx]
        if chunk.offset != self._received:
            kind = "overlaps" if chunk.offset < self._received else "leaves a gap"
            raise self._err(
                f"chunk of tensor {name!r} at offset {chunk.offset} {kind}; "
                f"expected offset {self._received}"
            )
        wdt = self.wire_dtype_of(spec)
        size = itemsize(wdt)
        if len(data) % size:
            raise self._err(
                f"chunk of tensor {name!r} has {len(data)} bytes, not a multiple of "
                f"{size} ({wdt})"
            )
        if self._received + len(data) > self._expected_bytes:
            raise self._err(
                f"tensor {name!r} overflows: {self._received + len(data)} bytes > "
                f"{self._expected_bytes} expected for shape {list(spec.shape)} {wdt}"
            )
        if not data and self._expected_bytes:
            raise self._err(f"empty chunk for tensor {name!r}")
        self._hash.update(data)
        self._received += len(data)
        self._total += len(data)
        view = np.frombuffer(data, dtype=STORAGE[wdt])
        return idx, chunk.offset // size, view

    def _next_name(self) -> str:
        if self._current >= 0 and self._received < self._expected_bytes:
            return self._specs[self._current].name
        nxt = self._current + 1
        return self._specs[nxt].name if nxt < len(self._specs) else "<end of update>"

    def _start_tensor(self, idx: int, chunk: tensor_pb2.TensorChunk | RawChunk) -> None:
        spec = self._specs[idx]
        if self._current >= 0 and self._received < self._expected_bytes:
            prev = self._specs[self._current]
            raise self._err(
                f"tensor {prev.name!r} truncated: {self._received} of "
                f"{self._expected_bytes} bytes before tensor {spec.name!r} began"
            )
        if idx != self._current + 1:
            raise self._err(
                f"tensor {spec.name!r} arrived out of order; expected "
                f"{self._next_name()!r}"
            )
        wdt = self.wire_dtype_of(spec)
        got_dtype = FROM_PROTO.get(chunk.dtype, f"<unknown enum {chunk.dtype}>")
        if not chunk.dtype:
            got_dtype = "<unset>"
        if got_dtype != wdt:
            raise self._err(
                f"tensor {spec.name!r} has dtype {got_dtype}; expected {wdt}"
            )
        shape = tuple(int(d) for d in chunk.shape)
        if shape != spec.shape:
            raise self._err(
                f"tensor {spec.name!r} has shape {list(shape)}; expected "
                f"{list(spec.shape)}"
            )
        expected = spec.numel * itemsize(wdt)
        if chunk.total_bytes != expected:
            raise self._err(
                f"tensor {spec.name!r} declares {chunk.total_bytes} bytes; shape "
                f"{list(spec.shape)} {wdt} needs {expected}"
            )
        if expected > self._limits.max_tensor_bytes:
            raise LimitError(
                f"{self._label}tensor {spec.name!r} has {expected} bytes; limit is "
                f"{self._limits.max_tensor_bytes}"
            )
        if self._total + expected > self._limits.max_submission_bytes:
            raise LimitError(
                f"{self._label}update exceeds {self._limits.max_submission_bytes} "
                f"bytes at tensor {spec.name!r}"
            )
        self._current = idx
        self._received = 0
        self._expected_bytes = expected

    def finish(self, digest: bytes | None = None) -> str:
        """Check every tensor arrived whole; compare the digest; return it as hex."""
        if self._current >= 0 and self._received < self._expected_bytes:
            spec = self._specs[self._current]
            raise self._err(
                f"tensor {spec.name!r} truncated: got {self._received} of "
                f"{self._expected_bytes} bytes"
            )
        if self._current < len(self._specs) - 1:
            missing = self._specs[self._current + 1].name
            raise self._err(
                f"missing tensor {missing!r}: update ended after "
                f"{self._current + 1} of {len(self._specs)} tensors"
            )
        got = self._hash.digest()
        if digest is not None and digest != got:
            raise self._err(
                f"digest mismatch: trailer says {digest.hex()[:16]}..., data hashes to "
                f"{got.hex()[:16]}..."
            )
        return got.hex()
