"""`tls = true` on a route: the proxy speaks mTLS to its backends too."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests
import trio
from proxy_env import read_request, serve_raw
from support import IssueFn

from mtlsproxy import pem
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream


async def tls_backend(
    nursery: trio.Nursery, ca: CertificateAuthority, issue: IssueFn, seen: list[str]
) -> int:
    """A backend that requires a client certificate from the CA and answers with its CN."""
    server = issue("server", "localhost")
    ctx = build_server_context(
        cert_chain=pem.load_certificates(server.crt.read_bytes(), server.crt),
        key=pem.load_private_key(server.key.read_bytes(), server.key),
        client_cas=[ca.root],
        alpn=None,
        session_id_context=b"backend",
    )

    async def handle(stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=5)
        except HandshakeError as exc:
            seen.append(f"refused: {exc.reason}")
            return
        cert = tls.peer_certificate
        assert cert is not None
        seen.append(cert.subject.rfc4514_string())
        await read_request(tls)  # type: ignore[arg-type]
        body = seen[-1].encode()
        await tls.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await tls.aclose()

    return await serve_raw(nursery, handle)


async def test_backend_mtls(
    make_env, nursery: trio.Nursery, ca: CertificateAuthority, issue: IssueFn
) -> None:
    seen: list[str] = []
    port = await tls_backend(nursery, ca, issue, seen)
    proxy_id = issue("client", "mtlsproxy-edge")
    routes = f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
tls = true
tls_cert = "{proxy_id.crt}"
tls_key = "{proxy_id.key}"
tls_server_name = "localhost"
"""
    env = await make_env(routes=routes, backends=0)
    response = await env.request("GET", "/")
    assert response.status_code == 200
    assert response.text == "CN=mtlsproxy-edge"


async def test_backend_with_a_certificate_for_another_name_is_502(
    make_env, nursery: trio.Nursery, ca: CertificateAuthority, issue: IssueFn
) -> None:
    seen: list[str] = []
    port = await tls_backend(nursery, ca, issue, seen)
    proxy_id = issue("client", "mtlsproxy-edge")
    routes = f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
tls = true
tls_cert = "{proxy_id.crt}"
tls_key = "{proxy_id.key}"
tls_server_name = "db.internal"
"""
    env = await make_env(routes=routes, backends=0)
    assert (await env.request("GET", "/")).status_code == 502


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(make_env) -> None:
    env = await make_env(tls='handshake_timeout = "500ms"')

    def silent() -> bytes:
        with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
            return sock.recv(100)  # b"" when the proxy gives up

    with trio.fail_after(8):
        assert await trio.to_thread.run_sync(silent) == b""
    labels = {"listener": "127.0.0.1:0", "result": "timeout", "resumed": "false"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


async def test_garbage_instead_of_tls_is_a_protocol_error(make_env) -> None:
    env = await make_env()

    def plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(100)

    answer = await trio.to_thread.run_sync(plaintext)
    assert b"HTTP" not in answer
    labels = {"listener": "127.0.0.1:0", "result": "protocol_error", "resumed": "false"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1
    # ...and one bad connection does not affect the next good one.
    assert (await env.request("GET", "/")).status_code == 200


async def test_min_version_1_3_refuses_tls_1_2_clients(make_env) -> None:
    env = await make_env(tls='min_version = "1.3"')
    old = await env.curl("--tls-max", "1.2", env.url + "/")
    assert old.returncode != 0
    assert b"protocol version" in old.stderr or b"alert" in old.stderr
    assert (await env.curl(env.url + "/")).returncode == 0


async def test_tls_1_2_works_by_default(make_env) -> None:
    env = await make_env()
    proc = await env.curl(
        "--tls-max", "1.2", "-w", "%{http_code}", "-o", "/dev/null", env.url + "/"
    )
    assert proc.stdout == b"200"


async def test_max_connections_holds_the_next_client_until_a_slot_frees(make_env) -> None:
    env = await make_env(listener="max_connections = 1")
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)
    first = await trio.to_thread.run_sync(  # holds the only slot, idle
        lambda: ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", env.port), timeout=10),
            server_hostname="localhost",
        )
    )
    try:
        # The second is not accepted: its TLS handshake gets no answer within 1 s.
        with pytest.raises(requests.exceptions.Timeout):
            await env.request("GET", "/", timeout=1)
    finally:
        first.close()
    with trio.fail_after(10):  # the slot frees; the kernel backlog held the client
        assert (await env.request("GET", "/")).status_code == 200
