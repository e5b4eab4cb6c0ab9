"""Unit tests for fedgrpc.security: certificates, tokens and the parties file."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrpc.errors import ConfigError
from fedgrpc.security.pki import init_ca, issue_party_cert
from fedgrpc.security.registry import (
    Credential,
    Identity,
    PartyRegistry,
    add_party,
    hash_token,
    new_token,
)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory)
    issue_party_cert(directory, "p0")
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_ca_is_self_signed_ca(ca_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.pem")

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)

    assert constraints.value.ca is True
    assert constraints.critical
    ca.verify_directly_issued_by(ca)  # self-signed: raises if not
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_init_ca_server_cert_signed_by_ca_with_sans(ca_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.pem")
    server = _cert(ca_dir / "server.pem")

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    server.verify_directly_issued_by(ca)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_ca_custom_server_names(tmp_path: Path) -> None:
    paths = init_ca(tmp_path, server_names=["agg.example.org", "10.0.0.7"], days=30)

    server = _cert(paths["server_cert"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    validity = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 <= validity.days <= 31


def test_issue_party_cert_cn_san_eku(ca_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.pem")
    party = _cert(ca_dir / "parties" / "p0.pem")

    cn = party.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = party.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = party.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    party.verify_directly_issued_by(ca)
    assert [a.value for a in cn] == ["p0"]
    assert san.get_values_for_type(x509.DNSName) == ["p0"]
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issue_party_cert_not_signed_by_other_ca(ca_dir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path)

    other_ca = _cert(tmp_path / "ca.pem")

    party = _cert(ca_dir / "parties" / "p0.pem")

    # What the deleted pki.verify_issued checked: issuer name, then signature.
    with pytest.raises((ValueError, InvalidSignature)):
        party.verify_directly_issued_by(other_ca)


def test_key_files_mode_0600(ca_dir: Path) -> None:
    keys = [ca_dir / "ca.key", ca_dir / "server.key", ca_dir / "parties" / "p0.key"]

    modes = {k.name: _mode(k) for k in keys}

    assert modes == {"ca.key": 0o600, "server.key": 0o600, "p0.key": 0o600}
    assert _mode(ca_dir / "ca.pem") == 0o644
    assert not list(ca_dir.glob(".*.tmp"))


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()

    with pytest.raises(ConfigError, match=r"already exists.*force"):
        init_ca(tmp_path)

    assert (tmp_path / "ca.pem").read_bytes() == before


def test_init_ca_force_replaces(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()

    init_ca(tmp_path, force=True)

    assert (tmp_path / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "p 0", "x" * 65, "p\n0", "é"])
def test_issue_party_cert_rejects_bad_id(ca_dir: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid party id"):
        issue_party_cert(ca_dir, bad)


def test_issue_party_cert_refuses_existing_and_needs_ca(
    ca_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="already has a certificate"):
        issue_party_cert(ca_dir, "p0")
    with pytest.raises(ConfigError, match="no CA"):
        issue_party_cert(tmp_path, "p1")


def test_hash_token_is_hex_sha256() -> None:
    token = new_token()

    digest = hash_token(token)

    assert len(token) >= 43
    assert new_token() != token
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert hash_token("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_registry_load_and_authenticate(tmp_path: Path) -> None:
    admin_token, p0_token = new_token(), new_token()
    path = _write(
        tmp_path / "parties.toml",
        f"""
[[admin]]
name = "operator"
token_sha256 = "{hash_token(admin_token)}"
cert_name = "ops-laptop"

[[party]]
id = "p0"
token_sha256 = "{hash_token(p0_token).upper()}"

[[party]]
id = "p1"
""",
    )

    registry = PartyRegistry.load(path)

    assert registry.party_ids() == ("p0", "p1")
    assert registry.admin_names() == ("operator",)
    assert registry.authenticate_token(p0_token) == Identity("p0", is_admin=False)
    assert registry.authenticate_token(admin_token) == Identity("operator", True)
    assert registry.authenticate_token(new_token()) is None
    assert registry.authenticate_token("") is None
    assert registry.identity_for_cert_name("p1") == Identity("p1", False)
    assert registry.identity_for_cert_name("ops-laptop") == Identity("operator", True)
    assert registry.identity_for_cert_name("operator") is None
    assert registry.identity_for_cert_name("p9") is None
    assert not registry.open


def test_registry_open_accepts_any_valid_party_name() -> None:
    registry = PartyRegistry(open=True)

    assert registry.identity_for_cert_name("p42") == Identity("p42", False)
    assert registry.identity_for_cert_name("not a party/id") is None
    assert registry.authenticate_token(new_token()) is None
    assert registry.party_ids() == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[[party]]\nid = "p0"\nid = "p1"\n', r"not valid TOML.*line 3"),
        ('[[party]]\nid = "p0"\n[[party]]\nid = "p0"\n', "duplicate party 'p0'"),
        ('[[party]]\nid = "p0"\ntoken_sha256 = "xyz"\n', "#1.*token_sha256.*64 hex"),
        ('[[party]]\nid = "p0"\ntoken_sha256 = 5\n', "token_sha256 must be a string"),
        ('[[party]]\ntoken_sha256 = "00"\n', r"\[\[party\]\] #1: missing key 'id'"),
        ('[[party]]\nid = "a/b"\n', "invalid .*id 'a/b'"),
        ('[[party]]\nid = "p0"\ncolour = "red"\n', r"#1.*unknown key.*colour"),
        ('[[admin]]\nname = "ops"\n', "needs token_sha256 or cert_name"),
        ('party = "p0"\n', "array of tables"),
        ('[[parties]]\nid = "p0"\n', "unknown top-level key.*parties"),
        (
            '[[party]]\nid = "a"\ntoken_sha256 = "{h}"\n'
            '[[party]]\nid = "b"\ntoken_sha256 = "{h}"\n',
            "used by another entry",
        ),
        (
            '[[admin]]\nname = "ops"\ncert_name = "p0"\n[[party]]\nid = "p0"\n',
            "certificate name 'p0' already names",
        ),
    ],
)
def test_registry_load_rejects_malformed(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path / "parties.toml", text.replace("{h}", "ab" * 32))

    with pytest.raises(ConfigError, match=match) as info:
        PartyRegistry.load(path)

    assert str(path) in str(info.value)


def test_registry_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PartyRegistry.load(tmp_path / "nope.toml")


def test_registry_error_never_echoes_a_pasted_token(tmp_path: Path) -> None:
    token = new_token()
    path = _write(
        tmp_path / "p.toml", f'[[party]]\nid = "p0"\ntoken_sha256 = "{token}"\n'
    )

    with pytest.raises(ConfigError) as info:
        PartyRegistry.load(path)

    assert token not in str(info.value)


def test_registry_constructor_checks_credentials() -> None:
    with pytest.raises(ConfigError, match="duplicate party 'p0'"):
        PartyRegistry([Credential(Identity("p0")), Credential(Identity("p0"))])


def test_add_party_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "parties.toml"

    t0 = add_party(path, "p0")
    t1 = add_party(path, "p1")
    ta = add_party(path, "operator", admin=True)
    registry = PartyRegistry.load(path)

    assert registry.party_ids() == ("p0", "p1")
    assert registry.authenticate_token(t0) == Identity("p0", False)
    assert registry.authenticate_token(t1) == Identity("p1", False)
    assert registry.authenticate_token(ta) == Identity("operator", True)
    assert _mode(path) == 0o600
    assert t0 not in path.read_text()


def test_add_party_appends_to_hand_written_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "parties.toml", '# comment\n[[party]]\nid = "p0"')

    token = add_party(path, "p1")

    text = path.read_text()
    assert text.startswith('# comment\n[[party]]\nid = "p0"\n')
    assert PartyRegistry.load(path).authenticate_token(token) == Identity("p1", False)


def test_add_party_refuses_duplicate_and_bad_id(tmp_path: Path) -> None:
    path = tmp_path / "parties.toml"
    add_party(path, "p0")
    before = path.read_text()

    with pytest.raises(ConfigError, match="already in"):
        add_party(path, "p0")
    with pytest.raises(ConfigError, match="invalid party id"):
        add_party(path, 'p0"\n[[admin]]')

    assert path.read_text() == before


def test_security_does_not_import_grpc() -> None:
    code = "import sys, fedgrpc.security; assert 'grpc' not in sys.modules"

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
