"""Who may join: no accidental open enrolment, stable sample counts, eviction.

Issue 11 item 3, on real loopback servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import grpc
import pytest

from fedgrpc.cli.main import main
from fedgrpc.config import Limits, ServerConfig, TlsConfig
from fedgrpc.errors import ConfigError
from fedgrpc.proto import aggregator_pb2, aggregator_pb2_grpc
from fedgrpc.security.pki import init_ca
from fedgrpc.security.registry import PartyRegistry, add_party, remove_party
from tests.conftest import MakeServer
from tests.integration.test_service import StubFor, _join, _state

pytestmark = pytest.mark.integration

_TIMEOUT_S = 10.0


def _code(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, err)
    return call.code(), call.details() or ""


def test_tls_without_any_identity_refuses_to_start(tmp_path: Path) -> None:
    pki = init_ca(tmp_path / "pki")
    tls = TlsConfig(cert=pki["server_cert"], key=pki["server_key"])

    with pytest.raises(ConfigError, match="--open-enrolment"):
        ServerConfig(tls=tls)
    code = main(
        [
            "serve",
            "--tls-cert",
            str(pki["server_cert"]),
            "--tls-key",
            str(pki["server_key"]),
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )

    assert code == 2
    assert not (tmp_path / "run").exists()
    assert ServerConfig(tls=tls, open_enrolment=True).open_enrolment


def test_open_enrolment_serves_nobody_s_contributions(
    make_server: MakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = init_ca(tmp_path / "pki")
    tls = TlsConfig(cert=pki["server_cert"], key=pki["server_key"])
    agg = make_server(
        server={"insecure": False, "tls": tls, "open_enrolment": True}, rounds=1
    )
    creds = grpc.ssl_channel_credentials(pki["ca_cert"].read_bytes())
    with grpc.secure_channel(f"localhost:{agg.port}", creds) as ch:
        stub = aggregator_pb2_grpc.AggregatorStub(ch)
        _join(stub, "alice")
        with pytest.raises(grpc.RpcError) as info:
            stub.GetContributions(
                aggregator_pb2.ContributionsRequest(party_ids=["alice"]),
                timeout=_TIMEOUT_S,
            )

    code, details = _code(info.value)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "open enrolment" in details
    assert any("OPEN ENROLMENT" in r.getMessage() for r in caplog.records)


def test_join_cannot_change_an_active_party_s_sample_count(
    make_server: MakeServer, stub_for: StubFor
) -> None:
    agg = make_server(rounds=1, min_parties=2)
    stub = stub_for(agg)
    _join(stub, "alice", num_samples=100)

    with pytest.raises(grpc.RpcError) as info:
        _join(stub, "alice", num_samples=5)
    again = _join(stub, "alice", num_samples=100)  # the honest party is unharmed

    code, details = _code(info.value)
    # A party's count is fixed for the run once it joined (issue 10).
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "party alice joined with 100 samples and now claims 5" in details
    assert again.party_id == "alice"
    assert agg.engine.parties.get("alice").num_samples == 100  # type: ignore[union-attr]
    assert [p["num_samples"] for p in agg.ledger.parties()] == [100]


def test_evicted_ids_leave_the_registry_and_cannot_rejoin_after_resume(
    make_server: MakeServer, stub_for: StubFor, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = make_server(
        run_dir=run_dir, rounds=1, min_parties=3, limits=Limits(max_parties=3)
    )
    stub = stub_for(first)
    for pid in ("alice", "junk1", "junk2"):
        _join(stub, pid)
    first.shutdown(grace_s=0.2, save_open_round=False)

    code = main(["parties", "evict", str(run_dir), "junk1", "junk2", "never"])
    resumed = make_server(
        run_dir=run_dir, server={"resume": True}, rounds=1, min_parties=3
    )
    stub = stub_for(resumed)
    with pytest.raises(grpc.RpcError) as info:
        _join(stub, "junk1")
    _join(stub, "bob")  # the freed places can be taken

    assert code == 0
    assert list(_state(stub).joined) == ["alice", "bob"]
    status, details = _code(info.value)
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert "party junk1 was evicted" in details


def test_parties_remove_revokes_the_token(tmp_path: Path) -> None:
    path = tmp_path / "parties.toml"
    keep = add_party(path, "alice")
    gone = add_party(path, "mallory")
    add_party(path, "operator", admin=True)

    code = main(["parties", "remove", str(path), "mallory"])
    registry = PartyRegistry.load(path)

    assert code == 0
    assert registry.party_ids() == ("alice",)
    assert registry.admin_names() == ("operator",)
    assert registry.authenticate_token(gone) is None
    assert registry.authenticate_token(keep) is not None
    with pytest.raises(ConfigError, match="'mallory' is not in"):
        remove_party(path, "mallory")
