"""HttpConnection and the pool over in-memory streams: the relay's decisions, no sockets.

The client side is raw bytes in, raw bytes out; the backends are h11 servers (the oracle)
on the other end of ``trio.testing.memory_stream_pair``; the pool connects through a
function that hands out those streams. Timeouts run on trio's autojump clock, so a 60 s
read timeout takes no wall time.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import h11
import pytest
import trio
import trio.testing

from mtlsproxy.accesslog import AccessLog
from mtlsproxy.address import parse_address
from mtlsproxy.config import AllowRule, Duration, Listener, Route
from mtlsproxy.denylist import DenyList
from mtlsproxy.identity import Identity, PeerCertificates
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import Allow
from mtlsproxy.relay.routing import RoundRobin, RouteTable
from mtlsproxy.relay.routing import Route as TableRoute
from mtlsproxy.server import http
from mtlsproxy.server.http import HttpConnection, RouteRuntime
from mtlsproxy.server.upstream import Target, UpstreamPool
from mtlsproxy.sessions import Session

NOW = datetime.now(UTC)
IDENT = Identity(
    subject="CN=player-1",
    issuer="CN=CA",
    cn="player-1",
    ous=(),
    dns=(),
    ips=(),
    uris=(),
    spiffe_id=None,
    serial="01",
    sha256="ab" * 32,
    not_before=NOW - timedelta(hours=1),
    not_after=NOW + timedelta(hours=23),
)
BACKEND = parse_address("127.0.0.1:9")  # never dialled: the pool's connect is ours

Handler = Callable[[h11.Request, bytes], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]


async def hello(request: h11.Request, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    payload = b"hello " + request.target + b" " + body
    return 200, [(b"Content-Length", b"%d" % len(payload))], payload


class Backends:
    """h11 servers on memory streams; ``connect`` is the pool's way to reach them."""

    def __init__(self, nursery: trio.Nursery, handler: Handler = hello) -> None:
        self.nursery = nursery
        self.handler = handler
        self.connects = 0
        self.requests: list[h11.Request] = []
        self.streams: list[trio.abc.Stream] = []

    async def connect(self, target: Target) -> trio.abc.Stream:
        self.connects += 1
        ours, theirs = trio.testing.memory_stream_pair()
        self.streams.append(theirs)
        self.nursery.start_soon(self.serve, theirs)
        return ours

    async def serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._request(conn, stream)
                if request is None:
                    return
                self.requests.append(request)
                status, headers, payload = await self.handler(request, body)
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=payload)) if payload else b""
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is not h11.DONE:
                    await stream.aclose()
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return  # the proxy closed on us: this connection is over

    @staticmethod
    async def _request(
        conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:  # ConnectionClosed
                return None, b""


def listener(**overrides: object) -> Listener:
    fields: dict[str, object] = {
        "listen": parse_address("127.0.0.1:0"),
        "routes": [Route(backends=[BACKEND])],
        "header_timeout": Duration("2s"),
        "idle_timeout": Duration("5s"),
    }
    fields.update(overrides)
    return Listener(**fields)  # type: ignore[arg-type]


def routes(**overrides: object) -> RouteTable[RouteRuntime]:
    config = Route(backends=[BACKEND], **overrides)  # type: ignore[arg-type]
    runtime = RouteRuntime(0, "api", config, RoundRobin([Target(BACKEND)]), None)
    return RouteTable([TableRoute(0, runtime)])


class Proxy:
    """One HttpConnection served over a memory stream; ``client`` is the client's end."""

    def __init__(
        self,
        nursery: trio.Nursery,
        backends: Backends,
        *,
        listen: Listener | None = None,
        table: RouteTable[RouteRuntime] | None = None,
        deny: DenyList = DenyList(),  # noqa: B008  # frozen: one instance is fine
        wrap: Callable[[trio.abc.HalfCloseableStream, Session], trio.abc.HalfCloseableStream]
        | None = None,
        peer_certificates: Callable[[], PeerCertificates | None] = lambda: None,
    ) -> None:
        self.client, theirs = trio.testing.memory_stream_pair()
        self.session = Session("mem", "192.0.2.7:4000", IDENT, "http", None)
        if wrap is not None:
            theirs = wrap(theirs, self.session)
        self.pool = UpstreamPool(connect=backends.connect)
        self.metrics = Metrics()
        self.connection = HttpConnection(
            theirs,
            session=self.session,
            listener=listen or listener(),
            routes=table or routes(),
            pool=self.pool,
            deny_list=lambda: deny,
            metrics=self.metrics,
            client_ip="192.0.2.7",
            access=AccessLog("off"),
            peer_certificates=peer_certificates,
        )
        self.ended = trio.Event()
        self._server_end = theirs
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await self.connection.run()
        finally:
            await self._server_end.aclose()
            self.ended.set()

    async def send(self, data: bytes) -> None:
        await self.client.send_all(data)

    async def responses(self, count: int, *, method: bytes = b"GET") -> list[Response]:
        """Read ``count`` whole responses (an h11 client parses them: the oracle)."""
        conn = h11.Connection(h11.CLIENT)
        # h11 needs to have "sent" the requests to parse their answers.
        out: list[Response] = []
        for _ in range(count):
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
            conn.send(h11.EndOfMessage())
            response = Response()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(30):
                        conn.receive_data(await self.client.receive_some(65536))
                elif isinstance(event, h11.InformationalResponse):
                    response.informational.append(event.status_code)
                elif isinstance(event, h11.Response):
                    response.status = event.status_code
                    response.headers = list(event.headers)
                elif isinstance(event, h11.Data):
                    response.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(event)
            out.append(response)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                break
        return out

    async def read_all(self) -> bytes:
        data = b""
        with trio.fail_after(30):
            while chunk := await self.client.receive_some(65536):
                data += chunk
        return data


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.informational: list[int] = []

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


GET = b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n"


async def test_keep_alive_reuses_both_connections(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    for i in range(3):
        await proxy.send(GET % i)
        (answer,) = await proxy.responses(1)
        assert (answer.status, answer.body) == (200, b"hello /%d " % i)
    assert backends.connects == 1  # one backend connection, pooled between requests
    assert not proxy.ended.is_set()


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(b"".join(GET % i for i in range(4)))
    answers = await proxy.responses(4)
    assert [a.body for a in answers] == [b"hello /%d " % i for i in range(4)]


async def test_the_backend_sees_our_forwarding_headers_not_the_clients(
    nursery: trio.Nursery,
) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(
        b"POST /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: forged\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nExpect: 100-continue\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
    )
    (answer,) = await proxy.responses(1, method=b"POST")
    assert answer.body == b"hello /x abc"
    (seen,) = backends.requests
    headers = dict(seen.headers)
    assert headers[b"x-forwarded-for"] == b"192.0.2.7"
    assert b"forged" not in headers[b"x-forwarded-client-cert"]
    assert b"expect" not in headers and b"connection" not in headers


async def test_a_stale_pooled_connection_is_replayed_for_get(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(GET % 1)
    await proxy.responses(1)
    await backends.streams[0].aclose()  # the backend drops its idle keep-alive connection
    await proxy.send(GET % 2)
    (answer,) = await proxy.responses(1)
    assert (answer.status, answer.body) == (200, b"hello /2 ")
    assert backends.connects == 2


async def test_a_stale_connection_is_not_replayed_for_post(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(GET % 1)
    await proxy.responses(1)
    await backends.streams[0].aclose()
    await proxy.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    answer = await proxy.read_all()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert backends.connects == 1


async def test_100_continue_is_sent_before_the_body_is(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    with trio.fail_after(30):
        first = await proxy.client.receive_some(65536)
    assert first == b"HTTP/1.1 100 \r\n\r\n"
    await proxy.send(b"body")
    (answer,) = await proxy.responses(1, method=b"PUT")
    assert answer.body == b"hello / body"


async def test_1xx_reach_an_http11_client_not_an_http10_one(nursery: trio.Nursery) -> None:
    async def hints(request: h11.Request, body: bytes) -> tuple[int, list, bytes]:
        return 200, [(b"Content-Length", b"2")], b"ok"

    backends = Backends(nursery, hints)

    async def early_hints(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )

    backends.serve = early_hints  # type: ignore[method-assign]
    proxy = Proxy(nursery, backends)
    await proxy.send(GET % 1)
    (answer,) = await proxy.responses(1)
    assert answer.informational == [103] and answer.body == b"ok"
    old = Proxy(nursery, backends)
    await old.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    data = await old.read_all()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"103" not in data


async def test_a_close_delimited_response_is_chunked_for_http11_and_closed_for_http10(
    nursery: trio.Nursery,
) -> None:
    backends = Backends(nursery)

    async def unsized(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await stream.aclose()

    backends.serve = unsized  # type: ignore[method-assign]
    proxy = Proxy(nursery, backends)
    await proxy.send(GET % 1)
    (answer,) = await proxy.responses(1)
    assert answer.header(b"transfer-encoding") == b"chunked" and answer.body == b"all of it"
    await proxy.send(GET % 2)  # the client connection lives on
    assert (await proxy.responses(1))[0].body == b"all of it"
    old = Proxy(nursery, backends)
    await old.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    data = await old.read_all()
    assert data == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    await old.ended.wait()


async def test_an_early_answer_closes_the_client_connection(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)

    async def refuse_early(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)  # the head and a first piece of the body
        await stream.send_all(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")

    backends.serve = refuse_early  # type: ignore[method-assign]
    proxy = Proxy(nursery, backends)
    await proxy.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nabc")
    data = await proxy.read_all()
    assert data.startswith(b"HTTP/1.1 413 ") and b"Connection: close\r\n" in data
    await proxy.ended.wait()


async def test_refusals_name_nothing_and_close(nursery: trio.Nursery) -> None:
    backends = Backends(nursery)
    denied = Proxy(nursery, backends, deny=DenyList(sha256=frozenset({IDENT.sha256})))
    await denied.send(GET % 1)
    data = await denied.read_all()
    assert data.startswith(b"HTTP/1.1 403 ") and denied.session.closing == "denied"
    smuggled = Proxy(nursery, backends)
    await smuggled.send(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert (await smuggled.read_all()).startswith(b"HTTP/1.1 400 ")
    assert backends.connects == 0


async def test_an_idle_connection_closes_quietly_when_the_session_is_asked_to(
    nursery: trio.Nursery,
) -> None:
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends)
    await proxy.send(GET % 1)
    await proxy.responses(1)
    await trio.testing.wait_all_tasks_blocked()
    proxy.session.close("draining")
    with trio.fail_after(30):
        await proxy.ended.wait()
    assert await proxy.read_all() == b""
    assert proxy.connection.clean_end


# ---- the clock: one deadline per exchange, moved by phase (autojump clock) ------------


async def test_a_head_that_never_ends_is_408(nursery: trio.Nursery, autojump_clock: object) -> None:
    proxy = Proxy(nursery, Backends(nursery))
    await proxy.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    started = trio.current_time()
    data = await proxy.read_all()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 2 <= trio.current_time() - started < 3  # header_timeout, from the handshake's end


async def test_a_backend_that_never_answers_is_504_after_read_timeout(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    async def silent(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await trio.sleep_forever()

    backends = Backends(nursery)
    backends.serve = silent  # type: ignore[method-assign]
    proxy = Proxy(nursery, backends, table=routes(read_timeout=Duration("7s")))
    await proxy.send(GET % 1)
    started = trio.current_time()
    data = await proxy.read_all()
    assert data.startswith(b"HTTP/1.1 504 ")
    assert 7 <= trio.current_time() - started < 8


async def test_the_response_head_clock_starts_when_the_body_is_sent(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    """A slow upload is not a slow backend: read_timeout runs from the body's end."""
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends, table=routes(read_timeout=Duration("3s")))
    await proxy.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    for piece in (b"a", b"b", b"c", b"d", b"e"):  # 10 s in all: over read_timeout
        await trio.sleep(2)
        await proxy.send(piece)
    (answer,) = await proxy.responses(1, method=b"POST")
    assert answer.body == b"hello / abcde"


async def test_a_stalled_body_is_408_and_a_stalled_response_is_cut(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    proxy = Proxy(nursery, Backends(nursery))
    await proxy.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    assert (await proxy.read_all()).startswith(b"HTTP/1.1 408 ")  # idle_timeout: 5 s

    async def trickle(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep_forever()

    backends = Backends(nursery)
    backends.serve = trickle  # type: ignore[method-assign]
    cut = Proxy(nursery, backends, table=routes(read_timeout=Duration("4s")))
    await cut.send(GET % 1)
    started = trio.current_time()
    data = await cut.read_all()
    assert data.endswith(b"\r\n\r\nabc")  # the head and what came, then the close
    assert 4 <= trio.current_time() - started < 5


async def test_a_close_asked_while_the_backend_works_is_said_on_that_response(
    nursery: trio.Nursery,
) -> None:
    """A drain or a revoked identity during an exchange: the answer still comes, and it
    says Connection: close (the exchange reads the session's state at the response head)."""
    answering = trio.Event()
    release = trio.Event()

    async def slow(request: h11.Request, body: bytes) -> tuple[int, list, bytes]:
        answering.set()
        await release.wait()
        return 200, [(b"Content-Length", b"2")], b"ok"

    proxy = Proxy(nursery, Backends(nursery, slow))
    await proxy.send(GET % 1)
    with trio.fail_after(30):
        await answering.wait()
    proxy.session.close("denied")
    release.set()
    (answer,) = await proxy.responses(1)
    assert answer.body == b"ok" and answer.header(b"connection") == b"close"
    with trio.fail_after(30):
        await proxy.ended.wait()


class Wrapped(trio.abc.HalfCloseableStream):
    """The proxy's end of the client connection, handed through to ``inner``; subclasses
    watch what passes."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, session: Session) -> None:
        self.inner = inner
        self.session = session

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class CloseAsDataArrives(Wrapped):
    """The session is asked to close in the instant a second request's bytes are handed
    over (a drain racing a request)."""

    receives = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await super().receive_some(max_bytes)
        self.receives += 1
        if self.receives == 2 and data:
            self.session.close("draining")  # after the data was taken, before we resume
        return data


async def test_a_request_that_arrives_as_a_drain_begins_is_answered(
    nursery: trio.Nursery,
) -> None:
    """Fault (review): the idle wait was the connection's own clock, so a drain in the same
    instant as a request's bytes cancelled the request itself (an immediate 504)."""
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends, wrap=CloseAsDataArrives)
    await proxy.send(GET % 1)
    await proxy.responses(1)
    await proxy.send(GET % 2)
    (answer,) = await proxy.responses(1)
    assert (answer.status, answer.body) == (200, b"hello /2 ")
    assert answer.header(b"connection") == b"close"
    assert [r.target for r in backends.requests] == [b"/1", b"/2"]


async def test_empty_lines_do_not_extend_the_idle_wait(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    """Fault (review): every CRLF between requests started idle_timeout (5 s) again."""
    proxy = Proxy(nursery, Backends(nursery))
    await proxy.send(GET % 1)
    await proxy.responses(1)
    started = trio.current_time()
    with trio.move_on_after(60):
        while not proxy.ended.is_set():
            await trio.sleep(4)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await proxy.send(b"\r\n")
    assert proxy.ended.is_set()
    assert trio.current_time() - started < 9  # one idle_timeout, at the second CRLF's turn


async def test_a_backend_connection_with_the_last_chunk_unwritten_is_not_pooled(
    nursery: trio.Nursery,
) -> None:
    """Fault (review): the body was read whole, but its last chunk was still being written
    when the backend's early answer ended the exchange; the connection went back to the
    pool, and the next request on it would have been read as the rest of this body."""
    backends = Backends(nursery)
    got_chunk = trio.Event()

    async def lockstep_connect(target: Target) -> trio.abc.Stream:
        backends.connects += 1
        ours, theirs = trio.testing.lockstep_stream_pair()  # a send waits for its reader
        nursery.start_soon(answer_early, theirs)
        return ours

    async def answer_early(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)  # the head
        await stream.receive_some(65536)  # the first chunk; the last one is never read
        got_chunk.set()
        await trio.testing.wait_all_tasks_blocked()  # the pump now waits on the last chunk
        await stream.send_all(b"HTTP/1.1 401 No\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep_forever()

    backends.connect = lockstep_connect  # type: ignore[method-assign]
    proxy = Proxy(nursery, backends)
    await proxy.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked()  # the head went up alone
    await proxy.send(b"3\r\nabc\r\n0\r\n\r\n")
    (answer,) = await proxy.responses(1, method=b"POST")
    assert answer.status == 401 and got_chunk.is_set()
    await trio.testing.wait_all_tasks_blocked()
    assert sum(len(idle) for idle in proxy.pool._idle.values()) == 0  # not pooled


async def test_a_status_below_100_is_502_not_a_crash(nursery: trio.Nursery) -> None:
    """Found in review: llhttp takes "000" (status None) and "099"; the reader raised
    TypeError for 000, which escaped the relay with no answer."""
    for status in (b"000", b"099"):
        backends = Backends(nursery)

        async def bad(stream: trio.abc.Stream, status: bytes = status) -> None:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")

        backends.serve = bad  # type: ignore[method-assign]
        proxy = Proxy(nursery, backends)
        await proxy.send(GET % 1)
        assert (await proxy.read_all()).startswith(b"HTTP/1.1 502 ")


class CountingWrites(Wrapped):
    """Counts the proxy's writes to the client."""

    writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await super().send_all(data)


async def test_per_connection_work_is_done_once_and_a_small_response_is_one_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 items 3 and 5: the identity headers and the allow verdict once per
    connection, not per request; a small response's head, body and end in one write."""
    built, asked = [], []
    forwarding = http.forwarding_headers
    monkeypatch.setattr(
        http, "forwarding_headers", lambda *a, **k: built.append(1) or forwarding(*a, **k)
    )
    admits = Allow.admits
    monkeypatch.setattr(Allow, "admits", lambda self, i: asked.append(1) or admits(self, i))
    counted: list[CountingWrites] = []

    def wrap(inner: trio.abc.HalfCloseableStream, session: Session) -> CountingWrites:
        counted.append(CountingWrites(inner, session))
        return counted[0]

    config = Route(backends=[BACKEND], allow=[AllowRule(cn="player-1")])
    runtime = RouteRuntime(0, "api", config, RoundRobin([Target(BACKEND)]), Allow(config.allow))
    proxy = Proxy(nursery, Backends(nursery), table=RouteTable([TableRoute(0, runtime)]), wrap=wrap)
    for i in range(3):
        await proxy.send(GET % i)
        (answer,) = await proxy.responses(1)
        assert answer.status == 200
    assert (len(built), len(asked)) == (1, 1)
    assert counted[0].writes == 3  # one per response


CERTS = PeerCertificates(leaf=b"leaf-der", chain=(b"issuer-der",))


async def test_identity_headers_once_per_connection_and_route(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 item 6: a route's identity headers (RFC 9440's Client-Cert and
    Client-Cert-Chain included) and the verified certificates they come from are built
    once per connection and route, whatever the number of requests."""
    built: list[tuple[str, ...]] = []
    forwarding = http.forwarding_headers

    def counting(*a: object, **k: object) -> object:
        built.append(k["identity_headers"])  # type: ignore[arg-type]
        return forwarding(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(http, "forwarding_headers", counting)
    asked: list[int] = []

    def certificates() -> PeerCertificates:
        asked.append(1)
        return CERTS

    chain = Route(
        backends=[BACKEND], path_prefix="/c", identity_headers=("client-cert", "client-cert-chain")
    )
    plain = Route(backends=[BACKEND], path_prefix="/")
    table = RouteTable(
        [
            TableRoute(
                0,
                RouteRuntime(0, "c", chain, RoundRobin([Target(BACKEND)]), None),
                path_prefix="/c",
            ),
            TableRoute(1, RouteRuntime(1, "p", plain, RoundRobin([Target(BACKEND)]), None)),
        ]
    )
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends, table=table, peer_certificates=certificates)
    for i in range(6):
        path = b"/c/%d" % i if i % 2 else b"/p/%d" % i
        await proxy.send(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nClient-Cert: :AAAA:\r\n\r\n")
        (answer,) = await proxy.responses(1)
        assert answer.status == 200
    assert sorted(built) == [("client-cert", "client-cert-chain"), ("xfcc",)]
    assert len(asked) == 1  # only the route that forwards Client-Cert asked, once
    seen = [dict((n.lower(), v) for n, v in r.headers.raw_items()) for r in backends.requests]
    for request, headers in zip(backends.requests, seen, strict=True):
        if request.target.startswith(b"/c"):
            assert headers[b"client-cert"] == b":" + base64.b64encode(CERTS.leaf) + b":"
            assert headers[b"client-cert-chain"] == b":" + base64.b64encode(b"issuer-der") + b":"
            assert b"x-forwarded-client-cert" not in headers
        else:
            assert b"client-cert" not in headers and b"x-forwarded-client-cert" in headers


async def test_a_client_cert_route_without_the_verified_certificate_is_500_never_forwarded(
    nursery: trio.Nursery,
) -> None:
    """Fail closed: no Client-Cert the proxy cannot vouch for, and no request without it."""
    backends = Backends(nursery)
    proxy = Proxy(nursery, backends, table=routes(identity_headers=("client-cert",)))
    await proxy.send(GET % 1)
    assert (await proxy.read_all()).startswith(b"HTTP/1.1 500 ")
    assert backends.requests == []
