"""HTTP/1.1 under slow clients and odd backends, through a real proxy with real TLS.

Each test names the defect it pins: clocks that ran at the wrong time, conformance gaps
(1xx to HTTP/1.0, reason phrases, header counts, chunk sizes, CR-only heads) and a
keep-alive race after small chunked requests.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import trio
from proxy_env import CLIENT_TIMEOUT, Env, parse_responses, read_request, route, serve_raw
from test_proxy_relay import CountingBackend


def _tls(env: Env) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)
    raw = socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_all(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLError, ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(CLIENT_TIMEOUT + 10):
        return await trio.to_thread.run_sync(fn)


async def _body_reader(stream: trio.SocketStream) -> None:
    """A backend that reads a Content-Length body whole, then says how much it got."""
    head = await read_request(stream)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    got = len(head.split(b"\r\n\r\n", 1)[1])
    while got < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        got += len(chunk)
    body = b"got %d" % got
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


async def test_an_upload_longer_than_read_timeout_is_not_cut(
    make_env, nursery: trio.Nursery
) -> None:
    """Fault: read_timeout started when the head went upstream, so any upload taking longer
    (a 1 GiB upload at 100 Mbit/s against the 60 s default) got 504 while the client was
    sending steadily. Now the response clock starts when the body has been sent."""
    port = await serve_raw(nursery, _body_reader)
    env = await make_env(routes=route([port], 'read_timeout = "300ms"'), backends=0)

    def upload() -> bytes:
        with _tls(env) as tls:
            tls.sendall(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000\r\n\r\n")
            for _ in range(10):  # 1 s in all, steadily: three read_timeouts
                tls.sendall(b"x" * 1000)
                time.sleep(0.1)
            return tls.recv(65536)

    answer = parse_responses(await in_thread(upload), eof=False)
    assert answer[0].status == 200
    assert answer[0].body == b"got 10000"


async def test_the_first_head_has_one_clock_from_the_handshake(make_env) -> None:
    """Fault: header_timeout was documented as the total time for a head, but the first
    request could take header_timeout for its first byte and header_timeout again for the
    rest. Now one clock runs from the end of the handshake."""
    env = await make_env(listener='header_timeout = "1500ms"')

    def trickle() -> tuple[float, bytes]:
        with _tls(env) as tls:
            shaken = time.monotonic()
            time.sleep(1.2)  # silent for most of the head's time...
            tls.settimeout(0.1)  # a read is also the trickle's pace
            for byte in b"GET / HTTP/1.1\r\nHost: localhost\r\n":  # ...then a trickle
                try:
                    return time.monotonic() - shaken, tls.recv(65536)  # the proxy answered
                except TimeoutError:
                    tls.sendall(bytes([byte]))
            return time.monotonic() - shaken, b""

    elapsed, data = await in_thread(trickle)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert elapsed < 2.4  # one clock (1.5 s), not 1.2 s + 1.5 s (2.7 s)


async def test_a_cr_only_head_is_400_at_once(make_env) -> None:
    env = await make_env(listener='header_timeout = "30s"')

    def send() -> tuple[float, bytes]:
        with _tls(env) as tls:
            started = time.monotonic()
            tls.sendall(b"GET / HTTP/1.1\rHost: localhost\r\r")
            return time.monotonic() - started, _read_all(tls)

    elapsed, data = await in_thread(send)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert elapsed < 10  # not the header timeout


async def _early_hints(stream: trio.SocketStream) -> None:
    while await read_request(stream):
        await stream.send_all(
            b"HTTP/1.1 103 Early Hints Here\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok"
        )


async def test_1xx_never_goes_to_http10_and_reason_phrases_are_kept(
    make_env, nursery: trio.Nursery
) -> None:
    """RFC 9110 15.2: a server must not send a 1xx response to an HTTP/1.0 client."""
    port = await serve_raw(nursery, _early_hints)
    env = await make_env(routes=route([port]), backends=0)
    old = await env.raw(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert old.startswith(b"HTTP/1.1 200 Fine Thanks\r\n"), old
    assert b" 103 " not in old
    new = await env.raw(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert new.startswith(b"HTTP/1.1 103 Early Hints Here\r\n"), new
    assert b"HTTP/1.1 200 Fine Thanks\r\n" in new


async def _many_cookies(stream: trio.SocketStream) -> None:
    while await read_request(stream):
        cookies = b"".join(b"Set-Cookie: c%d=v; Path=/\r\n" % i for i in range(150))
        await stream.send_all(b"HTTP/1.1 200 OK\r\n" + cookies + b"Content-Length: 2\r\n\r\nok")


async def test_heads_with_many_fields_pass(make_env, nursery: trio.Nursery) -> None:
    """A count cap of 100 fields refused real traffic: a response with 150 Set-Cookie was a
    502, a request with 100 small headers a 431. Only the byte caps apply now."""
    port = await serve_raw(nursery, _many_cookies)
    env = await make_env(routes=route([port]), backends=0)
    small = b"".join(b"X-Small-%d: 1\r\n" % i for i in range(120))
    raw = await env.raw(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + small + b"\r\n"
    )
    (answer,) = parse_responses(raw)
    assert answer.status == 200
    assert len(answer.headers["set-cookie"]) == 150


async def test_a_chunk_size_beyond_2_63_is_400_before_anything_is_forwarded(
    make_env, nursery: trio.Nursery
) -> None:
    """h11 accepts chunk sizes of up to 20 hex digits; a size past 2**63 - 1 overflows the
    signed 64-bit length a backend keeps, so the two could disagree on the chunk's end."""
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    answer = await env.raw(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"FFFFFFFFFFFFFFFFFFFF\r\nabc"
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert backend.heads == []  # nothing reached the backend
    fine = await env.raw(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert fine.startswith(b"HTTP/1.1 200 ")


async def test_keep_alive_survives_small_chunked_requests(make_env) -> None:
    """Fault: about 1 in 200 small chunked requests got `Connection: close`, a race
    between the body's last write upstream and the backend's quick answer."""
    env = await make_env()

    def many() -> list[bool]:
        closes = []
        with _tls(env) as tls:
            for i in range(400):
                tls.sendall(
                    b"POST /%d HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n" % i
                )
                data = tls.recv(65536)
                while not (answers := parse_responses(data, eof=False)):
                    chunk = tls.recv(65536)
                    assert chunk, f"closed after {i} requests"
                    data += chunk
                closes.append("close" in " ".join(answers[0].headers.get("connection", [])))
        return closes

    closes = await in_thread(many)
    assert not any(closes), f"{sum(closes)} of {len(closes)} answers closed the connection"
