"""The HTTP/2 relay for one client connection that selected ``h2`` in ALPN.

Theory of operation
===================

``h2`` (python-hyper) keeps the connection's state; this module moves its bytes and
runs its streams. One task reads the client and hands every event to ``_on_event``
(never blocking on a stream); each admitted request stream runs in a task of its own
(``_serve_stream``), so one slow backend never holds up another stream. Every write,
whoever makes it, goes out through ``H2Side.flush`` in order.

Each stream is a request like any HTTP/1.1 request (``relay.h2``): the same admission
(the identity's standing on every stream, the canonical target, the route, its allow
rules), the same header stripping and identity headers, the same metrics and access-log
line (with ``alpn: "h2"``). Streams share the connection's identity and its per-route
forwarding headers. To the backend a stream goes as HTTP/1.1 (``_via_h1``: the llhttp
reader of ``relay.h1`` reads the answer) or as HTTP/2 (``_via_h2``, ``server.h2upstream``:
trailers both ways, for gRPC).

Flow control is backpressure: a request body chunk is acknowledged to the client (its
window reopened) only once the backend has taken it, and a response chunk goes to the
client only as its windows allow, so memory per stream is bounded by the windows.

Limits (``relay.h2limits``): at most ``MAX_STREAMS`` concurrent streams, the header list
at most ``max_header_size``, budgets for resets, stream openings and control frames; a
connection that breaks one gets GOAWAY(ENHANCE_YOUR_CALM) and is closed with all its
streams (their backend requests cancelled). A protocol error gets h2's GOAWAY.

Clocks: the first request must come within ``header_timeout`` of the handshake and a
connection without streams may stay ``idle_timeout``; then it gets GOAWAY(NO_ERROR). A
stream waits for the backend ``read_timeout`` per read (longer when ``grpc-timeout``
asks for it), for request body bytes or a shut window ``idle_timeout``.

Closing: a drain, a deny, an expiry or a CA removal (``Session.close``) sends GOAWAY at
once (twice: RFC 9113's graceful shutdown, ``_watch_close``); streams in flight finish
(the enforcer's grace and the drain deadline bound them, as for HTTP/1.1), later ones are
refused, and the connection closes when none is left.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime

import trio
from h2 import events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from mtlsproxy import accesslog
from mtlsproxy.relay import h2 as rules
from mtlsproxy.relay.errors import BadGateway, GatewayTimeout, HttpError, RequestTimeout
from mtlsproxy.relay.exchange import Refused, admit, keeps_alive
from mtlsproxy.relay.framing import BodyLimit
from mtlsproxy.relay.h1 import END, LAST_CHUNK, NEED_DATA, Body, RequestHead, ResponseHead, chunk
from mtlsproxy.relay.h1 import request_head as h1_request_head
from mtlsproxy.relay.h2limits import MAX_STREAMS, Abuse, AbuseGuard
from mtlsproxy.relay.headers import Headers, forwarding_headers, upstream_request_headers
from mtlsproxy.server.h2io import Gone, H2Side
from mtlsproxy.server.h2upstream import H2Upstream
from mtlsproxy.server.http import RouteRuntime, ServedConnection, connect
from mtlsproxy.server.upstream import Upstream, discard

log = logging.getLogger("mtlsproxy.http2")

RECEIVE_SIZE = 65536
STREAM_WINDOW = 256 * 1024  # what a stream may send before we pass its bytes on
CONNECTION_WINDOW = 1024 * 1024  # all streams together: the memory bound of a connection
GOAWAY_RTT = 0.25  # between the two GOAWAYs of a graceful close: a round trip, and more
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Stream:
    """One admitted request stream."""

    __slots__ = (
        "arrived", "bytes_in", "bytes_out", "chunks", "ended", "ended_out", "error", "head",
        "id", "limit", "responded", "route", "scope", "status", "target", "trailers",
        "upstream",
    )  # fmt: skip

    def __init__(
        self, stream_id: int, head: RequestHead, target: bytes, route: RouteRuntime
    ) -> None:
        self.id = stream_id
        self.head = head
        self.target = target
        self.route = route
        self.scope = trio.CancelScope()
        # Body chunks with their flow-controlled length, in order; ``ended`` says no more
        # will come. Unbounded in count, bounded in bytes by the stream window, which we
        # only reopen as we forward. ``arrived``: set when a chunk or the end arrives.
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.arrived: trio.Event | None = None
        self.limit: BodyLimit | None = None
        self.error: HttpError | None = None  # found by the reader (a body over the limit)
        self.trailers: Headers | None = None
        self.ended = False  # the client's END_STREAM came
        self.responded = False  # a response head went to the client
        self.ended_out = False  # the response ended (END_STREAM sent)
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream: str | None = None

    def wake(self) -> None:
        if self.arrived is not None:
            self.arrived.set()
            self.arrived = None

    async def next_chunk(self) -> tuple[bytes, int] | None:
        """The next body chunk (None: the body ended); waits without a bound."""
        while not self.chunks:
            if self.ended:
                return None
            self.arrived = arrived = trio.Event()
            await arrived.wait()
        return self.chunks.popleft()


class Http2Connection(ServedConnection):
    """Serves one HTTP/2 client connection (the same inputs as ``HttpConnection``)."""

    PROTOCOL = "h2"

    # Not slotted like HttpConnection: an HTTP/2 connection carries many streams, its
    # per-instance dict is small beside them.
    def _prepare(self) -> None:
        listener = self.listener
        self.clean_end = False  # always a lingering close: the client may still be sending
        config = H2Configuration(client_side=False, header_encoding=None)
        conn = H2Connection(config)
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: listener.max_header_size,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # From the first frame on, not only once the client acknowledged our SETTINGS.
        conn.decoder.max_header_list_size = listener.max_header_size
        self.side = H2Side(conn, self.stream, listener.idle_timeout.seconds)
        self.conn = conn
        self.guard = AbuseGuard()
        self._streams: dict[int, _Stream] = {}
        self._forwarding: dict[int, Headers] = {}
        self._nursery: trio.Nursery | None = None
        self._reading = trio.CancelScope()
        self._goaway_sent = False
        self._abusive = False  # a budget broken outside the reader (see _premature)
        # The client's GOAWAYs are read here, not by h2, which would let no stream in
        # flight answer after one (python-hyper/h2#1181).
        self._splitter = rules.GoAwaySplitter(preface=rules.PREFACE)

    # ---- the connection ------------------------------------------------------------

    async def run(self) -> None:
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - conn.inbound_flow_control_window)
        self.metrics.child(self.metrics.http2_connections, self.session.listener).inc()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_close)
            try:
                await self.side.flush()
                await self._read_loop()
            except Gone as exc:
                log.debug("client %s: HTTP/2 connection ended: %s", self.session.peer, exc)
            finally:
                # The streams end with their backend requests, each logged as answered
                # (or 499), within a second; then whatever is left is cut.
                self._goaway_sent = True
                for st in list(self._streams.values()):
                    st.scope.cancel()
                if self.session.idle_scope is not None:
                    self.session.idle_scope.cancel()
                nursery.cancel_scope.deadline = trio.current_time() + 1
        self.session.idle_scope = None

    async def _read_loop(self) -> None:
        listener = self.listener
        # The first request must come within header_timeout of the handshake.
        self._reading.deadline = trio.current_time() + listener.header_timeout.seconds
        with self._reading:
            while True:
                data = await self._receive_or_eof()
                if not data:
                    return
                data, goaways = self._splitter.feed(data)
                if any(code != 0 for _, code in goaways):
                    log.info("client %s: GOAWAY with an error: closing", self.session.peer)
                    return  # the client gave up on the connection: so do we
                if goaways:  # graceful: it opens no more streams; ours may finish
                    self._goaway_sent = True
                try:
                    received = self.conn.receive_data(data)
                except ProtocolError as exc:  # h2 queued its GOAWAY
                    log.info("client %s: HTTP/2 protocol error: %s", self.session.peer, exc)
                    self._count_goaway("protocol_error")
                    await self._flush_last()
                    return
                try:
                    for event in received:
                        self.guard.check(event, trio.current_time())
                        self._on_event(event)
                except Abuse as exc:
                    log.warning("client %s: %s: GOAWAY", self.session.peer, exc)
                    self._count_goaway("enhance_your_calm")
                    # What h2 queued while it read the flood (an ACK for every PING and
                    # SETTINGS of the read) is not sent: only the GOAWAY.
                    self.conn.data_to_send()
                    self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                    await self._flush_last()
                    return
                await self.side.flush()
                self._set_idle_clock()
        if self._abusive:
            log.warning(
                "client %s: HTTP/2 flood: too many stream resets: GOAWAY", self.session.peer
            )
            self._count_goaway("enhance_your_calm")
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            await self._flush_last()
        elif self._reading.cancelled_caught and not self._streams and not self._goaway_sent:
            self._count_goaway("idle")
            self._goaway(ErrorCodes.NO_ERROR)  # idle too long, or no request in time
            await self._flush_last()

    def _set_idle_clock(self) -> None:
        """No stream: the connection may wait idle_timeout (or the first request's clock
        runs on); streams have their own clocks. Closing and done: stop now."""
        if self._streams:
            self._reading.deadline = math.inf
        elif self._goaway_sent:
            self._reading.cancel()
        elif self._reading.deadline == math.inf:
            self._reading.deadline = trio.current_time() + self.listener.idle_timeout.seconds

    async def _watch_close(self) -> None:
        """``Session.close`` (a drain, a deny, an expiry, a CA removal) cancels this
        scope; so does a close asked before the connection started (its handshake ended
        during a drain). Then RFC 9113's graceful shutdown: GOAWAY with the highest stream
        id, so requests already on their way are still served; ``GOAWAY_RTT`` later, the
        GOAWAY that names the last stream taken. Streams in flight finish, later ones are
        refused, and the connection closes when none is left."""
        if self.session.closing is None:
            with trio.CancelScope() as idle:
                self.session.idle_scope = idle
                await trio.sleep_forever()
            self.session.idle_scope = None
        if self._goaway_sent:
            return  # the connection is ending already
        # Our own frames, not h2's close_connection: after it, h2 lets no stream answer.
        try:
            await self.side.flush(then=GoAwayFrame(0, last_stream_id=2**31 - 1).serialize())
            await trio.sleep(GOAWAY_RTT)
            if self._ending():  # meanwhile, another task ended the connection
                return
            self._goaway_sent = True
            last = GoAwayFrame(0, last_stream_id=self.conn.highest_inbound_stream_id)
            await self.side.flush(then=last.serialize())
        except Gone:
            self._reading.cancel()
        self._set_idle_clock()

    def _ending(self) -> bool:
        return self._goaway_sent

    def _goaway(self, code: ErrorCodes) -> None:
        """The last GOAWAY: nothing is sent on the connection after it."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self.conn.close_connection(
                error_code=code, last_stream_id=self.conn.highest_inbound_stream_id
            )

    async def _flush_last(self) -> None:
        """The last frames (GOAWAY), with a short bound: the connection is ending."""
        with trio.move_on_after(1), trio.CancelScope(shield=True), suppress(Gone):
            await self.side.flush()

    def _count_goaway(self, reason: str) -> None:
        self.metrics.child(self.metrics.http2_goaway, self.session.listener, reason).inc()

    # ---- events from the client ----------------------------------------------------

    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, events.DataReceived):
            self._on_data(event)
        elif isinstance(event, events.StreamEnded):
            if (st := self._streams.get(event.stream_id)) is not None:
                st.ended = True
                st.wake()
        elif isinstance(event, events.TrailersReceived):
            if (st := self._streams.get(event.stream_id)) is not None:
                st.trailers = rules.upstream_trailers(event.headers)
        elif isinstance(event, events.StreamReset):
            if (st := self._streams.get(event.stream_id)) is not None:
                st.scope.cancel()  # the client gave up on it: so do we, backend included
            self.side.window_opened(event.stream_id)
        elif isinstance(event, events.WindowUpdated):
            self.side.window_opened(event.stream_id)
        elif isinstance(event, events.RemoteSettingsChanged):
            self.side.window_opened(0)

    def _on_request(self, event: events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._goaway_sent:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        head: RequestHead | None = None
        try:
            head = rules.request_head(event.headers, end_stream=event.stream_ended is not None)
            deny = self.deny_list()
            target, route = admit(head, self.routes, self.identity, deny, datetime.now(UTC))
            self._check_allowed(route)
            st = _Stream(stream_id, head, target, route)
            st.limit = BodyLimit(self.listener.max_body_size or None, head.framing)
        except HttpError as exc:
            if isinstance(exc, Refused):
                self.session.close(exc.standing)  # this stream is answered; then GOAWAY
            self._refuse(stream_id, exc, head, route=None)
            return
        # A request without a body ends its stream with its head: h2 reports that as a
        # StreamEnded event too, right after this one, and that event ends the body.
        self._streams[stream_id] = st
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_stream, st)

    def _on_data(self, event: events.DataReceived) -> None:
        st = self._streams.get(event.stream_id)
        if st is None or st.ended:  # refused or finished: nobody reads it, reopen at once
            self._acknowledge(event.stream_id, event.flow_controlled_length)
            return
        data = event.data
        if not data:  # padding only: nothing to forward (an empty chunk would end a body)
            self._acknowledge(event.stream_id, event.flow_controlled_length)
            return
        st.bytes_in += len(data)
        try:
            assert st.limit is not None
            st.limit.add(len(data))
        except HttpError as exc:
            st.ended = True
            st.error = exc  # the stream's task answers it, or resets the stream
            self._acknowledge(event.stream_id, event.flow_controlled_length)
            st.scope.cancel()
            return
        st.chunks.append((data, event.flow_controlled_length))
        st.wake()

    def _acknowledge(self, stream_id: int, length: int) -> None:
        if length:
            with suppress(ProtocolError):
                self.conn.acknowledge_received_data(length, stream_id)

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        with suppress(ProtocolError):
            self.conn.reset_stream(stream_id, code)

    def _refuse(
        self,
        stream_id: int,
        exc: HttpError,
        head: RequestHead | None,
        *,
        route: RouteRuntime | None,
        started: float | None = None,
    ) -> None:
        """Answer a stream with the proxy's own error response (never forwarded)."""
        log.info(
            "refused %s from %s (%s): %d %s",
            "request" if head is None else accesslog.path_of(head.target),
            self.session.peer,
            self.identity.cn or self.identity.fingerprint,
            exc.status,
            exc.log_detail or exc.reason,
        )
        head_only = head is not None and head.method == b"HEAD"
        headers, body = rules.error_response(exc.status, exc.reason, head_only=head_only)
        try:
            if body and self.conn.local_flow_control_window(stream_id) < len(body):
                headers, body = headers[:2], b""  # a shut window: the status alone
            self.conn.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self.conn.send_data(stream_id, body, end_stream=True)
        except ProtocolError:
            pass  # reset by the client meanwhile
        self._record(head, route, exc.status, started=started)

    # ---- one stream ----------------------------------------------------------------

    async def _serve_stream(self, st: _Stream) -> None:
        started = trio.current_time()
        error: HttpError | None = None
        with st.scope:
            try:
                if st.route.config.upstream_protocol == "h2":
                    await self._via_h2(st)
                else:
                    await self._via_h1(st)
            except HttpError as exc:
                error = exc
            except Gone as exc:
                log.debug("client %s: stream %d: %s", self.session.peer, st.id, exc)
                self._premature()  # closed under us: h2 reset it (a MadeYouReset shape)
        self._streams.pop(st.id, None)
        self._release_unread(st)
        error = st.error or error
        try:
            if error is not None and not st.responded:
                self._refuse(st.id, error, st.head, route=st.route, started=started)
            else:
                if error is not None:  # mid-response: the honest signal is a reset
                    log.info("client %s: %s after the response began", self.session.peer, error)
                    self._reset(st.id, ErrorCodes.INTERNAL_ERROR)
                elif st.scope.cancelled_caught or not st.ended_out:
                    self._reset(st.id, ErrorCodes.CANCEL)  # the client left, or we cut it
                self._record(
                    st.head, st.route, st.status or 499, bytes_in=st.bytes_in,
                    bytes_out=st.bytes_out, upstream=st.upstream, started=started,
                )  # fmt: skip
            await self.side.flush()
        except Gone:
            pass
        finally:
            self._set_idle_clock()

    def _release_unread(self, st: _Stream) -> None:
        """Body bytes nobody will forward: reopen the client's windows for them."""
        while st.chunks:
            self._acknowledge(st.id, st.chunks.popleft()[1])

    def _premature(self) -> None:
        """A stream ended by a reset of h2's own: counted as a client reset."""
        if not self.guard.resets.spend(trio.current_time()) and self._nursery is not None:
            self._abusive = True
            self._reading.cancel()

    def _forwarding_for(self, route: RouteRuntime) -> Headers:
        forwarding = self._forwarding.get(route.index)
        if forwarding is None:
            chosen = route.config.identity_headers
            certificates = self.peer_certificates() if "client-cert" in chosen else None
            forwarding = forwarding_headers(
                self.identity, self.client_ip, identity_headers=chosen, certificates=certificates
            )
            self._forwarding[route.index] = forwarding
        return forwarding

    def _upstream_headers(self, st: _Stream) -> Headers:
        return upstream_request_headers(
            st.head, self.identity, self.client_ip, forwarding=self._forwarding_for(st.route)
        )

    async def _respond(
        self, st: _Stream, status: int, headers: Headers, *, end: bool, flush: bool = True
    ) -> None:
        st.status = status
        st.responded = True
        st.ended_out = end
        try:
            self.conn.send_headers(st.id, rules.client_headers(status, headers), end_stream=end)
        except ProtocolError as exc:  # the stream, or the whole connection, closed
            raise Gone("stream closed") from exc
        if flush:
            await self.side.flush()

    async def _to_client(self, st: _Stream, data: bytes, *, flush: bool = True) -> None:
        st.bytes_out += len(data)
        self.guard.sent(len(data))  # the WINDOW_UPDATEs it will bring are not a flood
        await self.side.send_data(
            st.id, data, window_timeout=self.listener.idle_timeout.seconds, flush=flush
        )

    async def _end(self, st: _Stream, trailers: Headers | None = None) -> None:
        st.ended_out = True
        try:
            if trailers:
                self.conn.send_headers(st.id, trailers, end_stream=True)
            else:
                self.conn.end_stream(st.id)
        except ProtocolError as exc:  # the stream, or the whole connection, closed
            raise Gone("stream closed") from exc
        await self.side.flush()

    async def _next_chunk(self, st: _Stream) -> tuple[bytes, int] | None:
        """The client's next body chunk (None: the body ended), for idle_timeout."""
        with trio.move_on_after(self.listener.idle_timeout.seconds) as waited:
            return await st.next_chunk()
        assert waited.cancelled_caught
        raise RequestTimeout("request body stalled")

    def _read_timeout(self, st: _Stream) -> float:
        """The route's ``read_timeout``, per read, whatever ``grpc-timeout`` asks: a
        client's header must not stretch the operator's bound (the client enforces its
        own deadline; a call shorter than read_timeout is not broken by it)."""
        return float(st.route.config.read_timeout.seconds)

    # ---- to an HTTP/1.1 backend ----------------------------------------------------

    async def _via_h1(self, st: _Stream) -> None:
        route = st.route
        request = h1_request_head(st.head.method, st.target, self._upstream_headers(st))
        up = await connect(route, self.pool, self.metrics, self.proxy_header)
        st.upstream = str(up.backend)
        started = trio.current_time()
        try:
            sent = await self._exchange_h1(st, up, request)
        except BaseException:
            await discard(up)
            raise
        self.metrics.child(self.metrics.upstream_seconds, route.label).observe(
            trio.current_time() - started
        )
        up.reusable = sent and up.reusable
        if not self.pool.release(up):
            await discard(up)

    async def _exchange_h1(self, st: _Stream, up: Upstream, request: bytes) -> bool:
        """Relay one exchange with an HTTP/1.1 backend; True: the request went out whole."""
        idle = self.listener.idle_timeout.seconds
        chunked = st.head.framing.chunked
        sent = False

        async def pump() -> None:
            nonlocal sent
            while (item := await self._next_chunk(st)) is not None:
                data, length = item
                with trio.fail_after(idle):
                    await up.stream.send_all(chunk(data) if chunked else data)
                self._acknowledge(st.id, length)
                await self.side.flush()
            if chunked:
                with trio.fail_after(idle):
                    await up.stream.send_all(LAST_CHUNK)
            sent = True

        async def guarded_pump() -> None:
            # The backend stopped taking the body: its answer (or its silence) tells.
            with suppress(trio.TooSlowError, *_STREAM_ERRORS):
                await pump()

        try:
            with trio.fail_after(idle):
                await up.stream.send_all(request)
        except (trio.TooSlowError, *_STREAM_ERRORS) as exc:
            raise BadGateway("backend connection failed") from exc
        if _bodiless(st):  # one direction only: no second task
            sent = True
            await self._relay_h1_response(st, up)
            return True
        await _both(lambda: self._relay_h1_response(st, up), guarded_pump)
        if not sent:  # the backend answered before the whole body: not reusable
            up.reusable = False
        return sent

    async def _relay_h1_response(self, st: _Stream, up: Upstream) -> None:
        reader = up.reader
        is_head = st.head.method == b"HEAD"
        if is_head:
            reader.no_body_expected()
        timeout = self._read_timeout(st)
        head: ResponseHead | None = None
        # What one read of the backend brought leaves in one write (a small response:
        # head, body and end together); before waiting for more, it goes out.
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                if head is not None:
                    await self.side.flush()
                await _read_backend(up, timeout, started=head is not None)
            elif isinstance(event, ResponseHead):
                if event.status == 101:
                    raise BadGateway("backend switched protocols")
                if event.status < 200:  # 1xx: not relayed; the final answer follows
                    if reader.next_event() is not END:
                        raise BadGateway("backend sent a malformed response")
                    reader.start_next_cycle()
                    continue
                head = event
                await self._respond(st, event.status, event.headers, end=False, flush=False)
            elif isinstance(event, Body):
                await self._to_client(st, bytes(event.data), flush=False)
            elif event is END:
                assert head is not None
                await self._end(st)
                up.reusable = keeps_alive(head, is_head=is_head)
                return
            else:
                raise BadGateway("backend response ended unexpectedly")

    # ---- to an HTTP/2 backend ------------------------------------------------------

    async def _via_h2(self, st: _Stream) -> None:
        route = st.route
        idle = self.listener.idle_timeout.seconds
        up = await connect(route, self.pool, self.metrics, self.proxy_header)
        st.upstream = str(up.backend)
        started = trio.current_time()
        backend = H2Upstream.of(up, idle)
        try:
            try:
                await self._exchange_h2(st, backend)
            except ProtocolError as exc:  # h2 refused what the backend's state allows
                raise BadGateway("backend broke HTTP/2", log_detail=f"h2: {exc}") from exc
        except BaseException:
            await discard(up)
            raise
        self.metrics.child(self.metrics.upstream_seconds, route.label).observe(
            trio.current_time() - started
        )
        up.reusable = backend.reusable
        if not self.pool.release(up):
            await discard(up)

    async def _exchange_h2(self, st: _Stream, backend: H2Upstream) -> None:
        idle = self.listener.idle_timeout.seconds
        conn = backend.side.conn
        up_id = backend.start()
        headers = rules.upstream_h2_headers(st.head, st.target, self._upstream_headers(st))
        no_body = _bodiless(st)
        conn.send_headers(up_id, headers, end_stream=no_body)
        await backend.side.flush()

        async def pump() -> None:
            while (item := await self._next_chunk(st)) is not None:
                data, length = item
                await backend.side.send_data(up_id, data, window_timeout=idle)
                self._acknowledge(st.id, length)
                await self.side.flush()
            if st.trailers:
                conn.send_headers(up_id, st.trailers, end_stream=True)
            else:
                conn.end_stream(up_id)
            await backend.side.flush()

        async def guarded_pump() -> None:
            # The backend ended or reset the stream: the response side tells.
            with suppress(Gone, ProtocolError):
                await pump()

        if no_body:
            await self._relay_h2_response(st, backend)
        else:
            await _both(lambda: self._relay_h2_response(st, backend), guarded_pump)

    async def _relay_h2_response(self, st: _Stream, backend: H2Upstream) -> None:
        timeout = self._read_timeout(st)
        conn = backend.side.conn
        while True:
            event = await backend.next_event(timeout)
            # A 1xx is an InformationalResponseReceived, not relayed (left unmatched).
            if isinstance(event, events.ResponseReceived):
                raw = dict(event.headers).get(b":status", b"")
                if not (len(raw) == 3 and raw.isdigit() and 200 <= int(raw) <= 599):
                    raise BadGateway("backend sent a malformed status")
                status = int(raw)
                fields = [(n, v) for n, v in event.headers if n[:1] != b":"]
                ended = event.stream_ended is not None
                await self._respond(st, status, fields, end=ended)
                if ended:
                    return
            elif isinstance(event, events.DataReceived):
                if event.data:
                    await self._to_client(st, event.data)
                if event.flow_controlled_length:
                    with suppress(ProtocolError):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    await backend.side.flush()
            elif isinstance(event, events.TrailersReceived):
                await self._end(st, rules.client_trailers(event.headers))
                return
            elif isinstance(event, events.StreamEnded):
                await self._end(st)
                return
            elif isinstance(event, events.StreamReset):
                backend.closed = True
                raise BadGateway("backend reset the stream")


def _bodiless(st: _Stream) -> bool:
    """The stream's request has no body: the client ended it and only the end is queued."""
    return st.ended and not st.chunks


async def _read_backend(up: Upstream, timeout: float, *, started: bool) -> None:
    """Feed the backend's next bytes to its reader, within ``timeout``."""
    reader = up.reader
    with trio.move_on_after(timeout) as waited:
        try:
            data = await up.stream.receive_some(RECEIVE_SIZE)
        except _STREAM_ERRORS as exc:
            raise BadGateway("backend connection failed") from exc
    if waited.cancelled_caught:
        raise GatewayTimeout(
            "backend stalled mid-response" if started else "backend did not answer in time"
        )
    if not data and not started and reader.untouched:
        raise BadGateway("backend closed the connection without a response")
    reader.receive_data(bytes(data))


async def _both(main: Callable[[], Awaitable[None]], side: Callable[[], Awaitable[None]]) -> None:
    """Run ``side`` (a request body's pump) beside ``main`` (the response's relay): main's
    end stops side; an error of either stops both and is raised as itself (no group)."""
    errors: list[Exception] = []
    with trio.CancelScope() as both:

        async def capture(fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except Exception as exc:
                errors.append(exc)
                both.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, side)
            await capture(main)
            nursery.cancel_scope.cancel()
    if errors:
        raise errors[0]
