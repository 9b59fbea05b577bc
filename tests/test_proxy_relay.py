"""The HTTP/1.1 relay through real TLS: framing, limits, timeouts, backend failures."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import time

import pytest
import trio
from proxy_env import (
    CLIENT_TIMEOUT,
    decode,
    parse_responses,
    read_request,
    route,
    serve_raw,
)

from mtlsproxy import demo_backend


class CountingBackend:
    """A raw backend that counts the requests that reach it and answers each with 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        # It answers a head without reading its body, so the proxy may close on it with
        # bytes unread (a reset): that ends this connection, not the test.
        with contextlib.suppress(trio.BrokenResourceError):
            await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            self.heads.append(head)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


# --- framing the proxy must refuse, never forward ---------------------------------------

SMUGGLING = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-on-http10": b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-twice": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "te-gzip-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-identity": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "two-te-headers": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "bare-lf-in-one-header": b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    "cl-list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na",
    "cl-twice": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    "cl-empty": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
    "cl-plus": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http-0.9-style": b"GET /\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n",
    "empty-header-name": b"GET / HTTP/1.1\r\nHost: x\r\n: nothing\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "absolute-form": b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "dot-segment": b"GET /public/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_ambiguous_requests_are_refused_and_never_forwarded(
    make_env, nursery: trio.Nursery, name: str
) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    answer = await env.raw(SMUGGLING[name])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Connection: close" in answer
    assert backend.heads == []


async def test_a_smuggled_second_request_never_reaches_the_backend(
    make_env, nursery: trio.Nursery
) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    # The classic CL.TE attack: a front end reading CL would forward "GET /admin" as body.
    attack = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = await env.raw(attack)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert backend.heads == []


async def test_upstream_requests_are_rebuilt_not_copied(make_env, nursery: trio.Nursery) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    request = (
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\n"
        b"Upgrade: h2c\r\nX-Kept:   padded value   \r\n\r\n"
        b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer, _ = parse_responses(await env.raw(request))
    assert answer.status == 200
    head = backend.heads[0]
    lowered = head.lower()
    for gone in (
        b"x-secret",
        b"keep-alive",
        b"\r\nte:",
        b"proxy-authorization",
        b"upgrade",
        b"h2c",
    ):
        assert gone not in lowered, gone
    assert b"X-Kept: padded value" in head
    assert head.startswith(b"GET /x HTTP/1.1\r\n")


# --- limits and timeouts ----------------------------------------------------------------


async def test_a_huge_head_is_431(make_env) -> None:
    env = await make_env(listener='max_header_size = "2KiB"')
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    assert (await env.raw(big)).startswith(b"HTTP/1.1 431 ")
    # The cap counts the head as a whole, whatever the read sizes: 20 headers of 200 bytes.
    many = (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 200) for i in range(20))
        + b"\r\n"
    )
    assert (await env.raw(many)).startswith(b"HTTP/1.1 431 ")


async def test_a_slow_head_gets_408_even_when_bytes_trickle(make_env) -> None:
    env = await make_env(listener='header_timeout = "1s"')

    def slowloris() -> bytes:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(env.client.crt, env.client.key)
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\n")
            answer = b""
            for _ in range(40):  # one header byte every 100 ms: each read is quick
                try:
                    tls.sendall(b"X")
                except OSError:
                    break
                tls.settimeout(0.1)
                try:
                    answer += tls.recv(4096)
                    if answer:
                        break
                except (TimeoutError, ssl.SSLError):
                    continue
            tls.settimeout(CLIENT_TIMEOUT)
            with contextlib.suppress(OSError, ssl.SSLError):
                answer += tls.recv(4096)
            return answer

    with trio.fail_after(15):
        answer = await trio.to_thread.run_sync(slowloris)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


async def test_declared_body_over_the_limit_is_413_before_any_byte_moves(
    make_env, nursery: trio.Nursery
) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0, listener="max_body_size = 1000")
    answer = await env.raw(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"a" * 1001
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert backend.heads == []


async def test_streamed_body_over_the_limit_is_413(make_env) -> None:
    env = await make_env(listener="max_body_size = 100000")
    body = b"".join(b"%x\r\n%s\r\n" % (50000, b"z" * 50000) for _ in range(3)) + b"0\r\n\r\n"
    answer = await env.raw(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_backend_that_never_answers_is_504(make_env, nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    port = await serve_raw(nursery, silent)
    env = await make_env(routes=route([port], 'read_timeout = "300ms"'), backends=0)
    with trio.fail_after(10):
        response = await env.request("GET", "/")
    assert response.status_code == 504


async def test_a_backend_that_comes_back_serves_the_next_request(
    make_env, nursery: trio.Nursery
) -> None:
    """Fault: a route's only backend refuses, under concurrent requests, then comes back.
    Each failure used to double the back-off (5 concurrent failures: 10 s of 503 after the
    backend was healthy again); now the back-off grows once per window, and a route whose
    backends are all marked down still tries the one whose mark ends first."""
    with socket.socket() as probe:  # a port nobody listens on, for now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = await make_env(routes=route([port]), backends=0)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await env.request("GET", "/")).status_code)

    async with trio.open_nursery() as burst:
        for _ in range(5):
            burst.start_soon(one)
    assert statuses == [502] * 5
    labels = {"route": "*/", "backend": f"127.0.0.1:{port}"}
    assert env.proxy.metrics.sample("mtlsproxy_upstream_connect_errors_total", labels) == 5
    target = env.proxy.listeners[0].routes.match("x", "/").payload.backends.order()[0]
    assert env.proxy.shared.pool.is_up(target) is False  # marked down...
    await nursery.start(demo_backend.serve, "127.0.0.1", port)
    with trio.fail_after(1):  # ...and still the next request is served, at once
        assert (await env.request("GET", "/")).status_code == 200


async def test_a_refusing_backend_is_skipped_for_a_live_one(make_env) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    routes = f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{dead}", "127.0.0.1:{{b0}}", "127.0.0.1:{{b1}}"]
"""
    env = await make_env(routes=routes, backends=2)
    statuses = [(await env.request("GET", f"/{i}")).status_code for i in range(9)]
    assert statuses == [200] * 9


async def test_round_robin_spreads_requests(make_env, nursery: trio.Nursery) -> None:
    first, second = CountingBackend(), CountingBackend()
    ports = [await serve_raw(nursery, first.handle), await serve_raw(nursery, second.handle)]
    env = await make_env(routes=route(ports), backends=0)
    for i in range(6):
        assert (await env.request("GET", f"/{i}")).status_code == 200
    assert len(first.heads) == 3 and len(second.heads) == 3


async def test_upstream_connections_are_kept_alive(make_env, nursery: trio.Nursery) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    for i in range(5):
        assert (await env.request("GET", f"/{i}")).status_code == 200
    assert len(backend.heads) == 5
    assert backend.connections == 1


# --- HTTP semantics -------------------------------------------------------------------


async def test_client_connections_are_kept_alive(make_env) -> None:
    env = await make_env()
    proc = await env.curl("-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                          "-w", "%{num_connects} ", env.url + "/a", env.url + "/b", env.url + "/c")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"1", b"0", b"0"]  # one TLS handshake, three requests


async def test_pipelined_requests_are_answered_in_order(make_env) -> None:
    env = await make_env()
    requests = (
        b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3))
        + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = parse_responses(await env.raw(requests))
    assert [decode(a.body)["path"] for a in answers] == ["/p0", "/p1", "/p2", "/last"]


async def test_head_request(make_env) -> None:
    env = await make_env()
    raw = await env.raw(b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    (answer,) = parse_responses(raw, ["HEAD"])
    assert answer.status == 200 and answer.body == b""
    assert int(answer.headers["content-length"][0]) > 0


async def test_expect_100_continue(make_env) -> None:
    env = await make_env()

    def exchange() -> tuple[bytes, bytes]:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(env.client.crt, env.client.key)
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(
                b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                b"Connection: close\r\n\r\n"
            )
            interim = tls.recv(4096)  # nothing of the body is sent before the 100
            tls.sendall(b"hello")
            rest = b""
            while chunk := tls.recv(65536):
                rest += chunk
            return interim, rest

    interim, rest = await trio.to_thread.run_sync(exchange)
    assert interim.startswith(b"HTTP/1.1 100 ")
    (answer,) = parse_responses(rest)
    seen = decode(answer.body)
    assert seen["body_bytes"] == 5
    assert "expect" not in seen["headers"]


async def test_informational_responses_are_relayed(make_env, nursery: trio.Nursery) -> None:
    async def early_hints(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"
        )

    port = await serve_raw(nursery, early_hints)
    env = await make_env(routes=route([port]), backends=0)
    (answer,) = parse_responses(
        await env.raw(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert answer.informational == [103]
    assert answer.status == 200 and answer.body == b"done"


async def test_a_malformed_backend_response_is_502(make_env, nursery: trio.Nursery) -> None:
    async def smuggler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok"
        )

    port = await serve_raw(nursery, smuggler)
    env = await make_env(routes=route([port]), backends=0)
    assert (await env.request("GET", "/")).status_code == 502


async def test_large_bodies_stream_both_ways(make_env) -> None:
    env = await make_env()
    size = 48 * 2**20
    payload = env.folder / "upload.bin"
    with payload.open("wb") as f:
        for i in range(size // 2**20):
            f.write(bytes([i % 251]) * 2**20)
    want = hashlib.sha256(payload.read_bytes()).hexdigest()
    up = await env.curl("-T", str(payload), env.url + "/upload")
    assert up.returncode == 0, up.stderr
    seen = decode(up.stdout)
    assert seen["body_bytes"] == size and seen["body_sha256"] == want

    down = await env.curl("-o", str(env.folder / "download.bin"), env.url + f"/bytes/{size}")
    assert down.returncode == 0, down.stderr
    assert (env.folder / "download.bin").stat().st_size == size


async def test_idle_keep_alive_connections_are_closed(make_env) -> None:
    env = await make_env(listener='idle_timeout = "500ms"')
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    def idle_client() -> tuple[bytes, float]:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += tls.recv(65536)
            start = time.monotonic()
            try:
                rest = tls.recv(65536)  # b"" once the proxy closes the idle connection
            except (ssl.SSLError, OSError):
                rest = b""
            return rest, time.monotonic() - start

    rest, waited = await trio.to_thread.run_sync(idle_client)
    assert rest == b""
    assert 0.3 < waited < 5
