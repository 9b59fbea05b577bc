"""What ``mtlsproxy ca show`` prints: a certificate as an operator needs to read it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsproxy.pki.keys import describe_public_key
from mtlsproxy.units import format_duration

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


def render(summary: CertificateSummary, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if now < summary.not_before:
        state = f"not valid yet: starts in {format_duration(summary.not_before - now)}"
    elif now >= summary.not_after:
        state = f"EXPIRED {format_duration(now - summary.not_after)} ago"
    else:
        state = f"{format_duration(summary.not_after - now)} left"
    rows = [
        ("subject", summary.subject),
        ("issuer", summary.issuer),
        ("serial", summary.serial),
        ("fingerprint", summary.fingerprint),
        ("SANs", ", ".join(summary.sans) or "(none)"),
        ("key", summary.key),
        ("usage", ", ".join(summary.usage) + (" (CA)" if summary.is_ca else "")),
        ("not before", f"{summary.not_before:%Y-%m-%d %H:%M:%S}Z"),
        ("not after", f"{summary.not_after:%Y-%m-%d %H:%M:%S}Z ({state})"),
    ]
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)
