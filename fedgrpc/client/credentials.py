"""A party's channel credentials: TLS trust, mutual-TLS certificate, bearer token."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedgrpc.errors import ConfigError
from fedgrpc.security.registry import AUTH_HEADER
from fedgrpc.store.files import read_file


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel that trusts ``ca`` only.

    Args:
        ca: PEM CA certificate that signed the aggregator's certificate.
        cert: This party's PEM client certificate, for mutual TLS.
        key: Its private key; given exactly when ``cert`` is.

    Raises:
        ConfigError: Only one of cert and key given, or unreadable files.
    """
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs its key and vice versa")
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(ca, "CA certificate"),
        private_key=read_file(key, "TLS key") if key is not None else None,
        certificate_chain=read_file(cert, "TLS certificate")
        if cert is not None
        else None,
    )


class BearerToken(grpc.AuthMetadataPlugin):
    """Call credentials that send ``authorization: Bearer <token>`` with every call."""

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ConfigError("bearer token must be non-empty without whitespace")
        self._metadata = tuple(token_metadata(token))

    def __call__(
        self,
        context: grpc.AuthMetadataContext,
        callback: grpc.AuthMetadataPluginCallback,
    ) -> None:
        """Attach the token to an outgoing call."""
        callback(self._metadata, None)

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Bearer-token call credentials; combine with `channel_credentials`.

    gRPC only sends call credentials over secure channels; on an insecure (test)
    channel pass ``metadata=token_metadata(token)`` to each call instead.
    """
    return grpc.metadata_call_credentials(BearerToken(token), name="fedgrpc-bearer")


def token_metadata(token: str) -> list[tuple[str, str]]:
    """Per-call metadata carrying a bearer token, for channels without call creds."""
    return [(AUTH_HEADER, f"Bearer {token}")]
