"""Admission at the gRPC edge: caps on concurrent calls (DESIGN §5).

RPCs are coroutines on one event loop (server.servicer), so an open stream holds no
thread, but it still holds memory and a place in the server's bookkeeping, and a
stream can last as long as its sender likes. So that no caller (or crowd of callers)
can take the server:

- the server admits at most ``stream_cap`` long-lived streams (GetModel,
  SubmitGradient) and ``max_concurrent_unary`` unary calls at once;
- each identity (an authenticated party or admin, else the payload's party id, else
  the connection) holds at most ``max_streams_per_party`` streams and
  ``max_unary_per_identity`` unary calls of each method at once;
- streams that overstay are cancelled by timers on the loop: an upload whose header
  does not arrive in time, or one the engine discarded while its sender went quiet.

Rejections are RESOURCE_EXHAUSTED, raised before any message of the call is read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedgrpc.config import Limits
from fedgrpc.errors import LimitError

log = logging.getLogger(__name__)

STREAMING = ("GetModel", "SubmitGradient")
"""RPCs whose calls last as long as their sender (or the run) wants."""

HEADROOM_THREADS = 4
"""Blocking-call threads beyond the caps that bound those calls."""


def pool_size(limits: Limits) -> int:
    """Threads for the engine calls that may block, so the caps, not it, bound them.

    Every unary call may block on the ledger (a Join's fsync, a contributions
    query) and every upload in a slot ends with the fold; streams waiting for a
    model or a slot hold no thread. Threads start lazily.
    """
    return limits.max_concurrent_unary + limits.max_inflight_uploads + HEADROOM_THREADS


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
