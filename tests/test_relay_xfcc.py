"""XFCC: Envoy's byte format, and a parser that reads it back (Envoy's too)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.identity import Identity, rfc4514
from mtlsproxy.relay.xfcc import format_xfcc, parse_xfcc

HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def ident(
    subject: str = "CN=Test Client,OU=Lyft,L=San Francisco,ST=CA,C=US",
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> Identity:
    return Identity(
        subject=subject,
        issuer="CN=CA",
        cn="Test Client",
        ous=("Lyft",),
        dns=dns,
        ips=(),
        uris=uris,
        spiffe_id=None,
        serial="1",
        sha256=HASH,
        not_before=T0,
        not_after=T0,
    )


def test_envoy_documented_shape() -> None:
    # Envoy docs, headers.rst example 3, with our RFC 4514 subject instead of OpenSSL's
    # oneline form (Envoy itself now prints RFC 2253 too).
    value = format_xfcc(
        ident(uris=("http://testclient.lyft.com",), dns=("lyft.com", "www.lyft.com")),
        by="http://frontend.lyft.com",
    )
    assert value == (
        f"By=http://frontend.lyft.com;Hash={HASH};"
        'Subject="CN=Test Client,OU=Lyft,L=San Francisco,ST=CA,C=US";'
        "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com"
    )


def test_one_uri_pair_per_uri_san_and_empty_uri_when_none() -> None:
    assert format_xfcc(ident(uris=("spiffe://a/1", "spiffe://a/2"))).endswith(
        ";URI=spiffe://a/1;URI=spiffe://a/2"
    )
    # Envoy keeps the URI key "even if the URI is empty"; DNS only when there is one.
    assert (
        format_xfcc(ident())
        == f'Hash={HASH};Subject="CN=Test Client,OU=Lyft,L=San Francisco,ST=CA,C=US";URI='
    )


def test_subject_is_quoted_verbatim_even_when_it_has_escapes() -> None:
    subject = 'CN=Doe\\, \\"J\\",O=Game Co'
    value = format_xfcc(ident(subject=subject))
    assert f'Subject="{subject}"' in value
    assert parse_xfcc(value)[0].get("subject") == subject


def test_empty_subject_is_still_quoted() -> None:
    assert 'Subject=""' in format_xfcc(ident(subject=""))


@pytest.mark.parametrize(
    ("uri", "written"),
    [
        ("spiffe://td/ns/a", "URI=spiffe://td/ns/a"),
        ("https://x/?a=b;c,d", 'URI="https://x/?a=b;c,d"'),
        ('https://x/"q"', 'URI="https://x/\\"q\\""'),
        ("https://x/a\\b", 'URI="https://x/a\\\\b"'),
    ],
)
def test_other_values_are_quoted_only_when_needed(uri: str, written: str) -> None:
    value = format_xfcc(ident(uris=(uri,)))
    assert written in value.split(";", 2)[2]
    assert parse_xfcc(value)[0].get_all("URI") == [uri]


def test_control_characters_never_reach_the_header() -> None:
    with pytest.raises(ValueError, match="control"):
        format_xfcc(ident(dns=("a\r\nX-Evil: 1",)))


def test_parse_envoy_example_with_two_elements() -> None:
    header = (
        f"By=http://frontend.lyft.com;Hash={HASH};URI=http://testclient.lyft.com,"
        "By=http://backend.lyft.com;Hash=9ba6;URI=http://frontend.lyft.com"
    )
    first, second = parse_xfcc(header)
    assert first.get("by") == "http://frontend.lyft.com"
    assert first.get("HASH") == HASH
    assert second.get("uri") == "http://frontend.lyft.com"
    assert second.get("subject") is None


@pytest.mark.parametrize("bad", ['Subject="CN=a', "Hash", "=x", 'URI="a\\"'])
def test_parse_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_xfcc(bad)


def test_real_certificate_round_trip() -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, 'a,b;c="d"\\'),
            x509.NameAttribute(NameOID.COMMON_NAME, "p1"),
        ]
    )
    value = format_xfcc(ident(subject=rfc4514(name)))
    assert x509.Name.from_rfc4514_string(parse_xfcc(value)[0].get("Subject") or "") == name


_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
_unicode = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=20,
)
_san = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)


@given(
    cn=_unicode,
    ou=_unicode,
    uris=st.lists(_san, max_size=3),
    dns=st.lists(_san, max_size=3),
    by=st.none() | _san,
)
def test_round_trip(cn: str, ou: str, uris: list[str], dns: list[str], by: str | None) -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    identity = ident(subject=rfc4514(name), uris=tuple(uris), dns=tuple(dns))
    value = format_xfcc(identity, by=by)
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    (element,) = parse_xfcc(value)
    assert element.get("subject") == identity.subject
    assert x509.Name.from_rfc4514_string(element.get("subject") or "") == name
    assert element.get("hash") == HASH
    assert element.get_all("uri") == (uris or [""])
    assert element.get_all("dns") == dns
    assert element.get_all("by") == ([by] if by else [])


@given(subject=_printable)
def test_any_subject_string_keeps_the_header_parseable(subject: str) -> None:
    # An Identity built by hand may hold text that is not RFC 4514; the header must still
    # parse into exactly one element with every key in place.
    (element,) = parse_xfcc(format_xfcc(ident(subject=subject, uris=("u",), dns=("d",))))
    assert [k for k, _ in element.pairs] == ["Hash", "Subject", "URI", "DNS"]
