"""A grpc.aio server on its own event-loop thread, driven from ordinary threads.

Every RPC of the aggregator is a coroutine on one event loop (issue 14): an open
stream costs a suspended coroutine, not a thread, so 1,000 parties' GetModel streams
and waiting uploads need no thread each. The rest of the process (the round driver,
the CLI, the tests) stays synchronous; this module gives it the ``grpc.Server``
calls it uses (``add_*_port``, ``start``, ``stop(grace).wait()``) and a health
servicer whose ``set`` can be called from any thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health

T = TypeVar("T")

START_TIMEOUT_S = 30.0
"""Longest a call into the loop (making the server, binding a port) may take."""


class LoopThread:
    """An asyncio event loop running on a daemon thread."""

    def __init__(self, name: str = "grpc-aio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def submit(self, coro: Coroutine[Any, Any, T]) -> futures.Future[T]:
        """Run ``coro`` on the loop; its future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_sync(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        """Call ``fn`` on the loop thread (for APIs that must be called there)."""

        async def call() -> T:
            return fn()

        return self.call(call(), timeout_s)

    def close(self) -> None:
        """Stop the loop and join its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class Stopping:
    """What ``AioServer.stop`` returns: ``wait()`` blocks until the server is down."""

    def __init__(self, done: futures.Future[None], after: Callable[[], None]) -> None:
        self._done = done
        self._after = after

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (True), or ``timeout`` passed (False)."""
        try:
            self._done.result(timeout)
        except futures.TimeoutError:
            return False
        self._after()
        return True


class AioServer:
    """A ``grpc.aio.Server`` with synchronous ``add_*_port``/``start``/``stop``.

    Args:
        options: the server's channel arguments.
        setup: called on the loop thread with the new server and the loop, to add
            the services (grpc.aio wants its server made and fed on its loop).
    """

    def __init__(
        self,
        options: Sequence[tuple[str, Any]],
        setup: Callable[[grpc.aio.Server, asyncio.AbstractEventLoop], None],
    ) -> None:
        self.loop_thread = LoopThread()
        self.loop = self.loop_thread.loop

        def make() -> grpc.aio.Server:
            server = grpc.aio.server(options=list(options))
            setup(server, self.loop)
            return server

        self._server = self.loop_thread.run_sync(make, START_TIMEOUT_S)

    def add_insecure_port(self, address: str) -> int:
        """Bind ``address`` without TLS; the port bound."""
        return self.loop_thread.run_sync(
            lambda: self._server.add_insecure_port(address), START_TIMEOUT_S
        )

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        """Bind ``address`` with TLS; the port bound."""
        return self.loop_thread.run_sync(
            lambda: self._server.add_secure_port(address, creds), START_TIMEOUT_S
        )

    def start(self) -> None:
        """Start serving."""
        self.loop_thread.call(self._server.start(), START_TIMEOUT_S)

    def stop(self, grace: float | None) -> Stopping:
        """Stop accepting calls; cancel those still running after ``grace`` s."""
        return Stopping(
            self.loop_thread.submit(self._server.stop(grace)), self.loop_thread.close
        )


class ThreadSafeHealth:
    """The asyncio health servicer, settable from any thread (as the sync one was)."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the servicer runs on."""
        self._loop = loop

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None, "bind() the health servicer to its loop first"
        if self._loop.is_closed():
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT_S)

    def set(self, service: str, status: Any) -> None:
        """Set ``service``'s serving status."""
        self._run(self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        self._run(self.servicer.enter_graceful_shutdown())
