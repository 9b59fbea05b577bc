"""Strict PEM parsing: a file is whole or refused, never half-loaded."""

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mtlsproxy import pem
from mtlsproxy.errors import CredentialError
from mtlsproxy.pki import CertificateAuthority


@pytest.fixture
def two_certs(ca: CertificateAuthority) -> bytes:
    return pem.certificate_pem(ca.root) + pem.certificate_pem(ca.issuer)


def test_loads_every_certificate_in_order(ca: CertificateAuthority, two_certs: bytes) -> None:
    certs = pem.load_certificates(b"subject=whatever openssl prints\n" + two_certs, "f")
    assert certs == [ca.root, ca.issuer]


def test_truncated_second_certificate_is_refused(two_certs: bytes) -> None:
    cut = two_certs[: len(two_certs) - 200]
    with pytest.raises(CredentialError, match="truncated"):
        pem.load_certificates(cut, "bundle.crt")


def test_truncated_inside_base64_is_refused(two_certs: bytes) -> None:
    # Drop the END line of the last block only: still refused, naming the file.
    cut = two_certs.rsplit(b"-----END", 1)[0]
    with pytest.raises(CredentialError, match=r"bundle\.crt: .*truncated"):
        pem.load_certificates(cut, Path("bundle.crt"))


def test_corrupt_base64_is_refused(two_certs: bytes) -> None:
    lines = two_certs.splitlines(keepends=True)
    lines[3] = b"!!!!" + lines[3][4:]
    with pytest.raises(CredentialError):
        pem.load_certificates(b"".join(lines), "f")


def test_garbage_der_is_refused() -> None:
    bogus = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(CredentialError, match="certificate 1 does not parse"):
        pem.load_certificates(bogus, "f")


def test_mismatched_labels_are_refused(two_certs: bytes) -> None:
    bad = two_certs.replace(b"END CERTIFICATE", b"END PRIVATE KEY", 1)
    with pytest.raises(CredentialError):
        pem.load_certificates(bad, "f")


def test_a_key_in_a_bundle_is_refused(ca: CertificateAuthority, two_certs: bytes) -> None:
    with pytest.raises(CredentialError, match="PRIVATE KEY, not a CERTIFICATE"):
        pem.load_certificates(two_certs + pem.private_key_pem(ca.issuer_key), "f")


def test_empty_and_non_pem_files_are_refused() -> None:
    for data in (b"", b"hello\n", b"\x00\x01"):
        with pytest.raises(CredentialError, match="no PEM block"):
            pem.load_certificates(data, "f")


def test_private_key_round_trip(ca: CertificateAuthority) -> None:
    key = pem.load_private_key(pem.private_key_pem(ca.issuer_key), "k")
    assert pem.key_matches(key, ca.issuer)
    assert not pem.key_matches(key, ca.root)


def test_private_key_file_must_hold_one_key(ca: CertificateAuthority) -> None:
    two = pem.private_key_pem(ca.issuer_key) * 2
    with pytest.raises(CredentialError, match="expected one private key"):
        pem.load_private_key(two, "k")
    with pytest.raises(CredentialError, match="expected one private key"):
        pem.load_private_key(pem.certificate_pem(ca.root), "k")


def test_encrypted_key_is_named_as_such(ca: CertificateAuthority) -> None:
    data = ca.issuer_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CredentialError, match="encrypted"):
        pem.load_private_key(data, "k")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"nope\.crt: no such file"):
        pem.read_file(tmp_path / "nope.crt")
