"""Model versions encoded once and shared by every GetModel stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
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
    """Holds the latest encoded model and tells its watchers when it changes.

    Each version is encoded exactly once (``publish``); streams send those same bytes. A
    stream that fell behind gets the latest version, never a replay of history.
    Nothing here polls: :meth:`publish` and :meth:`finish` call every watcher
    (:meth:`watch`) once, on the publishing thread.
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
        self._lock = threading.Lock()
        self._latest: Version | None = None
        self._done: Version | None = None
        self._watchers: list[Callable[[], None]] = []

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
        with self._lock:
            self._latest = version
        self._notify()
        return version

    def finish(self, rounds_completed: int, reason: str) -> None:
        """Publish the final done message; streams end after sending it."""
        msg = wire.training_done_to_proto(
            TrainingDone(rounds_completed, reason)
        ).SerializeToString()
        with self._lock:
            self._done = Version(rounds_completed, (msg,), b"", done=True)
        self._notify()

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` after every publication (on the publishing thread)."""
        with self._lock:
            self._watchers.append(on_change)

    def _notify(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for fn in watchers:
            fn()

    @property
    def latest(self) -> Version | None:
        """The newest model version, if any."""
        return self._latest

    def current(self, from_round: int) -> Version | None:
        """The latest version with round >= ``from_round``, else the done message."""
        with self._lock:
            if self._latest is not None and self._latest.round >= from_round:
                return self._latest
            return self._done


class VersionWaiter:
    """Lets coroutines of one event loop sleep until the broadcaster changes.

    A stream waits on the event current when it looked; every publication replaces
    the event and sets the old one (from the loop, via ``call_soon_threadsafe``), so
    each waiter wakes exactly once per change and never on a timer. A cancelled
    waiter (its RPC ended) cancels only its own wait.
    """

    def __init__(self, broadcaster: ModelBroadcaster, loop: asyncio.AbstractEventLoop):
        self._broadcaster = broadcaster
        self._loop = loop
        self._event = asyncio.Event()
        broadcaster.watch(self.wake)

    def wake(self) -> None:
        """Wake every waiter (thread-safe): the version changed or the run stops."""
        self._loop.call_soon_threadsafe(self._changed)

    def _changed(self) -> None:
        old, self._event = self._event, asyncio.Event()
        old.set()

    async def next(
        self, from_round: int, stopping: Callable[[], bool]
    ) -> Version | None:
        """The next item for a stream that needs ``from_round``; None when stopping."""
        while True:
            event = self._event  # before looking: a change after this sets it
            item = self._broadcaster.current(from_round)
            if item is not None:
                return item
            if stopping():
                return None
            await event.wait()
