"""The registry of live client connections: who is connected, where, since when.

One owner for that question. The drain on shutdown reads it to tell connections to
finish, the enforcer (hot reload issue) reads it to close sessions whose certificate
expired or was denied, and metrics read its size. A connection registers after its
handshake and leaves when its task ends, whatever the reason.

Closing is cooperative and protocol-aware: ``close(reason)`` sets ``closing`` and cancels
the session's *idle* scope only. An HTTP connection that is between requests goes at
once; one in the middle of a response finishes it and then sees ``closing``. The hard
scope (``cancel_scope``) is for the drain deadline, when waiting is over.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from mtlsproxy.identity import Identity

_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    listener: str
    peer: str
    identity: Identity
    kind: str  # "http", "tcp", "websocket"
    started: float = field(default_factory=trio.current_time)
    id: int = field(default_factory=lambda: next(_ids))
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    idle_scope: trio.CancelScope | None = None
    closing: str | None = None  # the reason, once asked to close

    def close(self, reason: str) -> None:
        """Finish what is in flight, then close; idle connections close now."""
        if self.closing is None:
            self.closing = reason
        if self.idle_scope is not None:
            self.idle_scope.cancel()


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
