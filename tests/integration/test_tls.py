"""TLS, mutual TLS and bearer tokens against a real gRPC server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from fedgrpc.client.credentials import (
    BearerToken,
    channel_credentials,
    token_call_credentials,
    token_metadata,
)
from fedgrpc.config import TlsConfig
from fedgrpc.errors import AuthError, ConfigError
from fedgrpc.security.pki import init_ca, issue_party_cert
from fedgrpc.security.registry import PartyRegistry, add_party
from fedgrpc.server.auth import identity_from_context, server_credentials

pytestmark = pytest.mark.integration

_METHOD = "/fedgrpc.test.Whoami/Who"
_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    paths = init_ca(directory)
    for party in ("p0", "p1"):
        issued = issue_party_cert(directory, party)
        paths[f"{party}_cert"], paths[f"{party}_key"] = issued["cert"], issued["key"]
    other = tmp_path_factory.mktemp("other-ca")
    paths["other_ca"] = init_ca(other)["ca_cert"]
    paths["other_cert"] = issue_party_cert(other, "p0")["cert"]
    paths["other_key"] = other / "parties" / "p0.key"
    return paths


@contextmanager
def _whoami_server(
    tls: TlsConfig | None, registry: PartyRegistry | None, *, mtls: bool
) -> Iterator[int]:
    """Serve one unary method answering the caller's identity as ``[admin:]name``."""

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            identity = identity_from_context(context, registry, mtls=mtls)
        except AuthError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if identity is None:
            return b"anonymous"
        return (b"admin:" if identity.is_admin else b"") + identity.name.encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "fedgrpc.test.Whoami",
                    {"Who": grpc.unary_unary_rpc_method_handler(who)},
                )
            ]
        )
        if tls is None:
            port = server.add_insecure_port("localhost:0")
        else:
            port = server.add_secure_port("localhost:0", server_credentials(tls))
        assert port > 0
        server.start()
        yield port
    finally:
        server.stop(grace=None)


def _call(
    port: int,
    creds: grpc.ChannelCredentials | None,
    metadata: list[tuple[str, str]] | None = None,
) -> bytes:
    target = f"localhost:{port}"
    with (
        grpc.insecure_channel(target)
        if creds is None
        else grpc.secure_channel(target, creds)
    ) as channel:
        who: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_METHOD)
        # grpc-stubs wants a tuple of pairs; token_metadata returns a list.
        reply = who(
            b"", timeout=_TIMEOUT_S, metadata=tuple(metadata) if metadata else None
        )
        return reply


def _mtls_config(pki: dict[str, Path]) -> TlsConfig:
    return TlsConfig(
        cert=pki["server_cert"],
        key=pki["server_key"],
        ca=pki["ca_cert"],
        require_client_cert=True,
    )


def _tls_config(pki: dict[str, Path]) -> TlsConfig:
    return TlsConfig(cert=pki["server_cert"], key=pki["server_key"], ca=pki["ca_cert"])


def test_mtls_party_cert_gives_party_id(pki: dict[str, Path], tmp_path: Path) -> None:
    parties = tmp_path / "parties.toml"
    parties.write_text('[[party]]\nid = "p0"\n')
    registry = PartyRegistry.load(parties)
    creds = channel_credentials(pki["ca_cert"], pki["p0_cert"], pki["p0_key"])

    with _whoami_server(_mtls_config(pki), registry, mtls=True) as port:
        reply = _call(port, creds)

    assert reply == b"p0"


def test_mtls_open_registry_accepts_any_ca_signed_party(pki: dict[str, Path]) -> None:
    creds = channel_credentials(pki["ca_cert"], pki["p1_cert"], pki["p1_key"])

    with _whoami_server(_mtls_config(pki), None, mtls=True) as port:
        reply = _call(port, creds)

    assert reply == b"p1"


def test_mtls_unlisted_party_is_unauthenticated(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    parties = tmp_path / "parties.toml"
    parties.write_text('[[party]]\nid = "p0"\n')
    creds = channel_credentials(pki["ca_cert"], pki["p1_cert"], pki["p1_key"])

    with (
        _whoami_server(
            _mtls_config(pki), PartyRegistry.load(parties), mtls=True
        ) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, creds)

    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'p1' is not a known party" in (info.value.details() or "")


def test_mtls_without_client_cert_fails_handshake(pki: dict[str, Path]) -> None:
    creds = channel_credentials(pki["ca_cert"])

    with (
        _whoami_server(_mtls_config(pki), None, mtls=True) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, creds)

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_cert_rejected_as_client_cert(pki: dict[str, Path]) -> None:
    # The server certificate is CA-signed but has only the serverAuth EKU.
    creds = channel_credentials(pki["ca_cert"], pki["server_cert"], pki["server_key"])

    with (
        _whoami_server(_mtls_config(pki), None, mtls=True) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, creds)

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_cert_from_other_ca_fails(pki: dict[str, Path]) -> None:
    creds = channel_credentials(pki["ca_cert"], pki["other_cert"], pki["other_key"])

    with (
        _whoami_server(_mtls_config(pki), None, mtls=True) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, creds)

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_bearer_token_gives_identity(pki: dict[str, Path], tmp_path: Path) -> None:
    parties = tmp_path / "parties.toml"
    p0_token = add_party(parties, "p0")
    admin_token = add_party(parties, "operator", admin=True)
    registry = PartyRegistry.load(parties)
    base = channel_credentials(pki["ca_cert"])

    with _whoami_server(_tls_config(pki), registry, mtls=False) as port:
        as_party = _call(
            port,
            grpc.composite_channel_credentials(base, token_call_credentials(p0_token)),
        )
        as_admin = _call(
            port,
            grpc.composite_channel_credentials(
                base, token_call_credentials(admin_token)
            ),
        )

    assert as_party == b"p0"
    assert as_admin == b"admin:operator"


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ([("authorization", "Bearer not-a-real-token")], "unknown bearer token"),
        (None, "missing credentials"),
        ([("authorization", "Basic dXNlcjpwdw==")], "must be 'Bearer <token>'"),
    ],
)
def test_tls_bad_token_is_unauthenticated(
    pki: dict[str, Path],
    tmp_path: Path,
    metadata: list[tuple[str, str]] | None,
    details: str,
) -> None:
    parties = tmp_path / "parties.toml"
    add_party(parties, "p0")
    registry = PartyRegistry.load(parties)

    with (
        _whoami_server(_tls_config(pki), registry, mtls=False) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, channel_credentials(pki["ca_cert"]), metadata)

    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details in (info.value.details() or "")


def test_client_trusting_other_ca_fails(pki: dict[str, Path]) -> None:
    creds = channel_credentials(pki["other_ca"])

    with (
        _whoami_server(_tls_config(pki), None, mtls=False) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(port, creds)

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_insecure_channel_token_metadata(tmp_path: Path) -> None:
    parties = tmp_path / "parties.toml"
    token = add_party(parties, "p0")
    registry = PartyRegistry.load(parties)

    with _whoami_server(None, registry, mtls=False) as port:
        reply = _call(port, None, token_metadata(token))

    assert reply == b"p0"


def test_insecure_open_mode_is_anonymous() -> None:
    with _whoami_server(None, None, mtls=False) as port:
        reply = _call(port, None)

    assert reply == b"anonymous"


def test_credentials_config_errors(pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="certificate and a key"):
        server_credentials(TlsConfig(cert=pki["server_cert"]))
    with pytest.raises(ConfigError, match="needs a CA"):
        server_credentials(
            TlsConfig(
                cert=pki["server_cert"], key=pki["server_key"], require_client_cert=True
            )
        )
    with pytest.raises(ConfigError, match="needs its key"):
        channel_credentials(pki["ca_cert"], pki["p0_cert"], None)
    with pytest.raises(ConfigError, match="cannot read CA certificate"):
        channel_credentials(pki["ca_cert"].with_name("missing.pem"))


def test_bearer_token_repr_hides_token() -> None:
    plugin = BearerToken("s3cret-token")

    assert "s3cret" not in repr(plugin)
    with pytest.raises(ConfigError):
        BearerToken("two words")
