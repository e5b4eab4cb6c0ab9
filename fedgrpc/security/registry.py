"""Who may connect: bearer tokens, identities and the parties file (DESIGN §5).

An optional TOML parties file lists who may connect::

    [[admin]]
    name = "operator"
    token_sha256 = "<hex>"      # and/or cert_name = "<certificate CN>"
    [[party]]
    id = "p0"
    token_sha256 = "<hex>"      # optional when the party uses an mTLS certificate
    samples = 6000              # optional: the most samples p0 may claim (attested)

The file stores only SHA-256 digests of tokens; the plaintext token is shown once, by
``add_party``. No grpc import.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgrpc.errors import ConfigError
from fedgrpc.store.files import atomic_write, private_dir

log = logging.getLogger(__name__)

PARTY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Allowed party ids and admin names: safe as file names, CNs and TOML strings."""

AUTH_HEADER = "authorization"
"""Metadata key of the bearer token (gRPC metadata keys are lower case)."""
BEARER_SCHEME = "bearer"
"""Scheme of the header's value, ``Bearer <token>`` (compared case-insensitively)."""

_KEY_MODE = 0o600
_HEX_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def check_party_id(party_id: str, what: str = "party id") -> None:
    """Raise ConfigError unless ``party_id`` matches :data:`PARTY_ID_RE`."""
    if not PARTY_ID_RE.fullmatch(party_id):
        raise ConfigError(
            f"invalid {what} {party_id!r}: expected 1-64 characters from "
            "A-Z a-z 0-9 _ . -"
        )


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
    samples: int | None = None
    """The operator's attested sample count of a party (no claim may exceed it)."""


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
        self._samples: dict[str, int] = {}
        seen: set[Identity] = set()
        for c in creds:
            who = f"{'admin' if c.identity.is_admin else 'party'} {c.identity.name!r}"
            if c.identity in seen:
                raise ConfigError(f"duplicate {who}")
            seen.add(c.identity)
            (self._admins if c.identity.is_admin else self._parties).append(
                c.identity.name
            )
            if c.samples is not None and not c.identity.is_admin:
                self._samples[c.identity.name] = c.samples
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

    def attested_samples(self, party_id: str) -> int | None:
        """The count the operator attested for ``party_id`` (None: not attested)."""
        return self._samples.get(party_id)

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


_PARTY_KEYS = frozenset({"id", "token_sha256", "samples"})
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
            check_party_id(name, f"{where} {id_key}")
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
                samples = entry.get("samples")
                if samples is not None and (
                    isinstance(samples, bool)
                    or not isinstance(samples, int)
                    or samples <= 0
                ):
                    raise ConfigError(
                        f"{where}: samples must be a positive integer, got {samples!r}"
                    )
                # A listed party may always authenticate with its certificate.
                creds.append(
                    Credential(Identity(name, False), token_sha256, name, samples)
                )
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
    check_party_id(party_id, "admin name" if admin else "party id")
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
    private_dir(path.parent)
    atomic_write(path, new.encode("utf-8"), _KEY_MODE)
    log.info("added %s %s to %s", section, party_id, path)
    return token


def remove_party(path: Path, party_id: str, *, admin: bool = False) -> None:
    """Remove a party (or admin) from a parties file; its token stops working.

    The file is rewritten atomically (mode 0600) from its parsed entries, so
    comments are not kept. A running aggregator reads the file at start: restart it
    (``--resume``) for the removal to take effect.

    Raises:
        ConfigError: No such entry, or the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no parties file at {path}")
    creds = _credentials_from_toml(tomllib.loads(path.read_text(encoding="utf-8")))
    kept = [
        c
        for c in creds
        if not (c.identity.name == party_id and c.identity.is_admin == admin)
    ]
    if len(kept) == len(creds):
        raise ConfigError(
            f"{'admin' if admin else 'party'} {party_id!r} is not in {path}"
        )
    blocks = []
    for c in kept:
        section, key = ("admin", "name") if c.identity.is_admin else ("party", "id")
        lines = [f"[[{section}]]", f'{key} = "{c.identity.name}"']
        if c.token_sha256:
            lines.append(f'token_sha256 = "{c.token_sha256}"')
        if c.cert_name and c.identity.is_admin:  # a party's is its id
            lines.append(f'cert_name = "{c.cert_name}"')
        blocks.append("\n".join(lines) + "\n")
    new = "\n".join(blocks)
    PartyRegistry(_credentials_from_toml(tomllib.loads(new)))  # never write a bad file
    atomic_write(path, new.encode("utf-8"), _KEY_MODE)
    log.info("removed %s %s from %s", "admin" if admin else "party", party_id, path)
