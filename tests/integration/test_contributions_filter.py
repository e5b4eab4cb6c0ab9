"""GetContributions filter edge cases (issue 11 item 15), on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import grpc
import pytest

from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.security.registry import add_party
from tests.conftest import MakeServer
from tests.integration.test_service import StubFor, _join

pytestmark = pytest.mark.integration

_TIMEOUT_S = 10.0


def _ask(
    stub: aggregator_pb2_grpc.AggregatorStub,
    ids: list[str],
    token: str | None = None,
) -> aggregator_pb2.ContributionsReply:
    meta = (("authorization", f"Bearer {token}"),) if token else None
    reply: aggregator_pb2.ContributionsReply = stub.GetContributions(
        aggregator_pb2.ContributionsRequest(party_ids=ids),
        timeout=_TIMEOUT_S,
        metadata=meta,
    )
    return reply


def test_contributions_repeated_own_id_is_asked_once(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    parties = tmp_path / "parties.toml"
    token = add_party(parties, "alice")
    agg = make_server(server={"parties_file": parties}, rounds=1, min_parties=2)
    stub = stub_for(agg)
    stub.Join(
        aggregator_pb2.JoinRequest(party_id="alice", num_samples=10),
        timeout=_TIMEOUT_S,
        metadata=(("authorization", f"Bearer {token}"),),
    )

    reply = _ask(stub, ["alice", "alice"], token)

    assert [p.party_id for p in reply.parties] == ["alice"]


def test_contributions_unknown_id_is_not_found_not_a_zero_row(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=1, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "alice")

    with pytest.raises(grpc.RpcError) as info:
        _ask(stub, ["alice", "ghost"])
    dup = _ask(stub, ["alice", "alice"])

    err = cast(grpc.Call, info.value)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no party 'ghost' in run" in (err.details() or "")
    assert [p.party_id for p in dup.parties] == ["alice"]
