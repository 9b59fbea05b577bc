"""The credential store: the one owner of the proxy's current TLS material.

Theory of operation
===================

Every accepted connection asks ``current()`` once, at accept time, and handshakes with
the contexts it gets; every new backend connection of a ``tls = true`` route asks it for
the current context of that route's files (``Material.backend_context``). A reload
builds a complete new ``Material`` next to the old one and swaps one reference: a
handshake in progress keeps the object it started with, nothing is ever changed in place,
and there is no SNI-callback context switching (OpenSSL does not carry verify settings
over to a switched context).

What it owns: the server certificate and key, the client CA bundle, the deny list, the
optional ``server_ca``, and the proxy's client identity towards TLS backends
(``tls_cert``/``tls_key``/``tls_ca`` of the routes). All of them renew; all are proved
and swapped together.

``reload()`` is cheap when nothing changed: it reads every file once and compares a
digest of their *content* (mtime lies under Kubernetes ``..data`` symlink swaps and
``cp -p``). When the content changed it proves everything from those same bytes
(``tls.credentials``, ``tls.backend``) before building contexts; on any failure the old
material stays, one line names the file and the reason, and the same bad content is not
reported again on every poll. A cert/key pair replaced one file after the other is
therefore never swapped in half-way: the mismatched middle state fails the proof, and the
next poll sees the finished pair.

Removals wait until the file is stable. ``echo x > deny.txt`` truncates the file before
it writes, and a poll between the two reads an empty list: taken at once, that lets every
denied client back in. A CA bundle cut short the same way would refuse (and the enforcer
would disconnect) every client of the lost CAs. So a change that *removes* deny entries or
CAs takes effect only once the same content has been read again at least
``reload_interval`` later (the next poll), with no failed read in between; meanwhile the
old entries stay in force next to the new ones (``Material.pending`` says so). Additions
take effect at once: they only ever refuse more. A removal is logged as a warning, a deny
list that drops to empty as an error. (A process that starts in the middle of a rewrite
has nothing earlier to hold against: that is why the deny tooling writes atomically.)

Sessions do not resume across a swap: each SSL_CTX has its own session cache and ticket
keys, and the session id context is derived from the material's digest. A client must
show its certificate again after every rotation, so a CA that left the bundle, or a
certificate on the new deny list, cannot ride on an old session.

``anchor_of`` remembers which root each verified leaf chained to, so the enforcer can
close the sessions of a CA that leaves the bundle, resumed ones included (OpenSSL keeps
no verified chain for a resumed session).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

from mtlsproxy.certinfo import fingerprint
from mtlsproxy.config import H1_ALPN, HTTP_ALPN, TLS
from mtlsproxy.denylist import DenyList
from mtlsproxy.errors import CredentialError
from mtlsproxy.tls.backend import (
    BackendCredentials,
    BackendFiles,
    build_backend_context,
    load_backend_credentials,
)
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.credentials import Credentials, digest_of, load_credentials, read_files

log = logging.getLogger("mtlsproxy.reload")

_ANCHORS_KEPT = 100_000
_SHA256 = hashes.SHA256()
# Reading a file failed because the process or system is out of something for a moment.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class Pending:
    """Removals read from the files but not in force yet (see the module comment)."""

    deny_entries: int  # deny entries still applied although the file dropped them
    client_cas: tuple[x509.Certificate, ...]  # CAs still trusted although dropped
    since: datetime  # when that content was first read


# What a store builds when it is not told: http listeners (and the admin's) and raw TCP.
DEFAULT_ALPNS: tuple[tuple[bytes, ...] | None, ...] = (HTTP_ALPN, H1_ALPN, None)


@dataclass(frozen=True)
class Material:
    credentials: Credentials  # what is in force: the files' content, plus pending removals
    generation: int
    loaded_at: datetime
    # A server context per ALPN list the listeners use (None: no ALPN); http/1.1 always.
    contexts: Mapping[tuple[bytes, ...] | None, SSL.Context]
    root_fingerprints: frozenset[str]  # the CAs of client_ca, "sha256:<hex>"
    backends: Mapping[BackendFiles, tuple[BackendCredentials, SSL.Context]] = field(
        default_factory=dict
    )
    pending: Pending | None = None

    def context_for(self, alpn: tuple[bytes, ...] | None = HTTP_ALPN) -> SSL.Context:
        return self.contexts[alpn]

    def backend_context(self, files: BackendFiles) -> SSL.Context:
        return self.backends[files][1]


class ReloadResult(msgspec.Struct, frozen=True):
    time: datetime
    source: str  # "start", "poll", "signal", "admin"
    result: str  # "swapped", "unchanged", "failed"
    generation: int
    error: str | None = None


def build_material(
    creds: Credentials,
    tls: TLS,
    generation: int,
    backends: Mapping[BackendFiles, BackendCredentials] | None = None,
    pending: Pending | None = None,
    *,
    previous: Material | None = None,
    alpns: Iterable[tuple[bytes, ...] | None] = DEFAULT_ALPNS,
) -> Material:
    """``previous``: the material in force; a backend identity whose files did not change
    keeps its context, so a swap for another reason (a deny entry, a server certificate)
    does not retire every pooled backend connection."""
    sid = hashlib.sha256(b"mtlsproxy session id context\0" + creds.digest.encode()).digest()

    def context(alpn: tuple[bytes, ...] | None) -> SSL.Context:
        return build_server_context(
            cert_chain=list(creds.cert_chain),
            key=creds.key,
            client_cas=list(creds.client_cas),
            min_version=tls.min_version,
            groups=tls.groups,
            alpn=None if alpn is None else list(alpn),
            session_id_context=sid,
        )

    return Material(
        credentials=creds,
        generation=generation,
        loaded_at=datetime.now(UTC),
        contexts={alpn: context(alpn) for alpn in dict.fromkeys((HTTP_ALPN, H1_ALPN, *alpns))},
        root_fingerprints=frozenset(fingerprint(ca) for ca in creds.client_cas),
        backends={
            files: _backend_entry(backend, tls, previous)
            for files, backend in (backends or {}).items()
        },
        pending=pending,
    )


def _backend_entry(
    backend: BackendCredentials, tls: TLS, previous: Material | None
) -> tuple[BackendCredentials, SSL.Context]:
    old = previous.backends.get(backend.files) if previous is not None else None
    if old is not None and old[0].digest == backend.digest:
        return old
    return backend, build_backend_context(backend, tls.min_version, tls.groups)


@dataclass(frozen=True)
class _Read:
    """One reading of every file: the digest of their bytes, and what they prove to be."""

    digest: str
    credentials: Credentials
    backends: dict[BackendFiles, BackendCredentials]


class CredentialStore:
    def __init__(
        self,
        tls: TLS,
        backends: Iterable[BackendFiles] = (),
        now: datetime | None = None,
        clock: Callable[[], float] = time.monotonic,
        alpns: Iterable[tuple[bytes, ...] | None] = DEFAULT_ALPNS,
    ) -> None:
        self._tls = tls
        self._alpns = tuple(dict.fromkeys(alpns))  # the listeners' ALPN lists: a context each
        self._backend_files = tuple(dict.fromkeys(backends))  # unique, in config order
        self._clock = clock
        server_paths = [tls.cert, tls.key, tls.client_ca, tls.deny, tls.server_ca]
        backend_paths = [p for files in self._backend_files for p in files.paths]
        self._paths = list(dict.fromkeys(p for p in server_paths + backend_paths if p))
        first = self._prove(read_files(self._paths), now)
        self._seen = first.digest  # the content last read and proved
        self._settled = first.credentials  # the last content fully in force
        self._held: tuple[_Read, float] | None = None  # content with removals, first seen
        self._material = build_material(
            first.credentials, tls, 1, first.backends, alpns=self._alpns
        )
        self.last_result = ReloadResult(datetime.now(UTC), "start", "swapped", 1)
        self._last_failed: str | None = None  # what the last failure was about
        self._starved = False  # a poll found the process out of file descriptors
        # A read or proof failed since the content last proved: a held removal must then
        # be read again, unchanged, a full reload_interval later before it takes effect.
        self._interrupted = False
        self._anchors: OrderedDict[str, str] = OrderedDict()
        self._on_swap: list[Callable[[Material], None]] = []
        self._on_result: list[Callable[[ReloadResult], None]] = []

    def current(self) -> Material:
        return self._material

    def deny_list(self) -> DenyList:
        """The deny list of the current material (what every request is checked against)."""
        return self._material.credentials.deny

    def subscribe(
        self,
        on_swap: Callable[[Material], None] | None = None,
        on_result: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        if on_swap:
            self._on_swap.append(on_swap)
        if on_result:
            self._on_result.append(on_result)

    def _prove(
        self,
        blobs: dict[Path, bytes],
        now: datetime | None = None,
        known: x509.Certificate | None = None,
    ) -> _Read:
        tls = self._tls
        creds = load_credentials(
            tls.cert,
            tls.key,
            tls.client_ca,
            tls.deny,
            now,
            server_ca=tls.server_ca,
            blobs=blobs,
            known_anchor=known,
        )
        backends = {f: load_backend_credentials(f, blobs, now) for f in self._backend_files}
        return _Read(digest_of(self._paths, blobs), creds, backends)

    def reload(self, source: str) -> ReloadResult:
        """Swap in the files' current content if it changed and proves good."""
        try:
            blobs = read_files(self._paths)
        except CredentialError as exc:  # a file is missing or unreadable
            if source == "poll" and _out_of_resources(exc):
                return self._skipped(exc)
            return self._failed(source, exc, fingerprint_of_failure=str(exc))
        self._starved = False
        digest = digest_of(self._paths, blobs)
        if digest == self._seen:
            self._last_failed = None
            held, interrupted = self._held, self._interrupted
            self._interrupted = False
            if held is not None and interrupted:
                # A failed read came between (a rewrite in progress, the file gone for a
                # moment): "stayed the same" is not shown, so the wait starts again.
                self._held = (held[0], self._clock())
            elif held is not None and self._clock() - held[1] >= self._tls.reload_interval.seconds:
                return self._settle(source, held[0])
            return self._record(ReloadResult(_now(), source, "unchanged", self.generation))
        try:
            read = self._prove(blobs, known=self._settled.server_anchor)
            removed = _removals(self._settled, read.credentials)
            pending = None
            if removed.deny_entries or removed.client_cas:
                pending = removed
                creds = _with_removals_held(read.credentials, self._settled, removed)
            else:
                creds = read.credentials
            material = build_material(
                creds,
                self._tls,
                self.generation + 1,
                read.backends,
                pending,
                previous=self._material,
                alpns=self._alpns,
            )
        except (CredentialError, SSL.Error, ValueError) as exc:
            return self._failed(source, exc, fingerprint_of_failure=digest)
        self._seen, self._interrupted = digest, False
        if pending is None:
            self._held, self._settled = None, read.credentials
        else:
            self._held = (read, self._clock())
            _warn_held(pending, self._tls, self.generation + 1)
        return self._swap(source, material, _what_changed(self._material, material))

    def _settle(self, source: str, read: _Read) -> ReloadResult:
        """The content with removals stayed the same for a poll: put it in force."""
        try:
            material = build_material(
                read.credentials,
                self._tls,
                self.generation + 1,
                read.backends,
                previous=self._material,
                alpns=self._alpns,
            )
        except (CredentialError, SSL.Error, ValueError) as exc:  # did prove before
            return self._failed(source, exc, fingerprint_of_failure=read.digest)
        pending = self._material.pending
        self._held, self._settled = None, read.credentials
        if pending is not None and pending.deny_entries:
            if len(read.credentials.deny) == 0:
                log.error(
                    "deny list %s is now EMPTY (%d entries removed): every client "
                    "certificate from client_ca is admitted again",
                    self._tls.deny,
                    pending.deny_entries,
                )
            else:
                log.warning(
                    "deny list %s: %d entries removed, now in force (%d left)",
                    self._tls.deny,
                    pending.deny_entries,
                    len(read.credentials.deny),
                )
        if pending is not None and pending.client_cas:
            log.warning(
                "client CA bundle %s: %s removed, now in force: their clients are refused "
                "and their live sessions closed",
                self._tls.client_ca,
                "; ".join(ca.subject.rfc4514_string() for ca in pending.client_cas),
            )
        return self._swap(source, material, "removals in force after the file stayed the same")

    def _swap(self, source: str, material: Material, what: str) -> ReloadResult:
        self._material = material
        self._last_failed = None
        log.info("reload (%s): generation %d: %s", source, material.generation, what)
        creds = material.credentials
        if not creds.server_anchor_listed and creds.server_anchor is not None:
            log.warning(
                "the server certificate %s chains to %s, which is no longer in %s: clients "
                "that trust only the new bundle refuse it; renew the server certificate",
                self._tls.cert,
                creds.server_anchor.subject.rfc4514_string(),
                "tls.server_ca" if self._tls.server_ca else "tls.client_ca",
            )
        for callback in self._on_swap:
            callback(material)
        return self._record(ReloadResult(_now(), source, "swapped", material.generation))

    def _skipped(self, exc: CredentialError) -> ReloadResult:
        """The process is out of descriptors (a connection flood at ``ulimit -n``): the
        files are not broken and nothing failed, so this poll is skipped, not counted as
        a failed reload, and said once as a warning, not once a poll as an error."""
        if not self._starved:
            log.warning("credential poll skipped until descriptors are free again: %s", exc)
        self._starved = True
        self._interrupted = True  # unseen, the files may have changed and changed back
        return self._record(ReloadResult(_now(), "poll", "unchanged", self.generation))

    @property
    def generation(self) -> int:
        return self._material.generation

    def _failed(self, source: str, exc: Exception, *, fingerprint_of_failure: str) -> ReloadResult:
        self._interrupted = True
        result = ReloadResult(_now(), source, "failed", self.generation, str(exc))
        # The same bad content is reported once, not on every poll; an explicit reload
        # (signal, admin) always says what is wrong.
        if source != "poll" or fingerprint_of_failure != self._last_failed:
            log.error(
                "reload (%s) refused, still serving generation %d: %s",
                source,
                self.generation,
                exc,
            )
        self._last_failed = fingerprint_of_failure
        return self._record(result)

    def _record(self, result: ReloadResult) -> ReloadResult:
        if result.result != "unchanged" or self.last_result.result == "failed":
            self.last_result = result
        for callback in self._on_result:
            callback(result)
        return result

    # ---- which root each verified leaf chained to --------------------------------

    def remember_anchor(self, leaf_sha256: str, root_fingerprint: str) -> None:
        self._anchors[leaf_sha256] = root_fingerprint
        self._anchors.move_to_end(leaf_sha256)
        while len(self._anchors) > _ANCHORS_KEPT:
            self._anchors.popitem(last=False)

    def anchor_of(self, leaf_sha256: str) -> str | None:
        return self._anchors.get(leaf_sha256)


def _out_of_resources(exc: CredentialError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in _OUT_OF_RESOURCES


def _removals(settled: Credentials, new: Credentials) -> Pending:
    kept = {ca.fingerprint(_SHA256) for ca in new.client_cas}
    return Pending(
        deny_entries=settled.deny.removed_in(new.deny),
        client_cas=tuple(ca for ca in settled.client_cas if ca.fingerprint(_SHA256) not in kept),
        since=_now(),
    )


def _with_removals_held(new: Credentials, settled: Credentials, removed: Pending) -> Credentials:
    """``new`` with what it removed from ``settled`` (``removed``) still in force."""
    held_digest = hashlib.sha256(f"{new.digest} held {settled.digest}".encode()).hexdigest()
    return dataclasses.replace(
        new,
        client_cas=new.client_cas + removed.client_cas,
        deny=new.deny | settled.deny,
        digest=held_digest,
    )


def _warn_held(pending: Pending, tls: TLS, generation: int) -> None:
    wait = tls.reload_interval.text
    if pending.deny_entries:
        log.warning(
            "deny list %s: %d entries disappeared; they stay in force until the file has "
            "stayed the same for %s (a rewrite in progress reads as a shorter list)",
            tls.deny,
            pending.deny_entries,
            wait,
        )
    if pending.client_cas:
        log.warning(
            "client CA bundle %s: %s disappeared; still trusted until the file has stayed "
            "the same for %s (generation %d)",
            tls.client_ca,
            "; ".join(ca.subject.rfc4514_string() for ca in pending.client_cas),
            wait,
            generation,
        )


def _what_changed(old: Material, new: Material) -> str:
    before, after = old.credentials, new.credentials
    changes = []
    if before.cert_chain != after.cert_chain:
        leaf = after.leaf
        changes.append(
            f"server certificate {leaf.subject.rfc4514_string()} "
            f"until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
        )
    if before.client_cas != after.client_cas:
        changes.append(f"client CA bundle of {len(after.client_cas)}")
    if before.deny != after.deny:
        changes.append(f"deny list of {len(after.deny)}")
    for files, (backend, _) in new.backends.items():
        previous = old.backends.get(files)
        if previous is None or previous[0].cert_chain != backend.cert_chain:
            leaf = backend.leaf
            changes.append(
                f"backend client certificate {leaf.subject.rfc4514_string()} "
                f"until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
            )
        elif previous[0].server_cas != backend.server_cas:
            changes.append(f"backend CA bundle {files.ca} of {len(backend.server_cas)}")
    return ", ".join(changes) or "same content, new bytes"


def _now() -> datetime:
    return datetime.now(UTC)
