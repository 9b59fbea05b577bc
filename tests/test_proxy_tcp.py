"""Raw TCP listeners with PROXY protocol v2, through real TLS."""

from __future__ import annotations

import shutil
import socket
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from proxy_env import serve_raw
from support import IssueFn, Pair
from test_proxy_identity import leaf_sha256

from mtlsproxy import config, demo_backend, pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.relay import proxy_protocol as pp
from mtlsproxy.server.proxy import Proxy
from mtlsproxy.tls.context import build_client_context
from mtlsproxy.tls.engine import TLSStream

# --- the byte layout, against the specification ----------------------------------------


def test_ipv4_header_byte_for_byte() -> None:
    header = pp.encode(("192.0.2.1", 51000), ("198.51.100.7", 7777))
    assert header == (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # signature
        b"\x21"  # version 2, PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x0c"  # 12 bytes follow
        b"\xc0\x00\x02\x01" b"\xc6\x33\x64\x07"  # source, destination address
        b"\xc7\x38" b"\x1e\x61"  # source port 51000, destination port 7777
    )  # fmt: skip


def test_ipv6_and_mixed_families() -> None:
    six = pp.encode(("2001:db8::1", 1), ("2001:db8::2", 2))
    assert six[13] == 0x21 and struct.unpack("!H", six[14:16])[0] == 36
    mixed = pp.encode(("192.0.2.1", 1), ("::1", 2))
    assert mixed[13] == 0x21
    assert mixed[16:32] == b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1])  # IPv4-mapped


def test_tlvs_byte_for_byte() -> None:
    ssl_tlv = pp.ssl_tlv(tls_version="TLSv1.3", cn="p1", resumed=False)
    assert ssl_tlv == (
        b"\x20"
        + struct.pack("!H", 1 + 4 + 3 + 7 + 3 + 2)  # PP2_TYPE_SSL, length
        + b"\x07"  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        + b"\x00\x00\x00\x00"  # verify: 0 = verified
        + b"\x21\x00\x07TLSv1.3"  # PP2_SUBTYPE_SSL_VERSION
        + b"\x22\x00\x02p1"  # PP2_SUBTYPE_SSL_CN
    )
    resumed = pp.ssl_tlv(tls_version="TLSv1.3", cn=None, resumed=True)
    assert resumed[3] == 0x05  # the certificate was shown for the session, not this connection
    header = pp.encode(("127.0.0.1", 5), ("127.0.0.1", 6), ssl_tlv + pp.tlv(0xE1, b"sha256:ab"))
    parsed, rest = pp.parse(header + b"payload") or (None, b"")
    assert parsed is not None and rest == b"payload"
    assert parsed.ssl_verify == 0 and parsed.ssl_sub[pp.PP2_SUBTYPE_SSL_CN] == b"p1"
    assert parsed.tlvs[0xE1] == b"sha256:ab"


def test_parse_waits_for_more_and_refuses_garbage() -> None:
    header = pp.encode(("127.0.0.1", 5), ("127.0.0.1", 6))
    assert pp.parse(header[:10]) is None
    assert pp.parse(header[:-1]) is None
    with pytest.raises(ValueError):
        pp.parse(b"GET / HTTP/1.1\r\n\r\n")


# --- through the proxy ------------------------------------------------------------------


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    """The demo backend's TCP echo (reads the PROXY header, answers the identity)."""
    listeners = await nursery.start(demo_backend.serve_tcp_echo, "127.0.0.1", 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start_tcp_proxy(
    nursery: trio.Nursery,
    folder: Path,
    ca_bundle: Path,
    server: Pair,
    backend: int,
    extra: str = "",
    tls: str = "",
) -> tuple[Proxy, int]:
    text = f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca_bundle}"
enforce_interval = "200ms"
reload_interval = "200ms"
{tls}

[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:{backend}"]
proxy_protocol = "v2"
{extra}
"""
    path = folder / "tcp.toml"
    path.write_text(text)
    proxy = Proxy(config.load(path), str(path))
    bound = await nursery.start(proxy.run)
    return proxy, bound[0].address.port


async def connect(port: int, ca: CertificateAuthority, pair: Pair) -> TLSStream:
    ctx = build_client_context(
        server_cas=[ca.root],
        cert_chain=pem.load_certificates(pair.crt.read_bytes(), pair.crt),
        key=pem.load_private_key(pair.key.read_bytes(), pair.key),
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TLSStream(tcp, ctx, server_side=False, server_hostname="localhost")
    await tls.do_handshake(timeout=10)
    return tls


async def read_line(stream: Any) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    return data


async def test_echo_with_the_identity_in_proxy_v2(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    backend = echo_port
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend)
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair)
        greeting = msgspec.json.decode(await read_line(tls))
        assert greeting["proxy_protocol"] == "v2"
        assert greeting["cn"] == "player-1"
        assert greeting["spiffe_id"] == "spiffe://game.example/player/1"
        assert greeting["fingerprint"] == f"sha256:{leaf_sha256(client_pair)}"
        assert greeting["verified"] and greeting["tls_version"] == "TLSv1.3"
        assert greeting["client"].startswith("127.0.0.1:")
        await tls.send_all(b"ping\n")
        assert await read_line(tls) == b"ping\n"
        await tls.aclose()


async def test_the_header_a_backend_receives_byte_for_byte(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    received = trio.Event()
    captured: list[bytes] = []

    async def capture(stream: trio.SocketStream) -> None:
        data = b""
        while b"HELLO" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        captured.append(data)
        received.set()

    backend = await serve_raw(nursery, capture)
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend)
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair)
        await tls.send_all(b"HELLO")
        await received.wait()
        client_port = tls.local_address[1]
        await tls.aclose()
    sha = leaf_sha256(client_pair).encode()
    spiffe = b"spiffe://game.example/player/1"
    ssl_value = b"\x07\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3" + b"\x22\x00\x08player-1"
    tlvs = (
        b"\x20" + struct.pack("!H", len(ssl_value)) + ssl_value
        + b"\xe0" + struct.pack("!H", len(spiffe)) + spiffe
        + b"\xe1" + struct.pack("!H", 7 + len(sha)) + b"sha256:" + sha
    )  # fmt: skip
    addresses = socket.inet_aton("127.0.0.1") * 2 + struct.pack("!HH", client_port, port)
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(addresses) + len(tlvs))
        + addresses + tlvs + b"HELLO"
    )  # fmt: skip
    assert captured == [expected]


async def test_half_close_both_ways(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    async def answers_after_eof(stream: trio.SocketStream) -> None:
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        _, request = pp.parse(data) or (None, b"")
        await stream.send_all(b"got " + request)  # the client's side is closed; ours is not
        await stream.send_eof()

    backend = await serve_raw(nursery, answers_after_eof)
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend)
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair)
        await tls.send_all(b"question")
        await tls.send_eof()  # close_notify: "I am done sending"
        answer = b""
        while chunk := await tls.receive_some(65536):
            answer += chunk
        assert answer == b"got question"
        await tls.aclose()


async def test_idle_sessions_close(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    backend = echo_port
    _, port = await start_tcp_proxy(
        nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend, 'idle_timeout = "500ms"'
    )
    with trio.fail_after(10):
        tls = await connect(port, ca, client_pair)
        await read_line(tls)
        start = trio.current_time()
        while await tls.receive_some(65536):
            pass
        assert 0.3 < trio.current_time() - start < 5
        await tls.aclose()


async def test_allow_rules_on_a_tcp_listener(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    issue: IssueFn,
) -> None:
    backend = echo_port
    proxy, port = await start_tcp_proxy(
        nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend,
        '[[listeners.allow]]\nou = "game-servers"',
    )  # fmt: skip
    allowed = issue("client", "srv", ous=["game-servers"])
    other = issue("client", "player")
    with trio.fail_after(15):
        good = await connect(port, ca, allowed)
        assert b"game-servers" not in await read_line(good)  # the greeting arrives
        await good.aclose()
        refused = await connect(port, ca, other)
        assert await refused.receive_some(100) == b""  # closed, nothing relayed
        await refused.aclose()
    labels = {"listener": "127.0.0.1:0", "result": "denied", "resumed": "false"}
    assert proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


async def test_a_denied_identity_loses_its_tcp_session(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    backend = echo_port
    shutil.copy(ca.folder / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "deny.txt").write_text("")
    proxy, port = await start_tcp_proxy(
        nursery, tmp_path, tmp_path / "ca.crt", server_pair, backend,
        tls=f'deny = "{tmp_path / "deny.txt"}"',
    )  # fmt: skip
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair)
        await read_line(tls)
        write_atomic(tmp_path / "deny.txt", f"sha256:{leaf_sha256(client_pair)}\n".encode())
        while await tls.receive_some(65536):  # the proxy closes the session
            pass
        await tls.aclose()
    labels = {"listener": "127.0.0.1:0", "reason": "denied"}
    assert proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1


async def test_many_concurrent_sessions(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    backend = echo_port
    _, port = await start_tcp_proxy(nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend)
    results: list[bytes] = []

    async def session(n: int) -> None:
        tls = await connect(port, ca, client_pair)
        await read_line(tls)
        payload = f"session {n} ".encode() * 1000
        await tls.send_all(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += await tls.receive_some(65536)
        results.append(echoed)
        await tls.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as sessions:
            for n in range(50):
                sessions.start_soon(session, n)
    assert len(results) == 50
    assert all(r.startswith(b"session ") for r in results)


async def test_a_tcp_session_survives_a_reload(
    nursery: trio.Nursery,
    echo_port: int,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    backend = echo_port
    (tmp_path / "deny.txt").write_text("")
    proxy, port = await start_tcp_proxy(
        nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend,
        tls=f'deny = "{tmp_path / "deny.txt"}"',
    )  # fmt: skip
    with trio.fail_after(15):
        tls = await connect(port, ca, client_pair)
        await read_line(tls)
        (tmp_path / "deny.txt").write_text("cn:somebody-else\n")
        assert proxy.reload("admin").result == "swapped"
        await trio.sleep(0.5)  # enforcer passes
        await tls.send_all(b"still here\n")
        assert await read_line(tls) == b"still here\n"
        await tls.aclose()
