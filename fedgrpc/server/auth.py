"""Server credentials and caller identity at the gRPC edge (DESIGN §5).

The identity of a call comes from the channel, never from the payload: the verified
client certificate's CN under mutual TLS, or an ``authorization: Bearer <token>``
header checked against the parties file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import grpc

from fedgrpc.config import TlsConfig
from fedgrpc.errors import AuthError, ConfigError
from fedgrpc.security.registry import (
    AUTH_HEADER,
    BEARER_SCHEME,
    Identity,
    PartyRegistry,
)
from fedgrpc.store.files import read_file

log = logging.getLogger(__name__)

AnyContext = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]
"""A call's context on the sync or the asyncio server (the same calls are used)."""

_CN_KEY = "x509_common_name"
"""auth_context key of the verified peer certificate's subject CN (values are bytes)."""

# mTLS without a parties file: any CA-signed certificate with a valid party id as its
# CN is that party.
_OPEN_REGISTRY = PartyRegistry(open=True)


def _cert_name(context: AnyContext) -> str | None:
    """CN of the verified client certificate, or None if the peer sent none."""
    # grpc-stubs types this as Mapping[str, bytes]; at runtime each value is a list
    # of bytes, and the key is absent when the peer presented no certificate.
    auth = cast("Mapping[str, Iterable[bytes]]", context.auth_context())
    names = list(auth.get(_CN_KEY, ()))
    if not names:
        return None
    if len(names) != 1:
        raise AuthError("client certificate has more than one common name")
    try:
        return names[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise AuthError("client certificate common name is not UTF-8") from e


def _bearer_token(context: AnyContext) -> str | None:
    """The token of the call's ``authorization: Bearer`` header, or None if absent."""
    metadata = context.invocation_metadata() or ()
    headers = [v for k, v in metadata if k.lower() == AUTH_HEADER]
    if not headers:
        return None
    if len(headers) != 1:
        raise AuthError("more than one authorization header")
    header = headers[0]
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError as e:
            raise AuthError("authorization header is not ASCII") from e
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER_SCHEME or not token:
        raise AuthError("authorization header must be 'Bearer <token>'")
    return token


def identity_from_context(
    context: AnyContext, registry: PartyRegistry | None, *, mtls: bool
) -> Identity | None:
    """Authenticate the caller of an RPC from its channel and metadata.

    Under mTLS the verified certificate's CN is looked up in ``registry`` (or, with no
    registry, any valid party id is accepted). A call without a client certificate (or
    without mTLS) must carry a bearer token listed in ``registry``.

    Args:
        context: The call's servicer context.
        registry: Parties and admins from the parties file; None if no file given.
        mtls: Whether the server verifies client certificates (the CA given and
            ``require_client_cert`` on).

    Returns:
        The caller, or None in open insecure mode (no registry and no mTLS), where the
        caller falls back to the party id in the payload.

    Raises:
        AuthError: Missing, malformed or unknown credentials.
    """
    if registry is None and not mtls:
        return None
    if mtls:
        name = _cert_name(context)
        if name is not None:
            identity = (registry or _OPEN_REGISTRY).identity_for_cert_name(name)
            if identity is None:
                log.info("rejected certificate %r from %s", name, context.peer())
                raise AuthError(f"client certificate {name!r} is not a known party")
            return identity
    # No certificate: only reachable without required client certs, since the TLS
    # handshake already rejects a client that sends none.
    if registry is None:
        raise AuthError("no client certificate presented")
    token = _bearer_token(context)
    if token is None:
        raise AuthError(
            "missing credentials: send 'authorization: Bearer <token>' metadata"
            + (" or a client certificate" if mtls else "")
        )
    identity = registry.authenticate_token(token)
    if identity is None:
        # Never log the token itself.
        log.info("rejected unknown bearer token from %s", context.peer())
        raise AuthError("unknown bearer token")
    return identity


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials for the aggregator's port.

    gRPC Python either requires and verifies a client certificate or does not ask
    for one at all; ``tls.ca`` is only used when ``tls.require_client_cert``.

    Raises:
        ConfigError: Missing certificate or key, unreadable files, or client
            certificates required without a CA to verify them.
    """
    if tls.cert is None or tls.key is None:
        raise ConfigError(
            "TLS needs both a certificate and a key (--tls-cert/--tls-key)"
        )
    if tls.require_client_cert and tls.ca is None:
        raise ConfigError(
            "requiring client certificates needs a CA to verify them (--tls-ca)"
        )
    pair = (read_file(tls.key, "TLS key"), read_file(tls.cert, "TLS certificate"))
    root = read_file(tls.ca, "CA certificate") if tls.ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=tls.require_client_cert
    )
