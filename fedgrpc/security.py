"""Certificates, bearer tokens and the parties file (DESIGN §5). No grpc import.

A deployment has one certificate authority in a directory::

    ca.pem  ca.key            the CA (EC P-256, self-signed)
    server.pem  server.key    the aggregator, SANs for its host names and addresses
    parties/<id>.pem  .key    one client certificate per party, CN = party id

and, optionally, a TOML parties file that lists who may connect::

    [[admin]]
    name = "operator"
    token_sha256 = "<hex>"      # and/or cert_name = "<certificate CN>"
    [[party]]
    id = "p0"
    token_sha256 = "<hex>"      # optional when the party uses an mTLS certificate

The file stores only SHA-256 digests of tokens; the plaintext token is shown once, by
``add_party``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrpc.checkpoint import atomic_write
from fedgrpc.errors import ConfigError

log = logging.getLogger(__name__)

PARTY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Allowed party ids and admin names: safe as file names, CNs and TOML strings."""

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PARTIES_DIR = "parties"

DEFAULT_DAYS = 825
_CLOCK_SKEW = dt.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700
_HEX_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename, with ``mode``."""
    atomic_write(path, data, mode)


def _make_dir(directory: Path) -> None:
    """Create ``directory`` (0700 when new); an existing one keeps its mode."""
    try:
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create directory {directory}: {e}") from e


# --------------------------------------------------------------------- certificates


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"certificate validity must be >= 1 day, got {days}")


def _check_party_id(party_id: str, what: str = "party id") -> None:
    if not PARTY_ID_RE.fullmatch(party_id):
        raise ConfigError(
            f"invalid {what} {party_id!r}: expected 1-64 characters from "
            "A-Z a-z 0-9 _ . -"
        )


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


def init_ca(
    directory: Path,
    *,
    server_names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
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
            " every certificate it issued would stop verifying. Pass force=True"
            " (--force) to replace it."
        )
    sans = _san_entries(server_names)
    _make_dir(directory)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    # A random suffix keeps two CAs distinguishable in logs and error messages.
    ca_name = _name(f"fedgrpc CA {secrets.token_hex(4)}")
    ca_cert = (
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
    _write_atomic(paths["ca_key"], _key_pem(ca_key), _KEY_MODE)
    _write_atomic(paths["ca_cert"], _cert_pem(ca_cert), _CERT_MODE)
    _write_atomic(paths["server_key"], _key_pem(server_key), _KEY_MODE)
    _write_atomic(paths["server_cert"], _cert_pem(server_cert), _CERT_MODE)
    log.info("created CA and server certificate in %s for %s", directory, server_names)
    return paths


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
    _check_party_id(party_id)
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
            "force=True (--force) to replace it"
        )
    _make_dir(parties)

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
    _write_atomic(paths["key"], _key_pem(key), _KEY_MODE)
    _write_atomic(paths["cert"], _cert_pem(cert), _CERT_MODE)
    log.info("issued certificate for party %s in %s", party_id, parties)
    return paths


def verify_issued(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` was signed by ``ca_cert`` (signature and issuer name only).

    A diagnostic for tools and tests; TLS itself does full chain validation.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- tokens


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token, as stored in the parties file.

    A fast unsalted hash is enough here: tokens are 256-bit random values from
    `new_token`, so there is nothing to brute-force or look up in a dictionary.
    Never use this for human-chosen passwords.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------- parties file


def _bad_digest(where: str, value: str) -> str:
    # Never echo the value: it may be a plaintext token pasted into the wrong field.
    return (
        f"{where}: token_sha256 must be 64 hex digits (the SHA-256 of the token, not "
        f"the token itself), got {len(value)} characters"
    )


@dataclass(frozen=True)
class Identity:
    """Who is calling, as established from the channel (never from the payload)."""

    name: str
    """Party id, or the admin's name when ``is_admin``."""
    is_admin: bool = False


@dataclass(frozen=True)
class Credential:
    """How one identity authenticates: a token digest, a certificate name, or both."""

    identity: Identity
    token_sha256: str | None = None
    """Lower-case hex SHA-256 of the bearer token (see `hash_token`)."""
    cert_name: str | None = None
    """Certificate CN that authenticates as this identity over mTLS."""


class PartyRegistry:
    """The parties and admins allowed to connect, and how each authenticates."""

    def __init__(
        self, credentials: Iterable[Credential] = (), *, open: bool = False
    ) -> None:
        """Build a registry.

        Args:
            credentials: One entry per party or admin; names, certificate names and
                token digests must each be unique.
            open: Accept every CA-signed certificate whose CN is a valid party id as
                that party. Used when mTLS is on and no parties file is given.

        Raises:
            ConfigError: Duplicate ids, certificate names or tokens; bad digests.
        """
        creds = tuple(credentials)
        self._open = open
        self._digests: list[tuple[bytes, Identity]] = []
        self._by_cert: dict[str, Identity] = {}
        self._parties: list[str] = []
        self._admins: list[str] = []
        seen: set[Identity] = set()
        for c in creds:
            who = f"{'admin' if c.identity.is_admin else 'party'} {c.identity.name!r}"
            if c.identity in seen:
                raise ConfigError(f"duplicate {who}")
            seen.add(c.identity)
            (self._admins if c.identity.is_admin else self._parties).append(
                c.identity.name
            )
            if c.token_sha256 is not None:
                if not _HEX_SHA256_RE.fullmatch(c.token_sha256):
                    raise ConfigError(_bad_digest(who, c.token_sha256))
                digest = bytes.fromhex(c.token_sha256)
                if any(d == digest for d, _ in self._digests):
                    raise ConfigError(f"{who}: token_sha256 is used by another entry")
                self._digests.append((digest, c.identity))
            if c.cert_name is not None:
                if c.cert_name in self._by_cert:
                    raise ConfigError(
                        f"{who}: certificate name {c.cert_name!r} already names "
                        f"{self._by_cert[c.cert_name]}"
                    )
                self._by_cert[c.cert_name] = c.identity

    @classmethod
    def load(cls, path: Path) -> PartyRegistry:
        """Read a parties file (TOML, see the module docstring).

        Raises:
            ConfigError: Unreadable or malformed file; the message names the file and
                the line (syntax errors) or the entry and key (content errors).
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"parties file {path} does not exist") from e
        except OSError as e:
            raise ConfigError(f"cannot read parties file {path}: {e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"parties file {path} is not valid TOML: {e}") from e
        try:
            return cls(_credentials_from_toml(doc))
        except ConfigError as e:
            raise ConfigError(f"parties file {path}: {e}") from e

    @property
    def open(self) -> bool:
        """Whether any CA-signed party certificate is accepted (see ``__init__``)."""
        return self._open

    def authenticate_token(self, token: str) -> Identity | None:
        """The identity whose stored digest matches ``token``, or None.

        Every stored digest is compared with `hmac.compare_digest` and the loop never
        exits early, so the time taken does not reveal which entry (if any) matched.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Identity | None = None
        for stored, identity in self._digests:
            # No early exit and no short-circuit: compare against every entry.
            if hmac.compare_digest(digest, stored) and found is None:
                found = identity
        return found

    def identity_for_cert_name(self, name: str) -> Identity | None:
        """The identity of a verified certificate's CN, or None if not allowed.

        A listed party id or an admin's ``cert_name`` (never both: the constructor
        rejects the clash); an open registry also accepts any valid party id.
        """
        identity = self._by_cert.get(name)
        if identity is not None:
            return identity
        if self._open and PARTY_ID_RE.fullmatch(name):
            return Identity(name, is_admin=False)
        return None

    def party_ids(self) -> tuple[str, ...]:
        """Listed party ids, in file order (empty for an open registry)."""
        return tuple(self._parties)

    def admin_names(self) -> tuple[str, ...]:
        """Listed admin names, in file order."""
        return tuple(self._admins)

    def __repr__(self) -> str:
        return (
            f"PartyRegistry(parties={len(self._parties)}, admins={len(self._admins)}, "
            f"open={self._open})"
        )


_PARTY_KEYS = frozenset({"id", "token_sha256"})
_ADMIN_KEYS = frozenset({"name", "token_sha256", "cert_name"})


def _optional_str(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{where}: {key} must be a string, got {type(value).__name__}"
        )
    return value


def _credentials_from_toml(doc: Mapping[str, Any]) -> list[Credential]:
    """Turn a parsed parties file into credentials; errors name the entry and key."""
    unknown = sorted(set(doc) - {"party", "admin"})
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {unknown}; expected [[party]] and [[admin]]"
            " tables"
        )
    creds: list[Credential] = []
    for section, allowed, id_key in (
        ("admin", _ADMIN_KEYS, "name"),
        ("party", _PARTY_KEYS, "id"),
    ):
        entries = doc.get(section, [])
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) for e in entries
        ):
            raise ConfigError(f"{section!r} must be an array of tables ([[{section}]])")
        for i, entry in enumerate(entries, start=1):
            where = f"[[{section}]] #{i}"
            bad = sorted(set(entry) - allowed)
            if bad:
                raise ConfigError(
                    f"{where}: unknown key(s) {bad}; allowed: {sorted(allowed)}"
                )
            name = _optional_str(entry, id_key, where)
            if name is None:
                raise ConfigError(f"{where}: missing key {id_key!r}")
            _check_party_id(name, f"{where} {id_key}")
            where = f"[[{section}]] #{i} ({id_key} = {name!r})"
            token_sha256 = _optional_str(entry, "token_sha256", where)
            if token_sha256 is not None and not _HEX_SHA256_RE.fullmatch(token_sha256):
                raise ConfigError(_bad_digest(where, token_sha256))
            if section == "admin":
                cert_name = _optional_str(entry, "cert_name", where)
                if token_sha256 is None and cert_name is None:
                    raise ConfigError(f"{where}: needs token_sha256 or cert_name")
                creds.append(Credential(Identity(name, True), token_sha256, cert_name))
            else:
                # A listed party may always authenticate with its certificate.
                creds.append(Credential(Identity(name, False), token_sha256, name))
    return creds


def add_party(path: Path, party_id: str, *, admin: bool = False) -> str:
    """Append a party (or admin) with a fresh token to a parties file.

    The file is created if missing and rewritten atomically (mode 0600). Only the
    token's digest is stored: the returned plaintext is the only copy, so hand it to
    the party now. Not safe against concurrent writers of the same file.

    Args:
        path: The parties file.
        party_id: Party id, or the admin's name when ``admin``.
        admin: Add an ``[[admin]]`` entry instead of a ``[[party]]``.

    Returns:
        The plaintext bearer token.

    Raises:
        ConfigError: Invalid id, an entry with that id already exists, or the
            existing file is malformed.
    """
    path = Path(path)
    _check_party_id(party_id, "admin name" if admin else "party id")
    old = ""
    if path.exists():
        registry = PartyRegistry.load(path)
        listed = registry.admin_names() if admin else registry.party_ids()
        if party_id in listed:
            raise ConfigError(
                f"{'admin' if admin else 'party'} {party_id!r} is already in {path}"
            )
        old = path.read_text(encoding="utf-8")
    token = new_token()
    section, key = ("admin", "name") if admin else ("party", "id")
    # party_id matches PARTY_ID_RE, so it needs no TOML escaping.
    block = (
        f'[[{section}]]\n{key} = "{party_id}"\ntoken_sha256 = "{hash_token(token)}"\n'
    )
    sep = (
        ""
        if not old or old.endswith("\n\n")
        else ("\n" if old.endswith("\n") else "\n\n")
    )
    new = old + sep + block
    PartyRegistry(_credentials_from_toml(tomllib.loads(new)))  # never write a bad file
    _make_dir(path.parent)
    _write_atomic(path, new.encode("utf-8"), _KEY_MODE)
    log.info("added %s %s to %s", section, party_id, path)
    return token
