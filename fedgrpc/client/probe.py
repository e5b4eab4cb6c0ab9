"""Tell a misconfigured connection from an aggregator that is not there yet.

gRPC reports every failed connection as UNAVAILABLE, which clients retry for up to
``connect_timeout_s``. Some causes never go away by waiting: a certificate that does
not name the host, a CA that did not sign it, TLS against plaintext or the reverse,
a missing client certificate. :func:`permanent_cause` names them (from gRPC's
details, and where those are ambiguous, "Socket closed", from one direct TLS probe of
the port) together with the fix, so the client can fail within seconds.
"""

from __future__ import annotations

import logging
import socket
import ssl

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
"""Budget of each step of the probe (connect, handshake, read)."""


def split_address(server: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``[v6]:port``; None if unparsable."""
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def cause_from_details(details: str, server: str, *, insecure: bool) -> str:
    """The permanent cause gRPC's failure ``details`` reveal, or ""."""
    host = (split_address(server) or (server, 0))[0]
    if "Hostname Verification" in details or "Peer name" in details:
        return (
            f"the aggregator's certificate does not name {host!r}: connect by a name "
            "the certificate lists, or pass --tls-server-name NAME (the name in the "
            "certificate, e.g. when reaching it by IP)"
        )
    if "WRONG_VERSION_NUMBER" in details or "PACKET_LENGTH_TOO_LONG" in details:
        return (
            f"the aggregator at {server} does not speak TLS (it answered plaintext): "
            "run the client with --insecure if the aggregator runs --insecure, or "
            "check the port"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"the certificate of the aggregator at {server} is not signed by the CA "
            "given with --tls-ca (or has expired): pass the CA that issued it"
        )
    if insecure and "Ssl handshake" in details:
        return (
            f"the aggregator at {server} requires TLS: pass --tls-ca instead of "
            "--insecure"
        )
    return ""


def probe(server: str, *, insecure: bool, has_client_cert: bool) -> str:
    """Connect to ``server`` directly and name a permanent misconfiguration, or "".

    Only the ambiguous cases are probed: a plaintext client (is the port TLS?) and
    a TLS client without a certificate (does the port demand one?). Anything that
    cannot be established (nothing listening, timeouts) is "": maybe transient.
    """
    addr = split_address(server)
    if addr is None or (not insecure and has_client_cert):
        return ""
    try:
        raw = socket.create_connection(addr, timeout=PROBE_TIMEOUT_S)
    except OSError:
        return ""  # nothing listening yet: transient
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only the protocol is probed, nothing trusted
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(raw, server_hostname=addr[0]) as tls:
            tls.settimeout(PROBE_TIMEOUT_S)
            if insecure:
                return (
                    f"the aggregator at {server} uses TLS but this client runs "
                    "--insecure: pass --tls-ca CA.pem (and a client certificate or "
                    "token if the aggregator asks for one)"
                )
            # TLS 1.3 servers check the client certificate after the handshake: a
            # gRPC server that wants one hangs up (or alerts) at once, where one
            # that does not sends its HTTP/2 settings.
            try:
                if tls.recv(1) == b"":
                    return _NEEDS_CERT.format(server=server)
            except ssl.SSLError as err:
                text = str(err).upper()
                if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text:
                    return _NEEDS_CERT.format(server=server)
            except OSError:
                return ""
            return ""
    except ssl.SSLError as err:
        text = str(err).upper()
        if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER" in text:
            return (
                ""
                if insecure
                else cause_from_details("WRONG_VERSION_NUMBER", server, insecure=False)
            )
        if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text:
            return _NEEDS_CERT.format(server=server)
        log.debug("TLS probe of %s: %s", server, err)
        return ""
    except OSError:
        return ""
    finally:
        raw.close()


_NEEDS_CERT = (
    "the aggregator at {server} requires a client certificate (mutual TLS): pass "
    "--tls-cert and --tls-key (issued by `fedgrpc certs issue`)"
)
