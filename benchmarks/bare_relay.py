"""The floor of mtlsproxy's stack: a bare mTLS relay on trio and mtlsproxy's own TLSStream.

What it measures: how fast trio + ``mtlsproxy.tls.engine.TLSStream`` (pyOpenSSL) can relay
HTTP/1.1 between a mutual-TLS client and a plain-HTTP backend on one core, with none of the
product around it: no routing, path rules, policy, identity, deny list, deadlines, logging
or metrics. It handshakes as the proxy does (the same ``build_server_context``: client
certificate required, session cache and tickets on), relays one request at a time per
client connection over pooled keep-alive backend connections, and adds an
``X-Forwarded-Client-Cert: Hash=<leaf SHA-256>`` header. Not a product and not safe to
expose: ``benchmarks/bench.py`` runs it beside mtlsproxy and nginx (the "floor" column),
so every run says how far the proxy is from what its stack allows.

Three ways to find a message's end (``--mode``):

- ``min``: ``bytes.find`` of the blank line and a scan for ``Content-Length`` only; heads
  are forwarded verbatim. No chunked bodies, no validation: the least any HTTP relay does.
- ``httptools``: llhttp on both legs (through httptools; mtlsproxy/relay/h1.py reads
  with llhttp too, through the ``llhttp`` binding); heads are rebuilt from the parsed
  fields without hop-by-hop ``Connection``. The default.
- ``h11``: h11 on both legs, without anything else.

Bodies are read whole before they are forwarded (fine for the benchmark's small requests,
not for uploads). Usage::

    python benchmarks/bare_relay.py --listen 127.0.0.1:18446 --upstream 127.0.0.1:18080 \\
        --cert server.crt --key server.key --client-ca ca.crt [--mode httptools]
"""

from __future__ import annotations

import argparse
import functools
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL

from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream

try:
    import httptools
except ImportError:  # only --mode httptools needs it (the bench extra installs it)
    httptools = None
    PARSER_ERRORS: tuple[type[Exception], ...] = (h11.ProtocolError,)
else:
    PARSER_ERRORS = (h11.ProtocolError, httptools.HttpParserError)

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
RECEIVE = 65536
IDLE_SECONDS = 4.0  # pooled backend connections: under the backends' keep-alive timeout
MAX_IDLE = 64  # as nginx's `keepalive 64` in bench.py
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class Closed(Exception):
    """The peer closed (or broke the framing) in the middle of a message."""


# ---- min: bytes.find and Content-Length ---------------------------------------------


class MinLeg:
    """One side of the relay, framing with ``bytes.find`` and Content-Length only.

    A message is ``(head, body, keep_alive)``, the head without its blank line; ``open``
    says whether the connection may carry another exchange after the last message seen or
    sent (heads go out verbatim, so a client's ``Connection: close`` reaches the backend).
    """

    def __init__(self, stream: trio.abc.Stream, *, requests: bool) -> None:
        del requests  # the same framing both ways
        self.stream = stream
        self.buffer = bytearray()
        self.open = True

    async def receive(self) -> tuple[bytes, bytes, bool] | None:
        """The next message, or None when the peer closed between messages."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                return None
        head = bytes(self.buffer[:end])
        length = 0
        keep_alive = True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
            elif name == b"transfer-encoding":
                raise Closed("min mode does not do chunked bodies")
        start = end + 4
        while len(self.buffer) < start + length:
            if not await self._fill():
                raise Closed("EOF inside a body")
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        self.open = self.open and keep_alive
        return head, body, keep_alive

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(RECEIVE)
        if not data:
            if self.buffer:
                raise Closed("EOF inside a head")
            return False
        self.buffer += data
        return True

    async def send_request(self, request: tuple[bytes, bytes, bool], xfcc: bytes) -> None:
        head, body, self.open = request
        await self.stream.send_all(
            head + b"\r\nx-forwarded-client-cert: " + xfcc + b"\r\n\r\n" + body
        )

    async def send_response(self, response: tuple[bytes, bytes, bool]) -> None:
        head, body, _ = response
        await self.stream.send_all(head + b"\r\n\r\n" + body)


# ---- httptools: llhttp on both legs --------------------------------------------------


class _Message:
    __slots__ = ("body", "headers", "keep_alive", "method", "status", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = b""
        self.status = 0
        self.keep_alive = True


class HttptoolsLeg:
    """One side of the relay, parsed by httptools; complete messages queue in ``ready``."""

    def __init__(self, stream: trio.abc.Stream, *, requests: bool) -> None:
        self.stream = stream
        self.open = True
        self.requests = requests
        self.ready: deque[_Message] = deque()
        self.current = _Message()
        self.partial = False  # bytes of a message not complete yet
        kind = httptools.HttpRequestParser if requests else httptools.HttpResponseParser
        self.parser = kind(self)

    # The parser's callbacks (httptools joins a header's pieces; the URL may come in parts).
    def on_message_begin(self) -> None:
        self.current = _Message()
        self.partial = True

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        message = self.current
        message.keep_alive = self.parser.should_keep_alive()
        if self.requests:
            message.method = self.parser.get_method()
        else:
            message.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        self.ready.append(self.current)
        self.partial = False

    async def receive(self) -> _Message | None:
        while not self.ready:
            data = await self.stream.receive_some(RECEIVE)
            if not data:
                if self.partial:
                    raise Closed("EOF inside a message")
                return None
            self.parser.feed_data(data)
        message = self.ready.popleft()
        self.open = message.keep_alive
        return message

    async def send_request(self, request: _Message, xfcc: bytes) -> None:
        head = [request.method, b" ", request.url, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            lowered = name.lower()
            if lowered not in (b"connection", b"x-forwarded-client-cert"):
                head += (name, b": ", value, b"\r\n")
        head += (b"x-forwarded-client-cert: ", xfcc, b"\r\n\r\n", *request.body)
        await self.stream.send_all(b"".join(head))

    async def send_response(self, response: _Message) -> None:
        reason = REASONS.get(response.status, b"")
        head = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
        for name, value in response.headers:
            if name.lower() != b"connection":
                head += (name, b": ", value, b"\r\n")
        if not self.open:  # the client asked to close: say so, as h11 does
            head.append(b"connection: close\r\n")
        head += (b"\r\n", *response.body)
        await self.stream.send_all(b"".join(head))


# ---- h11 on both legs ----------------------------------------------------------------


class H11Leg:
    """One side of the relay, parsed and written by h11; a message is (event, body)."""

    def __init__(self, stream: trio.abc.Stream, *, requests: bool) -> None:
        self.stream = stream
        self.open = True
        self.conn = h11.Connection(h11.SERVER if requests else h11.CLIENT)

    async def receive(self) -> tuple[Any, bytes] | None:
        head = None
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(RECEIVE)
                if not data and head is None and not self.conn.trailing_data[0]:
                    return None
                self.conn.receive_data(data)  # b"": h11 raises if mid-message
            elif isinstance(event, h11.Request | h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_role is h11.CLIENT:  # a response: the exchange is over
                    self._next_cycle()
                return head, body
            else:  # ConnectionClosed, or something this relay does not do
                return None

    def _next_cycle(self) -> None:
        self.open = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        if self.open:
            self.conn.start_next_cycle()

    async def send_request(self, request: tuple[Any, bytes], xfcc: bytes) -> None:
        event, body = request
        headers = [
            (name, value)
            for name, value in event.headers
            if name not in (b"connection", b"x-forwarded-client-cert")
        ]
        headers.append((b"x-forwarded-client-cert", xfcc))
        data = self.conn.send(
            h11.Request(method=event.method, target=event.target, headers=headers)
        )
        if body:
            data += self.conn.send(h11.Data(data=body))
        await self.stream.send_all(data + self.conn.send(h11.EndOfMessage()))

    async def send_response(self, response: tuple[Any, bytes]) -> None:
        event, body = response
        headers = [(name, value) for name, value in event.headers if name != b"connection"]
        data = self.conn.send(
            h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
        )
        if body:
            data += self.conn.send(h11.Data(data=body))
        await self.stream.send_all(data + self.conn.send(h11.EndOfMessage()))
        self._next_cycle()


LEGS: dict[str, Any] = {
    "min": MinLeg,
    "httptools": HttptoolsLeg,
    "h11": H11Leg,
}


# ---- the relay -----------------------------------------------------------------------


class Pool:
    """Idle keep-alive backend connections, newest first; stale ones are closed."""

    def __init__(self, host: str, port: int, mode: str) -> None:
        self.host, self.port, self.mode = host, port, mode
        self.idle: list[tuple[float, Any]] = []

    async def acquire(self) -> Any:
        now = trio.current_time()
        while self.idle:
            since, leg = self.idle.pop()
            if now - since < IDLE_SECONDS:
                return leg
            leg.stream.socket.close()
        stream = await trio.open_tcp_stream(self.host, self.port)  # TCP_NODELAY is trio's default
        return LEGS[self.mode](stream, requests=False)

    def release(self, leg: Any) -> None:
        if leg.open and len(self.idle) < MAX_IDLE:
            self.idle.append((trio.current_time(), leg))
        else:
            leg.stream.socket.close()


async def relay(client: Any, pool: Pool, xfcc: bytes) -> None:
    """Exchanges on one client connection until it closes or asks to."""
    while client.open:
        request = await client.receive()
        if request is None:
            return
        upstream = await pool.acquire()
        response = None
        try:
            await upstream.send_request(request, xfcc)
            response = await upstream.receive()
        finally:
            if response is None:  # failed or closed mid-exchange: not reusable
                upstream.open = False
            pool.release(upstream)
        if response is None:
            raise Closed("the backend closed before answering")
        await client.send_response(response)


async def handle(tcp: trio.SocketStream, context: SSL.Context, pool: Pool) -> None:
    tls = TLSStream(tcp, context, server_side=True)
    try:
        await tls.do_handshake()
    except HandshakeError:
        return  # do_handshake closed the socket
    try:
        client = LEGS[pool.mode](tls, requests=True)
        await relay(client, pool, b"Hash=" + (tls.peer_sha256 or "").encode())
    except (Closed, ValueError, OSError, *PARSER_ERRORS, *STREAM_ERRORS):
        # A broken peer or backend ends this connection only, not the server (ValueError: a
        # bad Content-Length; OSError: the backend refused the connection).
        pass
    finally:
        await tls.aclose()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT (plain HTTP)")
    parser.add_argument("--cert", type=Path, required=True, help="server chain, PEM")
    parser.add_argument("--key", type=Path, required=True, help="server key, PEM")
    parser.add_argument("--client-ca", type=Path, required=True, help="trusted client CAs, PEM")
    parser.add_argument("--mode", choices=sorted(LEGS), default="httptools")
    args = parser.parse_args()
    if args.mode == "httptools" and httptools is None:
        parser.error("--mode httptools needs httptools: pip install -e '.[bench]'")
    context = build_server_context(
        cert_chain=x509.load_pem_x509_certificates(args.cert.read_bytes()),
        key=load_pem_private_key(args.key.read_bytes(), None),
        client_cas=x509.load_pem_x509_certificates(args.client_ca.read_bytes()),
        session_id_context=b"bare-relay",
    )
    pool = Pool(*args.upstream, args.mode)
    host, port = args.listen
    handler = functools.partial(handle, context=context, pool=pool)
    trio.run(functools.partial(trio.serve_tcp, handler, port, host=host))


if __name__ == "__main__":
    main()
