"""A model over 64 MiB moves both ways in 1 MiB chunks under the 4 MiB message cap."""

from __future__ import annotations

from typing import cast

import grpc
import numpy as np
import pytest

from fedgrpc import wire
from fedgrpc.client.stub import CHANNEL_OPTIONS, AggregatorClient, ModelVersion
from fedgrpc.proto import aggregator_pb2
from fedgrpc.types import RunState, SubmitOutcome, TrainingDone, UpdateKind
from tests.conftest import MakeServer, client_config

pytestmark = pytest.mark.integration

_TIMEOUT_S = 60.0  # generous: ~8 s on 2 idle cores, ~25 s on 2 busy ones
_SERVER_LR = 0.5  # RoundConfig default
_DEFAULT_CAP = 4 << 20  # gRPC's default max receive message length (bytes)
_FRAMING = 256  # generous bound on a ModelMessage's bytes besides the chunk data


def test_big_model_moves_both_ways_in_chunks(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = make_server(
        model="mlp", model_hidden=230_000, rounds=1, update_kind="gradient"
    )
    assert agg.layout.size * 4 >= 64 << 20
    theta0 = agg.engine.theta.copy()  # (n_params,) ~ 66 MiB
    rng = np.random.default_rng(1234)
    # SubmitOutcome has no byte count: record what the client decodes from the reply.
    decoded: list[tuple[SubmitOutcome, int]] = []
    from_proto = wire.submit_reply_from_proto

    def recording(msg: aggregator_pb2.SubmitReply) -> tuple[SubmitOutcome, int]:
        out = from_proto(msg)
        decoded.append(out)
        return out

    monkeypatch.setattr(wire, "submit_reply_from_proto", recording)

    with AggregatorClient(
        client_config(agg, "big", rpc_timeout_s=_TIMEOUT_S)
    ) as client:
        client.join(1)
        stream = client.models(0, _TIMEOUT_S)
        first = next(stream)
        assert isinstance(first, ModelVersion)
        sent = agg.broadcaster.latest
        g = {
            s.name: rng.standard_normal(s.shape, dtype=np.float32) for s in client.specs
        }
        # One sample: p = 1 and the fold multiplies by 1.0, so float32 math is exact.
        reply = client.submit(0, g, 1, train_loss=0.0, kind=UpdateKind.GRADIENT)
        last = next(stream)
    assert agg.wait(timeout_s=_TIMEOUT_S)
    expected = theta0 - np.float32(_SERVER_LR) * agg.layout.flatten(g)

    assert sent is not None
    assert sent.round == 0
    assert len(sent.messages) > 64
    assert max(len(m) for m in sent.messages) <= wire.CHUNK_BYTES + _FRAMING
    assert first.round == 0
    np.testing.assert_array_equal(first.flat, theta0)
    assert reply.accepted, reply.message
    assert decoded == [(reply, agg.layout.size * 4)]  # the server's bytes_received
    assert last == TrainingDone(1, "completed")
    assert agg.engine.state == RunState.DONE
    np.testing.assert_allclose(agg.engine.theta, expected, rtol=1e-6)


def test_default_message_cap_is_untouched(make_server: MakeServer) -> None:
    agg = make_server()
    too_big = b"\0" * (_DEFAULT_CAP + 1024)

    with grpc.insecure_channel(f"localhost:{agg.port}") as channel:
        call = channel.stream_unary(
            "/fedgrpc.v1.Aggregator/SubmitGradient",
            request_serializer=lambda b: b,
            response_deserializer=aggregator_pb2.SubmitReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(iter([too_big]), timeout=_TIMEOUT_S)
    err = cast(grpc.Call, info.value)  # what a stub raises is also a Call

    assert not [k for k, _ in CHANNEL_OPTIONS if "message_length" in k]
    # The server still refuses one message over 4 MiB: its receive cap is the default.
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert str(_DEFAULT_CAP) in (err.details() or "")
