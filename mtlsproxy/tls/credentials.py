"""Loading and proving the proxy's TLS material: server chain, key, client CA bundle, deny list.

"Prove" means: everything a handshake will rely on is checked before anything is used.
Every PEM block parses (see ``mtlsproxy.pem``), the key is the leaf's, the leaf is valid
now and its chain in the file is signed link by link, the client CA bundle holds only CA
certificates and at least one that is valid now, and each deny line parses. The same
function serves ``mtlsproxy check`` and the hot reload, so what ``check`` accepts is
exactly what the proxy will load.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
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
    # SHA-256 over the bytes of every file read, in a fixed order: the reloader compares
    # it to notice a change by content (mtime lies under symlink swaps and `cp -p`).
    digest: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]


def load_credentials(
    cert: Path, key: Path, client_ca: Path, deny: Path | None, now: datetime | None = None
) -> Credentials:
    now = now or datetime.now(UTC)
    files = {p: pem.read_file(p) for p in (cert, key, client_ca, deny) if p is not None}
    digest = _digest([files[p] if p is not None else b"" for p in (cert, key, client_ca, deny)])

    chain = pem.load_certificates(files[cert], cert)
    private_key = pem.load_private_key(files[key], key)
    if not pem.key_matches(private_key, chain[0]):
        raise CredentialError(key, f"this key is not the key of the first certificate in {cert}")
    _check_server_chain(chain, cert, now)
    cas = pem.load_certificates(files[client_ca], client_ca)
    _check_bundle(cas, client_ca, now)
    deny_list = DenyList() if deny is None else _parse_deny(files[deny], deny)
    return Credentials(tuple(chain), private_key, tuple(cas), deny_list, digest)


def content_digest(cert: Path, key: Path, client_ca: Path, deny: Path | None) -> str:
    """The digest ``load_credentials`` would record, from the files' bytes alone (cheap)."""
    return _digest(
        [pem.read_file(p) if p is not None else b"" for p in (cert, key, client_ca, deny)]
    )


def _digest(blobs: list[bytes]) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
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
