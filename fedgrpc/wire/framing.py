"""Protobuf framing of the bulk path, written and parsed by hand (DESIGN §9).

Chunk messages are built straight from the array buffer with one copy, and parsed
into zero-copy views. The bytes are ordinary protobuf (any protobuf library reads and
writes them); anything the fast parser does not recognise goes to the generated
parser, which stays the reference. :func:`read_messages` is the one loop that turns a
stream of serialized messages (an upload, or a model stream) into typed parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from fedgrpc.errors import InvalidUpdateError
from fedgrpc.proto import tensor_pb2

M = TypeVar("M", bound=Message)

_CHUNK_FIELD = 2  # SubmitMessage.chunk and ModelMessage.chunk
_DATA_TAG = b"\x2a"  # TensorChunk.data: field 5, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < end and shift < 70:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_chunk_message(chunk_head: tensor_pb2.TensorChunk, data: memoryview) -> bytes:
    """Serialized ``{Submit,Model}Message{chunk: head + data}``, one copy of data.

    ``chunk_head`` carries every TensorChunk field but ``data``; protobuf lets fields
    come in any order, so ``data`` is appended after them.
    """
    head = chunk_head.SerializeToString()
    data_len = _varint(len(data))
    inner = len(head) + 1 + len(data_len) + len(data)
    return b"".join(
        (
            bytes((_CHUNK_FIELD << 3 | 2,)),
            _varint(inner),
            head,
            _DATA_TAG,
            data_len,
            data,
        )
    )


@dataclass(frozen=True)
class RawChunk:
    """A TensorChunk parsed without copying its data (``data`` is a memoryview)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: memoryview


def parse_chunk_message(raw: bytes) -> RawChunk | None:
    """Parse a canonical chunk message without copying; None when not canonical.

    Canonical: exactly one ``chunk`` field spanning the message, each TensorChunk
    field at most once, ``shape`` packed, no unknown fields. Anything else returns None
    and the caller uses the generated parser (identical results for valid input).
    """
    end = len(raw)
    if end < 2 or raw[0] != (_CHUNK_FIELD << 3 | 2):
        return None
    try:
        inner_len, pos = _read_varint(raw, 1, end)
        if pos + inner_len != end:
            return None
        name = ""
        dtype = offset = total = 0
        shape: tuple[int, ...] = ()
        data = memoryview(b"")
        seen: set[int] = set()
        view = memoryview(raw)
        while pos < end:
            key, pos = _read_varint(raw, pos, end)
            field, wtype = key >> 3, key & 7
            if field in seen or field < 1 or field > 6:
                return None
            seen.add(field)
            if wtype == 0 and field in (2, 4, 6):
                value, pos = _read_varint(raw, pos, end)
                if field == 2:
                    dtype = value
                elif field == 4:
                    offset = value
                else:
                    total = value
            elif wtype == 2 and field in (1, 3, 5):
                n, pos = _read_varint(raw, pos, end)
                if pos + n > end:
                    return None
                if field == 1:
                    name = bytes(view[pos : pos + n]).decode("utf-8")
                elif field == 3:
                    dims = []
                    p = pos
                    while p < pos + n:
                        d, p = _read_varint(raw, p, pos + n)
                        dims.append(d - (1 << 64) if d >= 1 << 63 else d)
                    if p != pos + n:
                        return None
                    shape = tuple(dims)
                else:
                    data = view[pos : pos + n]
                pos += n
            else:
                return None
        return RawChunk(name, dtype, shape, offset, total, data)
    except (ValueError, UnicodeDecodeError):
        return None


def parse_message(cls: type[M], raw: bytes) -> M:
    """Parse a message; malformed bytes are INVALID_ARGUMENT, not INTERNAL."""
    try:
        return cls.FromString(raw)
    except DecodeError as err:
        raise InvalidUpdateError(f"malformed {cls.__name__} message: {err}") from None


def read_messages(
    raw: Iterable[bytes], cls: type[Message]
) -> Iterator[tuple[str, Any]]:
    """(kind, payload) of each ``SubmitMessage`` or ``ModelMessage`` in ``raw``.

    ``kind`` is the name of the message's ``kind`` oneof field ("" when unset);
    chunks come as :class:`RawChunk` views without a copy of their data when
    canonical, else as the generated ``TensorChunk``.
    """
    for data in raw:
        fast = parse_chunk_message(data)
        if fast is not None:
            yield "chunk", fast
            continue
        msg = parse_message(cls, data)
        which = msg.WhichOneof("kind")
        yield (which or "", getattr(msg, which) if which else None)
