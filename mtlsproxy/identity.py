"""Who is on the other end: the Identity read from a *verified* client certificate.

Theory of operation: the TLS layer verifies the chain against the private CA and hands
the leaf over; this module only reads it. Everything above (policy, deny list, XFCC,
logs, metrics, the session registry) reads the Identity, never the certificate, so the
one place that decodes X.509 fields is here and it is pure: no I/O, no clock.

Three choices fail closed on purpose:

- ``spiffe_id`` is set only when the certificate is an X.509-SVID in the SPIFFE sense,
  i.e. it carries exactly one URI SAN and that URI is ``spiffe://<trust domain>/...``.
  A certificate with two URIs cannot say which one it speaks for, so a SPIFFE rule
  never matches it (``uri:`` rules still see every URI).
  https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md#2-spiffe-id
- DNS and URI SANs are IA5String, and a value with a control character, white space or
  a non-ASCII byte is not a host name or a URI. Such a value would end up in a header
  (XFCC) or a log line, so the certificate is refused rather than the value cleaned.
- A CA certificate (basicConstraints CA:TRUE, or the legacy keyCertSign without
  basicConstraints that OpenSSL also lets sign) is no client identity, even one issued by
  our own issuing CA with clientAuth in its EKU: OpenSSL's ``sslclient`` purpose check
  admits it as a leaf, and its holder could sign further "clients" wherever a CA without
  a path length sits above it. It is refused with its own reason, ``ca_cert``. It is
  checked here, where an admitted leaf is read once (identities are cached by
  fingerprint), rather than in a per-certificate verify callback on every handshake; the
  listener, the mTLS admin listener and the renewal service all build their Identity
  through this one function.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mtlsproxy.errors import MtlsProxyError

# RFC 4514 lets any character be written as a backslash and two hex digits. OpenSSL's
# RFC 2253 printer (what Envoy puts in XFCC) does this for control characters
# (ASN1_STRFLGS_ESC_CTRL); cryptography's rfc4514_string() leaves them raw except NUL.
# A CR or LF in a subject must never reach a header or a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Printable ASCII without space: what a DNS name or a URI can consist of.
_SAN_TEXT = re.compile(r"[\x21-\x7e]+")


# Why a verified certificate is no identity, as logs and the refusal metric say it.
IdentityRefusal = Literal["bad_cert", "ca_cert"]


class IdentityError(MtlsProxyError):
    """A verified certificate whose fields cannot be used as an identity; ``reason`` is
    the refusal category (``ca_cert`` for a CA certificate, else ``bad_cert``)."""

    status = 403

    def __init__(self, message: str, *, reason: IdentityRefusal = "bad_cert") -> None:
        self.reason: IdentityRefusal = reason
        super().__init__(message)


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    issuer: str
    cn: str | None
    ous: tuple[str, ...]
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    uris: tuple[str, ...]
    spiffe_id: str | None
    serial: str
    sha256: str
    not_before: datetime
    not_after: datetime

    @property
    def name(self) -> str:
        """How logs name this identity: its SPIFFE id, else its CN, else its fingerprint."""
        return self.spiffe_id or self.cn or self.fingerprint

    @property
    def fingerprint(self) -> str:
        """The form the deny list and ``ca show`` use: ``sha256:<hex>``."""
        return f"sha256:{self.sha256}"

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        try:
            subject = cert.subject
            issuer = cert.issuer
            sans = _subject_alt_names(cert)
            dns = tuple(sans.get_values_for_type(x509.DNSName))
            uris = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))
            ips = tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
            cn = _common_name(subject)
            ous = _all_text(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
            subject_text = rfc4514(subject)
            issuer_text = rfc4514(issuer)
            ca_marking = _ca_marking(cert)
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
            # cryptography decodes extensions lazily, so a malformed SAN surfaces here,
            # after the handshake accepted the chain.
            raise IdentityError(f"client certificate cannot be read: {exc}") from exc
        sha256 = cert.fingerprint(hashes.SHA256()).hex()
        if ca_marking is not None:
            raise IdentityError(
                f"client certificate {subject_text} (sha256:{sha256}) is a CA certificate "
                f"({ca_marking}): a CA is not a client identity",
                reason="ca_cert",
            )
        for kind, values in (("DNS", dns), ("URI", uris)):
            for value in values:
                if not _SAN_TEXT.fullmatch(value):
                    raise IdentityError(f"client certificate {kind} SAN {value!r} is malformed")
        return cls(
            subject=subject_text,
            issuer=issuer_text,
            cn=cn,
            ous=ous,
            dns=dns,
            ips=ips,
            uris=uris,
            spiffe_id=_spiffe_id(uris),
            serial=format(cert.serial_number, "x"),
            sha256=sha256,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @classmethod
    def from_der(cls, der: bytes) -> Identity:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise IdentityError(f"client certificate is not DER: {exc}") from exc
        return cls.from_certificate(cert)


def rfc4514(name: x509.Name) -> str:
    """``name.rfc4514_string()`` with control characters hex-escaped (see ``_CONTROL``)."""
    return _CONTROL.sub(lambda m: f"\\{ord(m.group()):02X}", name.rfc4514_string())


def _ca_marking(cert: x509.Certificate) -> str | None:
    """What makes ``cert`` a CA in OpenSSL's eyes (``X509_check_ca``, which decides what
    may sign in a chain), or None: basicConstraints CA:TRUE, or, with no basicConstraints
    at all, a keyUsage that allows keyCertSign (OpenSSL tolerates that legacy form)."""
    extensions = cert.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None:
        return "basicConstraints CA:TRUE" if constraints.ca else None
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return "keyCertSign without basicConstraints" if usage.key_cert_sign else None


def _subject_alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def _all_text(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    # Only X500UniqueIdentifier-like attributes are bytes; CN and OU are strings, but the
    # type says str | bytes, and a bytes value would mean a malformed certificate.
    values = tuple(attr.value for attr in name.get_attributes_for_oid(oid))
    if any(isinstance(v, bytes) for v in values):
        raise IdentityError(f"client certificate subject has a binary {oid.dotted_string}")
    return tuple(str(v) for v in values)


def _common_name(name: x509.Name) -> str | None:
    # Two CNs leave it open which one a rule about "the" CN should read (OpenSSL takes
    # the first, Go's crypto/x509 the last), so such a certificate is refused.
    values = _all_text(name, NameOID.COMMON_NAME)
    if len(values) > 1:
        raise IdentityError(f"client certificate subject has {len(values)} common names")
    return values[0] if values else None


def _spiffe_id(uris: tuple[str, ...]) -> str | None:
    if len(uris) != 1:
        return None
    uri = uris[0]
    trust_domain, _, _path = uri.removeprefix("spiffe://").partition("/")
    if not uri.startswith("spiffe://") or not trust_domain:
        return None
    return uri


class IdentityCache:
    """Identities by the SHA-256 of their leaf, most recently used kept.

    The same few certificates come back on every connection (a client reconnects with the
    certificate it had a minute ago), and reading one is most of the Python work of a
    handshake: OpenSSL computes the fingerprint in C, and a hit skips decoding entirely.
    The fingerprint covers the whole DER, so a hit is the same certificate, byte for byte.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, Identity] = OrderedDict()

    def get(self, sha256: str) -> Identity | None:
        identity = self._items.get(sha256)
        if identity is not None:
            self._items.move_to_end(sha256)
        return identity

    def put(self, identity: Identity) -> None:
        self._items[identity.sha256] = identity
        self._items.move_to_end(identity.sha256)
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class PeerCertificates(msgspec.Struct, frozen=True):
    """The DER of what the TLS layer verified for one leaf, for RFC 9440's headers.

    ``leaf``: the client's certificate, byte for byte. ``chain``: the certificates OpenSSL
    verified it through, in TLS order (the one that signed the leaf first), without the
    leaf and without the trust anchor (the root of ``client_ca`` the chain ends at, which
    the backend is expected to hold; RFC 9440 §2.3 lets it be left out). That is the chain
    the proxy *verified*, not the list the client sent: a certificate the client added
    that played no part in the verification is not in it. ``None``: not known (a resumed
    session carries only the leaf; see ``PeerCertificateCache``).
    """

    leaf: bytes
    chain: tuple[bytes, ...] | None

    @classmethod
    def from_verified(
        cls,
        sha256: str,
        leaf: x509.Certificate,
        verified: Sequence[x509.Certificate] | None,
    ) -> PeerCertificates | None:
        """From the handshake's leaf and verified chain (leaf to trust anchor), or None when
        the leaf is not the certificate ``sha256`` names: never another one than the
        identity's. A verified chain that does not start with the leaf is not used."""
        der = leaf.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != sha256:
            return None
        chain = None
        if verified and verified[0].public_bytes(Encoding.DER) == der:
            chain = tuple(cert.public_bytes(Encoding.DER) for cert in verified[1:-1])
        return cls(leaf=der, chain=chain)


class PeerCertificateCache:
    """PeerCertificates by the SHA-256 of their leaf, most recently used kept.

    A resumed TLS session has the leaf but no verified chain (OpenSSL does not keep it in
    the session), so the chain a leaf was last verified with is remembered here, and a
    resumed session forwards the same headers as the full handshake it came from. Sessions
    resume only on the TLS context that made them, and every reload makes new contexts,
    so what is remembered was verified under the CA bundle in use.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, PeerCertificates] = OrderedDict()

    def get(self, sha256: str) -> PeerCertificates | None:
        found = self._items.get(sha256)
        if found is not None:
            self._items.move_to_end(sha256)
        return found

    def put(self, sha256: str, certificates: PeerCertificates) -> None:
        self._items[sha256] = certificates
        self._items.move_to_end(sha256)
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
