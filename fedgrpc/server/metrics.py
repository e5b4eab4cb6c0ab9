"""Prometheus metrics of the aggregator (``fedgrpc serve --metrics-address``).

Exposed on their own HTTP port (text format, ``/metrics``) from a registry of this
run only. Recorded at the gRPC edge (submissions, bytes) and when a round is committed
(rounds, phase times); live values (parties, upload slots) are read at scrape time.

* ``fedgrpc_rounds_total{outcome}``: closed rounds, ``ok`` or ``failed``.
* ``fedgrpc_round_seconds``: round latency, open to close (histogram).
* ``fedgrpc_round_phase_seconds{phase}``: ``validation`` (the v_t pass),
  ``aggregate`` (the fold and step, DIG-FL scores included) (histogram).
* ``fedgrpc_submissions_total{outcome,reason}``: uploads ``accepted`` (an exact
  resend too) or ``refused`` with the gRPC status code as ``reason``.
* ``fedgrpc_bytes_received_total{rpc}``, ``fedgrpc_bytes_sent_total{rpc}``: message
  bytes of SubmitGradient (in) and GetModel (out).
* ``fedgrpc_upload_slots_in_use``, ``fedgrpc_upload_slots``: buffered uploads now and
  the limit.
* ``fedgrpc_parties_joined``, ``fedgrpc_parties_late``: parties now joined and
  the open round's late parties.
* ``fedgrpc_rounds_done``, ``fedgrpc_validation_loss``, ``fedgrpc_validation_accuracy``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from fedgrpc.errors import ConfigError
from fedgrpc.types import RoundResult, RunStatus

log = logging.getLogger(__name__)

_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The run's metrics; ``serve`` starts the HTTP endpoint with :meth:`listen`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter(
            "fedgrpc_rounds", "Closed rounds by outcome", ["outcome"], registry=r
        )
        self.round_s = Histogram(
            "fedgrpc_round_seconds",
            "Round latency, open to close (s)",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.phase_s = Histogram(
            "fedgrpc_round_phase_seconds",
            "Time of a round's phases (s): validation pass, aggregation and scoring",
            ["phase"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.submissions = Counter(
            "fedgrpc_submissions",
            "Uploads by outcome (accepted, refused) and refusal reason",
            ["outcome", "reason"],
            registry=r,
        )
        self.bytes_in = Counter(
            "fedgrpc_bytes_received", "Message bytes received", ["rpc"], registry=r
        )
        self.bytes_out = Counter(
            "fedgrpc_bytes_sent", "Message bytes sent", ["rpc"], registry=r
        )
        self.slots_in_use = Gauge(
            "fedgrpc_upload_slots_in_use", "Uploads holding a buffer now", registry=r
        )
        self.slots = Gauge(
            "fedgrpc_upload_slots", "Uploads that may hold a buffer", registry=r
        )
        self.joined = Gauge("fedgrpc_parties_joined", "Parties joined", registry=r)
        self.late = Gauge(
            "fedgrpc_parties_late", "The open round's late parties", registry=r
        )
        self.rounds_done = Gauge("fedgrpc_rounds_done", "Rounds completed", registry=r)
        self.val_loss = Gauge(
            "fedgrpc_validation_loss",
            "Validation loss after the last round",
            registry=r,
        )
        self.val_acc = Gauge(
            "fedgrpc_validation_accuracy",
            "Validation accuracy after the last round",
            registry=r,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ recording
    def round_closed(self, result: RoundResult) -> None:
        """Count a committed round and its phase times."""
        self.rounds.labels(outcome=result.outcome.value).inc()
        self.round_s.observe(result.duration_s)
        self.phase_s.labels(phase="validation").observe(result.val_grad_s)
        self.phase_s.labels(phase="aggregate").observe(result.aggregate_s)

    def watch(
        self, status: Callable[[], RunStatus], in_flight: Callable[[], int], slots: int
    ) -> None:
        """Read the live values from the engine at scrape time."""
        self.slots.set(slots)
        self.slots_in_use.set_function(lambda: float(in_flight()))
        self.joined.set_function(lambda: float(len(status().joined)))
        self.late.set_function(lambda: float(len(status().late)))
        self.rounds_done.set_function(lambda: float(status().rounds_done))
        self.val_loss.set_function(lambda: float(status().val_loss))
        self.val_acc.set_function(lambda: float(status().val_acc))

    def submit_handler(
        self, fn: Callable[[AsyncIterator[bytes], Any], Awaitable[Any]]
    ) -> Callable[[AsyncIterator[bytes], Any], Awaitable[Any]]:
        """Wrap SubmitGradient: bytes in, and the outcome of every upload."""

        async def handler(requests: AsyncIterator[bytes], context: Any) -> Any:
            try:
                reply = await fn(self._count_in(requests, "SubmitGradient"), context)
            except BaseException:
                # context.abort set the code (None: cancelled by the caller).
                code = context.code()
                reason = code.name if code is not None else "UNKNOWN"
                self.submissions.labels(outcome="refused", reason=reason).inc()
                raise
            accepted = bool(getattr(reply, "accepted", True))
            self.submissions.labels(
                outcome="accepted" if accepted else "refused",
                reason="" if accepted else "NOT_ACCEPTED",
            ).inc()
            return reply

        return handler

    def model_handler(
        self, fn: Callable[[bytes, Any], Awaitable[None]]
    ) -> Callable[[bytes, Any], Awaitable[None]]:
        """Wrap GetModel (a coroutine writing to its context): bytes out."""

        async def handler(request: bytes, context: Any) -> None:
            await fn(request, _CountingContext(context, self.bytes_out, "GetModel"))

        return handler

    async def _count_in(
        self, requests: AsyncIterator[bytes], rpc: str
    ) -> AsyncIterator[bytes]:
        counter = self.bytes_in.labels(rpc=rpc)
        async for message in requests:
            counter.inc(len(message))
            yield message

    # ------------------------------------------------------------- endpoint
    def listen(self, address: str) -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: any); return the port."""
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ConfigError(
                f"--metrics-address {address!r}: expected HOST:PORT (port 0 = any)"
            )
        host = host.strip("[]") or "0.0.0.0"  # all interfaces, as asked
        try:
            self._server, self._thread = start_http_server(
                int(port_text), addr=host, registry=self.registry
            )
        except OSError as err:
            raise ConfigError(
                f"cannot serve metrics on {address}: {err.strerror}"
            ) from None
        port = int(self._server.server_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _CountingContext:
    """A servicer context whose ``write`` counts the bytes it sends."""

    def __init__(self, context: Any, counter: Counter, rpc: str) -> None:
        self._context = context
        self._counter = counter.labels(rpc=rpc)

    async def write(self, message: bytes) -> None:
        await self._context.write(message)
        self._counter.inc(len(message))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
