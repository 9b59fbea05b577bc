"""RFC 9440 Client-Cert and Client-Cert-Chain: the RFC's own example, and an independent
decoding (base64 and cryptography's DER loader) of certificates from the project's CA."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support import IssueFn, Pair

from mtlsproxy import pem
from mtlsproxy.identity import PeerCertificateCache, PeerCertificates
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.relay.client_cert import byte_sequence, client_cert, client_cert_chain

# RFC 9440 Appendix A, Figure 1: the client's certificate, an intermediate and the root.
RFC_LEAF = """\
-----BEGIN CERTIFICATE-----
MIIBqDCCAU6gAwIBAgIBBzAKBggqhkjOPQQDAjA6MRswGQYDVQQKDBJMZXQncyBB
dXRoZW50aWNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTAeFw0yMDAx
MTQyMjU1MzNaFw0yMTAxMjMyMjU1MzNaMA0xCzAJBgNVBAMMAkJDMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE8YnXXfaUgmnMtOXU/IncWalRhebrXmckC8vdgJ1p
5Be5F/3YC8OthxM4+k1M6aEAEFcGzkJiNy6J84y7uzo9M6NyMHAwCQYDVR0TBAIw
ADAfBgNVHSMEGDAWgBRm3WjLa38lbEYCuiCPct0ZaSED2DAOBgNVHQ8BAf8EBAMC
BsAwEwYDVR0lBAwwCgYIKwYBBQUHAwIwHQYDVR0RAQH/BBMwEYEPYmRjQGV4YW1w
bGUuY29tMAoGCCqGSM49BAMCA0gAMEUCIBHda/r1vaL6G3VliL4/Di6YK0Q6bMje
SkC3dFCOOB8TAiEAx/kHSB4urmiZ0NX5r5XarmPk0wmuydBVoU4hBVZ1yhk=
-----END CERTIFICATE-----
"""
RFC_INTERMEDIATE = """\
-----BEGIN CERTIFICATE-----
MIIB5jCCAYugAwIBAgIBFjAKBggqhkjOPQQDAjBWMQswCQYDVQQGEwJVUzEbMBkG
A1UECgwSTGV0J3MgQXV0aGVudGljYXRlMSowKAYDVQQDDCFMZXQncyBBdXRoZW50
aWNhdGUgUm9vdCBBdXRob3JpdHkwHhcNMjAwMTE0MjEzMjMwWhcNMzAwMTExMjEz
MjMwWjA6MRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdGUxGzAZBgNVBAMMEkxB
IEludGVybWVkaWF0ZSBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJf+aA54
RC5pyLAR5yfXVYmNpgd+CGUTDp2KOGhc0gK91zxhHesEYkdXkpS2UN8Kati+yHtW
CV3kkhCngGyv7RqjZjBkMB0GA1UdDgQWBBRm3WjLa38lbEYCuiCPct0ZaSED2DAf
BgNVHSMEGDAWgBTEA2Q6eecKu9g9yb5glbkhhVINGDASBgNVHRMBAf8ECDAGAQH/
AgEAMA4GA1UdDwEB/wQEAwIBhjAKBggqhkjOPQQDAgNJADBGAiEA5pLvaFwRRkxo
mIAtDIwg9D7gC1xzxBl4r28EzmSO1pcCIQCJUShpSXO9HDIQMUgH69fNDEMHXD3R
RX5gP7kuu2KGMg==
-----END CERTIFICATE-----
"""
RFC_ROOT = """\
-----BEGIN CERTIFICATE-----
MIICBjCCAaygAwIBAgIJAKS0yiqKtlhoMAoGCCqGSM49BAMCMFYxCzAJBgNVBAYT
AlVTMRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdGUxKjAoBgNVBAMMIUxldCdz
IEF1dGhlbnRpY2F0ZSBSb290IEF1dGhvcml0eTAeFw0yMDAxMTQyMTI1NDVaFw00
MDAxMDkyMTI1NDVaMFYxCzAJBgNVBAYTAlVTMRswGQYDVQQKDBJMZXQncyBBdXRo
ZW50aWNhdGUxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRpY2F0ZSBSb290IEF1dGhv
cml0eTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABFoaHU+Z5bPKmGzlYXtCf+E6
HYj62fORaHDOrt+yyh3H/rTcs7ynFfGn+gyFsrSP3Ez88rajv+U2NfD0o0uZ4Pmj
YzBhMB0GA1UdDgQWBBTEA2Q6eecKu9g9yb5glbkhhVINGDAfBgNVHSMEGDAWgBTE
A2Q6eecKu9g9yb5glbkhhVINGDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQE
AwIBhjAKBggqhkjOPQQDAgNIADBFAiEAmAeg1ycKHriqHnaD4M/UDBpQRpkmdcRF
YGMg1Qyrkx4CIB4ivz3wQcQkGhcsUZ1SOImd/lq1Q0FLf09rGfLQPWDc
-----END CERTIFICATE-----
"""
# Figures 2 and 3, as printed: "line breaks and whitespace have been added to the field
# value ... for display and formatting purposes only" (each continuation line starts
# with one space); the ", " between list members is part of the value.
RFC_CLIENT_CERT = """\
:MIIBqDCCAU6gAwIBAgIBBzAKBggqhkjOPQQDAjA6MRswGQYDVQQKDBJ
 MZXQncyBBdXRoZW50aWNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTAeFw0
 yMDAxMTQyMjU1MzNaFw0yMTAxMjMyMjU1MzNaMA0xCzAJBgNVBAMMAkJDMFkwEwYHKoZ
 Izj0CAQYIKoZIzj0DAQcDQgAE8YnXXfaUgmnMtOXU/IncWalRhebrXmckC8vdgJ1p5Be
 5F/3YC8OthxM4+k1M6aEAEFcGzkJiNy6J84y7uzo9M6NyMHAwCQYDVR0TBAIwADAfBgN
 VHSMEGDAWgBRm3WjLa38lbEYCuiCPct0ZaSED2DAOBgNVHQ8BAf8EBAMCBsAwEwYDVR0
 lBAwwCgYIKwYBBQUHAwIwHQYDVR0RAQH/BBMwEYEPYmRjQGV4YW1wbGUuY29tMAoGCCq
 GSM49BAMCA0gAMEUCIBHda/r1vaL6G3VliL4/Di6YK0Q6bMjeSkC3dFCOOB8TAiEAx/k
 HSB4urmiZ0NX5r5XarmPk0wmuydBVoU4hBVZ1yhk=:"""
RFC_CLIENT_CERT_CHAIN = """\
:MIIB5jCCAYugAwIBAgIBFjAKBggqhkjOPQQDAjBWMQsw
 CQYDVQQGEwJVUzEbMBkGA1UECgwSTGV0J3MgQXV0aGVudGljYXRlMSowKAYDVQQ
 DDCFMZXQncyBBdXRoZW50aWNhdGUgUm9vdCBBdXRob3JpdHkwHhcNMjAwMTE0Mj
 EzMjMwWhcNMzAwMTExMjEzMjMwWjA6MRswGQYDVQQKDBJMZXQncyBBdXRoZW50a
 WNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTBZMBMGByqGSM49AgEG
 CCqGSM49AwEHA0IABJf+aA54RC5pyLAR5yfXVYmNpgd+CGUTDp2KOGhc0gK91zx
 hHesEYkdXkpS2UN8Kati+yHtWCV3kkhCngGyv7RqjZjBkMB0GA1UdDgQWBBRm3W
 jLa38lbEYCuiCPct0ZaSED2DAfBgNVHSMEGDAWgBTEA2Q6eecKu9g9yb5glbkhh
 VINGDASBgNVHRMBAf8ECDAGAQH/AgEAMA4GA1UdDwEB/wQEAwIBhjAKBggqhkjO
 PQQDAgNJADBGAiEA5pLvaFwRRkxomIAtDIwg9D7gC1xzxBl4r28EzmSO1pcCIQC
 JUShpSXO9HDIQMUgH69fNDEMHXD3RRX5gP7kuu2KGMg==:, :MIICBjCCAaygAw
 IBAgIJAKS0yiqKtlhoMAoGCCqGSM49BAMCMFYxCzAJBgNVBAYTAlVTMRswGQYDV
 QQKDBJMZXQncyBBdXRoZW50aWNhdGUxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRp
 Y2F0ZSBSb290IEF1dGhvcml0eTAeFw0yMDAxMTQyMTI1NDVaFw00MDAxMDkyMTI
 1NDVaMFYxCzAJBgNVBAYTAlVTMRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdG
 UxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRpY2F0ZSBSb290IEF1dGhvcml0eTBZM
 BMGByqGSM49AgEGCCqGSM49AwEHA0IABFoaHU+Z5bPKmGzlYXtCf+E6HYj62fOR
 aHDOrt+yyh3H/rTcs7ynFfGn+gyFsrSP3Ez88rajv+U2NfD0o0uZ4PmjYzBhMB0
 GA1UdDgQWBBTEA2Q6eecKu9g9yb5glbkhhVINGDAfBgNVHSMEGDAWgBTEA2Q6ee
 cKu9g9yb5glbkhhVINGDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBh
 jAKBggqhkjOPQQDAgNIADBFAiEAmAeg1ycKHriqHnaD4M/UDBpQRpkmdcRFYGMg
 1Qyrkx4CIB4ivz3wQcQkGhcsUZ1SOImd/lq1Q0FLf09rGfLQPWDc:"""


def der(text: str) -> bytes:
    return x509.load_pem_x509_certificate(text.encode()).public_bytes(Encoding.DER)


def unfold(figure: str) -> bytes:
    return figure.replace("\n ", "").encode()


def decode_byte_sequence(item: bytes) -> bytes:
    """RFC 8941 §4.2.7, written apart from the encoder: colons, then strict base64."""
    match = re.fullmatch(rb":([A-Za-z0-9+/=]*):", item)
    assert match, item
    return base64.b64decode(match[1], validate=True)


def decode_list(value: bytes) -> list[bytes]:
    return [decode_byte_sequence(member) for member in value.split(b", ")]


def test_the_rfc_example_byte_for_byte() -> None:
    assert client_cert(der(RFC_LEAF)) == unfold(RFC_CLIENT_CERT)
    chain = client_cert_chain([der(RFC_INTERMEDIATE), der(RFC_ROOT)])
    assert chain == unfold(RFC_CLIENT_CERT_CHAIN)


def test_standard_base64_with_padding_between_colons() -> None:
    # + and / (not the URL-safe - and _), and = padding kept: RFC 8941 §3.3.5.
    assert byte_sequence(b"\xfb\xff") == b":+/8=:"
    assert byte_sequence(b"\xfb\xef\xbe\xff") == b":++++/w==:"
    assert byte_sequence(b"") == b"::"


def test_an_empty_chain_is_no_field() -> None:
    assert client_cert_chain([]) is None  # an empty List is not serialized (RFC 8941 §4.1)


def test_our_certificates_decode_back_with_base64_and_cryptography(
    ca: CertificateAuthority, client_pair: Pair
) -> None:
    leaf, issuer = pem.load_certificates(client_pair.crt.read_bytes(), "client")
    leaf_der = leaf.public_bytes(Encoding.DER)
    value = client_cert(leaf_der)
    assert b"\n" not in value and b" " not in value
    assert x509.load_der_x509_certificate(decode_byte_sequence(value)) == leaf
    root = ca.root
    chain = client_cert_chain([issuer.public_bytes(Encoding.DER), root.public_bytes(Encoding.DER)])
    assert chain is not None
    assert [x509.load_der_x509_certificate(d) for d in decode_list(chain)] == [issuer, root]


def verified(*certs: x509.Certificate) -> list[x509.Certificate]:
    return list(certs)


def test_peer_certificates_hold_the_verified_chain_without_leaf_and_anchor(
    ca: CertificateAuthority, issue: IssueFn
) -> None:
    pair = issue("client", "chain-1")
    leaf, issuer = pem.load_certificates(pair.crt.read_bytes(), "client")
    sha = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    found = PeerCertificates.from_verified(sha, leaf, verified(leaf, issuer, ca.root))
    assert found is not None
    assert found.leaf == leaf.public_bytes(Encoding.DER)
    assert found.chain == (issuer.public_bytes(Encoding.DER),)  # the root is left out
    # A chain verified to an anchor that is the issuer itself: nothing between.
    assert PeerCertificates.from_verified(sha, leaf, [leaf, issuer]).chain == ()  # type: ignore[union-attr]
    # No verified chain (a resumed session): the leaf alone.
    assert PeerCertificates.from_verified(sha, leaf, None).chain is None  # type: ignore[union-attr]
    # A verified chain that does not start with this leaf is never used.
    assert PeerCertificates.from_verified(sha, leaf, [issuer, ca.root]).chain is None  # type: ignore[union-attr]


def test_a_leaf_that_is_not_the_identity_s_certificate_gives_nothing(
    issue: IssueFn, client_pair: Pair
) -> None:
    other = pem.load_certificates(issue("client", "other").crt.read_bytes(), "o")[0]
    leaf = pem.load_certificates(client_pair.crt.read_bytes(), "c")[0]
    sha = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    assert PeerCertificates.from_verified(sha, other, [other]) is None


def test_the_cache_keeps_the_most_recently_used() -> None:
    cache = PeerCertificateCache(size=2)
    a, b, c = (PeerCertificates(leaf=x, chain=()) for x in (b"a", b"b", b"c"))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now the most recent
    cache.put("c", c)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (a, None, c)
    assert len(cache) == 2


@pytest.mark.parametrize("size", [1, 600, 1500])
def test_any_der_round_trips(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    assert decode_byte_sequence(byte_sequence(data)) == data
