"""Connections to backends: open with a deadline, keep alive in a pool, notice dead ones.

Health is passive: a backend that refuses a connection (or times out connecting) is
marked down for a short, growing back-off (1 s doubling to 10 s) and skipped while down;
the next request after the back-off tries it again, and a success clears the mark.
A route whose backends are all down answers 503 at once instead of making every client
wait for the connect timeouts.

Pooled connections are checked before reuse: an idle keep-alive socket that has become
readable has been closed by the backend (or carries bytes nobody asked for), and is
dropped; so is a TLS connection made with material the credential store has since
replaced (a renewed client certificate, a rotated backend CA), so that the old
certificate is not used again after a renewal. The pool keeps connections idle for at
most ``IDLE_SECONDS``, under the 5 s keep-alive common to backend servers, so we rarely
race a backend closing one.
"""

from __future__ import annotations

import select
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import h11
import trio
from OpenSSL import SSL

from mtlsproxy.address import Address
from mtlsproxy.tls.backend import BackendFiles
from mtlsproxy.tls.engine import HandshakeError, TLSStream

IDLE_SECONDS = 4.0
MAX_IDLE_PER_BACKEND = 64
_DOWN_MIN, _DOWN_MAX = 1.0, 10.0


@dataclass(frozen=True)
class Target:
    """Where and how to connect. The pool and the health marks are keyed by all of it:
    a connection opened in plaintext must never serve a ``tls = true`` route to the same
    address, and a TLS failure says nothing about the plaintext port."""

    address: Address
    tls: BackendFiles | None = None  # its current context comes from the credential store
    server_hostname: str | None = None

    def __str__(self) -> str:
        return str(self.address)


class ConnectFailed(Exception):
    def __init__(self, backend: Target, why: str) -> None:
        self.backend = backend
        self.why = why
        super().__init__(f"cannot connect to {backend}: {why}")


@dataclass(eq=False)
class Upstream:
    backend: Target
    stream: trio.abc.Stream
    fileno: int
    tls_context: SSL.Context | None = None  # what it was made with
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    reused: bool = False
    idle_since: float = 0.0
    private: bool = False  # carries one client's PROXY header: never back to the pool

    def looks_alive(self) -> bool:
        # poll, not select: select() cannot take a descriptor above 1023, and a busy
        # proxy has those.
        poller = select.poll()
        poller.register(self.fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return not poller.poll(0)
        except OSError:
            return False


@dataclass
class _Health:
    down_until: float = 0.0
    backoff: float = _DOWN_MIN


class UpstreamPool:
    """``tls_context`` gives the current client context for a route's TLS files (the
    credential store's); a pool without TLS backends needs none."""

    def __init__(self, tls_context: Callable[[BackendFiles], SSL.Context] | None = None) -> None:
        self._tls_context = tls_context
        self._idle: defaultdict[Target, list[Upstream]] = defaultdict(list)
        self._health: defaultdict[Target, _Health] = defaultdict(_Health)

    def is_up(self, backend: Target) -> bool:
        return trio.current_time() >= self._health[backend].down_until

    async def acquire(
        self, backend: Target, *, connect_timeout: float, fresh: bool = False
    ) -> Upstream:
        """An idle keep-alive connection, or a new one; ``fresh``: always a new one (a raw
        TCP session must never inherit a connection HTTP left in the pool)."""
        idle = self._idle[backend]
        now = trio.current_time()
        context = self._context(backend)
        while idle and not fresh:
            up = idle.pop()  # most recently used first: the likeliest to be alive
            current = up.tls_context is context  # not made with replaced material
            if current and now - up.idle_since < IDLE_SECONDS and up.looks_alive():
                up.reused = True
                return up
            await discard(up)
        try:
            up = await self._connect(backend, context, connect_timeout)
        except ConnectFailed:
            health = self._health[backend]
            health.down_until = trio.current_time() + health.backoff
            health.backoff = min(health.backoff * 2, _DOWN_MAX)
            raise
        self._health[backend] = _Health()
        return up

    def _context(self, backend: Target) -> SSL.Context | None:
        if backend.tls is None:
            return None
        if self._tls_context is None:
            raise RuntimeError("a TLS backend needs a pool made with tls_context")
        return self._tls_context(backend.tls)

    async def _connect(
        self, backend: Target, tls_context: SSL.Context | None, timeout: float
    ) -> Upstream:
        address = backend.address
        with trio.move_on_after(timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise ConnectFailed(backend, exc.strerror or str(exc)) from exc
            fileno = tcp.socket.fileno()
            if tls_context is None:
                return Upstream(backend, tcp, fileno)
            tls = TLSStream(
                tcp,
                tls_context,
                server_side=False,
                server_hostname=backend.server_hostname or address.host,
            )
            try:
                await tls.do_handshake(timeout=timeout)
            except HandshakeError as exc:
                raise ConnectFailed(backend, f"TLS: {exc.detail}") from exc
            # TLSStream re-wraps the same descriptor, so the number stays valid.
            return Upstream(backend, tls, fileno, tls_context)
        assert scope.cancelled_caught
        raise ConnectFailed(backend, f"no connection within {timeout:g} s")

    def release(self, up: Upstream) -> bool:
        """Keep ``up`` for reuse if its exchange ended cleanly; False means: close it."""
        conn = up.conn
        if up.private or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        data, closed = conn.trailing_data
        if data or closed:
            return False  # bytes after the response (a confused backend), or EOF
        idle = self._idle[up.backend]
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            return False
        conn.start_next_cycle()
        up.idle_since = trio.current_time()
        idle.append(up)
        return True

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                await discard(idle.pop())


async def discard(up: Upstream) -> None:
    """Close an upstream connection that will not be reused: bounded, and shielded so a
    cancelled request still releases its socket."""
    with trio.move_on_after(1, shield=True), suppress(trio.BrokenResourceError, OSError):
        await up.stream.aclose()
