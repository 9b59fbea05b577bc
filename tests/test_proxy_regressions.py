"""Regressions found by review: each test failed before its fix."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import requests
import trio
from proxy_env import CLIENT_TIMEOUT, parse_responses, read_request, route, serve_raw, write_config
from support import MTLSPROXY, IssueFn, Pair
from test_proxy_identity import leaf_sha256
from test_proxy_relay import CountingBackend
from test_proxy_tcp import connect, start_tcp_proxy

from mtlsproxy.address import Address
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.relay import proxy_protocol as pp
from mtlsproxy.relay.h1 import PAUSED
from mtlsproxy.server.upstream import Target, Upstream, UpstreamPool


async def test_a_tls_route_never_gets_a_pooled_plaintext_connection(
    make_env, client_pair: Pair
) -> None:
    routes = f"""[[listeners.routes]]
path_prefix = "/plain"
backends = ["127.0.0.1:{{b0}}"]

[[listeners.routes]]
path_prefix = "/tls"
backends = ["127.0.0.1:{{b0}}"]
tls = true
tls_cert = "{client_pair.crt}"
tls_key = "{client_pair.key}"
"""
    env = await make_env(routes=routes)  # the demo backend speaks plaintext only
    assert (await env.request("GET", "/plain")).status_code == 200  # leaves a pooled connection
    assert (await env.request("GET", "/tls")).status_code == 502  # TLS fails; never cleartext
    assert (await env.request("GET", "/plain")).status_code == 200  # TLS failure marks only TLS


class DiesOnReuse:
    """Answers the first request of each connection, then closes it on the second."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        first = True
        while head := await read_request(stream):
            self.requests.append(head.split(b"\r\n")[0])
            if not first:
                await stream.aclose()
                return
            first = False
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def test_a_stale_pooled_connection_is_retried_for_idempotent_requests(
    make_env, nursery: trio.Nursery
) -> None:
    backend = DiesOnReuse()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    assert (await env.request("GET", "/1")).status_code == 200
    assert (await env.request("GET", "/2")).status_code == 200  # retried on a new connection
    assert backend.requests == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1", b"GET /2 HTTP/1.1"]


async def test_a_non_idempotent_request_is_never_replayed(make_env, nursery: trio.Nursery) -> None:
    backend = DiesOnReuse()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    assert (await env.request("GET", "/1")).status_code == 200
    assert (await env.request("POST", "/charge")).status_code == 502
    assert backend.requests.count(b"POST /charge HTTP/1.1") == 1


async def test_100_continue_and_an_early_answer_do_not_race(
    make_env, nursery: trio.Nursery
) -> None:
    async def refuses_at_once(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep(0.3)

    port = await serve_raw(nursery, refuses_at_once)
    env = await make_env(routes=route([port]), backends=0)
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    def attempt() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            data = b""
            while b"401" not in data and (chunk := tls.recv(65536)):
                data += chunk
            return data

    for _ in range(20):
        assert b"HTTP/1.1 401" in await trio.to_thread.run_sync(attempt)


async def test_underscore_spellings_of_owned_headers_are_dropped(
    make_env, nursery: trio.Nursery
) -> None:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0)
    answer = await env.raw(
        b"GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_Client_Cert: Hash=forged\r\n"
        b"x_forwarded_for: 6.6.6.6\r\nX_Custom_Header: kept\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    (head,) = backend.heads
    assert b"forged" not in head and b"6.6.6.6" not in head
    assert b"X_Custom_Header: kept" in head


def test_liveness_check_works_above_fd_1023() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    a, b = socket.socketpair()
    high = 1500
    try:
        os.dup2(a.fileno(), high)
        up = Upstream(Target(Address("127.0.0.1", 1)), stream=None, fileno=high)  # type: ignore[arg-type]
        assert up.looks_alive()
        b.close()
        assert not up.looks_alive()  # EOF is readable
        os.close(high)
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_handshake_finishing_during_a_drain_gets_connection_close(make_env) -> None:
    env = await make_env(top='drain_timeout = "10s"')
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)
    raw = socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT)
    await trio.sleep(0.2)  # accepted; no ClientHello yet
    env.proxy.shutdown()
    await trio.sleep(0.2)

    def late_client() -> bytes:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data

    with trio.fail_after(8):
        data = await trio.to_thread.run_sync(late_client)
        await env.proxy.stopped()
    (answer,) = parse_responses(data)
    assert answer.status == 200
    assert answer.headers["connection"] == ["close"]


async def test_a_crlf_after_a_body_does_not_turn_idle_into_408(make_env) -> None:
    env = await make_env(listener='header_timeout = "500ms"')
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    def exchange() -> tuple[bytes, bytes]:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n")
            first = b""
            while not first.endswith(b"}"):  # the demo backend's JSON, whole
                first += tls.recv(65536)
            tls.settimeout(1.2)  # longer than header_timeout: nothing must arrive
            try:
                unsolicited = tls.recv(65536)
            except TimeoutError:
                unsolicited = b""
            return first, unsolicited

    first, unsolicited = await trio.to_thread.run_sync(exchange)
    assert first.startswith(b"HTTP/1.1 200")
    assert unsolicited == b""


async def test_a_denied_client_cannot_tell_routes_apart(
    make_env, issue: IssueFn, tmp_path: Path
) -> None:
    thief = issue("client", "thief")
    (tmp_path / "deny.txt").write_text(f"sha256:{leaf_sha256(thief)}\n")
    routes = """[[listeners.routes]]
host = "api.example"
backends = ["127.0.0.1:{b0}"]
"""
    env = await make_env(routes=routes, tls=f'deny = "{tmp_path / "deny.txt"}"')
    known = await env.raw(b"GET / HTTP/1.1\r\nHost: api.example\r\n\r\n", pair=thief)
    unknown = await env.raw(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n", pair=thief)
    assert known.split(b"\r\n")[0] == unknown.split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden"


def test_a_port_in_use_is_one_clear_line(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(
            tmp_path, ca_bundle=ca.folder / "ca.crt", server=server_pair, routes=route([9])
        )
        config.write_text(
            config.read_text().replace(
                'listen = "127.0.0.1:0"\nmode', f'listen = "127.0.0.1:{port}"\nmode'
            )
        )
        proc = subprocess.run(
            [*MTLSPROXY, "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"mtlsproxy: error: cannot listen on 127.0.0.1:{port}" in proc.stderr


async def test_an_early_answer_during_an_upload_says_connection_close(
    make_env, nursery: trio.Nursery
) -> None:
    """A backend may answer before the body is all sent (nginx's `return` does). The
    proxy then cannot keep the client connection, and must say so, not just close."""

    async def answers_at_once(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        with trio.move_on_after(5):  # then reads and drops the body, as nginx does
            while await stream.receive_some(65536):
                pass

    port = await serve_raw(nursery, answers_at_once)
    env = await make_env(routes=route([port]), backends=0)
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    def upload() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n")
            answer = b""
            for _ in range(16):  # the first quarter of the body, then read the answer
                tls.sendall(b"x" * 65536)
            while b"ok" not in answer and (chunk := tls.recv(65536)):
                answer += chunk
            return answer

    (answer,) = parse_responses(await trio.to_thread.run_sync(upload), eof=False)
    assert answer.status == 200
    assert answer.headers.get("connection") == ["close"]


# --- second review: TCP, anchors, admin ----------------------------------------------


async def test_a_deny_landing_during_the_handshake_applies_to_it(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    received: list[bytes] = []

    async def records(stream: trio.SocketStream) -> None:
        while chunk := await stream.receive_some(65536):
            received.append(chunk)

    backend = await serve_raw(nursery, records)
    (tmp_path / "ca.crt").write_bytes((ca.folder / "ca.crt").read_bytes())
    (tmp_path / "deny.txt").write_text("")
    proxy, port = await start_tcp_proxy(
        nursery, tmp_path, tmp_path / "ca.crt", server_pair, backend,
        tls=f'deny = "{tmp_path / "deny.txt"}"',
    )  # fmt: skip
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    await trio.sleep(0.2)  # accepted, material taken; the handshake has not begun
    (tmp_path / "deny.txt").write_text(f"sha256:{leaf_sha256(client_pair)}\n")
    assert proxy.reload("admin").result == "swapped"
    ctx = ssl.create_default_context(cafile=str(ca.folder / "ca.crt"))
    ctx.load_cert_chain(client_pair.crt, client_pair.key)

    def finish() -> bytes:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            with contextlib.suppress(OSError):
                tls.sendall(b"secret")
            try:
                return tls.recv(100)
            except OSError:
                return b""

    assert await trio.to_thread.run_sync(finish) == b""
    await trio.sleep(0.2)
    assert received == []  # not even the PROXY header


async def test_a_backend_reset_ends_the_tcp_session_at_once(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    client_pair: Pair,
) -> None:
    async def resets(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST

    backend = await serve_raw(nursery, resets)
    _, port = await start_tcp_proxy(
        nursery, tmp_path, ca.folder / "ca.crt", server_pair, backend, 'idle_timeout = "60s"'
    )
    with trio.fail_after(5):  # not the idle timeout
        tls = await connect(port, ca, client_pair)
        await tls.send_all(b"hello")
        with contextlib.suppress(trio.BrokenResourceError):
            while await tls.receive_some(65536):
                pass
        await tls.aclose()


async def test_a_wrong_remembered_anchor_is_corrected_by_a_full_handshake(
    make_env, client_pair: Pair
) -> None:
    env = await make_env(tls='enforce_interval = "100ms"')
    env.proxy.store.remember_anchor(leaf_sha256(client_pair), "sha256:" + "00" * 32)
    session = requests.Session()
    for _ in range(3):
        response = await trio.to_thread.run_sync(
            lambda: session.get(
                env.url, verify=str(env.ca_bundle),
                cert=(str(client_pair.crt), str(client_pair.key)), timeout=10,
            )
        )  # fmt: skip
        assert response.status_code == 200
        await trio.sleep(0.3)  # enforcer passes: the session must survive them
    session.close()
    labels = {"listener": "127.0.0.1:0", "reason": "ca_removed"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 0


async def test_a_tcp_session_never_reuses_a_pooled_connection(nursery: trio.Nursery) -> None:
    accepted: list[int] = []

    async def server(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await trio.sleep_forever()

    port = await serve_raw(nursery, server)
    pool = UpstreamPool()
    target = Target(Address("127.0.0.1", port))
    up = await pool.acquire(target, connect_timeout=5)
    up.reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    while up.reader.next_event() is not PAUSED:
        pass
    up.reusable = True  # the exchange ended cleanly on both sides
    assert pool.release(up)  # idle in the pool now
    fresh = await pool.acquire(target, connect_timeout=5, fresh=True)
    assert fresh is not up
    await trio.sleep(0.1)
    assert len(accepted) == 2
    await fresh.stream.aclose()
    await pool.aclose()


async def test_admin_refuses_what_a_browser_sends(make_env) -> None:
    env = await make_env()

    def post(headers: dict[str, str]) -> int:
        return requests.post(
            f"http://127.0.0.1:{env.admin_port}/reload", headers=headers, timeout=10
        ).status_code

    assert await trio.to_thread.run_sync(post, {}) == 200
    assert await trio.to_thread.run_sync(post, {"Origin": "https://evil.example"}) == 403
    assert await trio.to_thread.run_sync(post, {"Host": "evil.example"}) == 403


async def test_a_route_with_proxy_protocol_sends_the_header_on_private_connections(
    make_env, nursery: trio.Nursery, client_pair: Pair
) -> None:
    connections: list[str] = []

    async def reads_header(stream: trio.SocketStream) -> None:
        data = b""
        while (parsed := pp.parse(data)) is None:
            data += await stream.receive_some(65536)
        header, rest = parsed
        connections.append(header.ssl_sub[pp.PP2_SUBTYPE_SSL_CN].decode())
        while b"\r\n\r\n" not in rest:
            rest += await stream.receive_some(65536)
        cn = connections[-1].encode()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(cn), cn))
        await trio.sleep(5)  # keeps the connection open: the proxy must not reuse it

    port = await serve_raw(nursery, reads_header)
    env = await make_env(routes=route([port], 'proxy_protocol = "v2"'), backends=0)
    for _ in range(2):
        response = await env.request("GET", "/")
        assert response.status_code == 200 and response.text == "player-1"
    assert connections == ["player-1", "player-1"]  # a fresh connection, a header, each time
