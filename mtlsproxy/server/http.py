"""The HTTP/1.1 relay for one client connection that has passed the TLS handshake.

Theory of operation
===================

One request at a time (pipelined requests wait in the buffer, in order):

1. **Head.** Our ``HeadReader`` collects the request head under a total deadline (a
   per-read timeout would let a slowloris client trickle one byte at a time forever):
   the first head of a connection must be complete ``header_timeout`` after the end of
   the handshake; a later one may wait ``idle_timeout`` for its first byte (the idle
   keep-alive wait, cancellable by a drain or an enforcer), then has ``header_timeout``. The head
   goes through h11 *and* our stricter ``validate_request``; anything ambiguous is
   answered 400 and the connection closed, never forwarded.
2. **Decide.** Route by Host and path, check the deny list and the route's allow rules
   for this identity, check the declared body size. Every refusal is a short response
   and a closed connection.
3. **Forward.** The request sent upstream is rebuilt from parsed fields
   (``relay.headers``) and written by ``relay.h1``; the backend's answer is read by the
   upstream connection's ``relay.h1.MessageReader`` (llhttp): no h11 on that leg. The
   request body and the response relay run concurrently, so a backend that answers
   before reading the whole body is relayed, and backpressure
   flows both ways: we read from one side only as fast as the other side takes it.
4. **Finish.** The client connection is reused when both sides of the exchange ended
   cleanly and nobody asked to close; the upstream connection goes back to the pool
   under the same condition.

A fresh ``h11.Connection`` serves each request: the bytes after a request (a pipelined
next one) come back out of ``trailing_data`` and seed the next head reader, which keeps
one buffer in charge of the head limits.

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
from typing import Any

import h11
import trio

from mtlsproxy import accesslog
from mtlsproxy.config import Listener, Route
from mtlsproxy.identity import Identity
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import is_allowed, standing
from mtlsproxy.relay.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    HttpError,
    NoRoute,
    RequestTimeout,
)
from mtlsproxy.relay.framing import (
    BodyLimit,
    Framing,
    Head,
    HeadReader,
    check_chunk_size,
    validate_request,
)
from mtlsproxy.relay.h1 import END, LAST_CHUNK, NEED_DATA, Body, ResponseHead, chunk, request_head
from mtlsproxy.relay.headers import (
    Headers,
    accepts_websocket,
    client_response_headers,
    connection_tokens,
    forwarding_headers,
    is_websocket_upgrade,
    upstream_request_headers,
)
from mtlsproxy.relay.paths import canonical_target
from mtlsproxy.relay.responses import error_response
from mtlsproxy.relay.routing import RoundRobin, RouteTable
from mtlsproxy.server.tcp import proxy_header
from mtlsproxy.server.upstream import ConnectFailed, Target, Upstream, UpstreamPool, discard
from mtlsproxy.server.websocket import relay_websocket
from mtlsproxy.sessions import Session
from mtlsproxy.tls.engine import TLSStream
from mtlsproxy.tls.store import CredentialStore

log = logging.getLogger("mtlsproxy.http")

RECEIVE_SIZE = 65536
FLUSH_BYTES = 65536
# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
STALE_RETRIES = 2
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class RouteRuntime:
    """A configured route with what serving it needs: its label, rotation and TLS."""

    index: int
    label: str
    config: Route
    backends: RoundRobin[Target]


class _UpstreamBroken(BadGateway):
    """Writing to the backend failed."""


class _Stale(Exception):
    """A reused keep-alive connection died before the response began: safe to retry."""


class _Switch(Exception):
    """The backend accepted a WebSocket upgrade: leave HTTP for the frame relay."""

    def __init__(self, response: ResponseHead, rest: bytes) -> None:
        self.response = response
        self.rest = rest
        super().__init__("switching protocols")


class _ClientGone(Exception):
    """The client stopped reading or went away; nothing more can be said to it."""


@dataclass
class _Exchange:
    request: h11.Request
    target: bytes  # canonical (relay.paths): what was routed, authorized and is forwarded
    route: RouteRuntime
    has_body: bool
    chunked: bool = False  # the request body goes upstream in chunks we frame
    websocket: bool = False  # an upgrade the route lets through
    sent_100: bool = False
    body_done: bool = False  # the whole request body was read from the client
    # The clock for the response head: it runs once the request is sent completely
    # (nginx's read/send split); while the body flows, stall timeouts apply instead.
    head_clock: trio.CancelScope | None = None
    pumping: bool = False  # the body pump runs: the response head has no clock yet
    response_started: bool = False
    status: int = 0
    started: float = 0.0
    bytes_in: int = 0  # request body bytes
    bytes_out: int = 0  # response body bytes
    upstream: str | None = None


class HttpConnection:
    # One per client connection, alive as long as it is: no per-instance dict.
    __slots__ = (
        "_connected", "_first_event", "_forwarding", "access", "clean_end", "client_ip", "identity",
        "listener", "metrics", "pool", "routes", "session", "store", "stream",
    )  # fmt: skip

    def __init__(
        self,
        stream: TLSStream,
        *,
        session: Session,
        listener: Listener,
        routes: RouteTable[RouteRuntime],
        pool: UpstreamPool,
        store: CredentialStore,
        metrics: Metrics,
        client_ip: str,
        access: accesslog.AccessLog,
    ) -> None:
        self.stream = stream
        self.session = session
        self.identity: Identity = session.identity
        self.listener = listener
        self.routes = routes
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.access = access
        self.client_ip = client_ip
        # True when the connection ends with no unread input from the client, so a
        # plain close cannot turn into a RST that destroys the last response.
        self.clean_end = False
        self._first_event: Any = None  # a body event parsed with the head, not yet relayed
        self._connected = 0.0
        # XFF, X-Forwarded-Proto and XFCC: per connection, not per request.
        self._forwarding: Headers | None = None

    async def run(self) -> None:
        self._connected = trio.current_time()  # the handshake has just ended
        leftover, first = b"", True
        self.clean_end = False
        # A connection asked to close before its first request (its handshake finished
        # during a drain) still gets that request answered, with Connection: close:
        # closing it unanswered would look like a failure to the client.
        while first or self.session.closing is None:
            try:
                head = await self._read_head(leftover, first=first)
            except HttpError as exc:
                await self._refuse(exc, None)
                return
            if head is None:
                self.clean_end = not leftover  # idle or closed between requests
                return
            first = False
            leftover_or_none = await self._serve_one(head)
            if leftover_or_none is None:
                return
            leftover = leftover_or_none

    # ---- 1. the head ---------------------------------------------------------------

    async def _read_head(self, leftover: bytes, *, first: bool) -> Head | None:
        """One request head. The first one of a connection has one clock, from the end of
        the handshake: ``header_timeout`` for the whole head, its first byte included.
        Later ones wait up to ``idle_timeout`` for a first byte, then ``header_timeout``."""
        # The reader is made when there are bytes for it: not while a connection idles.
        reader: HeadReader | None = None
        if leftover:
            reader = HeadReader(max_bytes=self.listener.max_header_size)
            if (head := reader.feed(leftover)) is not None:
                return head
        header_timeout = self.listener.header_timeout.seconds
        deadline = self._connected + header_timeout if first else None
        if reader is None or not reader.buffered:  # nothing, or the CRLFs after a body
            idle = self.listener.idle_timeout.seconds
            idle_deadline = deadline if deadline is not None else trio.current_time() + idle
            with trio.CancelScope(deadline=idle_deadline) as scope:
                self.session.idle_scope = scope
                if self.session.closing is not None and not first:
                    scope.cancel()
                # Not through _receive_or_eof: one coroutine frame less per idle wait.
                try:
                    data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
                except _STREAM_ERRORS as exc:
                    log.debug("client %s: connection ended: %s", self.session.peer, exc)
                    data = b""
            self.session.idle_scope = None
            if scope.cancelled_caught or not data:
                return None
            reader = reader or HeadReader(max_bytes=self.listener.max_header_size)
            if (head := reader.feed(data)) is not None:
                return head
        assert reader is not None
        if deadline is None:
            deadline = trio.current_time() + header_timeout
        with trio.CancelScope(deadline=deadline):
            while True:
                data = await self._receive_or_eof()
                if not data:
                    return None  # the client gave up half-way through a head
                if (head := reader.feed(data)) is not None:
                    return head
        raise RequestTimeout("request head not received in time")

    async def _receive_or_eof(self) -> bytes:
        # A reset between requests is a client hanging up (often one that never read the
        # TLS 1.3 session tickets), not an error worth more than a debug line.
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except _STREAM_ERRORS as exc:
            log.debug("client %s: connection ended: %s", self.session.peer, exc)
            return b""

    # ---- 2. decide -----------------------------------------------------------------

    async def _serve_one(self, head: Head) -> bytes | None:
        """Serve one request; return the bytes after it, or None to close."""
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head.raw) + 1)
        client.receive_data(head.raw)
        exchange: _Exchange | None = None
        request: h11.Request | None = None
        started = trio.current_time()
        try:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest("malformed request") from exc
            if not isinstance(event, h11.Request):
                raise BadRequest("malformed request")
            request = event
            framing = validate_request(head.raw, request)
            target = canonical_target(request.target)
            # The identity first: a denied or expired client must not learn which
            # routes exist (404 versus 403).
            self._check_identity()
            route = self._match(request, target)
            exchange = _Exchange(
                request, target, route, _has_body(framing), framing.chunked, started=started
            )
            exchange.websocket = route.config.websocket and is_websocket_upgrade(request)
            self._authorize(route)
            limit = BodyLimit(self.listener.max_body_size or None, framing)
            if head.rest:  # h11 takes b"" to mean EOF
                client.receive_data(head.rest)
            # h11 only reaches DONE for the client's request (and so allows keep-alive)
            # once its EndOfMessage has been taken; for a bodyless request it is there.
            if not exchange.has_body and not isinstance(client.next_event(), h11.EndOfMessage):
                raise BadRequest("malformed request")
            if exchange.has_body and head.rest:
                # Body bytes that came with the head are parsed before the head goes
                # upstream, so a chunk size no backend can hold is refused with nothing sent.
                self._first_event = self._parse_client_event(client)
            await self._forward(client, exchange, limit)
        except HttpError as exc:
            if exchange is not None and exchange.response_started:
                log.info("client %s: %s after the response began", self.session.peer, exc)
                self._finish(exchange.request, exchange, exchange.status, started)
                return None
            await self._refuse(exc, exchange, request, started)
            return None
        except _ClientGone:
            if exchange is not None:  # 499: the client went away before its answer (nginx's)
                status = exchange.status if exchange.response_started else 499
                self._finish(exchange.request, exchange, status, started)
            return None
        self._finish(exchange.request, exchange, exchange.status, started)
        reusable = client.our_state is h11.DONE and client.their_state is h11.DONE
        leftover = bytes(client.trailing_data[0])
        if not reusable or self.session.closing is not None:
            # Whole request read and nothing after it: a plain close loses nothing.
            self.clean_end = client.their_state is h11.DONE and not leftover
            return None
        return leftover

    def _match(self, request: h11.Request, target: bytes) -> RouteRuntime:
        host = next((v for k, v in request.headers if k == b"host"), None)
        route = self.routes.match_canonical(host, target)
        if route is None:
            raise NoRoute("no route for this host and path")
        return route.payload

    def _check_identity(self) -> None:
        # Every request, not only the first: a keep-alive connection can outlive the
        # certificate, and the deny list can change under it.
        deny = self.store.current().credentials.deny
        if (refused := standing(self.identity, deny, datetime.now(UTC))) is None:
            return
        reason, detail = refused
        self.session.close(reason)
        if reason == "expired":
            raise Forbidden("client certificate expired")
        raise Forbidden("client certificate is denied", log_detail=f"deny list ({detail})")

    def _authorize(self, route: RouteRuntime) -> None:
        if not is_allowed(route.config.allow, self.identity):
            raise Forbidden(
                "client certificate not allowed on this route",
                log_detail=f"route {route.label}: no allow rule matched",
            )

    async def _refuse(
        self,
        exc: HttpError,
        exchange: _Exchange | None,
        request: h11.Request | None = None,
        started: float | None = None,
    ) -> None:
        detail = getattr(exc, "log_detail", None) or exc.reason
        log.info(
            "refused %s from %s (%s): %d %s",
            "request" if request is None else accesslog.path_of(request.target),
            self.session.peer,
            self.identity.cn or self.identity.fingerprint,
            exc.status,
            detail,
        )
        head_only = request is not None and request.method == b"HEAD"
        self._finish(request, exchange, exc.status, started)
        response = error_response(exc.status, exc.reason, head_only=head_only)
        with trio.move_on_after(self.listener.idle_timeout.seconds), suppress(*_STREAM_ERRORS):
            await self.stream.send_all(response)

    async def _websocket(
        self, client: h11.Connection, exchange: _Exchange, up: Upstream, switch: _Switch
    ) -> None:
        response = switch.response
        headers = client_response_headers(response.status, response.headers, websocket=True)
        exchange.response_started = True
        exchange.status = 101
        await self._send_client(client, h11.InformationalResponse(status_code=101, headers=headers))
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
            client_rest=bytes(client.trailing_data[0]),
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
            method=exchange.request.method.decode("ascii", "replace"),
            path=accesslog.path_of(exchange.request.target),
            status=101,
            bytes_in=summary.bytes_in,
            bytes_out=summary.bytes_out,
            upstream=exchange.upstream,
            end=summary.end,
        )

    def _finish(
        self,
        request: h11.Request | None,
        exchange: _Exchange | None,
        status: int,
        started: float | None,
    ) -> None:
        """Count a request that got an answer, and write its access log line."""
        route = exchange.route.label if exchange is not None else "-"
        self.metrics.child(
            self.metrics.requests, self.listener.label, route, f"{status // 100}xx"
        ).inc()
        if status == 101 or not self.access.enabled:
            return  # a WebSocket session is logged when it ends
        self.access.write_session(
            "http",
            self.session,
            trio.current_time() - started if started is not None else 0.0,
            route=exchange.route.label if exchange is not None else None,
            method=request.method.decode("ascii", "replace") if request is not None else None,
            path=accesslog.path_of(request.target) if request is not None else None,
            status=status,
            bytes_in=exchange.bytes_in if exchange is not None else 0,
            bytes_out=exchange.bytes_out if exchange is not None else 0,
            upstream=exchange.upstream if exchange is not None else None,
        )

    # ---- 3. forward ----------------------------------------------------------------

    async def _forward(self, client: h11.Connection, exchange: _Exchange, limit: BodyLimit) -> None:
        route = exchange.route
        request = exchange.request
        # We answer `Expect: 100-continue` ourselves, once a backend connection is up,
        # so the expectation must not travel on.
        if self._forwarding is None:
            self._forwarding = forwarding_headers(self.identity, self.client_ip)
        headers = upstream_request_headers(
            request,
            self.identity,
            self.client_ip,
            allow_websocket=exchange.websocket,
            forwarding=self._forwarding,
        )
        upstream_req = request_head(
            request.method, exchange.target, [(k, v) for k, v in headers if k.lower() != b"expect"]
        )
        for attempt in range(STALE_RETRIES + 1):
            up = await self._connect(route)
            exchange.upstream = str(up.backend)
            started = trio.current_time()
            try:
                await self._exchange(client, exchange, up, upstream_req, limit)
            except _Stale:
                await discard(up)
                if attempt == STALE_RETRIES:
                    raise BadGateway("backend closed the connection") from None
                continue
            except _Switch as switch:
                try:
                    await self._websocket(client, exchange, up, switch)
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

    async def _connect(self, route: RouteRuntime) -> Upstream:
        candidates = self.pool.eligible(route.backends.order())
        header = route.config.proxy_protocol == "v2"
        for backend in candidates:
            try:
                up = await self.pool.acquire(
                    backend, connect_timeout=route.config.connect_timeout.seconds, fresh=header
                )
            except ConnectFailed as exc:
                self.metrics.child(
                    self.metrics.upstream_connect_errors, route.label, str(backend)
                ).inc()
                log.warning("route %s: %s", route.label, exc)
                continue
            if header:
                up.private = True  # never pooled: the header names this client only
                try:
                    with trio.fail_after(route.config.connect_timeout.seconds):
                        await up.stream.send_all(proxy_header(self.stream, self.session))
                except (trio.TooSlowError, *_STREAM_ERRORS) as exc:
                    await discard(up)
                    raise BadGateway("backend connection failed") from exc
            return up
        raise BadGateway("no backend answered")

    async def _exchange(
        self,
        client: h11.Connection,
        exchange: _Exchange,
        up: Upstream,
        upstream_req: bytes,
        limit: BodyLimit,
    ) -> None:
        # Replaying is safe only when the backend cannot have acted on the request: it
        # closed a pooled connection before a byte of response, and the method is
        # idempotent, and there is no body we have already consumed.
        stale_ok = up.reused and not exchange.has_body and exchange.request.method in _IDEMPOTENT
        if exchange.request.method == b"HEAD":
            up.reader.no_body_expected()
        try:
            await self._send_up(up, upstream_req)
        except _UpstreamBroken as exc:
            if stale_ok:
                raise _Stale from exc
            raise

        if exchange.has_body and client.they_are_waiting_for_100_continue:
            # Now, before the two tasks start: only one task may write to the client.
            exchange.sent_100 = True
            await self._send_client(client, h11.InformationalResponse(status_code=100, headers=[]))
        if not exchange.has_body:  # one direction only: no second task to coordinate
            await self._relay_response(client, exchange, up, stale_ok)
            return
        errors: list[BaseException] = []
        with trio.CancelScope() as both:

            async def capture(fn: Callable[[], Awaitable[None]]) -> None:
                try:
                    await fn()
                except Exception as exc:  # handed to the caller below
                    errors.append(exc)
                    both.cancel()

            exchange.pumping = True  # now: the response side may look before the task runs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture, lambda: self._pump_body(client, exchange, up, limit))
                await capture(lambda: self._relay_response(client, exchange, up, stale_ok))
                nursery.cancel_scope.cancel()  # response done: stop reading a body nobody wants
        if errors:
            raise errors[0]

    async def _pump_body(
        self, client: h11.Connection, exchange: _Exchange, up: Upstream, limit: BodyLimit
    ) -> None:
        try:
            await self._pump_body_events(client, exchange, up, limit)
        finally:
            exchange.pumping = False
            # Sent completely, or the backend stopped taking it (it may be answering):
            # either way, from now on the backend has read_timeout to answer.
            if exchange.head_clock is not None:
                exchange.head_clock.deadline = (
                    trio.current_time() + exchange.route.config.read_timeout.seconds
                )

    async def _pump_body_events(
        self, client: h11.Connection, exchange: _Exchange, up: Upstream, limit: BodyLimit
    ) -> None:
        try:
            while True:
                event = await self._next_client_event(client)
                if isinstance(event, h11.Data):
                    limit.add(len(event.data))
                    exchange.bytes_in += len(event.data)
                    self.metrics.child(self.metrics.bytes, self.listener.label, "in").inc(
                        len(event.data)
                    )
                    await self._send_up(up, chunk(event.data) if exchange.chunked else event.data)
                elif isinstance(event, h11.EndOfMessage):
                    # Before the last write, not after: a backend that answers at once
                    # would otherwise find the body "unfinished" and the client's
                    # keep-alive connection would be closed for nothing (a race seen
                    # once in ~200 small chunked requests).
                    exchange.body_done = True
                    if exchange.chunked:
                        await self._send_up(up, LAST_CHUNK)
                    return
        except _UpstreamBroken:
            # The backend stopped taking the body: it may be answering already (413, 401),
            # and that answer is what the client should get. The response side reports
            # what happened; the unread rest of the body closes the client connection.
            return

    def _parse_client_event(self, client: h11.Connection) -> Any:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest("malformed request body") from exc
        check_chunk_size(client)
        return None if event is h11.NEED_DATA else event

    async def _next_client_event(self, client: h11.Connection) -> Any:
        if (first := self._first_event) is not None:
            self._first_event = None
            return first
        while True:
            event = self._parse_client_event(client)
            if event is not None:
                return event
            with trio.move_on_after(self.listener.idle_timeout.seconds) as scope:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    raise _ClientGone from exc
            if scope.cancelled_caught:
                raise RequestTimeout("request body stalled")
            if not data:
                raise _ClientGone
            client.receive_data(bytes(data))

    async def _relay_response(
        self, client: h11.Connection, exchange: _Exchange, up: Upstream, stale_ok: bool
    ) -> None:
        timeout = exchange.route.config.read_timeout.seconds
        response = await self._relay_heads(client, exchange, up, stale_ok, timeout)
        headers = client_response_headers(response.status, response.headers)
        # A backend may answer before the request body is all sent (nginx's `return`
        # does). The rest of the body will not be read once the response is done, so
        # this connection cannot carry another request: say so now, not by a bare close.
        unfinished_body = exchange.has_body and not exchange.body_done
        if self.session.closing is not None or unfinished_body:
            headers.append((b"Connection", b"close"))
        exchange.response_started = True
        exchange.status = response.status
        # What is ready is written together: head, body and end of a small response
        # leave in one TLS record and one syscall, not three. Before waiting for the
        # backend, and past FLUSH_BYTES, the buffer goes out, so nothing is held back
        # and memory stays bounded.
        try:
            head = h11.Response(
                status_code=response.status, headers=headers, reason=response.reason
            )
        except h11.LocalProtocolError as exc:
            raise BadGateway("backend sent a malformed response") from exc
        out = bytearray(client.send(head) or b"")
        bytes_out = self.metrics.child(self.metrics.bytes, self.listener.label, "out")
        reader = up.reader
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                if out:
                    await self._write_client(out)
                    out.clear()
                reader.receive_data(await self._receive_up(up, timeout))
            elif isinstance(event, Body):
                size = len(event.data)
                bytes_out.inc(size)
                exchange.bytes_out += size
                out += client.send(h11.Data(data=bytes(event.data))) or b""
                if len(out) >= FLUSH_BYTES:
                    await self._write_client(out)
                    out.clear()
            elif event is END:
                out += client.send(h11.EndOfMessage()) or b""
                up.reusable = _keeps_alive(exchange, response)
                await self._write_client(out)
                return
            else:
                raise BadGateway("backend response ended unexpectedly")

    async def _relay_heads(
        self,
        client: h11.Connection,
        exchange: _Exchange,
        up: Upstream,
        stale_ok: bool,
        timeout: float,
    ) -> ResponseHead:
        """Relay informational (1xx) heads; return the final head."""
        reader = up.reader
        while True:
            event = await self._read_upstream_head(exchange, up, timeout, stale_ok)
            stale_ok = False
            if event.status >= 200:
                return event
            if event.status == 101:
                if exchange.websocket and accepts_websocket(event.status, event.headers):
                    raise _Switch(event, reader.trailing_data[0])
                raise BadGateway("backend switched protocols without a WebSocket upgrade")
            if reader.next_event() is not END:  # a 1xx ends with its head
                raise BadGateway("backend sent a malformed response")
            reader.start_next_cycle()
            if event.status == 100 and exchange.sent_100:
                continue
            if exchange.request.http_version == b"1.0":
                continue  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
            try:
                info = h11.InformationalResponse(
                    status_code=event.status,
                    headers=client_response_headers(event.status, event.headers),
                    reason=event.reason,
                )
            except h11.LocalProtocolError as exc:
                raise BadGateway("backend sent a malformed response") from exc
            await self._send_client(client, info)

    async def _read_upstream_head(
        self, exchange: _Exchange, up: Upstream, timeout: float, stale_ok: bool
    ) -> ResponseHead:
        reader = up.reader
        sending = exchange.pumping
        deadline = math.inf if sending else trio.current_time() + timeout
        with trio.CancelScope(deadline=deadline) as clock:
            if sending:
                exchange.head_clock = clock  # the body pump starts it when it is done
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
        raise GatewayTimeout("backend did not answer in time")

    async def _receive_up(self, up: Upstream, timeout: float) -> bytes:
        with trio.move_on_after(timeout):
            try:
                return bytes(await up.stream.receive_some(RECEIVE_SIZE))
            except _STREAM_ERRORS as exc:
                raise BadGateway("backend connection failed mid-response") from exc
        raise GatewayTimeout("backend stalled mid-response")

    async def _send_up(self, up: Upstream, data: bytes | memoryview) -> None:
        with trio.move_on_after(self.listener.idle_timeout.seconds):
            try:
                await up.stream.send_all(data)
            except _STREAM_ERRORS as exc:
                raise _UpstreamBroken("backend connection failed") from exc
            return
        raise GatewayTimeout("backend stopped reading the request")

    async def _send_client(self, client: h11.Connection, event: Any) -> None:
        data = client.send(event)
        if data:
            await self._write_client(data)

    async def _write_client(self, data: bytes | bytearray) -> None:
        with trio.move_on_after(self.listener.idle_timeout.seconds):
            try:
                await self.stream.send_all(data)
            except _STREAM_ERRORS as exc:
                raise _ClientGone from exc
            return
        raise _ClientGone


def _keeps_alive(exchange: _Exchange, response: ResponseHead) -> bool:
    """May the backend connection carry another request after this exchange?

    As h11 decided it: the request went out whole, the response is HTTP/1.1, neither
    side said ``Connection: close``, and the body was not delimited by the close.
    """
    if exchange.has_body and not exchange.body_done:
        return False
    if response.version != b"1.1" or b"close" in connection_tokens(response.headers):
        return False
    framing = response.framing
    delimited = framing.chunked or framing.content_length is not None
    bodiless = exchange.request.method == b"HEAD" or response.status in (204, 304)
    return delimited or bodiless


def _has_body(framing: Framing) -> bool:
    return framing.chunked or bool(framing.content_length)
