"""Strict PEM: every block must be whole, or the file is refused.

``cryptography``'s loaders stop quietly at the first bad block, so a CA bundle truncated
in the middle of its second certificate loads as a one-certificate bundle. A proxy that
hot-loads rotated files must notice that instead: we find every ``-----BEGIN`` marker,
demand a matching ``-----END`` and a body that is valid base64, and decode each block
ourselves. Text outside blocks (``openssl`` writes ``subject=...`` lines) is allowed.
"""

from __future__ import annotations

import binascii
import re
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mtlsproxy.errors import CredentialError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----[ \t]*\r?\n([A-Za-z0-9+/=\s]*?)-----END ([A-Z0-9 ]+)-----"
)
_KEY_LABELS = {"PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"}


class PemBlock(NamedTuple):
    label: str
    der: bytes


def parse_blocks(data: bytes, source: Path | str) -> list[PemBlock]:
    blocks = []
    for n, match in enumerate(_BLOCK.finditer(data), start=1):
        label, body, end_label = match[1].decode(), match[2], match[3].decode()
        if label != end_label:
            raise CredentialError(source, f"PEM block {n} opens {label} but closes {end_label}")
        try:
            der = binascii.a2b_base64(b"".join(body.split()), strict_mode=True)
        except binascii.Error as exc:
            raise CredentialError(source, f"PEM block {n} ({label}) is not valid base64") from exc
        blocks.append(PemBlock(label, der))
    begins = data.count(b"-----BEGIN ")
    if begins != len(blocks):
        raise CredentialError(
            source,
            f"{begins} PEM blocks begin but only {len(blocks)} are whole; "
            "the file is truncated or corrupt",
        )
    if not blocks:
        raise CredentialError(source, "no PEM block found")
    return blocks


def load_certificates(data: bytes, source: Path | str) -> list[x509.Certificate]:
    """Every block must be a certificate that parses; returns them in file order."""
    certs = []
    for n, block in enumerate(parse_blocks(data, source), start=1):
        if block.label != "CERTIFICATE":
            raise CredentialError(source, f"PEM block {n} is {block.label}, not a CERTIFICATE")
        try:
            certs.append(x509.load_der_x509_certificate(block.der))
        except ValueError as exc:
            raise CredentialError(source, f"certificate {n} does not parse: {exc}") from exc
    return certs


def load_private_key(data: bytes, source: Path | str) -> PrivateKey:
    """Exactly one unencrypted private key (PKCS#8, SEC1 or PKCS#1)."""
    blocks = parse_blocks(data, source)
    if len(blocks) != 1 or blocks[0].label not in _KEY_LABELS:
        labels = ", ".join(b.label for b in blocks)
        if "ENCRYPTED PRIVATE KEY" in labels:
            raise CredentialError(source, "the private key is encrypted; give an unencrypted key")
        raise CredentialError(source, f"expected one private key, found: {labels}")
    try:
        key = serialization.load_der_private_key(blocks[0].der, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialError(source, f"the private key does not parse: {exc}") from exc
    if not isinstance(key, PrivateKey):
        raise CredentialError(source, f"unsupported key type {type(key).__name__}")
    return key


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(path, "no such file") from None
    except OSError as exc:
        raise CredentialError(path, f"cannot read: {exc.strerror}") from exc


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
