"""Where each tensor of a model lives in one flat float32 vector (no grpc, no proto)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from fedgrpc.errors import InvalidUpdateError
from fedgrpc.types import TensorSpec


@dataclass
class FlatLayout:
    """Where each float tensor of a model lives in one flat float32 vector."""

    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]  # element offset of each tensor in the flat vector
    size: int  # total elements

    @classmethod
    def of(cls, specs: Sequence[TensorSpec]) -> FlatLayout:
        """Layout of ``specs`` in order."""
        offsets = []
        pos = 0
        for s in specs:
            offsets.append(pos)
            pos += s.numel
        return cls(tuple(specs), tuple(offsets), pos)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named reshaped views into ``flat`` (no copies)."""
        return {
            s.name: flat[o : o + s.numel].reshape(s.shape)
            for s, o in zip(self.specs, self.offsets, strict=True)
        }

    def flatten(
        self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Copy named arrays into one flat float32 vector (checked against the spec)."""
        flat = np.empty(self.size, dtype=np.float32) if out is None else out
        for s, o in zip(self.specs, self.offsets, strict=True):
            a = arrays.get(s.name)
            if a is None:
                raise InvalidUpdateError(f"missing tensor {s.name!r}")
            if tuple(a.shape) != s.shape:
                raise InvalidUpdateError(
                    f"tensor {s.name!r} has shape {list(a.shape)}; expected "
                    f"{list(s.shape)}"
                )
            flat[o : o + s.numel] = np.asarray(a).reshape(-1)
        extra = set(arrays) - {s.name for s in self.specs}
        if extra:
            raise InvalidUpdateError(f"unexpected tensors {sorted(extra)}")
        return flat

    def iter_arrays(self, flat: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(name, view) pairs in spec order."""
        yield from self.views(flat).items()


def stream_digest() -> xxhash.xxh3_128:
    """A new incremental digest of wire bytes: XXH3-128.

    Integrity against truncation, reordering and corruption (authenticity comes from
    TLS); ~45 GB/s here against SHA-256's 1.6 GB/s, which would otherwise cost more CPU
    than the transport itself.
    """
    return xxhash.xxh3_128()


def update_digest(flat: np.ndarray) -> str:
    """Hex wire digest of a float32 update's raw bytes (what a float32 upload sends)."""
    h = stream_digest()
    h.update(np.ascontiguousarray(flat, dtype="<f4").data.cast("B"))
    return h.hexdigest()
