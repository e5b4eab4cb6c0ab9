"""Permanent connection errors fail fast, naming cause and fix (issue 11 item 14).

Each case would otherwise be retried as UNAVAILABLE for ``connect_timeout_s``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fedgrpc.client.stub import AggregatorClient
from fedgrpc.config import ObserverConfig, TlsConfig
from fedgrpc.errors import ConnectionSetupError
from fedgrpc.security.pki import init_ca, issue_party_cert
from fedgrpc.server.app import Aggregator
from tests.conftest import MakeServer

pytestmark = pytest.mark.integration

_PATIENCE_S = 60.0  # what the client would otherwise keep retrying for
_FAST_S = 8.0


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    # A certificate for a DNS name only: reaching it as "localhost" must fail.
    paths = init_ca(tmp_path / "pki", server_names=["aggregator.example"])
    issued = issue_party_cert(tmp_path / "pki", "p0")
    paths["p0_cert"], paths["p0_key"] = issued["cert"], issued["key"]
    paths["other_ca"] = init_ca(tmp_path / "other")["ca_cert"]
    return paths


def _tls_server(
    make_server: MakeServer, pki: dict[str, Path], **tls: Any
) -> Aggregator:
    cfg = TlsConfig(cert=pki["server_cert"], key=pki["server_key"], **tls)
    extra = {} if tls.get("require_client_cert") else {"open_enrolment": True}
    return make_server(server={"insecure": False, "tls": cfg, **extra}, rounds=1)


def _observer(agg: Aggregator, **kw: Any) -> AggregatorClient:
    cfg = ObserverConfig(
        server=f"localhost:{agg.port}", connect_timeout_s=_PATIENCE_S, **kw
    )
    return AggregatorClient(cfg)


def _fails_fast(client: AggregatorClient) -> str:
    t0 = time.monotonic()
    with client, pytest.raises(ConnectionSetupError) as info:
        client.status()
    assert time.monotonic() - t0 < _FAST_S
    return str(info.value)


def test_hostname_mismatch_names_tls_server_name(
    make_server: MakeServer, pki: dict[str, Path]
) -> None:
    agg = _tls_server(make_server, pki)

    text = _fails_fast(_observer(agg, tls=TlsConfig(ca=pki["ca_cert"])))
    with _observer(
        agg, tls=TlsConfig(ca=pki["ca_cert"]), tls_server_name="aggregator.example"
    ) as ok:
        status = ok.status()

    assert "does not name 'localhost'" in text and "--tls-server-name" in text
    assert status.rounds_total == 1


def test_tls_client_against_plaintext_server(
    make_server: MakeServer, pki: dict[str, Path]
) -> None:
    agg = make_server(rounds=1)

    text = _fails_fast(_observer(agg, tls=TlsConfig(ca=pki["ca_cert"])))

    assert "does not speak TLS" in text and "--insecure" in text


def test_plaintext_client_against_tls_server(
    make_server: MakeServer, pki: dict[str, Path]
) -> None:
    agg = _tls_server(make_server, pki)

    text = _fails_fast(_observer(agg, insecure=True))

    assert "uses TLS but this client runs --insecure" in text
    assert "--tls-ca" in text


def test_missing_client_certificate_against_mutual_tls(
    make_server: MakeServer, pki: dict[str, Path]
) -> None:
    agg = _tls_server(make_server, pki, ca=pki["ca_cert"], require_client_cert=True)
    tls = TlsConfig(ca=pki["ca_cert"])

    text = _fails_fast(_observer(agg, tls=tls, tls_server_name="aggregator.example"))

    assert "requires a client certificate" in text and "--tls-cert" in text


def test_certificate_from_another_ca(
    make_server: MakeServer, pki: dict[str, Path]
) -> None:
    agg = _tls_server(make_server, pki)
    tls = TlsConfig(ca=pki["other_ca"])

    text = _fails_fast(_observer(agg, tls=tls, tls_server_name="aggregator.example"))

    assert "not signed by the CA given with --tls-ca" in text
