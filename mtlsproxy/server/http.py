"""The HTTP/1.1 relay for one client connection that has passed the TLS handshake.

Theory of operation
===================

This module moves bytes and owns the clocks; what the bytes mean is decided elsewhere,
without I/O: ``relay.h1`` parses both legs (llhttp), ``relay.exchange`` decides each
exchange (framing for the client, 100-continue, 1xx, upgrade, reuse, replay), and the
pure admission rules (deny list, routes, allow rules) refuse before anything is sent.

One request at a time (pipelined requests wait in the client's reader, in order):

1. **Head.** The first head of a connection must be complete ``header_timeout`` after
   the end of the handshake; a later one may wait ``idle_timeout`` for its first byte
   (the idle keep-alive wait, cancellable by a drain or an enforcer), then has
   ``header_timeout`` (a total deadline: a per-read timeout would let a slowloris client
   trickle one byte at a time forever). Anything the reader refuses is answered 4xx and
   the connection closed, never forwarded.
2. **Decide.** The identity's standing, the route by Host and path, the route's allow
   rules for this identity (once per connection and route), the declared body size.
   Every refusal is a short response and a closed connection.
3. **Forward.** The request head goes upstream with the body bytes that came with it
   (one write for a small request); a body still on its way is pumped by a second task
   while the response is relayed, so a backend that answers before reading the whole
   body is relayed, and backpressure flows both ways.
4. **Finish.** Metrics and the access log, once per exchange. The client connection is
   reused when the exchange says so; the upstream connection goes back to the pool under
   the same condition.

**One clock.** A connection runs in one cancel scope whose deadline moves with the
phase of the exchange in progress (``_arm``): idle, head, sending upstream, waiting for
the response head, reading the response, writing to the client; connecting, which has
its own timeout, parks it. It moves lazily (``_move``: at most 1% late), so a keep-alive
request usually moves no deadline at all. When it fires, the connection ends and the
phase says what the exchange in progress is answered. The request body's pump, a second
task, has a clock of its own; the idle wait between requests has a scope of its own too,
the one a drain or the enforcer cancels (``Session.idle_scope``): a cancelled scope
cannot be used again, and a request arriving in that same instant must still be served.

Errors before the response started become an error response; after it started, the only
honest signal left is closing the connection mid-body.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from mtlsproxy import accesslog
from mtlsproxy.config import Listener, Route
from mtlsproxy.denylist import DenyList
from mtlsproxy.identity import Identity, PeerCertificates
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import Allow
from mtlsproxy.relay.errors import (
    BadGateway,
    Forbidden,
    GatewayTimeout,
    HttpError,
    RequestTimeout,
)
from mtlsproxy.relay.exchange import DONE, SWITCHED, WAIT, Exchange, Refused, admit
from mtlsproxy.relay.h1 import (
    END,
    NEED_DATA,
    PAUSED,
    Body,
    End,
    MessageReader,
    RequestHead,
    ResponseHead,
    request_head,
)
from mtlsproxy.relay.headers import Headers, forwarding_headers, upstream_request_headers
from mtlsproxy.relay.responses import error_response
from mtlsproxy.relay.routing import RoundRobin, RouteTable
from mtlsproxy.server.upstream import ConnectFailed, Target, Upstream, UpstreamPool, discard
from mtlsproxy.server.websocket import relay_websocket
from mtlsproxy.sessions import Session

log = logging.getLogger("mtlsproxy.http")

RECEIVE_SIZE = 65536
FLUSH_BYTES = 65536
STALE_RETRIES = 2
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)

# The phases of an exchange, for its one clock: what a deadline that fires means.
_IDLE, _HEAD, _CONNECT, _SEND_UP, _AWAIT_HEAD, _READ_UP, _WRITE_CLIENT = range(7)
_SLACK = 0.01  # a deadline may fire this much of its timeout late (see _arm)


def _move(clock: trio.CancelScope, timeout: float) -> None:
    """Give ``clock`` ``timeout`` from now, lazily: the deadline moves only when it is
    earlier than wanted or more than ``_SLACK`` of the timeout later (each move is a
    context manager and a heap push in trio), so it fires at most 1% late."""
    wanted = trio.current_time() + timeout
    if not wanted <= clock.deadline <= wanted + timeout * _SLACK:
        clock.deadline = wanted + timeout * _SLACK


@dataclass(frozen=True)
class RouteRuntime:
    """A configured route with what serving it needs: its label, rotation and rules."""

    index: int
    label: str
    config: Route
    backends: RoundRobin[Target]
    allow: Allow | None  # the route's allow rules, normalized at load (None: everyone)


class _Stale(Exception):
    """A reused keep-alive connection died before the response began: safe to retry."""


class _Switch(Exception):
    """The backend accepted a WebSocket upgrade: leave HTTP for the frame relay."""

    def __init__(self, rest: bytes) -> None:
        self.rest = rest
        super().__init__("switching protocols")


class _ClientGone(Exception):
    """The client stopped reading or went away; nothing more can be said to it."""


async def connect(
    route: RouteRuntime,
    pool: UpstreamPool,
    metrics: Metrics,
    proxy_header: Callable[[], bytes],
    before_connect: Callable[[], None] | None = None,
) -> Upstream:
    """A connection to one of the route's backends (pooled, or new: each backend that is
    up, in the route's order), with the PROXY v2 header sent when the route asks for it;
    BadGateway when none answers. ``before_connect``: called before a new connection."""
    candidates = pool.eligible(route.backends.order())
    header = route.config.proxy_protocol == "v2"
    for backend in candidates:
        try:
            up = await pool.acquire(
                backend,
                connect_timeout=route.config.connect_timeout.seconds,
                fresh=header,
                before_connect=before_connect,
            )
        except ConnectFailed as exc:
            metrics.child(metrics.upstream_connect_errors, route.label, str(backend)).inc()
            log.warning("route %s: %s", route.label, exc)
            continue
        if header:
            up.private = True  # never pooled: the header names this client only
            try:
                with trio.fail_after(route.config.connect_timeout.seconds):
                    await up.stream.send_all(proxy_header())
            except (trio.TooSlowError, *_STREAM_ERRORS) as exc:
                await discard(up)
                raise BadGateway("backend connection failed") from exc
        return up
    raise BadGateway("no backend answered")


class ServedConnection:
    """What serving one client connection needs, whatever its protocol (HTTP/1.1 here,
    HTTP/2 in ``server.h2``): any trio stream, the session (its identity), the listener
    and its routes, the pool, metrics, the access log, and what is known of the peer.

    ``deny_list`` gives the current deny list (the credential store's); ``proxy_header``
    makes the PROXY v2 header for this client when a route asks for one;
    ``peer_certificates`` gives the verified certificates (asked once per connection and
    route, by a route that forwards RFC 9440's Client-Cert).
    """

    PROTOCOL: str | None = None  # the access log's ``alpn`` of its requests

    # One per client connection, alive as long as it is: no per-instance dict.
    __slots__ = (
        "_allowed", "access", "clean_end", "client_ip", "deny_list", "identity", "listener",
        "metrics", "peer_certificates", "pool", "proxy_header", "routes", "session", "stream",
    )  # fmt: skip

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        *,
        session: Session,
        listener: Listener,
        routes: RouteTable[RouteRuntime],
        pool: UpstreamPool,
        deny_list: Callable[[], DenyList],
        metrics: Metrics,
        client_ip: str,
        access: accesslog.AccessLog,
        proxy_header: Callable[[], bytes] = lambda: b"",
        peer_certificates: Callable[[], PeerCertificates | None] = lambda: None,
    ) -> None:
        self.stream = stream
        self.session = session
        self.identity: Identity = session.identity
        self.listener = listener
        self.routes = routes
        self.pool = pool
        self.deny_list = deny_list
        self.metrics = metrics
        self.access = access
        self.client_ip = client_ip
        self.proxy_header = proxy_header
        self.peer_certificates = peer_certificates
        # True when the connection ends with no unread input from the client, so a
        # plain close cannot turn into a RST that destroys the last response.
        self.clean_end = False
        self._allowed: dict[int, bool] = {}  # the allow rules' verdict, per route
        self._prepare()

    def _check_allowed(self, route: RouteRuntime) -> None:
        """Forbidden unless the route's allow rules admit this identity (asked once per
        connection and route)."""
        allowed = self._allowed.get(route.index)
        if allowed is None:
            allowed = route.allow is None or route.allow.admits(self.identity)
            self._allowed[route.index] = allowed
        if not allowed:
            raise Forbidden(
                "client certificate not allowed on this route",
                log_detail=f"route {route.label}: no allow rule matched",
            )

    def _prepare(self) -> None:
        """What the protocol keeps per connection (the subclass's part of __init__)."""

    async def _receive_or_eof(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except _STREAM_ERRORS as exc:
            # A reset between requests (or streams) is a client hanging up (often one
            # that never read the TLS 1.3 session tickets), not an error worth more.
            log.debug("client %s: connection ended: %s", self.session.peer, exc)
            return b""

    def _record(
        self,
        head: RequestHead | None,
        route: RouteRuntime | None,
        status: int,
        *,
        bytes_in: int = 0,
        bytes_out: int = 0,
        upstream: str | None = None,
        started: float | None = None,
        log: bool = True,
    ) -> None:
        """Count one answered request (an HTTP/1.1 exchange, an HTTP/2 stream) in the
        metrics and, with ``log``, write its access-log line."""
        metrics, listener = self.metrics, self.listener.label
        label = route.label if route is not None else None
        metrics.child(metrics.requests, listener, label or "-", f"{status // 100}xx").inc()
        if bytes_in:
            metrics.child(metrics.bytes, listener, "in").inc(bytes_in)
        if bytes_out:
            metrics.child(metrics.bytes, listener, "out").inc(bytes_out)
        if not log or not self.access.enabled:
            return
        self.access.write_session(
            "http",
            self.session,
            trio.current_time() - started if started is not None else 0.0,
            route=label,
            method=head.method.decode("ascii", "replace") if head is not None else None,
            path=accesslog.path_of(head.target) if head is not None else None,
            status=status,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            upstream=upstream,
            alpn=self.PROTOCOL,
        )


class HttpConnection(ServedConnection):
    """Serves one HTTP/1.1 client connection."""

    __slots__ = (
        "_clock", "_current", "_forwarding", "_phase", "_pumping", "_reader",
    )  # fmt: skip

    def _prepare(self) -> None:
        self._reader = MessageReader(max_head=self.listener.max_header_size)
        self._clock: trio.CancelScope  # made by run(), with the first head's deadline
        self._phase = _IDLE
        self._pumping = False  # the request body's pump runs: the response head waits
        self._current: tuple[RequestHead | None, Exchange[RouteRuntime] | None, float] | None = None
        # Per connection and route, not per request: XFF, X-Forwarded-Proto and the
        # route's identity headers, and the verdict of the route's allow rules.
        self._forwarding: dict[int, Headers] = {}

    async def run(self) -> None:
        connected = trio.current_time()  # the handshake has just ended
        self.clean_end = False
        # The first head's clock starts at the end of the handshake.
        deadline = connected + self.listener.header_timeout.seconds
        self._clock = clock = trio.CancelScope(deadline=deadline)
        self._phase = _IDLE
        with clock:
            first = True
            # A connection asked to close before its first request (its handshake
            # finished during a drain) still gets that request answered, with Connection:
            # close: closing it unanswered would look like a failure to the client.
            while first or self.session.closing is None:
                if not first:
                    self._reader.start_next_cycle()
                if not await self._serve_one(first):
                    break
                first = False
        self.session.idle_scope = None
        if clock.cancelled_caught:
            await self._expired()

    # ---- the clock -----------------------------------------------------------------

    def _arm(self, phase: int, timeout: float) -> None:
        """Give the phase ``timeout`` from now (``_move``: a keep-alive request usually
        moves no deadline at all)."""
        self._phase = phase
        _move(self._clock, timeout)

    async def _expired(self) -> None:
        """The clock fired: end the exchange in progress as its phase says."""
        if self._phase == _IDLE:  # idle too long, or asked to close while idle
            self.clean_end = self._reader.untouched
            return
        if self._current is None:
            return  # it was being answered already
        head, exchange, started = self._current
        await self._conclude(head, exchange, self._timed_out(), started)

    def _unclock(self, phase: int = _CONNECT) -> None:
        """A phase with a timeout of its own (connecting, per backend tried; writing a
        refusal): the connection's clock waits."""
        self._phase = phase
        self._clock.deadline = math.inf

    def _timed_out(self) -> HttpError | None:
        """What the fired clock means in this phase (None: nothing to tell the client)."""
        phase = self._phase
        if phase == _HEAD:
            return RequestTimeout("request head not received in time")
        if phase == _SEND_UP:
            return GatewayTimeout("backend stopped reading the request")
        if phase == _AWAIT_HEAD:
            return GatewayTimeout("backend did not answer in time")
        if phase == _READ_UP:
            return GatewayTimeout("backend stalled mid-response")
        return None  # idle, or a client that stopped reading

    # ---- one exchange --------------------------------------------------------------

    async def _serve_one(self, first: bool) -> bool:
        """Serve one request; False: close the connection."""
        exchange: Exchange[RouteRuntime] | None = None
        head: RequestHead | None = None
        error: HttpError | None = None
        started = 0.0
        self._current = (None, None, 0.0)  # what a timeout ends, should the clock fire
        try:
            head = await self._read_head(first)
            if head is None:
                self._current = None
                return False  # closed, or asked to close, between requests
            started = trio.current_time()
            self._current = (head, None, started)
            exchange = self._admit(head)
            self._current = (head, exchange, started)
            self._authorize(exchange)
            await self._forward(exchange)
        except HttpError as exc:
            error = exc
        except _ClientGone:
            pass
        self._current = None
        if error is not None:
            self._unclock(_WRITE_CLIENT)  # the refusal's write has a bound of its own
        return await self._conclude(head, exchange, error, started)

    async def _conclude(
        self,
        head: RequestHead | None,
        exchange: Exchange[RouteRuntime] | None,
        error: HttpError | None,
        started: float,
    ) -> bool:
        """Answer, count and log the exchange; False: close the connection."""
        if error is not None:
            if exchange is not None and exchange.response != WAIT:
                log.info("client %s: %s after the response began", self.session.peer, error)
                self._finish(head, exchange, exchange.status, started)
                return False
            await self._refuse(error, exchange, head, started)
            return False
        assert head is not None
        if exchange is None or exchange.status == 0:  # the client left before its answer
            self._finish(head, exchange, 499, started)  # nginx's 499
            return False
        self._finish(head, exchange, exchange.status, started)
        if exchange.response == SWITCHED:
            return False
        if not exchange.client_reusable or self.session.closing is not None:
            # Whole request read and nothing after it: a plain close loses nothing.
            self.clean_end = exchange.request == DONE and not self._reader.buffered
            return False
        return True

    # ---- 1. the head ---------------------------------------------------------------

    async def _read_head(self, first: bool) -> RequestHead | None:
        """One request head. The first one of a connection has one deadline from the end
        of the handshake: ``header_timeout`` for the whole head, its first byte included.
        Later ones wait up to ``idle_timeout`` for a first byte, then ``header_timeout``."""
        reader, session = self._reader, self.session
        header_timeout = self.listener.header_timeout.seconds
        self._phase = _IDLE
        idle_armed = False
        while True:
            event = reader.next_event()
            if isinstance(event, RequestHead):
                return event
            if event is PAUSED:  # closed between requests
                self.clean_end = True
                return None
            if reader.untouched:  # between requests: the idle wait
                if not first and not idle_armed:  # once: empty lines do not extend it
                    if session.closing is not None:
                        self.clean_end = True
                        return None
                    self._arm(_IDLE, self.listener.idle_timeout.seconds)
                    idle_armed = True
                # A scope of its own, for a drain or the enforcer to end the wait with:
                # the connection's clock, once cancelled, could not serve a request that
                # arrived in the same instant (it gets answered, with Connection: close).
                with trio.CancelScope() as idle:
                    session.idle_scope = idle
                    data = await self._receive_or_eof()
                session.idle_scope = None
                if idle.cancelled_caught:
                    self.clean_end = reader.untouched
                    return None
            else:
                if self._phase == _IDLE:  # its first byte came: the head has a deadline now
                    if first:
                        self._phase = _HEAD  # the handshake's deadline runs on
                    else:
                        self._arm(_HEAD, header_timeout)
                data = await self._receive_or_eof()
            if not data and not reader.untouched:
                return None  # the client gave up half-way through a head
            reader.receive_data(data)

    # ---- 2. decide -----------------------------------------------------------------

    def _admit(self, head: RequestHead) -> Exchange[RouteRuntime]:
        deny = self.deny_list()
        try:
            target, route = admit(head, self.routes, self.identity, deny, datetime.now(UTC))
        except Refused as exc:
            self.session.close(exc.standing)
            raise
        return Exchange(
            head,
            route,
            target=target,
            websocket_allowed=route.config.websocket,
            closing=self.session.closing is not None,
        )

    def _authorize(self, exchange: Exchange[RouteRuntime]) -> None:
        self._check_allowed(exchange.route)
        exchange.limit_body(self.listener.max_body_size or None)

    async def _refuse(
        self,
        exc: HttpError,
        exchange: Exchange[RouteRuntime] | None,
        head: RequestHead | None,
        started: float,
    ) -> None:
        detail = exc.log_detail or exc.reason
        log.info(
            "refused %s from %s (%s): %d %s",
            "request" if head is None else accesslog.path_of(head.target),
            self.session.peer,
            self.identity.cn or self.identity.fingerprint,
            exc.status,
            detail,
        )
        head_only = head is not None and head.method == b"HEAD"
        self._finish(head, exchange, exc.status, started if head is not None else None)
        response = error_response(exc.status, exc.reason, head_only=head_only)
        with trio.move_on_after(self.listener.idle_timeout.seconds), suppress(*_STREAM_ERRORS):
            await self.stream.send_all(response)

    def _finish(
        self,
        head: RequestHead | None,
        exchange: Exchange[RouteRuntime] | None,
        status: int,
        started: float | None,
    ) -> None:
        """Count a request that got an answer, and write its access log line: once (a
        WebSocket session is logged when it ends)."""
        if exchange is None:
            self._record(head, None, status, started=started, log=status != 101)
        else:
            self._record(
                head, exchange.route, status, bytes_in=exchange.bytes_in,
                bytes_out=exchange.bytes_out, upstream=exchange.upstream, started=started,
                log=status != 101,
            )  # fmt: skip

    # ---- 3. forward ----------------------------------------------------------------

    async def _forward(self, exchange: Exchange[RouteRuntime]) -> None:
        route = exchange.route
        head = exchange.head
        forwarding = self._forwarding.get(route.index)
        if forwarding is None:
            forwarding = self._forwarding[route.index] = self._identify(route)
        headers = upstream_request_headers(
            head,
            self.identity,
            self.client_ip,
            allow_websocket=exchange.websocket,
            forwarding=forwarding,
        )
        upstream_req = request_head(head.method, exchange.target, headers)
        # Body bytes that came with the head go up with it, after the checks they owe
        # (chunk framing, the body limit): what is refused is refused with nothing sent.
        upstream_req += self._buffered_body(exchange)
        for attempt in range(STALE_RETRIES + 1):
            up = await self._connect(route)
            exchange.upstream = str(up.backend)
            started = trio.current_time()
            try:
                await self._exchange(exchange, up, upstream_req)
            except _Stale:
                await discard(up)
                if attempt == STALE_RETRIES:
                    raise BadGateway("backend closed the connection") from None
                continue
            except _Switch as switch:
                try:
                    await self._websocket(exchange, up, switch)
                finally:
                    await discard(up)
                return
            except BaseException:
                await discard(up)
                raise
            self.metrics.child(self.metrics.upstream_seconds, route.label).observe(
                trio.current_time() - started
            )
            if not self.pool.release(up):
                await discard(up)
            return

    def _identify(self, route: RouteRuntime) -> Headers:
        """The forwarding headers of ``route`` for this connection (once per route)."""
        chosen = route.config.identity_headers
        certificates = self.peer_certificates() if "client-cert" in chosen else None
        return forwarding_headers(
            self.identity, self.client_ip, identity_headers=chosen, certificates=certificates
        )

    def _buffered_body(self, exchange: Exchange[RouteRuntime]) -> bytes:
        """What the reader holds of the request after its head (for a request without a
        body: its end, so the reader stands at the next request)."""
        out = bytearray()
        reader = self._reader
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, Body):
                out += exchange.request_body(event.data)
            elif event is END:
                if exchange.request != DONE:
                    out += exchange.request_end()
                break
            else:
                raise RuntimeError(f"request reader: {event!r} after the head")
        return bytes(out)

    async def _connect(self, route: RouteRuntime) -> Upstream:
        return await connect(route, self.pool, self.metrics, self.proxy_header, self._unclock)

    async def _exchange(
        self, exchange: Exchange[RouteRuntime], up: Upstream, upstream_req: bytes
    ) -> None:
        # Replaying is safe only when the backend cannot have acted on the request.
        stale_ok = exchange.replayable(up.reused)
        if exchange.is_head:
            up.reader.no_body_expected()
        whole = exchange.request == DONE  # the request goes out in this one write
        if whole:  # the response head's clock runs from the hand-over: one arming
            self._arm(_AWAIT_HEAD, exchange.route.config.read_timeout.seconds)
        else:
            self._arm(_SEND_UP, self.listener.idle_timeout.seconds)
        try:
            await up.stream.send_all(upstream_req)
        except _STREAM_ERRORS as exc:
            if stale_ok:
                raise _Stale from exc
            raise BadGateway("backend connection failed") from exc
        exchange.sent = whole
        if whole:  # one direction only: no second task to coordinate
            await self._relay_response(exchange, up, stale_ok, armed=True)
            return
        if continue_head := exchange.continue_head():
            # Now, before the two tasks start: only one task may write to the client.
            await self._write_client(continue_head)
        errors: list[BaseException] = []
        with trio.CancelScope() as both:

            async def capture(fn: Callable[[], Awaitable[None]]) -> None:
                try:
                    await fn()
                except Exception as exc:  # handed to the caller below
                    errors.append(exc)
                    both.cancel()

            self._pumping = True  # now: the response side may look before the task runs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture, lambda: self._pump_body(exchange, up))
                await capture(lambda: self._relay_response(exchange, up, False, armed=False))
                nursery.cancel_scope.cancel()  # response done: stop reading a body nobody wants
        if not exchange.sent:  # the pump was stopped before the body's last byte went out
            up.reusable = False
        if errors:
            raise errors[0]

    async def _pump_body(self, exchange: Exchange[RouteRuntime], up: Upstream) -> None:
        """The rest of the request body, client to backend, on a clock of its own."""
        idle = self.listener.idle_timeout.seconds
        sending = False
        with trio.CancelScope() as clock:
            try:
                while True:
                    event = await self._client_body_event(clock, idle)
                    if isinstance(event, Body):
                        out = exchange.request_body(event.data)
                    else:
                        # Marked done before the last write, not after: a backend that
                        # answers at once would otherwise find the body "unfinished" and
                        # the client's keep-alive connection would be closed for nothing.
                        out = exchange.request_end()
                    if out:
                        _move(clock, idle)
                        sending = True
                        try:
                            await up.stream.send_all(out)
                        except _STREAM_ERRORS:
                            # The backend stopped taking the body: it may be answering
                            # already (413, 401), and that answer is what the client should
                            # get. The unread rest of the body closes the client connection.
                            return
                        sending = False
                    if event is END:
                        exchange.sent = True
                        return
            finally:
                self._pumping = False
                # Sent completely, or the backend stopped taking it (it may be answering):
                # either way, from now on the backend has read_timeout to answer.
                if self._phase == _AWAIT_HEAD:
                    self._arm(_AWAIT_HEAD, exchange.route.config.read_timeout.seconds)
        if clock.cancelled_caught:
            if sending:
                raise GatewayTimeout("backend stopped reading the request")
            raise RequestTimeout("request body stalled")

    async def _client_body_event(self, clock: trio.CancelScope, idle: float) -> Body | End:
        reader = self._reader
        while (event := reader.next_event()) is NEED_DATA:
            _move(clock, idle)
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except _STREAM_ERRORS as exc:
                raise _ClientGone from exc
            if not data:
                raise _ClientGone
            reader.receive_data(bytes(data))
        assert isinstance(event, (Body, End)), event  # the reader's contract in a body
        return event

    async def _relay_response(
        self,
        exchange: Exchange[RouteRuntime],
        up: Upstream,
        stale_ok: bool,
        *,
        armed: bool,
    ) -> None:
        """The response, backend to client; ``armed``: the head's clock is set already."""
        reader = up.reader
        timeout = exchange.route.config.read_timeout.seconds
        head, out = await self._relay_heads(exchange, up, stale_ok, timeout, armed=armed)
        # What is ready is written together: head, body and end of a small response
        # leave in one TLS record and one syscall. Before waiting for the backend, and
        # past FLUSH_BYTES, the buffer goes out, so nothing is held back and memory
        # stays bounded.
        buffer = bytearray(out)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                if buffer:
                    await self._write_client(buffer)
                    buffer.clear()
                self._arm(_READ_UP, timeout)
                try:
                    data = await up.stream.receive_some(RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    raise BadGateway("backend connection failed mid-response") from exc
                reader.receive_data(bytes(data))
            elif isinstance(event, Body):
                buffer += exchange.response_body(event.data)
                if len(buffer) >= FLUSH_BYTES:
                    await self._write_client(buffer)
                    buffer.clear()
            elif event is END:
                buffer += exchange.response_end()
                up.reusable = exchange.backend_reusable(head)
                await self._write_client(buffer)
                return
            else:
                raise BadGateway("backend response ended unexpectedly")

    async def _relay_heads(
        self,
        exchange: Exchange[RouteRuntime],
        up: Upstream,
        stale_ok: bool,
        timeout: float,
        *,
        armed: bool,
    ) -> tuple[ResponseHead, bytes]:
        """Relay informational (1xx) heads; return the final head and its bytes."""
        reader = up.reader
        while True:
            head = await self._upstream_head(exchange, up, stale_ok, timeout, armed=armed)
            stale_ok = armed = False  # each later head has read_timeout of its own
            if self.session.closing is not None:  # asked while the backend was working
                exchange.closing = True
            out = exchange.response_head(head)
            if exchange.response == SWITCHED:
                await self._write_client(out)
                raise _Switch(reader.trailing_data[0])
            if exchange.response != WAIT:
                return head, out
            if reader.next_event() is not END:  # a 1xx ends with its head
                raise BadGateway("backend sent a malformed response")
            reader.start_next_cycle()
            if out:
                await self._write_client(out)

    async def _upstream_head(
        self,
        exchange: Exchange[RouteRuntime],
        up: Upstream,
        stale_ok: bool,
        timeout: float,
        *,
        armed: bool,
    ) -> ResponseHead:
        reader = up.reader
        # The clock for the response head runs once the request is sent completely
        # (nginx's read/send split); while the body flows, the pump's stall clock applies.
        if not armed:
            self._phase = _AWAIT_HEAD
            if self._pumping:
                self._clock.deadline = math.inf  # the pump arms it when it stops
            else:
                self._arm(_AWAIT_HEAD, timeout)
        while True:
            event = reader.next_event()
            if isinstance(event, ResponseHead):
                return event
            if event is not NEED_DATA:
                raise BadGateway("backend sent no response")
            try:
                data = await up.stream.receive_some(RECEIVE_SIZE)
            except _STREAM_ERRORS as exc:
                if stale_ok and reader.untouched:
                    raise _Stale from exc
                raise BadGateway("backend connection failed") from exc
            if not data:
                if stale_ok and reader.untouched:
                    raise _Stale
                raise BadGateway("backend closed the connection without a response")
            reader.receive_data(bytes(data))

    async def _write_client(self, data: bytes | bytearray) -> None:
        # Every caller arms the clock for what it waits on next: nothing to restore.
        self._arm(_WRITE_CLIENT, self.listener.idle_timeout.seconds)
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise _ClientGone from exc

    # ---- WebSocket -----------------------------------------------------------------

    async def _websocket(
        self, exchange: Exchange[RouteRuntime], up: Upstream, switch: _Switch
    ) -> None:
        self._unclock()  # the frame relay keeps its own clocks
        self.session.kind = "websocket"
        started = trio.current_time()
        label, metrics = exchange.route.label, self.metrics
        metrics.child(metrics.websocket_sessions, label).inc()
        counters = {
            d: (
                metrics.child(metrics.bytes, self.listener.label, d),
                metrics.child(metrics.websocket_messages, label, d),
            )
            for d in ("in", "out")
        }

        def count(direction: str, nbytes: int, messages: int) -> None:
            octets, frames = counters[direction]
            octets.inc(nbytes)
            if messages:
                frames.inc(messages)

        summary = await relay_websocket(
            self.stream,
            up.stream,
            client_rest=self._reader.trailing_data[0],
            backend_rest=switch.rest,
            session=self.session,
            route=exchange.route.config,
            count=count,
        )
        self.clean_end = True
        self.access.write_session(
            "websocket",
            self.session,
            trio.current_time() - started,
            route=label,
            method=exchange.head.method.decode("ascii", "replace"),
            path=accesslog.path_of(exchange.head.target),
            status=101,
            bytes_in=summary.bytes_in,
            bytes_out=summary.bytes_out,
            upstream=exchange.upstream,
            end=summary.end,
        )
