"""The certificate authority: a CA, the aggregator's and the parties' certificates.

A deployment has one certificate authority in a directory::

    ca.pem  ca.key            the CA (EC P-256, self-signed)
    server.pem  server.key    the aggregator, SANs for its host names and addresses
    parties/<id>.pem  .key    one client certificate per party, CN = party id

No grpc import: the gRPC edges turn these files into credentials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrpc.errors import ConfigError
from fedgrpc.security.registry import check_party_id
from fedgrpc.store.files import atomic_write, private_dir

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PARTIES_DIR = "parties"

DEFAULT_DAYS = 825
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
"""Names the aggregator's certificate is valid for unless others are given."""
_CLOCK_SKEW = dt.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644


# --------------------------------------------------------------------- certificates


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"certificate validity must be >= 1 day, got {days}")


def _name(common_name: str) -> x509.Name:
    try:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgrpc"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
    except ValueError as e:  # e.g. a CN over 64 characters
        raise ConfigError(f"invalid certificate name {common_name!r}: {e}") from e


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: gRPC cannot read encrypted keys; the file mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS or IP SubjectAlternativeName entries; IPs are recognised with ipaddress."""
    if not names:
        raise ConfigError("need at least one server name for the server certificate")
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name or any(c.isspace() for c in name) or not name.isascii():
            raise ConfigError(f"invalid server name {name!r}: not an IP or DNS name")
        entries.append(x509.DNSName(name))
    return entries


def _leaf_builder(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
) -> x509.Certificate:
    """Sign an end-entity certificate; it never outlives the CA."""
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def _self_signed_ca(
    ca_key: ec.EllipticCurvePrivateKey, *, days: int
) -> x509.Certificate:
    """A self-signed CA certificate for ``ca_key``; it signs leaves only (path 0)."""
    now = dt.datetime.now(dt.UTC)
    # A random suffix keeps two CAs distinguishable in logs and error messages.
    ca_name = _name(f"fedgrpc CA {secrets.token_hex(4)}")
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def init_ca(
    directory: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> dict[str, Path]:
    """Create a CA and the aggregator's server certificate in ``directory``.

    Args:
        directory: Where to write ``ca.pem``, ``ca.key``, ``server.pem`` and
            ``server.key``; created (0700) if missing.
        server_names: Host names and IP addresses the aggregator is reached by; each
            becomes a SubjectAlternativeName entry, the first is also the CN.
        days: Validity of both certificates.
        force: Replace an existing CA. Every certificate it issued stops verifying.

    Returns:
        Paths under the keys ``ca_cert``, ``ca_key``, ``server_cert``, ``server_key``.

    Raises:
        ConfigError: A CA already exists and ``force`` is false, or bad arguments.
    """
    _check_days(days)
    directory = Path(directory)
    paths = {
        "ca_cert": directory / CA_CERT,
        "ca_key": directory / CA_KEY,
        "server_cert": directory / SERVER_CERT,
        "server_key": directory / SERVER_KEY,
    }
    existing = [p for p in (paths["ca_cert"], paths["ca_key"]) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"a CA already exists in {directory} "
            f"({', '.join(p.name for p in existing)}); refusing to overwrite it:"
            " every certificate it issued would stop verifying. Pass --force"
            " (force=True) to replace it and re-issue the party certificates."
        )
    sans = _san_entries(server_names)
    private_dir(directory)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _self_signed_ca(ca_key, days=days)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf_builder(
        _name(server_names[0]),
        server_key.public_key(),
        ca_cert,
        ca_key,
        days=days,
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
    )

    # Keys before certificates: a crash leaves a CA that blocks re-init, not a
    # certificate whose key is lost.
    atomic_write(paths["ca_key"], _key_pem(ca_key), _KEY_MODE)
    atomic_write(paths["ca_cert"], _cert_pem(ca_cert), _CERT_MODE)
    atomic_write(paths["server_key"], _key_pem(server_key), _KEY_MODE)
    atomic_write(paths["server_cert"], _cert_pem(server_cert), _CERT_MODE)
    log.info("created CA and server certificate in %s for %s", directory, server_names)
    return paths


def issued_party_ids(directory: Path) -> list[str]:
    """Ids of the party (and admin) certificates under ``directory/parties``."""
    parties = Path(directory) / PARTIES_DIR
    if not parties.is_dir():
        return []
    return sorted(p.stem for p in parties.glob("*.pem"))


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key from ``directory`` and check they match."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise ConfigError(
            f"no CA in {directory} (missing {Path(e.filename).name}); run init_ca first"
        ) from e
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the CA in {directory}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def issue_party_cert(
    directory: Path, party_id: str, days: int = DEFAULT_DAYS, *, force: bool = False
) -> dict[str, Path]:
    """Issue a client certificate for ``party_id``, signed by the CA in ``directory``.

    The certificate's CN and its one DNS SubjectAlternativeName are the party id, and
    its extended key usage is clientAuth only, so it cannot serve as a server.

    Args:
        directory: The CA directory made by `init_ca`.
        party_id: Matches ``PARTY_ID_RE``.
        days: Validity, capped at the CA's own expiry.
        force: Replace an existing certificate for this party.

    Returns:
        Paths under the keys ``ca_cert``, ``cert`` (``parties/<id>.pem``) and ``key``
        (``parties/<id>.key``).

    Raises:
        ConfigError: Bad party id, no CA, or the party already has a certificate.
    """
    check_party_id(party_id)
    _check_days(days)
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    parties = directory / PARTIES_DIR
    paths = {
        "ca_cert": directory / CA_CERT,
        "cert": parties / f"{party_id}.pem",
        "key": parties / f"{party_id}.key",
    }
    if not force and (paths["cert"].exists() or paths["key"].exists()):
        raise ConfigError(
            f"party {party_id!r} already has a certificate in {parties}; pass "
            "--force (force=True) to replace it"
        )
    private_dir(parties)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_builder(
        _name(party_id),
        key.public_key(),
        ca_cert,
        ca_key,
        days=days,
        sans=[x509.DNSName(party_id)],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    atomic_write(paths["key"], _key_pem(key), _KEY_MODE)
    atomic_write(paths["cert"], _cert_pem(cert), _CERT_MODE)
    log.info("issued certificate for party %s in %s", party_id, parties)
    return paths
