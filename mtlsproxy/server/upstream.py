"""Connections to backends: open with a deadline, keep alive in a pool, notice dead ones.

Health is passive. A backend that refuses a connection (or times out connecting) is
marked down for a back-off window (1 s, doubling to 10 s while new probes keep failing)
and skipped while other backends of the route are up. The back-off grows once per
*window*, not once per failed request: twenty requests that fail together in one outage
are one failure, not twenty doublings (that pushed a route to 10 s of 503s after its
backend was back). And marks alone never leave a route with nothing to try: when every
backend of a route is marked down, the one whose mark ends first is tried anyway (Envoy's
panic mode, nginx's behaviour with a single server), so a backend that comes back serves
the very next request.

Pooled connections are checked before reuse: an idle keep-alive socket that has become
readable has been closed by the backend (or carries bytes nobody asked for), and is
dropped; so is a TLS connection made with material the credential store has since
replaced (a renewed client certificate, a rotated backend CA), so that the old
certificate is not used again after a renewal. The pool keeps connections idle for at
most ``IDLE_SECONDS``, under the 5 s keep-alive common to backend servers, so we rarely
race a backend closing one; ``reap()`` closes the ones that outlive it (or that the
backend closed), so a burst does not leave sockets in CLOSE-WAIT until the next request.
"""

from __future__ import annotations

import select
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio
from OpenSSL import SSL

from mtlsproxy.address import Address
from mtlsproxy.relay.h1 import MessageReader
from mtlsproxy.server.plainstream import PlainStream
from mtlsproxy.tls.backend import BackendFiles
from mtlsproxy.tls.engine import HandshakeError, TLSStream

IDLE_SECONDS = 4.0
MAX_RESPONSE_HEAD = 64 * 1024
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
    h2: bool = False  # HTTP/2 to the backend (upstream_protocol = "h2"): its own pool

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
    # The backend's responses, read by llhttp (relay.h1); one per connection.
    reader: MessageReader = field(
        default_factory=lambda: MessageReader(response=True, max_head=MAX_RESPONSE_HEAD)
    )
    # Set by the exchange when it ended cleanly on both sides: the request sent whole,
    # the response read to its end, and the backend did not ask to close.
    reusable: bool = False
    reused: bool = False
    idle_since: float = 0.0
    private: bool = False  # carries one client's PROXY header: never back to the pool
    # An HTTP/2 backend connection's client side (server.h2upstream), made on first use.
    h2: Any = None
    _poller: select.poll | None = field(default=None, repr=False)

    def looks_alive(self) -> bool:
        if self.fileno < 0:
            return True  # not a socket (a pool's own connect function): its reads will tell
        # poll, not select: select() cannot take a descriptor above 1023, and a busy
        # proxy has those. One poller per connection, made on first use: a check is
        # then one syscall.
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return not self._poller.poll(0)
        except OSError:
            return False


@dataclass
class _Health:
    down_until: float = 0.0  # marked down until then (0: never failed)
    backoff: float = _DOWN_MIN  # the next window's length

    def failed(self, now: float) -> None:
        if now < self.down_until:
            return  # the same outage, seen by another request: one failure per window
        self.down_until = now + self.backoff
        self.backoff = min(self.backoff * 2, _DOWN_MAX)


Connect = Callable[[Target], Awaitable[trio.abc.Stream]]


async def open_tcp(backend: Target) -> trio.SocketStream:
    address = backend.address
    return await trio.open_tcp_stream(address.host, address.port)


class UpstreamPool:
    """``tls_context`` gives the current client context for a route's TLS files (the
    credential store's); a pool without TLS backends needs none. ``connect`` opens the
    byte stream to a backend (TCP; a test hands out in-memory streams)."""

    def __init__(
        self,
        tls_context: Callable[[BackendFiles], SSL.Context] | None = None,
        *,
        connect: Connect = open_tcp,
    ) -> None:
        self._tls_context = tls_context
        self._open = connect
        self._idle: defaultdict[Target, list[Upstream]] = defaultdict(list)
        self._health: defaultdict[Target, _Health] = defaultdict(_Health)

    def is_up(self, backend: Target) -> bool:
        return trio.current_time() >= self._health[backend].down_until

    def eligible(self, backends: list[Target]) -> list[Target]:
        """The backends to try, in order: those not marked down, or, when every one is,
        the one whose mark ends first (marks alone never leave a route with none)."""
        now = trio.current_time()
        up = [b for b in backends if now >= self._health[b].down_until]
        if up or not backends:
            return up
        return [min(backends, key=lambda b: self._health[b].down_until)]

    async def acquire(
        self,
        backend: Target,
        *,
        connect_timeout: float,
        fresh: bool = False,
        before_connect: Callable[[], None] | None = None,
    ) -> Upstream:
        """An idle keep-alive connection, or a new one; ``fresh``: always a new one (a raw
        TCP session must never inherit a connection HTTP left in the pool).
        ``before_connect`` is called when a new connection is about to be opened."""
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
        if before_connect is not None:
            before_connect()
        try:
            up = await self._connect(backend, context, connect_timeout)
        except ConnectFailed:
            self._health[backend].failed(trio.current_time())
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
                tcp = await self._open(backend)
            except OSError as exc:
                raise ConnectFailed(backend, exc.strerror or str(exc)) from exc
            fileno = tcp.socket.fileno() if isinstance(tcp, trio.SocketStream) else -1
            if tls_context is None:
                plain = PlainStream(tcp) if isinstance(tcp, trio.SocketStream) else tcp
                return Upstream(backend, plain, fileno)
            if not isinstance(tcp, trio.SocketStream):  # TLSStream reads its socket itself
                raise ConnectFailed(backend, "TLS to a backend needs a socket")
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
        if up.private or not up.reusable:
            return False
        if up.h2 is None:
            data, closed = up.reader.trailing_data
            if data or closed:
                return False  # bytes after the response (a confused backend), or EOF
        idle = self._idle[up.backend]
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            return False
        if up.h2 is None:
            up.reader.start_next_cycle()
        up.reusable = False
        up.idle_since = trio.current_time()
        idle.append(up)
        return True

    async def reap(self) -> None:
        """Run for the pool's life: close idle connections once they are older than
        ``IDLE_SECONDS`` or the backend has closed them."""
        while True:
            await trio.sleep(IDLE_SECONDS / 4)
            now = trio.current_time()
            stale = []
            for idle in self._idle.values():  # no await in this loop: acquire() adds keys
                old = [u for u in idle if now - u.idle_since >= IDLE_SECONDS or not u.looks_alive()]
                for up in old:
                    idle.remove(up)
                stale += old
            for up in stale:
                await discard(up)

    async def aclose(self) -> None:
        everything = [up for idle in self._idle.values() for up in idle]
        self._idle.clear()
        for up in everything:
            await discard(up)


async def discard(up: Upstream) -> None:
    """Close an upstream connection that will not be reused: bounded, and shielded so a
    cancelled request still releases its socket."""
    with trio.move_on_after(1, shield=True), suppress(trio.BrokenResourceError, OSError):
        await up.stream.aclose()
