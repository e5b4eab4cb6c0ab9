"""Availability on a real loopback server: no party or stranger stalls the federation.

Drip-feeding uploads, idle streams beyond the thread pool, unauthenticated streams
that send nothing, and too many model streams from one party (issue 11, items 1-2).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgrpc.config import Limits
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.security.registry import add_party
from fedgrpc.server.guard import pool_size
from tests.conftest import MakeServer
from tests.integration.test_service import (
    _SAMPLES,
    StubFor,
    _assert_theta,
    _expected_theta,
    _join,
    _submission,
    _training,
    _update,
    _wait_for,
)

pytestmark = pytest.mark.integration

_TIMEOUT_S = 10.0


def _code(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, err)
    return call.code(), call.details() or ""


def _quiet(
    head: list[aggregator_pb2.SubmitMessage], stop: threading.Event
) -> Iterator[aggregator_pb2.SubmitMessage]:
    """Send ``head``, then nothing until ``stop`` (bounded)."""
    yield from head
    stop.wait(_TIMEOUT_S)


def _drip(
    messages: list[aggregator_pb2.SubmitMessage],
    stop: threading.Event,
    every_s: float,
) -> Iterator[aggregator_pb2.SubmitMessage]:
    """The header at once, then one tiny chunk every ``every_s`` (never the trailer)."""
    yield messages[0]
    for msg in messages[1:-1]:
        if stop.wait(every_s):
            return
        yield msg


def test_drip_feeding_party_cannot_hold_the_upload_slots(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    # Two slots, as the default; a drip-feeder opens its two allowed streams first.
    limits = Limits(
        max_inflight_uploads=2,
        upload_grace_s=1.0,
        upload_min_rate_bytes_s=20_000.0,
        upload_slot_timeout_s=8.0,
    )
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice", "bob", "mallory"],
        rounds=1,
        limits=limits,
        min_parties=2,
        round_timeout_s=4.0,
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    drip = _submission(
        "mallory", 0, specs, _update(specs, 99), chunk_bytes=16, sid="drip"
    )
    stop = threading.Event()
    streams = [
        stub.SubmitGradient.future(_drip(drip, stop, 0.2), timeout=_TIMEOUT_S)
        for _ in range(2)
    ]
    try:
        _wait_for("mallory to hold a slot", lambda: agg.engine.uploads.in_flight >= 1)
        good = {p: _update(specs, i) for i, p in enumerate(("alice", "bob"))}
        t0 = time.monotonic()

        replies = [
            stub.SubmitGradient(
                iter(_submission(p, 0, specs, u, chunk_bytes=512)), timeout=_TIMEOUT_S
            )
            for p, u in good.items()
        ]
        waited_s = time.monotonic() - t0
        errors = []
        for s in streams:
            with pytest.raises(grpc.RpcError) as info:
                s.result(timeout=_TIMEOUT_S)
            errors.append(_code(info.value))
    finally:
        stop.set()

    assert all(r.accepted for r in replies), replies
    # One party never holds both slots, and a slow one loses its slot after the grace.
    assert waited_s < 6.0, waited_s
    for code, details in errors:
        assert code in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
        ), (code, details)
    assert any("too slow" in d or "share" in d for _, d in errors), errors
    assert agg.wait(timeout_s=_TIMEOUT_S)
    _assert_theta(
        agg, _expected_theta(theta0, specs, [(u, _SAMPLES) for u in good.values()])
    )


def test_upload_of_a_closing_round_is_discarded_and_frees_its_slot(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    limits = Limits(max_inflight_uploads=1, upload_slot_timeout_s=5.0)
    agg, stub = _training(
        make_server,
        stub_for,
        ["alice", "mallory"],
        rounds=1,
        limits=limits,
        round_timeout_s=1.5,
        quorum_retries=1,
    )
    specs = agg.engine.specs
    theta0 = agg.engine.theta.copy()
    held = _submission("mallory", 0, specs, _update(specs, 7), chunk_bytes=64)
    stop = threading.Event()
    stream = stub.SubmitGradient.future(_quiet(held[:3], stop), timeout=_TIMEOUT_S)
    try:
        _wait_for("mallory's slot", lambda: agg.engine.uploads.in_flight == 1)
        # Round 0 fails at its deadline (no update arrived) and is retried; its
        # close, not the 60 s idle timeout, must free mallory's slot.
        _wait_for(
            "the close to free the slot", lambda: agg.engine.uploads.in_flight == 0
        )
        good = _update(specs, 1)
        _wait_for(
            "round 0's failure to be recorded", lambda: len(agg.ledger.rounds()) == 1
        )
        _wait_for(
            "the retry of round 0 to open",
            lambda: (
                agg.engine.status().state == "training"
                and agg.engine.uploads.in_flight == 0
                and not getattr(agg.engine._round, "closing", True)
            ),
        )

        reply = stub.SubmitGradient(
            iter(_submission("alice", 0, specs, good)), timeout=_TIMEOUT_S
        )
    finally:
        stop.set()
    with pytest.raises(grpc.RpcError) as info:
        stream.result(timeout=_TIMEOUT_S)

    assert reply.accepted
    code, details = _code(info.value)
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        assert "the round closed while the update was in flight" in details
    assert agg.wait(timeout_s=_TIMEOUT_S)
    _assert_theta(agg, _expected_theta(theta0, specs, [(good, _SAMPLES)]))


def test_more_idle_streams_than_threads_still_let_join_and_health_through(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    limits = Limits(max_parties=2, upload_grace_s=3.0)
    agg = make_server(limits=limits, rounds=1, min_parties=2)
    threads = pool_size(limits)
    n_channels = threads // 2 + 4  # two streams per connection: more than the pool
    # A local subchannel pool gives each channel its own connection.
    opts = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.insecure_channel(f"localhost:{agg.port}", options=opts)
        for _ in range(n_channels)
    ]
    stop = threading.Event()
    calls = []
    try:
        for ch in channels:
            stub = aggregator_pb2_grpc.AggregatorStub(ch)
            for _ in range(2):
                calls.append(
                    stub.SubmitGradient.future(_quiet([], stop), timeout=_TIMEOUT_S)
                )
        assert len(calls) > threads

        t0 = time.monotonic()
        reply = _join(stub_for(agg), "alice")
        health = health_pb2_grpc.HealthStub(channels[0]).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=_TIMEOUT_S
        )
        answered_s = time.monotonic() - t0
        refused = []
        for c in calls:
            try:
                c.result(timeout=_TIMEOUT_S)
            except grpc.RpcError as err:
                refused.append(_code(err))
    finally:
        stop.set()
        for ch in channels:
            ch.close()

    assert reply.party_id == "alice"
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert answered_s < 3.0, answered_s
    exhausted = [d for c, d in refused if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(exhausted) >= len(calls) - limits.stream_cap, refused
    assert any("stream calls (limit" in d for d in exhausted), exhausted[:3]
    # The admitted ones sent no header: cancelled after the grace, threads freed.
    assert len(refused) == len(calls)
    _wait_for(
        "the idle streams to be gone",
        lambda: agg.servicer._guard.open_calls()["stream"] == 0,
    )


def test_model_streams_per_party_are_capped(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    limits = Limits(max_streams_per_party=2)
    agg = make_server(limits=limits, rounds=1, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "alice")
    streams = [
        stub.GetModel(
            aggregator_pb2.GetModelRequest(party_id="alice", from_round=0),
            timeout=_TIMEOUT_S,
        )
        for _ in range(4)
    ]
    refused = []
    try:
        _wait_for(
            "two model streams",
            lambda: agg.servicer._guard.open_calls()["stream"] == 2,
        )
        for s in streams:
            try:
                next(iter(s))
            except grpc.RpcError as err:
                refused.append(_code(err))
            except StopIteration:
                pass
    finally:
        for s in streams:
            s.cancel()

    assert [c for c, _ in refused].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
    details = [d for c, d in refused if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert "party alice: 2 GetModel calls already open; limit is 2" in details[0]
    # Another party is not affected.
    _join(stub, "bob")


def test_unauthenticated_stream_is_refused_before_any_message(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    parties = tmp_path / "parties.toml"
    add_party(parties, "alice")
    agg = make_server(server={"parties_file": parties}, rounds=1)
    stub = stub_for(agg)
    stop = threading.Event()
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitGradient(_quiet([], stop), timeout=5.0)
        took_s = time.monotonic() - t0
    finally:
        stop.set()

    code, details = _code(info.value)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert "missing credentials" in details
    assert took_s < 2.0, took_s


def test_header_that_never_comes_is_cancelled_after_the_grace(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(limits=Limits(upload_grace_s=0.5), rounds=1)
    stub = stub_for(agg)
    stop = threading.Event()
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitGradient(_quiet([], stop), timeout=_TIMEOUT_S)
        took_s = time.monotonic() - t0
    finally:
        stop.set()

    assert _code(info.value)[0] == grpc.StatusCode.CANCELLED
    assert took_s < 5.0, took_s
    _wait_for(
        "the stream to be gone",
        lambda: agg.servicer._guard.open_calls()["stream"] == 0,
    )
