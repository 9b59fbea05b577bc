"""The credential store: the one owner of the proxy's current TLS material.

Theory of operation
===================

Every accepted connection asks ``current()`` once, at accept time, and handshakes with
the contexts it gets. A reload builds a complete new ``Material`` next to the old one and
swaps one reference: a handshake in progress keeps the object it started with, nothing is
ever changed in place, and there is no SNI-callback context switching (OpenSSL does not
carry verify settings over to a switched context).

``reload()`` is cheap when nothing changed: it reads the files and compares a digest of
their *content* (mtime lies under Kubernetes ``..data`` symlink swaps and ``cp -p``).
When the content changed it proves everything (``tls.credentials``) before building
contexts; on any failure the old material stays, one line names the file and the reason,
and the same bad content is not reported again on every poll. A cert/key pair replaced
one file after the other is therefore never swapped in half-way: the mismatched middle
state fails the proof, and the next poll sees the finished pair.

Sessions do not resume across a swap: each SSL_CTX has its own session cache and ticket
keys, and the session id context is derived from the material's digest. A client must
show its certificate again after every rotation, so a CA that left the bundle, or a
certificate on the new deny list, cannot ride on an old session.

``anchor_of`` remembers which root each verified leaf chained to, so the enforcer can
close the sessions of a CA that leaves the bundle, resumed ones included (OpenSSL keeps
no verified chain for a resumed session).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from OpenSSL import SSL

from mtlsproxy.config import TLS
from mtlsproxy.errors import CredentialError
from mtlsproxy.pki.describe import fingerprint
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.credentials import Credentials, content_digest, load_credentials

log = logging.getLogger("mtlsproxy.reload")

_ANCHORS_KEPT = 100_000


@dataclass(frozen=True)
class Material:
    credentials: Credentials
    generation: int
    loaded_at: datetime
    http_context: SSL.Context  # ALPN http/1.1
    raw_context: SSL.Context  # no ALPN: raw TCP listeners
    root_fingerprints: frozenset[str]  # the CAs of client_ca, "sha256:<hex>"

    def context_for(self, mode: str) -> SSL.Context:
        return self.http_context if mode == "http" else self.raw_context


class ReloadResult(msgspec.Struct, frozen=True):
    time: datetime
    source: str  # "start", "poll", "signal", "admin"
    result: str  # "swapped", "unchanged", "failed"
    generation: int
    error: str | None = None


def build_material(creds: Credentials, tls: TLS, generation: int) -> Material:
    sid = hashlib.sha256(b"mtlsproxy session id context\0" + creds.digest.encode()).digest()

    def context(alpn: list[bytes] | None) -> SSL.Context:
        return build_server_context(
            cert_chain=list(creds.cert_chain),
            key=creds.key,
            client_cas=list(creds.client_cas),
            min_version=tls.min_version,
            alpn=alpn,
            session_id_context=sid,
        )

    return Material(
        credentials=creds,
        generation=generation,
        loaded_at=datetime.now(UTC),
        http_context=context([b"http/1.1"]),
        raw_context=context(None),
        root_fingerprints=frozenset(fingerprint(ca) for ca in creds.client_cas),
    )


class CredentialStore:
    def __init__(self, tls: TLS, now: datetime | None = None) -> None:
        self._tls = tls
        creds = load_credentials(tls.cert, tls.key, tls.client_ca, tls.deny, now)
        self._material = build_material(creds, tls, generation=1)
        self.last_result = ReloadResult(datetime.now(UTC), "start", "swapped", 1)
        self._last_failed: str | None = None  # what the last failure was about
        self._anchors: OrderedDict[str, str] = OrderedDict()
        self._on_swap: list[Callable[[Material], None]] = []
        self._on_result: list[Callable[[ReloadResult], None]] = []

    def current(self) -> Material:
        return self._material

    def subscribe(
        self,
        on_swap: Callable[[Material], None] | None = None,
        on_result: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        if on_swap:
            self._on_swap.append(on_swap)
        if on_result:
            self._on_result.append(on_result)

    def reload(self, source: str) -> ReloadResult:
        """Swap in the files' current content if it changed and proves good."""
        tls, old = self._tls, self._material
        try:
            digest = content_digest(tls.cert, tls.key, tls.client_ca, tls.deny)
        except CredentialError as exc:  # a file is missing or unreadable
            return self._failed(source, exc, fingerprint_of_failure=str(exc))
        if digest == old.credentials.digest:
            self._last_failed = None
            return self._record(ReloadResult(_now(), source, "unchanged", old.generation))
        try:
            creds = load_credentials(tls.cert, tls.key, tls.client_ca, tls.deny)
            material = build_material(creds, tls, old.generation + 1)
        except (CredentialError, SSL.Error, ValueError) as exc:
            return self._failed(source, exc, fingerprint_of_failure=digest)
        self._material = material
        self._last_failed = None
        log.info(
            "reload (%s): generation %d: %s",
            source,
            material.generation,
            _what_changed(old.credentials, creds),
        )
        for callback in self._on_swap:
            callback(material)
        return self._record(ReloadResult(_now(), source, "swapped", material.generation))

    def _failed(self, source: str, exc: Exception, *, fingerprint_of_failure: str) -> ReloadResult:
        result = ReloadResult(_now(), source, "failed", self._material.generation, str(exc))
        # The same bad content is reported once, not on every poll; an explicit reload
        # (signal, admin) always says what is wrong.
        if source != "poll" or fingerprint_of_failure != self._last_failed:
            log.error(
                "reload (%s) refused, still serving generation %d: %s",
                source,
                self._material.generation,
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


def _what_changed(old: Credentials, new: Credentials) -> str:
    changes = []
    if old.cert_chain != new.cert_chain:
        leaf = new.leaf
        changes.append(
            f"server certificate {leaf.subject.rfc4514_string()} "
            f"until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
        )
    if old.client_cas != new.client_cas:
        changes.append(f"client CA bundle of {len(new.client_cas)}")
    if old.deny != new.deny:
        changes.append(f"deny list of {len(new.deny)}")
    return ", ".join(changes) or "same content, new bytes"


def _now() -> datetime:
    return datetime.now(UTC)
