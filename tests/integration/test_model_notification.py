"""GetModel streams sleep until a version is published, the run ends or they are
cancelled: no periodic wake-up (issue 14, item 3)."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from fedgrpc.proto import aggregator_pb2
from tests.conftest import MakeServer
from tests.integration.test_service import StubFor, _join, _wait_for

pytestmark = pytest.mark.integration

_TIMEOUT_S = 10.0
_IDLE_S = 1.5  # the old streams woke every 0.5 s


def _first_message(stream: Any, got: list[float]) -> None:
    try:
        for _ in stream:
            got.append(time.monotonic())
            return
    except grpc.RpcError:
        pass


def test_model_stream_sleeps_until_publication_and_ends_on_cancel(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=1, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "alice")
    looks = []
    current = agg.broadcaster.current

    def counted(from_round: int) -> Any:
        looks.append(time.monotonic())
        return current(from_round)

    agg.broadcaster.current = counted  # type: ignore[method-assign]
    request = aggregator_pb2.GetModelRequest(party_id="alice", from_round=0)
    waiting = stub.GetModel(request, timeout=_TIMEOUT_S)
    cancelled = stub.GetModel(request, timeout=_TIMEOUT_S)
    got: list[float] = []
    reader = threading.Thread(target=_first_message, args=(waiting, got))
    reader.start()
    threading.Thread(target=_first_message, args=(cancelled, []), daemon=True).start()
    try:
        _wait_for("two waiting streams", lambda: agg.servicer.model_streams == 2)
        time.sleep(_IDLE_S)
        idle_looks = len(looks)

        cancelled.cancel()
        t0 = time.monotonic()
        _wait_for(
            "the cancelled stream to end", lambda: agg.servicer.model_streams == 1
        )
        ended_s = time.monotonic() - t0

        _join(stub, "bob")  # quorum: round 0 is published
        _wait_for("round 0", lambda: agg.broadcaster.latest is not None)
        published = time.monotonic()
        reader.join(timeout=_TIMEOUT_S)
    finally:
        waiting.cancel()
        cancelled.cancel()

    # One look per stream when it started, none while idle.
    assert idle_looks == 2, looks
    assert ended_s < 1.0, ended_s
    assert got, "the waiting stream never got round 0"
    assert got[0] - published < 1.0, got[0] - published
