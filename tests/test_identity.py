"""Identity from certificates built here with cryptography, so every odd field is reachable."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtlsproxy.identity import Identity, IdentityError

_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuing CA"),
    ]
)
NOT_BEFORE = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def make_cert(
    *,
    cn: str | None = "player-1",
    ous: tuple[str, ...] = (),
    sans: list[x509.GeneralName] | None = None,
    serial: int = 0xABCDEF0123,
    extra_attrs: list[x509.NameAttribute[str]] | None = None,
) -> x509.Certificate:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Game Co")]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    attrs += extra_attrs or []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(_ISSUER)
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_BEFORE + dt.timedelta(hours=24))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def test_all_fields() -> None:
    cert = make_cert(
        ous=("players", "eu"),
        sans=[
            x509.DNSName("player-1.game.example"),
            x509.UniformResourceIdentifier("spiffe://game.example/player/1"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
            x509.DNSName("alt.game.example"),
        ],
    )
    ident = Identity.from_certificate(cert)
    assert ident.subject == "CN=player-1,OU=eu,OU=players,O=Game Co"
    assert ident.subject == cert.subject.rfc4514_string()
    assert ident.issuer == "CN=Test Issuing CA,O=Test"
    assert ident.cn == "player-1"
    assert ident.ous == ("players", "eu")
    assert ident.dns == ("player-1.game.example", "alt.game.example")
    assert ident.ips == ("192.0.2.7", "2001:db8::1")
    assert ident.uris == ("spiffe://game.example/player/1",)
    assert ident.spiffe_id == "spiffe://game.example/player/1"
    assert ident.serial == "abcdef0123"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ident.sha256 == hashlib.sha256(der).hexdigest()
    assert ident.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ident.not_before == NOT_BEFORE
    assert ident.not_after == NOT_BEFORE + dt.timedelta(hours=24)
    assert ident.not_after.tzinfo is not None
    assert Identity.from_der(der) == ident


def test_no_san_no_cn() -> None:
    ident = Identity.from_certificate(make_cert(cn=None, sans=None))
    assert (ident.cn, ident.dns, ident.ips, ident.uris, ident.spiffe_id) == (None, (), (), (), None)
    assert ident.subject == "O=Game Co"


def test_is_frozen_and_encodes_to_json() -> None:
    ident = Identity.from_certificate(make_cert(sans=[x509.DNSName("a.example")]))
    with pytest.raises(AttributeError):
        ident.cn = "someone-else"  # type: ignore[misc]
    decoded = msgspec.json.decode(msgspec.json.encode(ident), type=Identity)
    assert decoded == ident


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        (["spiffe://td/ns/a"], "spiffe://td/ns/a"),
        (["spiffe://td"], "spiffe://td"),
        (["https://td/x"], None),
        (["spiffe:///no-trust-domain"], None),
        # An SVID has exactly one URI SAN: two leave the identity ambiguous.
        (["spiffe://td/a", "spiffe://td/b"], None),
        (["spiffe://td/a", "https://td/a"], None),
        ([], None),
    ],
)
def test_spiffe_id(uris: list[str], expected: str | None) -> None:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    ident = Identity.from_certificate(make_cert(sans=sans or [x509.DNSName("x.example")]))
    assert ident.spiffe_id == expected
    assert ident.uris == tuple(uris)


def test_serial_is_lowercase_hex_without_prefix() -> None:
    assert Identity.from_certificate(make_cert(serial=1)).serial == "1"
    big = (1 << 158) | 0xFF
    assert Identity.from_certificate(make_cert(serial=big)).serial == format(big, "x")


def test_subject_escapes_rfc4514_specials() -> None:
    ident = Identity.from_certificate(make_cert(cn='Doe, "J" + <x>;\\'))
    assert ident.subject == 'CN=Doe\\, \\"J\\" \\+ \\<x\\>\\;\\\\,O=Game Co'
    assert x509.Name.from_rfc4514_string(ident.subject) == make_cert(cn='Doe, "J" + <x>;\\').subject


def test_subject_control_characters_are_hex_escaped() -> None:
    # cryptography leaves CR/LF raw; a subject goes into a header and into logs.
    cert = make_cert(cn="evil\r\nX-Injected: 1")
    ident = Identity.from_certificate(cert)
    assert "\r" not in ident.subject and "\n" not in ident.subject
    assert ident.subject.startswith("CN=evil\\0D\\0AX-Injected: 1,")
    assert x509.Name.from_rfc4514_string(ident.subject) == cert.subject
    assert ident.cn == "evil\r\nX-Injected: 1"  # the value itself is not rewritten


def test_two_common_names_are_refused() -> None:
    cert = make_cert(extra_attrs=[x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    with pytest.raises(IdentityError, match="2 common names"):
        Identity.from_certificate(cert)


@pytest.mark.parametrize(
    "san",
    [
        x509.DNSName("bad name.example"),
        x509.DNSName("crlf\r\n.example"),
        x509.UniformResourceIdentifier("spiffe://td/a\nb"),
        x509.UniformResourceIdentifier("spiffe://td/a b"),
    ],
)
def test_sans_that_are_not_hostnames_or_uris_are_refused(san: x509.GeneralName) -> None:
    with pytest.raises(IdentityError, match="SAN"):
        Identity.from_certificate(make_cert(sans=[san]))


def test_from_der_rejects_garbage() -> None:
    with pytest.raises(IdentityError, match="not DER"):
        Identity.from_der(b"\x30\x03garbage")
