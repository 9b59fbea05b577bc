"""Loading and proving the proxy's TLS material: server chain, key, client CA bundle, deny list.

"Prove" means: everything a handshake will rely on is checked before anything is used.
Every PEM block parses (see ``mtlsproxy.pem``), the key is the leaf's, the leaf is valid
now and its chain in the file is signed link by link *up to a trust anchor the clients
hold* (``tls.server_ca``, default ``client_ca``: one private PKI), the client CA bundle
holds only CA certificates and at least one that is valid now, and each deny line parses.
The same function serves ``mtlsproxy check`` and the hot reload, so what ``check``
accepts is exactly what the proxy will load.

Why the anchor: a ``server.crt`` cut after its leaf (a truncated write, or
``openssl x509 -in f -out f``, which keeps the first certificate only) is a valid,
self-consistent file, and every client that trusts only the root fails against it. Only
"does the chain reach a root the clients have" tells it from a whole chain.
"""

from __future__ import annotations

import hashlib
import itertools
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsproxy import pem
from mtlsproxy.denylist import DenyList, parse_deny_list
from mtlsproxy.errors import CredentialError


@dataclass(frozen=True)
class Credentials:
    cert_chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates
    key: pem.PrivateKey
    client_cas: tuple[x509.Certificate, ...]
    deny: DenyList
    # SHA-256 over the bytes of every file read, in a fixed order (``digest_of``); the
    # session id context is derived from it, so sessions never resume across material.
    digest: str
    server_anchor: x509.Certificate | None = None  # what the server chain was proved to reach
    # False when that anchor is only the one the chain in force reached (``known_anchor``),
    # no longer in the bundle its clients trust: worth a warning, not a refusal.
    server_anchor_listed: bool = True

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]


def load_credentials(
    cert: Path,
    key: Path,
    client_ca: Path,
    deny: Path | None,
    now: datetime | None = None,
    *,
    server_ca: Path | None = None,
    blobs: dict[Path, bytes] | None = None,
    known_anchor: x509.Certificate | None = None,
) -> Credentials:
    """Prove the server material. ``blobs``: the files' bytes as already read (the store
    reads every file once per reload, so what is proved is what was digested).
    ``known_anchor``: the anchor the chain in force reached; it still proves a new chain
    whole after its CA left ``client_ca`` (removing a CA must never wait for the server
    certificate's renewal: the proof is about the file being whole, not about trust)."""
    now = now or datetime.now(UTC)
    paths = (cert, key, client_ca, deny, server_ca)
    files = blobs if blobs is not None else read_files([p for p in paths if p is not None])
    digest = digest_of([p for p in paths if p is not None], files)

    chain = pem.load_certificates(files[cert], cert)
    private_key = pem.load_private_key(files[key], key)
    if not pem.key_matches(private_key, chain[0]):
        raise CredentialError(key, f"this key is not the key of the first certificate in {cert}")
    _check_server_chain(chain, cert, now)
    cas = pem.load_certificates(files[client_ca], client_ca)
    _check_bundle(cas, client_ca, now)
    if server_ca is None:
        anchors, key_name = cas, "tls.client_ca"
    else:
        anchors, key_name = pem.load_certificates(files[server_ca], server_ca), "tls.server_ca"
    extra = [known_anchor] if known_anchor is not None else []
    anchor = _check_reaches_anchor(chain, anchors + extra, cert, key_name)
    deny_list = DenyList() if deny is None else _parse_deny(files[deny], deny)
    listed = anchor in anchors
    return Credentials(tuple(chain), private_key, tuple(cas), deny_list, digest, anchor, listed)


def read_files(paths: list[Path]) -> dict[Path, bytes]:
    """Every file's bytes, or a CredentialError naming the first that cannot be read."""
    return {path: pem.read_file(path) for path in paths}


def digest_of(paths: list[Path], blobs: dict[Path, bytes]) -> str:
    """SHA-256 over the paths and bytes of ``paths``, in order: a change of any file's
    content (not its mtime) changes it."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
        digest.update(blobs[path])
        digest.update(b"\0")
    return digest.hexdigest()


def _check_server_chain(chain: list[x509.Certificate], source: Path, now: datetime) -> None:
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        raise CredentialError(
            source,
            f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z",
        )
    if now >= leaf.not_valid_after_utc:
        raise CredentialError(
            source, f"the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            raise CredentialError(source, "the certificate is not for servers (no serverAuth EKU)")
    except x509.ExtensionNotFound:
        pass
    for n, (child, parent) in enumerate(itertools.pairwise(chain), start=1):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CredentialError(
                source, f"certificate {n} is not issued by certificate {n + 1} in the file"
            ) from exc


def _check_reaches_anchor(
    chain: list[x509.Certificate], anchors: list[x509.Certificate], source: Path, key: str
) -> x509.Certificate:
    """The anchor the chain reaches, or a CredentialError saying what is missing."""
    by_fingerprint = {a.fingerprint(hashes.SHA256()): a for a in anchors}
    for cert in chain:
        if (same := by_fingerprint.get(cert.fingerprint(hashes.SHA256()))) is not None:
            return same  # the file carries an anchor itself (a root or a trusted intermediate)
        for anchor in anchors:
            if anchor.subject != cert.issuer:
                continue
            with suppress(ValueError, TypeError, InvalidSignature):
                cert.verify_directly_issued_by(anchor)
                return anchor
    last = chain[-1]
    raise CredentialError(
        source,
        f"the chain in the file ends at {last.subject.rfc4514_string()}, issued by "
        f"{last.issuer.rfc4514_string()}, which is not in {key}: clients that trust only "
        "the root cannot verify it. An intermediate is missing (a truncated write, or "
        "`openssl x509 -in f -out f`, which keeps the first certificate only); or the "
        "certificate comes from another CA: then set tls.server_ca to the bundle its "
        "clients trust",
    )


def trust_warnings(creds: Credentials, client_ca: Path) -> list[str]:
    """What is legal but almost surely wrong about the trust bundle, in words."""
    if any(_is_root(ca) for ca in creds.client_cas):
        return []
    names = "; ".join(ca.subject.rfc4514_string() for ca in creds.client_cas)
    return [
        f"{client_ca} holds no root CA, only intermediates ({names}): OpenSSL verifies a "
        "client's chain up to a self-signed root, so every client will be refused. Put the "
        "root in the bundle (`ca init` writes it to ca.crt)."
    ]


def _is_root(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_bundle(cas: list[x509.Certificate], source: Path, now: datetime) -> None:
    for n, ca in enumerate(cas, start=1):
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CredentialError(
                source,
                f"certificate {n} ({ca.subject.rfc4514_string()}) is not a CA certificate; "
                "the bundle must hold CA certificates only",
            )
    if not any(ca.not_valid_before_utc <= now < ca.not_valid_after_utc for ca in cas):
        raise CredentialError(source, "no CA certificate in the bundle is valid now")


def _parse_deny(data: bytes, source: Path) -> DenyList:
    try:
        return parse_deny_list(data.decode("utf-8"), source)
    except UnicodeDecodeError as exc:
        raise CredentialError(source, f"not UTF-8 text: {exc.reason}") from exc
