"""The party's keepalive pings and the aggregator's ping policy agree (issue 14).

Before, parties pinged every 10 s against a server minimum of 5 s, and at 1,024
parties every connection got GOAWAY ENHANCE_YOUR_CALM "too_many_pings". The e2e
test tests/e2e/test_scale.py holds 1,024 real connections across a ping period.
"""

from __future__ import annotations

from fedgrpc.client.stub import CHANNEL_OPTIONS, KEEPALIVE_TIME_MS
from fedgrpc.server.app import KEEPALIVE_OPTIONS

MARGIN = 3
"""A ping may be read this many times later than sent and still not be a strike."""


def test_keepalive_client_pings_within_the_server_policy_with_margin() -> None:
    client = {k: int(v) for k, v in CHANNEL_OPTIONS}
    server = dict(KEEPALIVE_OPTIONS)

    min_interval = server["grpc.http2.min_recv_ping_interval_without_data_ms"]

    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    assert min_interval * MARGIN <= KEEPALIVE_TIME_MS, (min_interval, KEEPALIVE_TIME_MS)
    # Parties ping while their model stream waits without data, so the server must
    # permit that, and still strike out a client that floods it.
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0
    assert server["grpc.http2.max_ping_strikes"] > 0
    # A dead peer is still detected by both sides within a minute.
    assert KEEPALIVE_TIME_MS + client["grpc.keepalive_timeout_ms"] <= 60_000
    assert (
        server["grpc.keepalive_time_ms"] + server["grpc.keepalive_timeout_ms"] <= 60_000
    )
