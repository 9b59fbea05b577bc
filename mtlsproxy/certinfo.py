"""What a certificate says, read without any CA machinery: its fingerprint and a summary.

A floor below ``tls/`` and ``pki/``: the credential store and the admin listener (the proxy
process, which never loads ``pki/``) and ``mtlsproxy ca show`` (``pki/describe.py``, which
renders the summary for a terminal) read certificates through the same functions.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


class CertificateSummary(msgspec.Struct, frozen=True):
    subject: str
    issuer: str
    serial: str
    fingerprint: str  # "sha256:<hex>", the form a deny list takes
    sans: list[str]
    key: str
    usage: list[str]
    is_ca: bool
    not_before: datetime
    not_after: datetime


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe_public_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def summarize(cert: x509.Certificate) -> CertificateSummary:
    ext = cert.extensions
    sans: list[str] = []
    try:
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{v}" for v in san.get_values_for_type(x509.IPAddress)]
        sans += [f"URI:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    usage: list[str] = []
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        usage = [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku]
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = ext.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        fingerprint=fingerprint(cert),
        sans=sans,
        key=describe_public_key(cert.public_key()),
        usage=usage,
        is_ca=is_ca,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
