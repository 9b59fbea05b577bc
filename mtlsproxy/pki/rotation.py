"""CA rotation without downtime: ``ca rotate`` then, once it is safe, ``ca retire``.

``rotate`` makes a new root and issuer in the CA folder and publishes at once a bundle
``ca.crt`` that lists the new root first, then every previous root. The replaced root and
issuer move to ``previous/<root sha256 prefix>/`` (the old root's key is deleted).

Issuance switches to the new issuer after a **grace period** (``--grace``, default 1 hour;
0 switches at once). Until then the previous issuer (its key kept in ``previous/`` for
that long) goes on signing: a certificate chained to the new root is only useful once
every peer that must verify it holds the new root, and peers learn it from the bundle
(proxies poll ``client_ca``; ``client renew --watch`` polls the renewal service's
``GET /ca``). A rotation because a CA key leaked wants ``--grace 0`` and a fast
``retire --force`` instead.

``retire`` removes previous roots from the bundle once no certificate they issued can
still be valid: the latest ``not_after`` the audit log records for that root (without an
audit log, the old issuer's own end, as no leaf outlives its issuer). Earlier it refuses
and says until when, unless forced. Proxies following the bundle then close the sessions
of certificates from a retired root.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from mtlsproxy import pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.errors import CAError, CredentialError
from mtlsproxy.pki.ca import (
    BUNDLE,
    DEFAULT_ISSUER_TTL,
    DEFAULT_ROOT_TTL,
    ISSUER_CERT,
    ISSUER_KEY,
    PREVIOUS,
    ROOT_CERT,
    ROOT_KEY,
    CertificateAuthority,
    grace_end,
    mark_grace,
    previous_folders,
)
from mtlsproxy.pki.keys import KeyType
from mtlsproxy.pki.lifecycle import AUDIT_BEGINS, audit, read_audit, sha256_of

RETIRED = "retired"


@dataclass(frozen=True)
class PreviousRoot:
    folder: Path
    root: x509.Certificate
    issuer: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return sha256_of(self.root)

    @property
    def switch_at(self) -> datetime | None:
        """End of the grace period during which this root's issuer still signs."""
        return grace_end(self.folder)

    def last_valid(self, ca_folder: Path) -> datetime:
        """Until when a certificate this root's issuer signed can still be valid: the
        latest end on record, when the audit log covers this root's whole life (it starts
        with an "audit begins" line for it); else the issuer's own end, as no leaf
        outlives its issuer."""
        records = read_audit(ca_folder) or []
        mine = [r for r in records if r.root == self.fingerprint]
        ends = [datetime.fromisoformat(r.not_after) for r in mine if r.by != AUDIT_BEGINS]
        latest = max(ends, default=datetime.min.replace(tzinfo=UTC))
        if not any(r.by == AUDIT_BEGINS for r in mine):
            return max(latest, self.issuer.not_valid_after_utc)
        return latest


def previous_roots(folder: Path) -> list[PreviousRoot]:
    found = []
    for sub in previous_folders(folder):
        try:
            root = pem.load_certificates(pem.read_file(sub / ROOT_CERT), sub / ROOT_CERT)[0]
            issuer = pem.load_certificates(pem.read_file(sub / ISSUER_CERT), sub / ISSUER_CERT)[0]
        except CredentialError as exc:
            raise CAError(f"{sub}: not a previous root: {exc}") from exc
        found.append(PreviousRoot(sub, root, issuer))
    return found


def _write_bundle(folder: Path, current: x509.Certificate, previous: list[PreviousRoot]) -> None:
    roots = [current, *(p.root for p in previous)]
    write_atomic(folder / BUNDLE, b"".join(pem.certificate_pem(r) for r in roots))


def rotate(
    folder: Path,
    *,
    name: str | None = None,
    key_type: KeyType = "ecdsa-p256",
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    issuer_ttl: timedelta = DEFAULT_ISSUER_TTL,
    grace: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> tuple[CertificateAuthority, PreviousRoot]:
    """Make a new root and issuer, keep the old root trusted; returns (new CA, old root)."""
    now = now or datetime.now(UTC)
    old = CertificateAuthority.load_current(folder)
    if CertificateAuthority.load(folder, now=now).root != old.root:
        raise CAError(
            f"{folder}: the previous rotation's grace period is not over yet; rotate again "
            "after it (or retire the previous root with --force first)"
        )
    org = old.root.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
    name = name or (str(org[0].value) if org else "mtlsproxy")
    # Build the new CA beside the old one first: a failure leaves the old one untouched.
    staging = folder / ".rotate-staging"
    shutil.rmtree(staging, ignore_errors=True)
    CertificateAuthority.init(
        staging, name=name, key_type=key_type, root_ttl=root_ttl, issuer_ttl=issuer_ttl
    )
    keep = folder / PREVIOUS / sha256_of(old.root).removeprefix("sha256:")[:16]
    keep.mkdir(parents=True, exist_ok=True)
    keep.chmod(0o700)
    for cert_name in (ROOT_CERT, ISSUER_CERT):
        write_atomic(keep / cert_name, (folder / cert_name).read_bytes())
    if grace > timedelta(0):
        write_atomic(keep / ISSUER_KEY, (folder / ISSUER_KEY).read_bytes(), mode=0o600)
        mark_grace(keep, now, grace)
    # The switch: new keys first, then the certificates they belong to, then the bundle.
    for file, mode in ((ROOT_KEY, 0o600), (ISSUER_KEY, 0o600), (ROOT_CERT, 0o644),
                       (ISSUER_CERT, 0o644)):  # fmt: skip
        write_atomic(folder / file, (staging / file).read_bytes(), mode=mode)
    shutil.rmtree(staging)
    current = CertificateAuthority.load_current(folder)
    audit(folder, current.root, issuer=current.root, root=current.root, by=AUDIT_BEGINS)
    previous = previous_roots(folder)
    _write_bundle(folder, current.root, previous)
    old_root = next(p for p in previous if p.fingerprint == sha256_of(old.root))
    return current, old_root


def retire(
    folder: Path, *, force: bool = False, now: datetime | None = None
) -> tuple[list[PreviousRoot], list[tuple[PreviousRoot, datetime]]]:
    """Remove the previous roots whose certificates have all expired from the bundle.

    Returns (retired, still needed with the time each may go). Raises CAError when
    nothing can be retired yet, unless ``force``.
    """
    current = CertificateAuthority.load_current(folder)
    now = now or datetime.now(UTC)
    previous = previous_roots(folder)
    if not previous:
        raise CAError(f"{folder}: no previous root to retire (run `ca rotate` first)")

    def until(p: PreviousRoot) -> datetime:
        # Still signing during its grace period, and then its certificates must run out.
        return max(p.last_valid(folder), p.switch_at or datetime.min.replace(tzinfo=UTC))

    ready = [p for p in previous if force or until(p) <= now]
    waiting = [(p, until(p)) for p in previous if p not in ready]
    if not ready:
        latest = max(t for _, t in waiting)
        raise CAError(
            f"the previous root signs, or certificates it issued can be valid, until "
            f"{latest:%Y-%m-%d %H:%M:%S}Z; retire it after that, or pass --force to cut "
            "them off now"
        )
    (folder / RETIRED).mkdir(exist_ok=True)
    keep = [p for p in previous if p not in ready]
    _write_bundle(folder, current.root, keep)  # first: trust goes away before the files move
    for p in ready:
        (p.folder / ISSUER_KEY).unlink(missing_ok=True)  # nothing is signed with it again
        target = folder / RETIRED / p.folder.name
        shutil.rmtree(target, ignore_errors=True)
        p.folder.rename(target)
    return ready, waiting
