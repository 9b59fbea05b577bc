"""Certificate lifecycle rules shared by the renewal tools: when to renew, what a renewed
certificate copies, and the audit log of every issuance.

Renewal time: at about two thirds of a certificate's validity window, with jitter (plus or
minus 5% of the window) so that a fleet issued at the same moment does not renew at the
same moment. A 24-hour certificate renews with about 8 hours left; a 60-second one with
about 20 seconds left, room for a few retries.

Identity: a renewed certificate keeps the subject CN and OUs, the SANs and the kind
(server or client, from the extended key usage) of the certificate it replaces, never what
a request asks for.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtlsproxy.errors import CAError

log = logging.getLogger("mtlsproxy.renew")

RENEW_AT = 2 / 3
JITTER = 0.05
AUDIT_LOG = "audit.log"
AUDIT_BEGINS = "audit begins"  # the record a new root starts with; not an issuance


def renewal_due(cert: x509.Certificate, rng: random.Random | None = None) -> datetime:
    """When ``cert`` should be renewed: about 2/3 into its validity window, jittered."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    share = RENEW_AT + (rng or random).uniform(-JITTER, JITTER)
    return start + (end - start) * share


@dataclass(frozen=True)
class LeafIdentity:
    """What a renewal copies from the certificate it replaces."""

    kind: str  # "server" or "client"
    name: str
    ous: tuple[str, ...]
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    uris: tuple[str, ...]
    ttl: timedelta  # the lifetime it was issued with

    @classmethod
    def of(cls, cert: x509.Certificate) -> LeafIdentity:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise CAError("the certificate to renew has no single common name (CN)")
        ous = tuple(
            str(a.value)
            for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        )
        try:
            ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CAError("the certificate to renew has no extended key usage") from None
        if ExtendedKeyUsageOID.SERVER_AUTH in ekus:
            kind = "server"
        elif ExtendedKeyUsageOID.CLIENT_AUTH in ekus:
            kind = "client"
        else:
            raise CAError("the certificate to renew is neither a server nor a client certificate")
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        return cls(
            kind=kind,
            name=str(cns[0].value),
            ous=ous,
            dns=tuple(sans.get_values_for_type(x509.DNSName)),
            ips=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
            uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
            ttl=issued_ttl(cert),
        )

    @property
    def key(self) -> str:
        """One string per identity (rate limits count renewals by it)."""
        parts = [self.kind, self.name, *self.ous, *self.dns, *self.ips, *self.uris]
        return "\x00".join(parts)


def backdate(ttl: timedelta) -> timedelta:
    """How far before issuance a certificate starts: a minute for clock skew, but at most a
    tenth of a short lifetime (a 60-second certificate starts 6 seconds early)."""
    return min(timedelta(minutes=1), ttl / 10)


def issued_ttl(cert: x509.Certificate) -> timedelta:
    """The TTL a certificate was issued with: its window less the backdating."""
    window = cert.not_valid_after_utc - cert.not_valid_before_utc
    if window >= timedelta(minutes=11):
        return window - timedelta(minutes=1)
    return window / 1.1


class AuditRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    time: str
    serial: str  # hex
    subject: str
    sans: list[str]
    fingerprint: str  # sha256:<hex> of the issued leaf
    not_after: str
    issuer: str  # subject of the issuing CA
    root: str  # sha256:<hex> of the root above it: what `ca retire` looks for
    by: str  # "ca issue", "ca renew", "renewal service"
    requester: str | None = None  # fingerprint of the certificate that asked for it


def sha256_of(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def audit(
    folder: Path,
    cert: x509.Certificate,
    *,
    issuer: x509.Certificate,
    root: x509.Certificate,
    by: str,
    requester: str | None = None,
) -> None:
    """Append one issuance to ``folder/audit.log`` (JSON lines, appended under a lock)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"{type(n).__name__}:{n.value}" for n in sans]
    except x509.ExtensionNotFound:
        names = []
    record = AuditRecord(
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        sans=names,
        fingerprint=sha256_of(cert),
        not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
        issuer=issuer.subject.rfc4514_string(),
        root=sha256_of(root),
        by=by,
        requester=requester,
    )
    line = msgspec.json.encode(record) + b"\n"
    fd = os.open(folder / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def audited_ttl(folder: Path, cert: x509.Certificate) -> timedelta | None:
    """The TTL ``cert`` was issued with, as the audit log recorded it (None: not there)."""
    serial = format(cert.serial_number, "x")
    for record in reversed(read_audit(folder) or []):
        if record.serial == serial and record.by != AUDIT_BEGINS:
            issued = datetime.fromisoformat(record.time)
            return timedelta(seconds=round((cert.not_valid_after_utc - issued).total_seconds()))
    return None


def read_audit(folder: Path) -> list[AuditRecord] | None:
    """Every issuance on record, or None when this CA has no audit log at all."""
    path = folder / AUDIT_LOG
    if not path.exists():
        return None
    records = []
    decoder = msgspec.json.Decoder(AuditRecord)
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(decoder.decode(line))
        except msgspec.DecodeError as exc:
            raise CAError(f"{path}:{number}: not an audit record: {exc}") from exc
    return records


class RetryLater(Exception):
    """A renewal failed in a way worth retrying (service down, busy, rate limited);
    ``retry_after`` is the wait the service asked for, in seconds, if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def keep_renewed(
    current: Callable[[], x509.Certificate],
    renew: Callable[[], x509.Certificate],
    *,
    what: str,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    max_backoff: float = 60.0,
    tick: Callable[[], None] | None = None,
    tick_every: Callable[[x509.Certificate], float] = lambda _cert: 60.0,
    renew_expired: bool = False,
) -> None:
    """Renew ``current()`` at its renewal time, forever (until ``stop()``).

    A ``RetryLater`` failure is retried with a back-off (1 s doubling to ``max_backoff``,
    never sleeping past the certificate's end); any other error, or the certificate
    expiring before a renewal succeeded, is raised: a person has to look.
    ``tick`` runs every ``tick_every(cert)`` seconds while waiting (the client refreshes
    its trust bundle there); a ``RetryLater`` from it is logged and waited out.
    ``renew_expired``: the CA's own tool may renew a certificate past its end (a client
    renewing over TLS cannot: it has nothing valid left to prove who it is).
    """
    while not stop():
        cert = current()
        due = renewal_due(cert, rng)
        log.info("%s: valid until %s, renewing at %s", what,
                 cert.not_valid_after_utc.isoformat(timespec="seconds"),
                 due.isoformat(timespec="seconds"))  # fmt: skip
        next_tick = time.monotonic() + tick_every(cert)
        while not stop() and (wait := (due - datetime.now(UTC)).total_seconds()) > 0:
            sleep(min(wait, 1.0))
            if tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_every(cert)
                try:
                    tick()
                except RetryLater as exc:
                    log.warning("%s: %s", what, exc)
        backoff = 1.0
        while not stop():
            left = (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
            if renew_expired:
                left = max(left, 2 * max_backoff)
            if left <= 0:
                raise CAError(
                    f"{what}: the certificate expired at "
                    f"{cert.not_valid_after_utc.isoformat(timespec='seconds')} before a renewal "
                    "succeeded; it needs a new one from an operator"
                )
            try:
                fresh = renew()
            except RetryLater as exc:
                wanted = max(backoff, exc.retry_after or 0.0)
                pause = min(wanted, max(left / 2, 0.1))
                log.warning("%s: renewal failed (%s); retrying in %.1f s", what, exc, pause)
                sleep(pause)
                backoff = min(backoff * 2, max_backoff)
                continue
            log.info("%s: renewed, valid until %s", what,
                     fresh.not_valid_after_utc.isoformat(timespec="seconds"))  # fmt: skip
            break
