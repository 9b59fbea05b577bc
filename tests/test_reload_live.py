"""Hot reload and live enforcement through a running proxy, with real clients."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import trio
from cryptography.hazmat.primitives import hashes
from proxy_env import CLIENT_TIMEOUT, Env, parse_responses, read_request, route, serve_raw
from support import IssueFn, Pair

from mtlsproxy import pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority

FAST = 'reload_interval = "200ms"\nenforce_interval = "200ms"'


async def rotatable(make_env: Any, creds: Path, tls: str = FAST, **kwargs: Any) -> Env:
    env: Env = await make_env(
        server=Pair(creds / "server.crt", creds / "server.key"),
        bundle=creds / "ca.crt",
        tls=f'deny = "{creds / "deny.txt"}"\n{tls}',
        **kwargs,
    )
    return env


def sha256_of(pair: Pair) -> str:
    leaf = pem.load_certificates(pair.crt.read_bytes(), pair.crt)[0]
    return leaf.fingerprint(hashes.SHA256()).hex()


class Client:
    """One TLS connection held open in a worker thread, for keep-alive and enforcement tests."""

    def __init__(self, env: Env, pair: Pair, verify: Path | None = None) -> None:
        self.ctx = ssl.create_default_context(cafile=str(verify or env.ca_bundle))
        self.ctx.load_cert_chain(pair.crt, pair.key)
        self.port = env.port
        self.tls: ssl.SSLSocket | None = None

    async def connect(self) -> None:
        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)
            return self.ctx.wrap_socket(raw, server_hostname="localhost")

        self.tls = await trio.to_thread.run_sync(connect)

    async def get(self, path: str = "/") -> Any:
        assert self.tls is not None
        tls = self.tls

        def exchange() -> Any:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
                answers = parse_responses(data, eof=False)
                if answers:
                    return answers[0]
            return None

        return await trio.to_thread.run_sync(exchange)

    async def closed_by_proxy(self, within: float) -> bool:
        assert self.tls is not None
        tls = self.tls

        def wait() -> bool:
            tls.settimeout(within)
            try:
                return tls.recv(1) == b""
            except TimeoutError:
                return False
            except (ConnectionResetError, ssl.SSLError):
                return True

        return await trio.to_thread.run_sync(wait)

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()


def server_fingerprint(env: Env, verify: Path | None = None) -> str:
    ctx = ssl.create_default_context(cafile=str(verify or env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)
    with (
        socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


async def test_new_handshakes_use_the_new_certificate_old_connections_live_on(
    make_env: Any, creds: Path, issue: IssueFn
) -> None:
    env = await rotatable(make_env, creds, tls="")
    idle = Client(env, env.client)
    await idle.connect()
    assert (await idle.get("/before")).status == 200
    fresh = issue("server", "localhost")
    write_atomic(creds / "server.key", fresh.key.read_bytes())
    write_atomic(creds / "server.crt", fresh.crt.read_bytes())
    status, body = await env.admin("POST", "/reload")
    assert status == 200
    assert msgspec.json.decode(body)["result"] == "swapped"
    assert await trio.to_thread.run_sync(server_fingerprint, env) == sha256_of(fresh)
    assert (await idle.get("/after")).status == 200  # the same connection, still serving
    idle.close()


async def test_admin_endpoints(make_env: Any, creds: Path) -> None:
    env = await rotatable(make_env, creds, tls="")
    assert await env.admin("GET", "/healthz") == (200, b"ok\n")
    assert await env.admin("GET", "/readyz") == (200, b"ready\n")
    assert (await env.request("GET", "/")).status_code == 200
    status, metrics = await env.admin("GET", "/metrics")
    assert status == 200
    assert (
        b'mtlsproxy_handshakes_total{listener="127.0.0.1:0",result="ok",resumed="false"} 1.0'
        in metrics
    )
    assert b"mtlsproxy_credentials_generation 1.0" in metrics
    status, certs = await env.admin("GET", "/certs")
    info = msgspec.json.decode(certs)
    assert info["generation"] == 1 and info["server"]["subject"] == "CN=localhost"
    assert info["last_reload"]["result"] == "swapped"  # the load at start

    verify = creds.parent / "verify.crt"  # the client's copy, kept whole
    verify.write_bytes((creds / "ca.crt").read_bytes())
    (creds / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    status, body = await env.admin("POST", "/reload")
    assert status == 422
    failed = msgspec.json.decode(body)
    assert failed["result"] == "failed" and "ca.crt" in failed["error"]
    assert (
        msgspec.json.decode((await env.admin("GET", "/certs"))[1])["last_reload"]["result"]
        == "failed"
    )
    assert (await env.admin("GET", "/reload"))[0] == 405
    assert (await env.admin("GET", "/nope"))[0] == 404
    still = await env.curl(
        "--cacert", str(verify), "-o", "/dev/null", "-w", "%{http_code}", env.url
    )
    assert still.stdout == b"200"  # still serving generation 1
    _, metrics = await env.admin("GET", "/metrics")
    assert b'mtlsproxy_reloads_total{result="failed"} 1.0' in metrics


async def test_the_poll_notices_a_change_by_itself(make_env: Any, creds: Path) -> None:
    env = await rotatable(make_env, creds)
    write_atomic(creds / "deny.txt", b"cn:somebody-else\n")
    with trio.fail_after(5):
        while env.proxy.store.current().generation < 2:
            await trio.sleep(0.05)


async def test_a_denied_identity_loses_its_live_connection(make_env: Any, creds: Path) -> None:
    env = await rotatable(make_env, creds)
    live = Client(env, env.client)
    await live.connect()
    assert (await live.get()).status == 200
    write_atomic(creds / "deny.txt", f"sha256:{sha256_of(env.client)}\n".encode())
    assert await live.closed_by_proxy(within=3)
    labels = {"listener": "127.0.0.1:0", "reason": "denied"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1
    live.close()


async def test_an_expiring_certificate_loses_its_live_connection(
    make_env: Any, creds: Path, issue: IssueFn
) -> None:
    env = await rotatable(make_env, creds)
    short = issue("client", "short-lived", ttl=timedelta(seconds=2))
    live = Client(env, short)
    await live.connect()
    assert (await live.get()).status == 200
    assert await live.closed_by_proxy(within=5)
    labels = {"listener": "127.0.0.1:0", "reason": "expired"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1
    live.close()


async def test_a_removed_ca_loses_its_live_connections(
    make_env: Any, creds: Path, other_ca: CertificateAuthority
) -> None:
    env = await rotatable(make_env, creds)
    both = creds.parent / "verify.crt"  # what clients trust for the *server*: unchanged
    both.write_bytes((creds / "ca.crt").read_bytes())
    live = Client(env, env.client, verify=both)
    await live.connect()
    assert (await live.get()).status == 200
    write_atomic(creds / "ca.crt", (other_ca.folder / "ca.crt").read_bytes())
    assert await live.closed_by_proxy(within=3)
    labels = {"listener": "127.0.0.1:0", "reason": "ca_removed"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1
    refused = await env.curl("--cacert", str(both), env.url + "/")
    assert refused.returncode != 0 and b"unknown ca" in refused.stderr
    live.close()


async def test_the_response_in_flight_finishes_before_the_close(
    make_env: Any, creds: Path, nursery: trio.Nursery
) -> None:
    arrived = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        await read_request(stream)
        arrived.set()
        await trio.sleep(1.0)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfinished")

    port = await serve_raw(nursery, slow)
    env = await rotatable(make_env, creds, routes=route([port]), backends=0)
    live = Client(env, env.client)
    await live.connect()
    answers: list[Any] = []

    async def request() -> None:
        answers.append(await live.get("/slow"))

    async with trio.open_nursery() as inner:
        inner.start_soon(request)
        with trio.fail_after(5):
            await arrived.wait()
        write_atomic(creds / "deny.txt", f"sha256:{sha256_of(env.client)}\n".encode())
        assert env.proxy.reload("admin").result == "swapped"
    (answer,) = answers
    assert answer.status == 200 and answer.body == b"finished"
    assert answer.headers.get("connection") == ["close"]
    assert await live.closed_by_proxy(within=3)
    live.close()


def resume_twice(env: Env, pair: Pair, between: Any) -> tuple[bool, bytes]:
    """Connect, then reconnect offering the first session; ``between`` runs in the gap."""
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(pair.crt, pair.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is there at once

    def once(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, bytes]:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return tls.session, tls.session_reused, data

    session, _, _ = once(None)
    between()
    _, reused, data = once(session)
    return reused, data


async def test_sessions_do_not_resume_across_a_reload(make_env: Any, creds: Path) -> None:
    env = await rotatable(make_env, creds, tls="")

    def rotate_unrelated() -> None:
        write_atomic(creds / "deny.txt", b"cn:someone-else\n")
        assert trio.from_thread.run_sync(env.proxy.reload, "admin").result == "swapped"

    reused, data = await trio.to_thread.run_sync(resume_twice, env, env.client, rotate_unrelated)
    assert not reused  # a full handshake: the certificate was shown and verified again
    assert data.startswith(b"HTTP/1.1 200")
    reused, _ = await trio.to_thread.run_sync(resume_twice, env, env.client, lambda: None)
    assert reused  # without a reload, resumption works


async def test_a_resumed_session_with_an_expired_certificate_is_refused(
    make_env: Any, creds: Path, issue: IssueFn
) -> None:
    env = await rotatable(make_env, creds, tls="")
    short = issue("client", "short-lived", ttl=timedelta(seconds=2))

    def wait_for_expiry() -> None:
        time.sleep(2.5)

    reused, data = await trio.to_thread.run_sync(resume_twice, env, short, wait_for_expiry)
    assert reused  # OpenSSL resumed it without looking at the certificate...
    assert data.startswith(b"HTTP/1.1 403")  # ...the proxy did look
    labels = {"listener": "127.0.0.1:0", "result": "expired", "resumed": "true"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


async def test_a_response_that_never_ends_is_cut_after_the_grace(
    make_env: Any, creds: Path, nursery: trio.Nursery
) -> None:
    async def endless(stream: trio.SocketStream) -> None:  # an event stream that never ends
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(b"6\r\nevent\n\r\n")
                await trio.sleep(0.1)

    port = await serve_raw(nursery, endless)
    env = await rotatable(make_env, creds, routes=route([port]), backends=0,
                          tls=f'{FAST}\nenforce_grace = "1s"')  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    def stream_until_cut() -> tuple[int, float]:
        with (
            socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received, denied_at = 0, 0.0
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    return received, time.monotonic() - denied_at
                received += len(chunk)
                if received > 200 and not denied_at:
                    write_atomic(creds / "deny.txt", f"sha256:{sha256_of(env.client)}\n".encode())
                    denied_at = time.monotonic()

    with trio.fail_after(20):
        received, after = await trio.to_thread.run_sync(stream_until_cut)
    assert received > 200
    assert after < 6  # the poll (0.2 s), the grace (1 s), a sweep (0.2 s); not forever
