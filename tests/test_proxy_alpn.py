"""ALPN on listeners: a tcp listener with ``alpn = ["h2"]`` carries gRPC through at L4.

gRPC clients refuse a server that does not select h2 in ALPN. A tcp listener with an
``alpn`` list selects from it (server preference), refuses a client that offers none of
it (no_application_protocol), tells a PROXY v2 backend what was agreed (PP2_TYPE_ALPN),
and relays the bytes: behind it, a gRPC server speaking h2c. Real clients: grpcio and
openssl s_client; the gRPC server is grpcio's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
import trio
from support import Pair
from test_proxy_tcp import echo_port, read_line, start_tcp_proxy  # noqa: F401 - fixture

from mtlsproxy import config, pem
from mtlsproxy.errors import ConfigError
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.server.proxy import Proxy
from mtlsproxy.tls.context import build_client_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream

# ---- a gRPC backend (h2c), with no generated code: methods over raw bytes ----------------


def _say(request: bytes, context: Any) -> bytes:
    if request == b"forbidden":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "players may not do that")
    if request == b"slow":
        time.sleep(3)  # the backend is slow; the client's deadline is shorter
    return b"echo:" + request


def _count(request: bytes, _context: Any) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def _sum(requests: Iterator[bytes], _context: Any) -> bytes:
    return str(sum(int(r) for r in requests)).encode()


@pytest.fixture
def grpc_backend() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "game.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(_say),
                    "Count": grpc.unary_stream_rpc_method_handler(_count),
                    "Sum": grpc.stream_unary_rpc_method_handler(_sum),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


async def start_proxy(
    nursery: trio.Nursery, folder: Path, ca: CertificateAuthority, server: Pair, backend: int,
    alpn: str | None,
) -> int:  # fmt: skip
    text = f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca.folder / "ca.crt"}"

[admin]
listen = "127.0.0.1:0"

[log]
access = "{folder / "access.log"}"

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:{backend}"]
{f"alpn = {alpn}" if alpn else ""}
"""
    path = folder / "grpc.toml"
    path.write_text(text)
    proxy = Proxy(config.load(path), str(path))
    bound = await nursery.start(proxy.run)
    port: int = bound[0].address.port
    return port


def channel(port: int, ca: CertificateAuthority, pair: Pair) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca.folder / "ca.crt").read_bytes(),
        private_key=pair.key.read_bytes(),
        certificate_chain=pair.crt.read_bytes(),
    )
    return grpc.secure_channel(
        f"localhost:{port}", credentials, options=[("grpc.enable_http_proxy", 0)]
    )


def grpc_calls(port: int, ca: CertificateAuthority, pair: Pair) -> None:
    """The calls every gRPC path must carry: each RPC shape, an error status with its
    details, a deadline, and the channel living on after both."""
    with channel(port, ca, pair) as ch:
        say = ch.unary_unary("/game.Echo/Say")
        assert say(b"hello", timeout=10) == b"echo:hello"
        count = ch.unary_stream("/game.Echo/Count")
        assert list(count(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
        total = ch.stream_unary("/game.Echo/Sum")
        assert total(iter([b"1", b"2", b"39"]), timeout=10) == b"42"
        with pytest.raises(grpc.RpcError) as denied:
            say(b"forbidden", timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details() == "players may not do that"  # grpc-message, intact
        with pytest.raises(grpc.RpcError) as late:
            say(b"slow", timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert say(b"after", timeout=10) == b"echo:after"  # the connection lives on


def test_grpc_through_a_tcp_listener_that_selects_h2(
    grpc_backend: int, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    client_pair: Pair,
) -> None:  # fmt: skip
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start_proxy(nursery, tmp_path, ca, server_pair, grpc_backend, '["h2"]')
            await trio.to_thread.run_sync(grpc_calls, port, ca, client_pair)
            with trio.fail_after(10):  # the session's line, once the channel has closed
                while not (lines := (tmp_path / "access.log").read_text().splitlines()):
                    await trio.sleep(0.05)
            record = msgspec.json.decode(lines[0])
            assert record["kind"] == "tcp" and record["alpn"] == "h2"
            assert record["cn"] == "player-1" and record["bytes_in"] > 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_grpc_is_refused_by_a_tcp_listener_without_alpn(
    grpc_backend: int, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    client_pair: Pair,
) -> None:  # fmt: skip
    """Why the key exists: a gRPC client does not speak to a server that selects no h2."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start_proxy(nursery, tmp_path, ca, server_pair, grpc_backend, None)
            await trio.to_thread.run_sync(call, port)
            nursery.cancel_scope.cancel()

    def call(port: int) -> None:
        with channel(port, ca, client_pair) as ch, pytest.raises(grpc.RpcError) as refused:
            ch.unary_unary("/game.Echo/Say")(b"hello", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    trio.run(main)


async def connect(port: int, ca: CertificateAuthority, pair: Pair, alpn: list[bytes]) -> TLSStream:
    ctx = build_client_context(
        server_cas=[ca.root],
        cert_chain=pem.load_certificates(pair.crt.read_bytes(), pair.crt),
        key=pem.load_private_key(pair.key.read_bytes(), pair.key),
        alpn=alpn,
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TLSStream(tcp, ctx, server_side=False, server_hostname="localhost")
    await tls.do_handshake(timeout=10)
    return tls


async def test_the_agreed_protocol_is_the_servers_preference_and_reaches_the_backend(
    nursery: trio.Nursery, echo_port: int, tmp_path: Path, ca: CertificateAuthority,  # noqa: F811
    server_pair: Pair, client_pair: Pair,
) -> None:  # fmt: skip
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair,
                                    echo_port, extra='alpn = ["h2", "game/1"]')  # fmt: skip
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair, [b"game/1", b"h2"])
        assert tls.alpn_protocol == b"h2"  # ours first, whatever the client's order
        greeting = msgspec.json.decode(await read_line(tls))
        assert greeting["alpn"] == "h2" and greeting["cn"] == "player-1"  # PP2_TYPE_ALPN
        await tls.aclose()
        game = await connect(port, ca, client_pair, [b"game/1"])
        assert game.alpn_protocol == b"game/1"
        await game.aclose()
        with pytest.raises(HandshakeError):
            await connect(port, ca, client_pair, [b"http/1.1"])


async def test_a_client_offering_none_of_the_list_gets_no_application_protocol(
    nursery: trio.Nursery, echo_port: int, tmp_path: Path, ca: CertificateAuthority,  # noqa: F811
    server_pair: Pair, client_pair: Pair,
) -> None:  # fmt: skip
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair,
                                    echo_port, extra='alpn = ["h2"]')  # fmt: skip
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-CAfile", str(ca.folder / "ca.crt"), "-cert", str(client_pair.crt),
               "-cert_chain", str(client_pair.crt), "-key", str(client_pair.key)]  # fmt: skip
    refused = await trio.run_process([*command, "-alpn", "http/1.1"], stdin=b"", capture_stdout=True,
                                     capture_stderr=True, check=False)  # fmt: skip
    assert refused.returncode != 0
    assert b"no application protocol" in refused.stderr, refused.stderr
    agreed = await trio.run_process([*command, "-alpn", "h2"], stdin=b"", capture_stdout=True,
                                    capture_stderr=True, check=False)  # fmt: skip
    assert b"ALPN protocol: h2" in agreed.stdout


def load_listener(folder: Path, server: Pair, ca: CertificateAuthority, listener: str) -> Any:
    path = folder / "c.toml"
    path.write_text(f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca.folder / "ca.crt"}"

[[listeners]]
listen = "127.0.0.1:0"
{listener}
""")
    return config.load(path)


@pytest.mark.parametrize(
    ("mode", "alpn", "error"),
    [
        ("http", '["h2", "spdy/3.1"]', "an http listener serves \\['h2', 'http/1.1'\\]"),
        ("tcp", "[]", "alpn is a list of protocol names"),
        ("tcp", '["h2", "h2"]', "lists a protocol twice"),
        ("tcp", '["with space"]', "1 to 255 printable ASCII bytes"),
    ],
)
def test_alpn_mistakes_are_named_at_load(
    tmp_path: Path, server_pair: Pair, ca: CertificateAuthority, mode: str, alpn: str, error: str
) -> None:
    where = 'backends = ["127.0.0.1:9"]' if mode == "tcp" else HTTP_ROUTE
    with pytest.raises(ConfigError, match=error) as failed:
        load_listener(tmp_path, server_pair, ca, f'mode = "{mode}"\nalpn = {alpn}\n{where}')
    assert "listeners[0]" in str(failed.value)


HTTP_ROUTE = '[[listeners.routes]]\npath_prefix = "/"\nbackends = ["127.0.0.1:9"]'


def test_http_listeners_offer_h2_then_http_1_1_unless_told(
    tmp_path: Path, server_pair: Pair, ca: CertificateAuthority
) -> None:
    loaded = load_listener(tmp_path, server_pair, ca, HTTP_ROUTE)
    assert loaded.listeners[0].alpn_protocols == (b"h2", b"http/1.1")
    loaded = load_listener(tmp_path, server_pair, ca, f'alpn = ["http/1.1"]\n{HTTP_ROUTE}')
    assert loaded.listeners[0].alpn_protocols == (b"http/1.1",)
