"""Model versions encoded once and shared by every GetModel stream."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from fedgrpc import wire
from fedgrpc.types import ModelHeader, TrainingDone


@dataclass(frozen=True)
class Version:
    """One published item: a model version (header, chunks, end) or the done message."""

    round: int
    messages: tuple[bytes, ...]  # serialized ModelMessage, sent as-is to every stream
    digest: bytes
    done: bool = False


class ModelBroadcaster:
    """Holds the latest encoded model; GetModel streams wait on it.

    Each version is encoded exactly once (``publish``); streams send those same bytes. A
    stream that fell behind gets the latest version, never a replay of history.
    """

    def __init__(
        self,
        layout: wire.FlatLayout,
        *,
        wire_dtype: str = "float32",
        chunk_bytes: int = wire.CHUNK_BYTES,
    ) -> None:
        self._layout = layout
        self._wire_dtype = wire_dtype
        self._chunk_bytes = chunk_bytes
        self._cond = threading.Condition()
        self._latest: Version | None = None
        self._done: Version | None = None

    def publish(self, round_index: int, flat: np.ndarray) -> Version:
        """Encode ``flat`` as the model of ``round_index`` and wake every stream."""
        bundle = wire.prepare_bundle(self._layout.iter_arrays(flat), self._wire_dtype)
        body = list(bundle.messages(self._chunk_bytes))
        digest, total = bundle.digest, bundle.total_bytes
        header = wire.model_header_to_proto(
            ModelHeader(round_index, digest, total, self._wire_dtype)
        ).SerializeToString()
        end = wire.model_end_to_proto(digest).SerializeToString()
        version = Version(round_index, (header, *body, end), digest)
        with self._cond:
            self._latest = version
            self._cond.notify_all()
        return version

    def finish(self, rounds_completed: int, reason: str) -> None:
        """Publish the final done message; streams end after sending it."""
        msg = wire.training_done_to_proto(
            TrainingDone(rounds_completed, reason)
        ).SerializeToString()
        with self._cond:
            self._done = Version(rounds_completed, (msg,), b"", done=True)
            self._cond.notify_all()

    @property
    def latest(self) -> Version | None:
        """The newest model version, if any."""
        return self._latest

    def wait_next(self, from_round: int, timeout_s: float) -> Version | None:
        """The latest version with round >= ``from_round``, the done message or None."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: (
                    self._done is not None
                    or (self._latest is not None and self._latest.round >= from_round)
                ),
                timeout=timeout_s,
            )
            if not ready:
                return None
            if self._latest is not None and self._latest.round >= from_round:
                return self._latest
            return self._done
