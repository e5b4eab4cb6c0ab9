"""Upload rules that tie a submission to the registry and to the published model."""

from __future__ import annotations

import grpc
import pytest

from fedgrpc.proto import aggregator_pb2
from tests.conftest import MakeServer
from tests.integration.test_service import (
    StubFor,
    _rejected,
    _submission,
    _submit,
    _training,
    _update,
)

pytestmark = pytest.mark.integration


def test_submit_num_samples_must_match_join(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice", "bob"], min_parties=2)
    specs = agg.engine.specs

    code, details = _rejected(
        stub, _submission("alice", 0, specs, _update(specs, 1), num_samples=10**9)
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "party alice, round 0" in details
    assert "num_samples 1000000000 differs from the 100 declared at Join" in details
    assert agg.engine.status().submitted == ()


def test_submit_from_another_model_version_is_refused(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(make_server, stub_for, ["alice", "bob"], min_parties=2)
    specs = agg.engine.specs
    published = agg.broadcaster.latest
    assert published is not None
    stale = _submission("alice", 0, specs, _update(specs, 1), sid="s")
    stale[0].header.model_digest = bytes(32)
    fresh = _submission("alice", 0, specs, _update(specs, 1), sid="f")
    fresh[0].header.model_digest = published.digest

    code, details = _rejected(stub, stale)
    reply = _submit(stub, fresh)

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "party alice, round 0: update computed from model 0000000000000000" in details
    )
    assert published.digest.hex()[:16] in details
    assert reply.accepted


def test_party_reads_only_its_own_round_participation(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg, stub = _training(
        make_server, stub_for, ["alice", "bob"], min_parties=2, rounds=1
    )
    specs = agg.engine.specs
    for party, seed in (("alice", 1), ("bob", 2)):
        assert _submit(
            stub, _submission(party, 0, specs, _update(specs, seed))
        ).accepted
    assert agg.wait(30)
    report = agg.ledger.contributions()

    from fedgrpc.wire import report_to_proto

    as_alice = report_to_proto(report, viewer="alice")
    as_admin = report_to_proto(report)

    assert list(as_admin.rounds[0].submitted) == ["alice", "bob"]
    assert list(as_alice.rounds[0].submitted) == ["alice"]
    alice_score = next(p.total for p in as_admin.parties if p.party_id == "alice")
    assert as_alice.rounds[0].predicted_drop == pytest.approx(alice_score)
    assert isinstance(as_alice, aggregator_pb2.ContributionsReply)
