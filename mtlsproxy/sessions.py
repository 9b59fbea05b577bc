"""The registry of live client connections, and the enforcer that closes them.

One owner for that question. The drain on shutdown reads it to tell connections to
finish, the enforcer (hot reload issue) reads it to close sessions whose certificate
expired or was denied, and metrics read its size. A connection registers after its
handshake and leaves when its task ends, whatever the reason.

Enforcement: ``verdict`` is a pure function of a session, the current material and the
time. It answers why a live session must end: its certificate expired, its identity is on
the deny list now, or the CA it chained to has left the bundle. The enforcer loop asks it
for every session every ``enforce_interval`` and at once after each reload.

Closing is cooperative and protocol-aware: ``close(reason)`` sets ``closing`` and cancels
the session's *idle* scope only. An HTTP connection that is between requests goes at
once; one in the middle of a response finishes it and then sees ``closing``. The hard
scope (``cancel_scope``) is for the drain deadline, when waiting is over.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from mtlsproxy.identity import Identity
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import standing
from mtlsproxy.tls.store import CredentialStore, Material

log = logging.getLogger("mtlsproxy.enforce")

_ids = itertools.count(1)


@dataclass(eq=False, slots=True)  # one per live connection: no per-instance dict
class Session:
    listener: str
    peer: str
    identity: Identity
    kind: str  # "http", "tcp", "websocket"
    anchor: str | None  # fingerprint of the root the certificate chained to, if known
    resumed: bool = False  # the TLS session was resumed (no certificate shown this time)
    started: float = field(default_factory=trio.current_time)
    id: int = field(default_factory=lambda: next(_ids))
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    idle_scope: trio.CancelScope | None = None
    closing: str | None = None  # the reason, once asked to close
    closing_since: float | None = None  # trio clock of the first close request

    def close(self, reason: str) -> None:
        """Finish what is in flight, then close; idle connections close now."""
        if self.closing is None:
            self.closing = reason
            self.closing_since = trio.current_time()
        if self.idle_scope is not None:
            self.idle_scope.cancel()

    def cut(self) -> None:
        """Close now, in the middle of whatever is in flight."""
        self.cancel_scope.cancel()


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._changed = trio.Event()
        self._closing_all: str | None = None

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session
        if self._closing_all is not None:  # its handshake finished during a drain
            session.close(self._closing_all)

    def close_all(self, reason: str) -> None:
        """Ask every live session, and every one that registers from now on, to close."""
        self._closing_all = reason
        for session in list(self._sessions.values()):
            session.close(reason)

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            self._changed.set()
            self._changed = trio.Event()

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    async def wait_empty(self) -> None:
        while self._sessions:
            await self._changed.wait()


def verdict(session: Session, material: Material, now: datetime) -> str | None:
    """Why ``session`` must close now (``expired``, ``denied``, ``ca_removed``), or None."""
    return identity_verdict(session.identity, session.anchor, material, now)


def identity_verdict(
    identity: Identity, anchor: str | None, material: Material, now: datetime
) -> str | None:
    """The one rule, for a new connection and a live session alike."""
    if (refused := standing(identity, material.credentials.deny, now)) is not None:
        return refused[0]
    # An unknown anchor fails closed: if we cannot say which CA vouched for a
    # certificate, it does not outlive a change of the bundle.
    if anchor not in material.root_fingerprints:
        return "ca_removed"
    return None


class Enforcer:
    """Closes live sessions that ``verdict`` condemns; wakes every interval and on swaps."""

    def __init__(
        self,
        registry: SessionRegistry,
        store: CredentialStore,
        metrics: Metrics,
        interval: float,
        grace: float = 10.0,
    ) -> None:
        self._registry = registry
        self._store = store
        self._metrics = metrics
        self._interval = interval
        # How long a condemned session may go on finishing the response in flight (a
        # long download, a server-sent event stream) before it is cut.
        self._grace = grace
        self._wake = trio.Event()
        store.subscribe(on_swap=lambda _material: self._wake.set())

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = trio.Event()
            self.sweep()

    def sweep(self, now: datetime | None = None) -> int:
        material = self._store.current()
        now = now or datetime.now(UTC)
        closed = 0
        clock = trio.current_time()
        for session in self._registry:
            if session.closing is not None:
                self._cut_if_overdue(session, clock)
                continue
            reason = verdict(session, material, now)
            if reason is None:
                continue
            log.warning(
                "closing session of %s from %s on %s: %s",
                session.identity.name,
                session.peer,
                session.listener,
                reason,
            )
            self._metrics.sessions_closed.labels(session.listener, reason).inc()
            session.close(reason)
            closed += 1
        return closed

    def _cut_if_overdue(self, session: Session, clock: float) -> None:
        # A drain has its own deadline (drain_timeout); enforcement has the grace.
        since = session.closing_since
        if session.closing == "shutdown" or since is None or clock - since < self._grace:
            return
        if not session.cancel_scope.cancel_called:
            log.warning(
                "cutting session of %s from %s on %s: %s, and still busy after %g s",
                session.identity.name,
                session.peer,
                session.listener,
                session.closing,
                self._grace,
            )
            session.cut()
