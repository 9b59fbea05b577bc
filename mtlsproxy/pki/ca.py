"""The private CA: a root, an issuing intermediate, and the leaves they sign.

Layout of a CA folder (mode 0700; every key 0600):

    ca.crt       the trust bundle: the root(s). The proxy's ``client_ca`` and every
                 client's ``verify`` point here.
    root.crt     the root certificate, and root.key its key (only used to sign issuers)
    issuer.crt   the issuing intermediate, and issuer.key its key (signs every leaf)
    audit.log    one JSON line per certificate issued (``pki.lifecycle``)
    previous/    roots and issuers replaced by ``ca rotate``, still trusted (no keys)
    retired/     the same, once ``ca retire`` removed them from the bundle

Leaves are written as ``PREFIX.crt`` (leaf, then the intermediate: what a TLS peer must
send) and ``PREFIX.key``. The root is never part of a chain file: a peer that trusts it
has it already, and a peer that does not must not be handed it.

This module is used by the CLI and the renewal service, never by the proxy: the proxy
process never holds a CA key.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtlsproxy import pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.errors import CAError, CredentialError
from mtlsproxy.pki import names
from mtlsproxy.pki.keys import KeyType, generate_key, signature_hash
from mtlsproxy.pki.lifecycle import AUDIT_BEGINS, LeafIdentity, audit, backdate
from mtlsproxy.units import format_duration

Kind = Literal["server", "client"]

BUNDLE = "ca.crt"
ROOT_CERT, ROOT_KEY = "root.crt", "root.key"
ISSUER_CERT, ISSUER_KEY = "issuer.crt", "issuer.key"
CA_FILES = (BUNDLE, ROOT_CERT, ROOT_KEY, ISSUER_CERT, ISSUER_KEY)

DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_ISSUER_TTL = timedelta(days=365)
DEFAULT_LEAF_TTL = timedelta(hours=24)
# Leaves start a minute in the past (at most a tenth of their lifetime) so a peer whose
# clock runs a little behind ours does not refuse a certificate we issued a second ago
# as "not yet valid".
BACKDATE = timedelta(minutes=1)

_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def pair_paths(prefix: Path) -> tuple[Path, Path]:
    """``PREFIX.crt`` and ``PREFIX.key``: where a certificate and its key live."""
    return prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key")


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    key: pem.PrivateKey | None  # None: signed from a CSR, the requester holds the key
    chain: tuple[x509.Certificate, ...]  # the intermediates that follow the leaf

    def chain_pem(self) -> bytes:
        """The leaf, then its intermediates: what a TLS peer sends."""
        return b"".join(pem.certificate_pem(c) for c in (self.certificate, *self.chain))

    def key_pem(self) -> bytes:
        if self.key is None:
            raise CAError("signed from a CSR: the private key stays with the requester")
        return pem.private_key_pem(self.key)

    def write(self, prefix: Path) -> tuple[Path, Path]:
        """Write ``PREFIX.key`` then ``PREFIX.crt``, each atomically."""
        cert_path, key_path = pair_paths(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(key_path, self.key_pem(), mode=0o600)
        write_atomic(cert_path, self.chain_pem(), mode=0o644)
        return cert_path, key_path


@dataclass(frozen=True)
class CertificateAuthority:
    folder: Path
    root: x509.Certificate
    issuer: x509.Certificate
    issuer_key: pem.PrivateKey

    @classmethod
    def init(
        cls,
        folder: Path,
        *,
        name: str = "mtlsproxy",
        key_type: KeyType = "ecdsa-p256",
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        issuer_ttl: timedelta = DEFAULT_ISSUER_TTL,
        force: bool = False,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        existing = [f for f in CA_FILES if (folder / f).exists()]
        if existing and not force:
            raise CAError(
                f"{folder} already holds a CA ({', '.join(existing)}); refusing to overwrite it. "
                "Pass --force to replace it: every certificate the old CA issued stops "
                "being trusted."
            )
        if issuer_ttl > root_ttl:
            raise CAError(
                f"the issuer's lifetime ({format_duration(issuer_ttl)}) "
                f"must not exceed the root's ({format_duration(root_ttl)})"
            )
        now = now or datetime.now(UTC)
        tag = secrets.token_hex(3)  # tells rotated CAs apart in logs and in `ca show`
        root_key = generate_key(key_type)
        root_name = _name(f"{name} root CA {tag}", org=name)
        root = _sign(
            _ca_builder(root_name, root_name, root_key, now, root_ttl, path_length=1), root_key
        )
        issuer_key = generate_key(key_type)
        issuer_name = _name(f"{name} issuing CA {tag}", org=name)
        builder = _ca_builder(issuer_name, root_name, issuer_key, now, issuer_ttl, path_length=0)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        ).add_extension(_aki(root), critical=False)
        issuer = _sign(builder, root_key)

        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        write_atomic(folder / ROOT_KEY, pem.private_key_pem(root_key), mode=0o600)
        write_atomic(folder / ISSUER_KEY, pem.private_key_pem(issuer_key), mode=0o600)
        write_atomic(folder / ROOT_CERT, pem.certificate_pem(root))
        write_atomic(folder / ISSUER_CERT, pem.certificate_pem(issuer))
        # The bundle goes last: its presence is what says "a whole CA lives here".
        write_atomic(folder / BUNDLE, pem.certificate_pem(root))
        # From here on every issuance under this root is on record (``ca retire`` relies
        # on that, and falls back to the issuer's own end for a root without this line).
        audit(folder, root, issuer=root, root=root, by=AUDIT_BEGINS)
        return cls(folder, root, issuer, issuer_key)

    @classmethod
    def load(cls, folder: Path, *, now: datetime | None = None) -> CertificateAuthority:
        """The CA that signs now: the current root and issuer, or, during the grace period
        after ``ca rotate``, the previous ones (see ``pki.rotation``)."""
        current = cls.load_current(folder)
        return _in_grace(folder, now or datetime.now(UTC)) or current

    @classmethod
    def load_current(cls, folder: Path) -> CertificateAuthority:
        if not (folder / ISSUER_CERT).exists():
            raise CAError(
                f"{folder}: no CA here (no {ISSUER_CERT}); create one with "
                f"`mtlsproxy ca init --dir {folder}`"
            )
        try:
            root = pem.load_certificates(pem.read_file(folder / ROOT_CERT), folder / ROOT_CERT)[0]
            issuer = pem.load_certificates(
                pem.read_file(folder / ISSUER_CERT), folder / ISSUER_CERT
            )[0]
            issuer_key = pem.load_private_key(
                pem.read_file(folder / ISSUER_KEY), folder / ISSUER_KEY
            )
        except CredentialError as exc:
            raise CAError(f"cannot load the CA: {exc}") from exc
        if not pem.key_matches(issuer_key, issuer):
            raise CAError(f"{folder / ISSUER_KEY} is not the key of {folder / ISSUER_CERT}")
        return cls(folder, root, issuer, issuer_key)

    def issue(
        self,
        *,
        kind: Kind,
        name: str,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        uris: Iterable[str] = (),
        ous: Sequence[str] = (),
        ttl: timedelta = DEFAULT_LEAF_TTL,
        key_type: KeyType = "ecdsa-p256",
        key: pem.PrivateKey | None = None,
        public_key: pem.PublicKey | None = None,
        now: datetime | None = None,
        by: str = "ca issue",
        requester: str | None = None,
    ) -> IssuedCertificate:
        """Sign a leaf, and record it in the audit log.

        ``key`` reuses a key pair; ``public_key`` signs a public key whose private half
        stays with the requester (renewal from a CSR: the result has no ``key``).
        ``now`` anchors the validity window (tests make expired certificates with it); the
        TTL check against the issuer's life uses it too, so it cannot sneak past that.
        """
        now = now or datetime.now(UTC)
        if ttl <= timedelta(0):
            raise CAError(f"the TTL must be positive, not {format_duration(ttl)}")
        not_after = now + ttl
        issuer_end = self.issuer.not_valid_after_utc
        if not_after > issuer_end:
            raise CAError(
                f"a TTL of {format_duration(ttl)} would outlive the issuing CA, which expires "
                f"{issuer_end:%Y-%m-%d %H:%M}Z ({format_duration(issuer_end - now)} from now); "
                "use a shorter --ttl or rotate the CA"
            )
        if datetime.now(UTC) < self.issuer.not_valid_before_utc:
            raise CAError("the issuing CA is not valid yet; check this machine's clock")
        sans: list[x509.GeneralName] = [names.dns_name(d) for d in dns]
        sans += [names.ip_address(i) for i in ips]
        sans += [names.uri(u) for u in uris]
        if kind == "server" and not sans:
            sans = [names.dns_name(name)]
        if public_key is None:
            key = key or generate_key(key_type)
            public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name, ous=ous))
            .issuer_name(self.issuer.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - backdate(ttl))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([_EKU[kind]]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(_aki(self.issuer), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = _sign(builder, self.issuer_key)
        audit(self.folder, cert, issuer=self.issuer, root=self.root, by=by, requester=requester)
        return IssuedCertificate(cert, key, (self.issuer,))

    def reissue(
        self,
        identity: LeafIdentity,
        *,
        ttl: timedelta | None = None,
        key_type: KeyType = "ecdsa-p256",
        public_key: pem.PublicKey | None = None,
        by: str = "ca renew",
        requester: str | None = None,
    ) -> IssuedCertificate:
        """A new certificate for the same identity (and, unless given, the same TTL)."""
        return self.issue(
            kind="server" if identity.kind == "server" else "client",
            name=identity.name,
            dns=identity.dns,
            ips=identity.ips,
            uris=identity.uris,
            ous=identity.ous,
            ttl=ttl or identity.ttl,
            key_type=key_type,
            public_key=public_key,
            by=by,
            requester=requester,
        )


PREVIOUS = "previous"  # roots replaced by `ca rotate`, one folder each
GRACE_FILE = "rotated.json"  # in such a folder: until when its issuer still signs


def mark_grace(previous: Path, now: datetime, grace: timedelta) -> None:
    """Record that the issuer kept in ``previous`` signs until ``now + grace``."""
    marker = {"rotated_at": now.isoformat(), "switch_at": (now + grace).isoformat()}
    write_atomic(previous / GRACE_FILE, msgspec.json.encode(marker))


def grace_end(previous: Path) -> datetime | None:
    """Until when the issuer kept in ``previous`` signs (None: it does not)."""
    marker = previous / GRACE_FILE
    if not marker.exists():
        return None
    try:
        return datetime.fromisoformat(msgspec.json.decode(marker.read_bytes())["switch_at"])
    except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise CAError(f"{marker}: unreadable: {exc}") from exc


def previous_folders(folder: Path) -> list[Path]:
    base = folder / PREVIOUS
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def _in_grace(folder: Path, now: datetime) -> CertificateAuthority | None:
    """The previous root and issuer while a rotation's grace period lasts, else None."""
    for sub in previous_folders(folder):
        end = grace_end(sub)
        if end is None or now >= end or not (sub / ISSUER_KEY).exists():
            continue
        try:
            root = pem.load_certificates(pem.read_file(sub / ROOT_CERT), sub / ROOT_CERT)[0]
            issuer = pem.load_certificates(pem.read_file(sub / ISSUER_CERT), sub / ISSUER_CERT)[0]
            key = pem.load_private_key(pem.read_file(sub / ISSUER_KEY), sub / ISSUER_KEY)
        except CredentialError as exc:
            raise CAError(f"{sub}: unreadable previous CA: {exc}") from exc
        return CertificateAuthority(folder, root, issuer, key)
    return None


def _name(common_name: str, *, org: str | None = None, ous: Sequence[str] = ()) -> x509.Name:
    attrs = []
    try:
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    except ValueError as exc:  # empty, or longer than the 64 characters X.509 allows
        raise CAError(f"cannot use {common_name!r} / OUs {list(ous)!r} in a name: {exc}") from exc
    return x509.Name(attrs)


def _serial() -> int:
    # RFC 5280 §4.1.2.2 wants a positive serial; CA/B Forum wants 64+ random bits. We
    # take 128, and a zero (one chance in 2**128) would be invalid, so retry.
    while not (serial := secrets.randbits(128)):
        pass
    return serial


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: pem.PrivateKey,
    now: datetime,
    ttl: timedelta,
    *,
    path_length: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _leaf_key_usage(key: pem.PublicKey) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 non-ECDHE) would need keyEncipherment; we only allow
    # ECDHE suites, but a client may be used elsewhere, so RSA keys keep it.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _sign(builder: x509.CertificateBuilder, issuer_key: pem.PrivateKey) -> x509.Certificate:
    return builder.sign(issuer_key, signature_hash(issuer_key))
