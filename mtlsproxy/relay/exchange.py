"""One request/response exchange of the HTTP/1.1 relay, as plain code driven by events.

Theory of operation
===================

The trio side (``server/http.py``) reads bytes, feeds them to ``relay.h1`` readers and
hands the parsed events to an ``Exchange``; the exchange says what to write where and
what happens next: whether the client gets a ``100 Continue``, which backend head is
relayed, how the response is framed for this client, whether either connection may
carry another request, whether a failed request may be sent again. No I/O and no clock
here, so every decision is testable with bytes alone (``tests/test_relay_exchange.py``).

Two sides, each with its own state, as h11 keeps one per peer:

=========  ========  =====================================  ========  ==============================
side       state     event                                  next      output
=========  ========  =====================================  ========  ==============================
request    BODY      ``request_body(data)``                 BODY      the data for the backend (a
                                                                      chunk of ours when chunked)
request    BODY      ``request_end()``                      DONE      the last chunk, when chunked
request    (start)   a request without a body               DONE
response   WAIT      ``response_head``: 1xx other than 101  WAIT      that head for the client, or
                                                                      nothing (a 100 we sent, an
                                                                      HTTP/1.0 client: RFC 9110
                                                                      §15.2)
response   WAIT      ``response_head``: a 101 accepting     SWITCHED  the 101 for the client; the
                     the WebSocket upgrade we let through             connection leaves HTTP
response   WAIT      ``response_head``: any other 101       (error)   BadGateway
response   WAIT      ``response_head``: 2xx-5xx             BODY      the client's head, framed
response   BODY      ``response_body(data)``                BODY      the data, chunked if we chunk
response   BODY      ``response_end()``                     DONE      the last chunk, when we chunk
=========  ========  =====================================  ========  ==============================

Any event in a state the table has no row for is a bug in the driver (RuntimeError).

Decisions, read from the states:

- **100-continue**: ``continue_head()`` gives the ``100 Continue`` to send (our own, once
  a backend connection is up) when an HTTP/1.1 client asked for it and has sent no body
  byte yet; the expectation never travels upstream.
- **Framing for the client**, as h11 chose it before: a response with Content-Length
  keeps it and its body passes as it is; a response of unknown length (chunked, or ended
  by the backend's close) is chunked again for an HTTP/1.1 client and ended by our close
  for an HTTP/1.0 one. HEAD, 204 and 304 have no body whatever the headers say.
- **Connection: close** goes to the client when the client asked for it (or speaks
  HTTP/1.0), when the connection is being closed (a drain, a revoked identity), when the
  body is close-delimited, and when the backend answered before the request body was
  all read: the unread rest could not be told apart from a next request.
- **Reuse**: the client connection carries another request only when both sides ended
  and no ``Connection: close`` went out; the backend connection only when the request went
  out whole (``sent``: its last byte written, not only read), the response was HTTP/1.1,
  neither side said close, and the response had a delimited body (or none).
- **Replay**: a request may be sent again on a new connection only when it went out on a
  reused keep-alive connection that the backend closed before a byte of response, has
  no body, and its method is idempotent (RFC 9110 §9.2.2).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Generic, TypeVar

from mtlsproxy.denylist import DenyList
from mtlsproxy.identity import Identity
from mtlsproxy.policy import standing
from mtlsproxy.relay.errors import BadGateway, Forbidden, HttpError, NoRoute
from mtlsproxy.relay.framing import BodyLimit
from mtlsproxy.relay.h1 import LAST_CHUNK, RequestHead, ResponseHead, chunk, response_head
from mtlsproxy.relay.headers import (
    Headers,
    accepts_websocket,
    client_response_headers,
    is_websocket_upgrade,
)
from mtlsproxy.relay.paths import canonical_target
from mtlsproxy.relay.routing import RouteTable

# The states of each side (h11's names where they mean the same).
WAIT: Final = "WAIT"
BODY: Final = "BODY"
DONE: Final = "DONE"
SWITCHED: Final = "SWITCHED"

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
CONTINUE: Final = b"HTTP/1.1 100 \r\n\r\n"  # h11's spelling: no reason phrase

T = TypeVar("T")


class Refused(Forbidden):
    """The certificate may not be used at all now; ``standing`` says why. The connection
    is to be closed with that reason, not only the request refused."""

    def __init__(self, reason: str, detail: str) -> None:
        self.standing = reason
        if reason == "expired":
            super().__init__("client certificate expired")
        else:
            super().__init__("client certificate is denied", log_detail=f"deny list ({detail})")


def check_standing(identity: Identity, deny: DenyList, now: datetime) -> None:
    """Every request, not only the first: a keep-alive connection can outlive the
    certificate, and the deny list can change under it."""
    refused = standing(identity, deny, now)
    if refused is not None:
        raise Refused(*refused)


def route_for(head: RequestHead, target: bytes, routes: RouteTable[T]) -> T:
    """The route of a request (by its one Host and its canonical target), or NoRoute."""
    host = next((v for k, v in head.headers if k.lower() == b"host"), None)
    route = routes.match_canonical(host, target)
    if route is None:
        raise NoRoute("no route for this host and path")
    return route.payload


class Exchange(Generic[T]):
    """One request and its response. Built once the request head is admitted."""

    __slots__ = (
        "_chunk_out", "_close", "_continue", "_sent_continue", "body_limit", "bytes_in",
        "bytes_out", "closing", "head", "keep_alive", "request", "response", "route", "sent",
        "status", "target", "upstream", "websocket",
    )  # fmt: skip

    def __init__(
        self,
        head: RequestHead,
        route: T,
        *,
        target: bytes,
        websocket_allowed: bool,
        closing: bool = False,
    ) -> None:
        self.head = head
        self.route = route
        self.target = target  # canonical (relay.paths): what was routed and is forwarded
        self.websocket = websocket_allowed and is_websocket_upgrade(head)
        self.body_limit = BodyLimit(None, head.framing)
        self.closing = closing  # the connection is asked to close after this exchange
        self.request = BODY if head.has_body else DONE
        self.response = WAIT
        self.keep_alive = head.version == b"1.1" and b"close" not in head.connection
        expect = [v for n, v in head.headers if n.lower() == b"expect"]
        self._continue = (
            head.has_body
            and head.version == b"1.1"
            and any(b"100-continue" in v.lower() for v in expect)
        )
        self._sent_continue = False
        self._chunk_out = False
        self._close = False
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream: str | None = None  # the backend it went to, for the access log
        # Told by the driver: the whole request, its last byte included, was written to the
        # backend. "Read whole" (request DONE) is not enough to reuse the connection: a
        # last chunk still being written when the response ends would be missing.
        self.sent = False

    # ---- the request side ----------------------------------------------------------

    @property
    def has_body(self) -> bool:
        return self.head.has_body

    @property
    def is_head(self) -> bool:
        return self.head.method == b"HEAD"

    def limit_body(self, max_body: int | None) -> None:
        """The body may not exceed ``max_body``: a declared excess is refused (413) now."""
        self.body_limit = BodyLimit(max_body, self.head.framing)

    def continue_head(self) -> bytes:
        """The ``100 Continue`` to send now, or b"" (not asked for, or body already sent)."""
        if self._continue and self.request == BODY and self.bytes_in == 0:
            self._continue = False
            self._sent_continue = True
            return CONTINUE
        return b""

    def request_body(self, data: memoryview) -> bytes | memoryview:
        self._expect(self.request, BODY, "request body")
        self.body_limit.add(len(data))
        self.bytes_in += len(data)
        self._continue = False  # h11's rule: a client that sends has stopped waiting
        return chunk(data) if self.head.framing.chunked else data

    def request_end(self) -> bytes:
        self._expect(self.request, BODY, "request end")
        self.request = DONE
        return LAST_CHUNK if self.head.framing.chunked else b""

    def replayable(self, reused: bool) -> bool:
        """May this request go out again after its connection died before any answer?"""
        return reused and not self.has_body and self.head.method in IDEMPOTENT

    # ---- the response side ---------------------------------------------------------

    def response_head(self, head: ResponseHead) -> bytes:
        """The bytes for the client (possibly none) for a backend's response head."""
        self._expect(self.response, WAIT, "response head")
        status = head.status
        if status == 101:
            if self.websocket and accepts_websocket(status, head.headers):
                self.response, self.status = SWITCHED, 101
                headers = client_response_headers(101, head.headers, websocket=True)
                return response_head(101, b"", headers)
            raise BadGateway("backend switched protocols without a WebSocket upgrade")
        if status < 200:
            if status == 100 and self._sent_continue:
                return b""  # our own 100 went out already
            if self.head.version == b"1.0":
                return b""  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
            headers = client_response_headers(status, head.headers, nominated=head.connection)
            return response_head(status, head.reason, headers)
        self.response, self.status = BODY, status
        self._continue = False
        return response_head(status, head.reason, self._final_headers(head))

    def _final_headers(self, head: ResponseHead) -> Headers:
        headers = client_response_headers(head.status, head.headers, nominated=head.connection)
        bodiless = head.status in (204, 304)
        close = self.closing or not self.keep_alive or self.request != DONE
        # The headers a GET would get (RFC 9110 §9.3.2), so a HEAD says the same.
        if not bodiless and head.framing.content_length is None:  # unknown length
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            if self.head.version == b"1.1":
                headers.append((b"Transfer-Encoding", b"chunked"))
                self._chunk_out = not self.is_head
            elif not self.is_head:
                close = True  # the body ends when we close
        if close:
            headers.append((b"Connection", b"close"))
            self._close = True
        return headers

    def response_body(self, data: memoryview) -> bytes | memoryview:
        self._expect(self.response, BODY, "response body")
        self.bytes_out += len(data)
        return chunk(data) if self._chunk_out else data

    def response_end(self) -> bytes:
        self._expect(self.response, BODY, "response end")
        self.response = DONE
        return LAST_CHUNK if self._chunk_out else b""

    # ---- what happens next ---------------------------------------------------------

    @property
    def client_reusable(self) -> bool:
        """Both sides ended and nobody said close: the next request may follow."""
        return self.request == DONE and self.response == DONE and not self._close

    def backend_reusable(self, head: ResponseHead) -> bool:
        """May the backend connection carry another request (as h11 decided it)?"""
        if self.request != DONE or self.response != DONE or not self.sent:
            return False
        return keeps_alive(head, is_head=self.is_head)

    @staticmethod
    def _expect(state: str, wanted: str, event: str) -> None:
        if state != wanted:
            raise RuntimeError(f"{event} in state {state}")


def keeps_alive(head: ResponseHead, *, is_head: bool) -> bool:
    """May a backend connection carry another request after this response (read to its
    end, the request sent whole)? HTTP/1.1, no close, and a delimited body (or none)."""
    if head.version != b"1.1" or b"close" in head.connection:
        return False
    framing = head.framing
    delimited = framing.chunked or framing.content_length is not None
    return delimited or is_head or head.status in (204, 304)


def admit(
    head: RequestHead,
    routes: RouteTable[T],
    identity: Identity,
    deny: DenyList,
    now: datetime,
) -> tuple[bytes, T]:
    """The canonical target and route of a request, or the HttpError that refuses it.

    The identity first: a denied or expired client must not learn which routes exist
    (404 versus 403)."""
    target = canonical_target(head.target)
    check_standing(identity, deny, now)
    return target, route_for(head, target, routes)


__all__ = [
    "BODY",
    "DONE",
    "SWITCHED",
    "WAIT",
    "Exchange",
    "HttpError",
    "Refused",
    "admit",
    "keeps_alive",
]
