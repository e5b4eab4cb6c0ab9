"""Admission at the gRPC edge: caps on concurrent calls, and a watchdog (DESIGN §5).

Every RPC handler holds a worker thread while it runs, and a stream can last as long
as its sender likes. So that no caller (or crowd of callers) can take every thread:

- the server admits at most ``stream_cap`` long-lived streams (GetModel,
  SubmitGradient) and ``max_concurrent_unary`` unary calls at once; the thread pool
  is larger than both together, so the health service and the rejections themselves
  always find a thread;
- each identity (an authenticated party or admin, else the payload's party id, else
  the connection) holds at most ``max_streams_per_party`` streams and
  ``max_unary_per_identity`` unary calls of each method at once;
- a :class:`Watchdog` cancels streams that overstay: an upload whose header does not
  arrive in time, or one the engine discarded while its sender went quiet.

Rejections are RESOURCE_EXHAUSTED, raised before any message of the call is read.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedgrpc.config import Limits
from fedgrpc.errors import LimitError

log = logging.getLogger(__name__)

STREAMING = ("GetModel", "SubmitGradient")
"""RPCs whose calls last as long as their sender (or the run) wants."""

HEADROOM_THREADS = 16
"""Worker threads beyond both caps: health checks, reflection and rejections."""


def pool_size(limits: Limits) -> int:
    """Worker threads the gRPC server needs so that the caps, not it, bound calls."""
    return limits.stream_cap + limits.max_concurrent_unary + HEADROOM_THREADS


class CallGuard:
    """Counts calls in progress, server-wide and per identity, and refuses excess."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._total = {"stream": 0, "unary": 0}
        self._per: dict[tuple[str, str], int] = {}

    def _caps(self, method: str) -> tuple[str, int, int]:
        if method in STREAMING:
            return (
                "stream",
                self._limits.stream_cap,
                self._limits.max_streams_per_party,
            )
        return (
            "unary",
            self._limits.max_concurrent_unary,
            self._limits.max_unary_per_identity,
        )

    @contextmanager
    def admit(self, method: str) -> Iterator[None]:
        """Hold one of the server's call slots for ``method`` while the body runs."""
        kind, cap, _ = self._caps(method)
        with self._lock:
            if self._total[kind] >= cap:
                raise LimitError(
                    f"{method}: the aggregator already serves {self._total[kind]} "
                    f"{kind} calls (limit {cap}); try again later"
                )
            self._total[kind] += 1
        try:
            yield
        finally:
            with self._lock:
                self._total[kind] -= 1

    @contextmanager
    def per_identity(
        self, who: str, method: str, label: str = "", *, scale: int = 1
    ) -> Iterator[None]:
        """Hold one of ``who``'s calls of ``method`` while the body runs.

        Args:
            who: the caller's key (party id, admin name or connection).
            method: the RPC.
            label: how to name the caller in the refusal (default ``who``).
            scale: multiplies the cap (a connection may carry several parties).
        """
        _, _, cap = self._caps(method)
        cap *= scale
        key = (who, method)
        with self._lock:
            held = self._per.get(key, 0)
            if held >= cap:
                what = "uploads" if method == "SubmitGradient" else f"{method} calls"
                raise LimitError(
                    f"{label or who}: {held} {what} already open; limit is {cap}"
                )
            self._per[key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._per[key] - 1
                if left:
                    self._per[key] = left
                else:
                    del self._per[key]

    def open_calls(self) -> dict[str, int]:
        """Calls in progress by kind (``stream``, ``unary``)."""
        with self._lock:
            return dict(self._total)


class Watchdog:
    """Runs callbacks at deadlines on one daemon thread (cancellable handles)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def after(self, delay_s: float, fn: Callable[[], None]) -> int:
        """Call ``fn`` in ``delay_s`` seconds unless :meth:`cancel` is called first."""
        with self._cond:
            handle = next(self._seq)
            heapq.heappush(self._heap, (self._clock() + delay_s, handle, fn))
            self._live.add(handle)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="rpc-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
            return handle

    def cancel(self, handle: int) -> None:
        """Forget ``handle``'s callback (a no-op once it ran)."""
        with self._cond:
            self._live.discard(handle)

    def stop(self) -> None:
        """End the thread; pending callbacks never run."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                    not self._heap or self._heap[0][0] > self._clock()
                ):
                    wait = self._heap[0][0] - self._clock() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, handle, fn = heapq.heappop(self._heap)
                if handle not in self._live:
                    continue
                self._live.discard(handle)
            try:
                fn()
            except Exception:
                log.exception("watchdog callback failed")
