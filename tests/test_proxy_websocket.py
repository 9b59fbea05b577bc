"""WebSocket through the proxy: two independent clients, frames relayed, the proxy's closes."""

from __future__ import annotations

import gc
import ssl
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio_websocket
from proxy_env import read_request, route, serve_raw
from support import IssueFn, Pair
from test_proxy_identity import leaf_sha256
from websockets.sync.client import connect as ws_connect

from mtlsproxy import demo_backend
from mtlsproxy.relay.websocket import FrameError, FrameScanner, close_frame


@pytest.fixture(autouse=True)
def _collect_client_sockets() -> Iterator[None]:
    """trio-websocket's client leaves its socket unclosed when the far side closes the
    connection first (seen only with that client, never with `websockets`; the socket's
    remote end is the proxy's port, so it is the test client's). Collect it here, quietly,
    so the warning cannot surface under whichever unrelated test the collector runs in."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# --- the frame scanner (pure) ------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if masked:
        key = b"\x01\x02\x03\x04"
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def test_scanner_follows_frames_split_anywhere() -> None:
    stream = frame(1, b"hello") + frame(2, b"x" * 300) + frame(9, b"ping") + frame(2, b"y" * 70000)
    for cut in (1, 2, 3, 7, 100, 65536):
        scanner = FrameScanner(masked=False, max_message=None)
        for i in range(0, len(stream), cut):
            scanner.feed(stream[i : i + cut])
        assert scanner.at_boundary
        # Whole headers in one piece take a fast path, split ones the slow: same count.
        assert (scanner.messages, scanner.bytes) == (3, len(stream))


def test_scanner_limits_messages_across_fragments() -> None:
    scanner = FrameScanner(masked=True, max_message=1000)
    scanner.feed(frame(1, b"a" * 600, fin=False, masked=True))
    with pytest.raises(FrameError) as caught:
        scanner.feed(frame(0, b"a" * 600, masked=True))
    assert caught.value.code == 1009


@pytest.mark.parametrize(
    "bad",
    [frame(1, b"x", masked=False), frame(9, b"x" * 126, masked=True),
     frame(8, b"\x03\xe8", fin=False, masked=True), frame(0, b"x", masked=True),
     frame(3, b"x", masked=True)],
)  # fmt: skip
def test_scanner_refuses_protocol_errors(bad: bytes) -> None:
    with pytest.raises(FrameError) as caught:
        FrameScanner(masked=True, max_message=None).feed(bad)
    assert caught.value.code == 1002


def test_close_frames() -> None:
    assert close_frame(1008, "bye", masked=False) == b"\x88\x05\x03\xf0bye"
    masked = close_frame(1001, "x", masked=True)
    assert masked[:2] == b"\x88\x83"
    key = masked[2:6]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(masked[6:])) == b"\x03\xe9x"


# --- through the proxy -------------------------------------------------------------------


async def ws_env(make_env: Any, nursery: trio.Nursery, extra: str = "", tls: str = "") -> Any:
    server = await nursery.start(demo_backend.serve_websocket_echo, "127.0.0.1", 0)
    port = server.port
    routes = f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
websocket = true
{extra}
"""
    return await make_env(routes=routes, backends=0, tls=f'enforce_interval = "200ms"\n{tls}')


def client_context(env: Any, pair: Pair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(pair.crt, pair.key)
    return ctx


async def test_trio_websocket_client(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair
) -> None:
    env = await ws_env(make_env, nursery)
    url = f"wss://localhost:{env.port}/game"
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            url, ssl_context=client_context(env, client_pair), subprotocols=["game.v2", "game.v1"]
        ) as ws:
            assert ws.subprotocol == "game.v2"
            hello = msgspec.json.decode(await ws.get_message())
            (xfcc,) = hello["headers"]["x-forwarded-client-cert"]
            assert f"Hash={leaf_sha256(client_pair)}" in xfcc
            assert hello["headers"]["x-forwarded-proto"] == ["https"]
            await ws.send_message("text message")
            assert await ws.get_message() == "text message"
            big = bytes(range(256)) * 2000  # 512 KB binary, many frames on the wire
            await ws.send_message(big)
            assert await ws.get_message() == big
            await ws.send_message("close 4001 backend says bye")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4001
            assert closed.value.reason.reason == "backend says bye"


async def test_websockets_library(make_env: Any, nursery: trio.Nursery, client_pair: Pair) -> None:
    env = await ws_env(make_env, nursery)

    def talk() -> tuple[str, str, Any]:
        with ws_connect(
            f"wss://localhost:{env.port}/chat",
            ssl=client_context(env, client_pair),
            subprotocols=["chat"],  # type: ignore[list-item]
            open_timeout=10,
            close_timeout=5,
        ) as ws:
            hello = ws.recv(timeout=10)
            ws.send(["frag", "mented ", "message"])  # one message in three fragments
            echoed = ws.recv(timeout=10)
            ws.close(code=4002, reason="client done")
            return str(hello), str(echoed), ws.subprotocol

    hello, echoed, subprotocol = await trio.to_thread.run_sync(talk)
    assert "x-forwarded-client-cert" in hello
    assert echoed == "fragmented message"
    assert subprotocol == "chat"


async def test_messages_over_the_limit_close_with_1009(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair
) -> None:
    env = await ws_env(make_env, nursery, 'websocket_max_message = "64KiB"')
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, client_pair)
        ) as ws:
            await ws.get_message()
            await ws.send_message(b"x" * 60000)  # under the limit
            assert len(await ws.get_message()) == 60000
            await ws.send_message(b"x" * 70000)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009


async def test_an_expiring_certificate_gets_1008(
    make_env: Any, nursery: trio.Nursery, issue: IssueFn
) -> None:
    env = await ws_env(make_env, nursery)
    short = issue("client", "short-lived", ttl=timedelta(seconds=2))
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, short)
        ) as ws:
            await ws.get_message()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1008
    labels = {"listener": "127.0.0.1:0", "reason": "expired"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_a_backend_refusing_the_upgrade_gives_its_status(
    make_env: Any, nursery: trio.Nursery
) -> None:
    async def refuses(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")

    port = await serve_raw(nursery, refuses)
    env = await make_env(routes=route([port], "websocket = true"), backends=0)
    answer = await env.raw(UPGRADE, read_until_close=False)  # keep-alive goes on
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b" 101 " not in answer


async def test_backend_down_is_502_before_any_101(
    make_env: Any, client_pair: Pair, tmp_path: Path
) -> None:
    env = await make_env(
        routes="""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:9"]
websocket = true
""",
        backends=0,
    )
    answer = await env.raw(UPGRADE)
    assert answer.startswith(b"HTTP/1.1 502 ")


async def test_without_websocket_on_the_route_the_upgrade_is_dropped(
    make_env: Any, nursery: trio.Nursery
) -> None:
    heads: list[bytes] = []

    async def records(stream: trio.SocketStream) -> None:
        heads.append(await read_request(stream))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    port = await serve_raw(nursery, records)
    env = await make_env(routes=route([port]), backends=0)  # no websocket = true
    answer = await env.raw(UPGRADE, read_until_close=False)  # keep-alive goes on
    assert answer.startswith(b"HTTP/1.1 200 ")
    (head,) = heads
    assert b"upgrade" not in head.lower()  # neither Upgrade nor Connection: Upgrade went on


async def test_client_close_codes_reach_the_backend(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair
) -> None:
    seen: list[tuple[int, str]] = []
    done = trio.Event()

    async def records_close(request: Any) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            seen.append((closed.reason.code, closed.reason.reason))
            done.set()

    server = await nursery.start(
        trio_websocket.serve_websocket, records_close, "127.0.0.1", 0, None
    )
    env = await make_env(routes=route([server.port], "websocket = true"), backends=0)
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, client_pair)
        ) as ws:
            await ws.aclose(4003, "player quit")
        await done.wait()
    assert seen == [(4003, "player quit")]


async def test_pings_keep_an_idle_session_alive_and_silence_closes_it(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair
) -> None:
    env = await ws_env(make_env, nursery, 'websocket_idle_timeout = "1s"')
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, client_pair)
        ) as ws:
            await ws.get_message()
            for _ in range(6):  # 1.8 s of pings only: longer than the idle timeout
                await ws.ping()
                await trio.sleep(0.3)
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
            start = trio.current_time()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()  # silence: the proxy closes it
            assert closed.value.reason.code == 1001
            assert 0.5 < trio.current_time() - start < 5


async def test_many_concurrent_websocket_sessions(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair
) -> None:
    env = await ws_env(make_env, nursery)
    ctx = client_context(env, client_pair)
    echoed: list[str] = []

    async def session(n: int) -> None:
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=ctx
        ) as ws:
            await ws.get_message()
            for i in range(5):
                await ws.send_message(f"{n}:{i}")
                echoed.append(await ws.get_message())

    with trio.fail_after(60):
        async with trio.open_nursery() as sessions:
            for n in range(30):
                sessions.start_soon(session, n)
    assert sorted(echoed) == sorted(f"{n}:{i}" for n in range(30) for i in range(5))


async def test_a_denied_identity_gets_1008(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair, tmp_path: Path
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    env = await ws_env(make_env, nursery, tls=f'deny = "{deny}"')
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, client_pair)
        ) as ws:
            await ws.get_message()
            deny.write_text(f"sha256:{leaf_sha256(client_pair)}\n")
            assert env.proxy.reload("admin").result == "swapped"
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1008
            assert "denied" in (closed.value.reason.reason or "")


async def test_a_websocket_survives_a_reload(
    make_env: Any, nursery: trio.Nursery, client_pair: Pair, tmp_path: Path
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    env = await ws_env(make_env, nursery, tls=f'deny = "{deny}"')
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{env.port}/", ssl_context=client_context(env, client_pair)
        ) as ws:
            await ws.get_message()
            deny.write_text("cn:somebody-else\n")
            assert env.proxy.reload("admin").result == "swapped"
            await trio.sleep(0.5)  # enforcer passes
            await ws.send_message("after the reload")
            assert await ws.get_message() == "after the reload"
