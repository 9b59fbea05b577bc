"""The demo game/API backend that ``mtlsproxy quickstart`` starts behind the proxy.

Plain HTTP/1.1 on trio + h11, meant to sit on loopback behind the proxy. Every request
gets a JSON answer saying what arrived: method, path, the identity headers the proxy
added (each as a list of every value received), and, for a body, its length and SHA-256
(so a test can check a 1 GiB upload arrived whole without the backend keeping it).
``GET /bytes/N`` streams N bytes back.

The WebSocket echo (``serve_websocket_echo``, trio-websocket) sends one JSON message with
the identity headers it received, accepts the first subprotocol offered, echoes every
message, and on the message ``close <code> <reason>`` closes with that code.

The TCP echo (``serve_tcp_echo``) reads the PROXY protocol v2 header the proxy sends on a
``proxy_protocol = "v2"`` listener, answers one JSON line with the identity it carried
(client address, CN, SPIFFE id, fingerprint, TLS version, ALPN), then echoes every byte back,
and passes a half-close on.

It trusts the identity headers because only the proxy can reach it: that is the whole
deployment model, and why it must never listen on a public address.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from typing import Any

import h11
import msgspec
import trio

from mtlsproxy.errors import UsageError
from mtlsproxy.relay import proxy_protocol

log = logging.getLogger("mtlsproxy.demo_backend")

ECHOED_HEADERS = (
    "host",
    "x-forwarded-client-cert",
    "client-cert",  # RFC 9440, on routes with identity_headers = [..., "client-cert"]
    "client-cert-chain",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "content-type",
)
_CHUNK = 64 * 1024
_MAX_DOWNLOAD = 64 * 2**30


async def serve(host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` reports the bound listeners."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(_handle, listeners)


async def _handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            with trio.move_on_after(60) as idle:
                request = await _next_event(conn, stream)
            if idle.cancelled_caught or not isinstance(request, h11.Request):
                return
            await _answer(conn, stream, request)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("demo backend: connection ended: %s", exc)
    finally:
        await stream.aclose()


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_CHUNK))
            continue
        return event


async def _answer(conn: h11.Connection, stream: trio.SocketStream, request: h11.Request) -> None:
    async def send(event: Any) -> None:
        await stream.send_all(conn.send(event) or b"")

    digest, size = hashlib.sha256(), 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            digest.update(event.data)
            size += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            return
    path = request.target.decode("ascii", "replace")
    if request.method == b"GET" and path.startswith("/bytes/"):
        count = int(path.removeprefix("/bytes/")) if path[7:].isdigit() else -1
        if 0 <= count <= _MAX_DOWNLOAD:
            await send(h11.Response(status_code=200, headers=[
                ("content-type", "application/octet-stream"), ("content-length", str(count))
            ]))  # fmt: skip
            block = b"x" * _CHUNK
            while count:
                piece = block[: min(count, _CHUNK)]
                await send(h11.Data(data=piece))
                count -= len(piece)
            await send(h11.EndOfMessage())
            return
    # Every value of a repeated header is listed: a second, smuggled XFCC must show.
    seen: dict[str, list[str]] = {}
    for name, value in request.headers:
        seen.setdefault(name.decode(), []).append(value.decode("latin-1"))
    body = msgspec.json.encode(
        {
            "method": request.method.decode(),
            "path": path,
            "headers": {name: seen[name] for name in ECHOED_HEADERS if name in seen},
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )
    await send(h11.Response(status_code=200, headers=[
        ("content-type", "application/json"), ("content-length", str(len(body)))
    ]))  # fmt: skip
    if request.method != b"HEAD":
        await send(h11.Data(data=body))
    await send(h11.EndOfMessage())


async def serve_tcp_echo(
    host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(_echo, listeners)


async def _echo(stream: trio.SocketStream) -> None:
    try:
        greeting, rest = await _read_proxy_header(stream)
        await stream.send_all(msgspec.json.encode(greeting) + b"\n" + rest)
        while data := await stream.receive_some(_CHUNK):
            await stream.send_all(data)
        await stream.send_eof()
        with trio.move_on_after(5):  # let the proxy close its side first
            await stream.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("demo tcp echo: connection ended: %s", exc)
    finally:
        await stream.aclose()


async def _read_proxy_header(stream: trio.SocketStream) -> tuple[dict[str, Any], bytes]:
    buffer = b""
    with trio.move_on_after(10):
        while True:
            try:
                parsed = proxy_protocol.parse(buffer)
            except ValueError:
                return {"proxy_protocol": None}, buffer  # a direct client: echo it all
            if parsed is not None:
                header, rest = parsed
                ssl = header.ssl_sub
                return {
                    "proxy_protocol": "v2",
                    "client": f"{header.source[0]}:{header.source[1]}",
                    "cn": ssl.get(proxy_protocol.PP2_SUBTYPE_SSL_CN, b"").decode() or None,
                    "tls_version": ssl.get(proxy_protocol.PP2_SUBTYPE_SSL_VERSION, b"").decode(),
                    "verified": header.ssl_verify == 0,
                    "spiffe_id": header.tlvs.get(proxy_protocol.PP2_TYPE_SPIFFE_ID, b"").decode()
                    or None,
                    "fingerprint": header.tlvs.get(
                        proxy_protocol.PP2_TYPE_FINGERPRINT, b""
                    ).decode(),
                    "alpn": header.tlvs.get(proxy_protocol.PP2_TYPE_ALPN, b"").decode() or None,
                }, rest
            data = await stream.receive_some(_CHUNK)
            if not data:
                return {"proxy_protocol": None}, buffer
            buffer += data
    return {"proxy_protocol": None}, buffer


async def serve_websocket_echo(
    host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    await websocket_library().serve_websocket(
        _websocket_echo, host, port, ssl_context=None, task_status=task_status
    )


def websocket_library() -> Any:
    """trio-websocket, which only the demo's WebSocket echo needs (the ``demo`` extra): the
    proxy relays WebSocket frames itself, so ``pip install mtlsproxy`` leaves it out."""
    try:
        import trio_websocket  # noqa: PLC0415 - optional: the demo extra
    except ImportError as exc:
        raise UsageError(
            "the demo backend's WebSocket echo needs trio-websocket, which is not installed:"
            " pip install 'mtlsproxy[demo]'"
        ) from exc
    return trio_websocket


async def _websocket_echo(request: Any) -> None:
    closed = websocket_library().ConnectionClosed
    offered = request.proposed_subprotocols
    ws = await request.accept(subprotocol=offered[0] if offered else None)
    seen: dict[str, list[str]] = {}
    for name, value in request.headers:
        seen.setdefault(name.decode().lower(), []).append(value.decode("latin-1"))
    hello = {
        "headers": {k: seen[k] for k in ECHOED_HEADERS if k in seen},
        "subprotocol": ws.subprotocol,
    }
    try:
        await ws.send_message(msgspec.json.encode(hello).decode())
        while True:
            message = await ws.get_message()
            if isinstance(message, str) and message.startswith("close "):
                _, code, reason = [*message.split(" ", 2), ""][:3]
                await ws.aclose(int(code), reason)
                return
            await ws.send_message(message)
    except closed:
        return


async def serve_all(
    host: str,
    http_port: int = 8080,
    tcp_port: int = 8081,
    ws_port: int = 8082,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """The three demo services at once (``mtlsproxy demo-backend``)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, host, http_port)
        await nursery.start(serve_tcp_echo, host, tcp_port)
        await nursery.start(serve_websocket_echo, host, ws_port)
        log.info(
            "demo backend: HTTP on %s:%d, TCP echo on %s:%d, WebSocket echo on %s:%d",
            host, http_port, host, tcp_port, host, ws_port,
        )  # fmt: skip
        task_status.started()


def run(host: str, http_port: int, tcp_port: int, ws_port: int) -> None:
    """Serve until SIGTERM or SIGINT."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_all, host, http_port, tcp_port, ws_port)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
