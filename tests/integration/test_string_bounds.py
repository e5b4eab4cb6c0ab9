"""Every string a caller sends is bounded (issue 11 item 4), on a real server."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import grpc
import pytest

from fedgrpc.proto import aggregator_pb2, tensor_pb2
from tests.conftest import MakeServer
from tests.integration.test_service import (
    StubFor,
    _header,
    _join,
    _submission,
    _training,
    _update,
)

pytestmark = pytest.mark.integration

_TIMEOUT_S = 10.0
_HUGE = 1_000_000


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = cast(grpc.Call, info.value)
    return err.code(), err.details() or ""


def test_huge_submission_id_is_refused_and_never_stored(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice"], rounds=1)
    specs = agg.engine.specs
    msgs = _submission("alice", 0, specs, _update(specs, 1), sid="x" * _HUGE)
    size_before = agg.run_dir.ledger_path.stat().st_size

    code, details = _refusal(
        lambda: stub.SubmitGradient(iter(msgs), timeout=_TIMEOUT_S)
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "submission id has 1000000 characters; the limit is 128" in details
    assert len(details) < 300
    assert agg.engine.status().submitted == ()
    assert agg.run_dir.ledger_path.stat().st_size <= size_before + 65536


@pytest.mark.parametrize("field", ["party_id", "client_version"])
def test_huge_join_strings_are_refused_without_echo(
    make_server: MakeServer, stub_for: StubFor, field: str
) -> None:
    stub = stub_for(make_server())
    req = aggregator_pb2.JoinRequest(party_id="alice", num_samples=10)
    setattr(req, field, "y" * _HUGE)

    code, details = _refusal(lambda: stub.Join(req, timeout=_TIMEOUT_S))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    limit = "need 1-64 of" if field == "party_id" else "the limit is 64"
    assert f"1000000 characters; {limit}" in details
    assert len(details) < 300


def test_huge_tensor_name_and_filter_are_refused(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    _agg, stub = _training(make_server, stub_for, ["alice"], rounds=1)
    chunk = aggregator_pb2.SubmitMessage(
        chunk=tensor_pb2.TensorChunk(name="z" * _HUGE, offset=0, data=b"\0" * 4)
    )
    msgs = [_header("alice", 0), chunk]

    upload = _refusal(lambda: stub.SubmitGradient(iter(msgs), timeout=_TIMEOUT_S))
    filt = _refusal(
        lambda: stub.GetContributions(
            aggregator_pb2.ContributionsRequest(party_ids=["q" * 300]),
            timeout=_TIMEOUT_S,
        )
    )

    assert upload[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor name has 1000000 characters; the limit is 256" in upload[1]
    assert filt[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "party id in the filter has 300 characters; need 1-64" in filt[1]
    _join(stub, "alice")  # still serving
