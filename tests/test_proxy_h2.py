"""HTTP/2 to clients: every stream is a request like an HTTP/1.1 one, and gRPC gets through.

Real clients: curl --http2, httpx with http2, grpcio, and a client of python-hyper's h2
over a stdlib ssl socket where the frames themselves matter (GOAWAY on a deny, a drain).
Backends: the demo backend (HTTP/1.1), grpcio's server (h2c), and h2c over TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import msgspec
import pytest
import trio
from hyperframe.frame import Frame, GoAwayFrame
from proxy_env import CLIENT_TIMEOUT, Env, decode, read_request, route, serve_raw
from support import IssueFn, Pair, metric_sum, parse_metrics
from test_proxy_alpn import _count, _say, _sum, channel, grpc_backend, grpc_calls  # noqa: F401 - fixture
from test_reload_live import rotatable, sha256_of

from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority


class H2Client:
    """One HTTP/2 connection in a worker thread (blocking socket, h2's state machine).

    GOAWAY frames are taken out before h2 sees them (and recorded in ``goaway``): h2
    closes its state machine on a GOAWAY (python-hyper/h2#1181), so it could not read
    the answers of the streams a graceful GOAWAY lets finish."""

    def __init__(self, env: Env, pair: Pair | None = None) -> None:
        pair = pair or env.client
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))  # only the test CA
        ctx.load_cert_chain(pair.crt, pair.key)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", env.port), timeout=CLIENT_TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.authority = f"localhost:{env.port}".encode()
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self._pending = b""

    def start(self, path: str, method: str = "GET", body: bytes = b"") -> int:
        sid: int = self.conn.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"https"),
                   (b":authority", self.authority), (b":path", path.encode())]  # fmt: skip
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def response(self, sid: int) -> tuple[int, bytes]:
        """The status and body of stream ``sid`` (0 and b"" when the connection ended)."""
        status, body = 0, b""
        while not self.closed:
            for event in self._read():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif (
                    isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset))
                    and event.stream_id == sid
                ):
                    self.sock.sendall(self.conn.data_to_send())
                    return status, body
        return status, body

    def request(self, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
        return self.response(self.start(path, method, body))

    def wait_closed(self) -> None:
        while not self.closed:
            self._read()

    def _read(self) -> list[h2.events.Event]:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return []
        self._pending += data
        frames = b""
        while len(self._pending) >= 9:
            length = int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < 9 + length:
                break
            whole, self._pending = self._pending[: 9 + length], self._pending[9 + length :]
            if whole[3] == 0x7:  # GOAWAY
                frame, _ = Frame.parse_frame_header(memoryview(whole[:9]))
                frame.parse_body(memoryview(whole[9:]))
                self.goaway = frame  # type: ignore[assignment]
            else:
                frames += whole
        events = self.conn.receive_data(frames)
        if pending := self.conn.data_to_send():
            try:
                self.sock.sendall(pending)
            except OSError:
                self.closed = True
        return events

    def close(self) -> None:
        self.sock.close()


async def slow_backend(nursery: Any) -> tuple[int, trio.Event, trio.Event]:
    """An HTTP/1.1 backend that answers "done" once ``release`` is set; ``arrived``: the
    request is at the backend."""
    arrived, release = trio.Event(), trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        await read_request(stream)
        arrived.set()
        await release.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")

    return await serve_raw(nursery, slow), arrived, release


async def in_thread(fn: Any, *args: Any) -> Any:
    with trio.fail_after(CLIENT_TIMEOUT + 5):
        return await trio.to_thread.run_sync(fn, *args)


# ---- the same request rules as HTTP/1.1 ----------------------------------------------


async def test_curl_http2_is_routed_and_identified_like_http_1_1(make_env: Any) -> None:
    env = await make_env()
    out = await env.curl(
        "--http2", "-sS", "-D", "-", env.url + "/hello?x=1",
        "-H", "X-Forwarded-Client-Cert: Hash=forged", "-H", "Client-Cert: :Zm9yZ2Vk:",
        "-H", "X-Forwarded-For: 10.6.6.6", "-H", "X_Forwarded_Client_Cert: forged",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    seen = decode(body)
    assert seen["path"] == "/hello?x=1" and seen["method"] == "GET"
    headers = seen["headers"]
    assert headers["x-forwarded-client-cert"][0].startswith("Hash=" + sha256_of(env.client))
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["host"] == [f"localhost:{env.port}"]
    assert "client-cert" not in headers and "x_forwarded_client_cert" not in headers
    found = parse_metrics((await env.admin("GET", "/metrics"))[1])
    assert metric_sum(found, "mtlsproxy_http2_connections_total") == 1
    assert metric_sum(found, "mtlsproxy_requests_total", code="2xx") == 1


async def test_every_stream_is_logged_with_its_protocol(make_env: Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    env = await make_env(top=f'[log]\naccess = "{log}"')
    client = await in_thread(H2Client, env)
    try:
        for path in ("/a", "/b"):
            status, _ = await in_thread(client.request, path)
            assert status == 200
    finally:
        client.close()
    with trio.fail_after(10):
        while len(lines := log.read_text().splitlines()) < 2:
            await trio.sleep(0.05)
    records = [msgspec.json.decode(line) for line in lines]
    assert [r["path"] for r in records] == ["/a", "/b"]
    assert {r["alpn"] for r in records} == {"h2"}
    assert {r["client"] for r in records} == {records[0]["client"]}  # one connection
    assert all(r["cn"] == "player-1" and r["status"] == 200 for r in records)


async def test_route_rules_hold_for_every_spelling_of_the_path(make_env: Any) -> None:
    routes = """[[listeners.routes]]
path_prefix = "/admin"
backends = ["127.0.0.1:{b0}"]
allow = [{{ cn = "nobody" }}]

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{b0}"]
"""
    env = await make_env(routes=routes)
    for path in ("/admin", "//admin", "/./admin", "/%61dmin", "/x/../admin"):
        out = await env.curl("--http2", "--path-as-is", "-s", "-o", "/dev/null", "-w",
                             "%{http_code}", env.url + path)  # fmt: skip
        assert out.stdout in (b"403", b"400"), (path, out.stdout)


async def test_a_body_reaches_an_http_1_1_backend_with_or_without_a_length(
    make_env: Any, tmp_path: Path
) -> None:
    env = await make_env()
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    out = await env.curl("--http2", "-sS", "--data-binary", f"@{payload}", env.url + "/up")
    seen = decode(out.stdout)
    assert seen["body_bytes"] == 1024 * 1024
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert seen["body_sha256"] == digest
    with payload.open("rb") as stdin:  # no length: chunked to the backend
        proc = await trio.run_process(
            ["curl", "--http2", "-sS", "--max-time", "20", "--cacert", str(env.ca_bundle),
             "--cert", str(env.client.crt), "--key", str(env.client.key), "-T", "-",
             "-X", "POST", env.url + "/up"],
            stdin=stdin.read(), capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = decode(proc.stdout)
    assert seen["body_bytes"] == 1024 * 1024 and seen["body_sha256"] == digest


async def test_httpx_multiplexes_requests_on_one_connection(make_env: Any) -> None:
    env = await make_env()
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(env.client.crt, env.client.key)

    async def many() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(http2=True, verify=ctx, timeout=CLIENT_TIMEOUT) as http:
            results = []
            for i in range(20):
                response = await http.get(f"{env.url}/n/{i}")
                results.append((response.http_version, response.status_code))
            return results

    def run() -> list[tuple[str, int]]:
        return asyncio.run(many())

    results = await in_thread(run)
    assert results == [("HTTP/2", 200)] * 20
    found = parse_metrics((await env.admin("GET", "/metrics"))[1])
    assert metric_sum(found, "mtlsproxy_http2_connections_total") == 1


async def test_an_http_1_1_only_listener_does_not_offer_h2(make_env: Any) -> None:
    env = await make_env(listener='alpn = ["http/1.1"]')
    out = await env.curl("--http2", "-sS", "-o", "/dev/null", "-w", "%{http_version}", env.url)
    assert out.stdout == b"1.1"


# ---- enforcement ---------------------------------------------------------------------


async def test_a_denied_identity_gets_goaway_on_its_live_connection(
    make_env: Any, creds: Path
) -> None:
    env = await rotatable(make_env, creds)
    client = await in_thread(H2Client, env)
    try:
        assert (await in_thread(client.request, "/"))[0] == 200
        write_atomic(creds / "deny.txt", f"sha256:{sha256_of(env.client)}\n".encode())
        await in_thread(client.wait_closed)
        assert client.goaway is not None and client.goaway.error_code == 0  # NO_ERROR
    finally:
        client.close()
    labels = {"listener": "127.0.0.1:0", "reason": "denied"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1


async def test_a_denied_identity_gets_403_on_its_stream_then_goaway(
    make_env: Any, issue: IssueFn, tmp_path: Path
) -> None:
    """Denied at the handshake: as over HTTP/1.1, told why (403), then sent away."""
    thief = issue("client", "thief")
    (tmp_path / "deny.txt").write_text(f"sha256:{sha256_of(thief)}\n")
    env = await make_env(tls=f'deny = "{tmp_path / "deny.txt"}"')
    out = await env.curl("--http2", "-sS", "-i", env.url + "/", pair=thief)
    assert out.stdout.startswith(b"HTTP/2 403") and b"denied" in out.stdout
    client = await in_thread(H2Client, env, thief)
    try:
        status, body = await in_thread(client.request, "/")
        assert status == 403 and b"denied" in body
        await in_thread(client.wait_closed)
        assert client.goaway is not None and client.goaway.error_code == 0
    finally:
        client.close()
    assert (await env.curl("--http2", env.url + "/")).returncode == 0  # others still pass


async def test_a_drain_lets_the_stream_in_flight_finish_after_goaway(
    make_env: Any, nursery: Any
) -> None:
    port, arrived, release = await slow_backend(nursery)
    env = await make_env(routes=route([port]), backends=0)
    client = await in_thread(H2Client, env)
    try:
        sid = await in_thread(client.start, "/slow")
        with trio.fail_after(10):
            await arrived.wait()  # the stream is at the backend
        env.proxy.sessions.close_all("shutdown")
        release.set()
        status, body = await in_thread(client.response, sid)
        assert (status, body) == (200, b"done")  # finished after the GOAWAY
        await in_thread(client.wait_closed)
        assert client.goaway is not None and client.goaway.error_code == 0
        assert client.goaway.last_stream_id == sid
    finally:
        client.close()


# ---- gRPC -----------------------------------------------------------------------------


def grpc_routes(port: int, extra: str = "") -> str:
    return f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
upstream_protocol = "h2"
{extra}
"""


async def test_grpc_through_an_http_listener_to_an_h2c_backend(
    make_env: Any,
    grpc_backend: int,  # noqa: F811 - the fixture
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    env = await make_env(routes=grpc_routes(grpc_backend), backends=0,
                         top=f'[log]\naccess = "{log}"')  # fmt: skip
    await in_thread(grpc_calls, env.port, ca, env.client)
    with trio.fail_after(10):
        while len(lines := log.read_text().splitlines()) < 6:
            await trio.sleep(0.05)
    records = [msgspec.json.decode(line) for line in lines]
    assert {r["alpn"] for r in records} == {"h2"}
    assert records[0]["path"] == "/game.Echo/Say" and records[0]["method"] == "POST"
    assert all(r["cn"] == "player-1" for r in records)


async def test_grpc_allow_rules_apply_per_call(
    make_env: Any,
    grpc_backend: int,  # noqa: F811 - the fixture
    ca: CertificateAuthority,
) -> None:
    env = await make_env(routes=grpc_routes(grpc_backend, 'allow = [{{ cn = "admin" }}]'),
                         backends=0)  # fmt: skip

    def call() -> None:
        with channel(env.port, ca, env.client) as ch, pytest.raises(grpc.RpcError) as refused:
            ch.unary_unary("/game.Echo/Say")(b"hello", timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # HTTP 403

    await in_thread(call)


@pytest.fixture
def grpc_tls_backend(server_pair: Pair, client_pair: Pair, ca: CertificateAuthority) -> Any:
    """A gRPC server on TLS that requires a client certificate of the test CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("game.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Sum": grpc.stream_unary_rpc_method_handler(_sum),
    })])  # fmt: skip
    credentials = grpc.ssl_server_credentials(
        [(server_pair.key.read_bytes(), server_pair.crt.read_bytes())],
        root_certificates=(ca.folder / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


async def test_grpc_to_a_backend_over_tls_with_the_proxys_client_certificate(
    make_env: Any, grpc_tls_backend: int, ca: CertificateAuthority, client_pair: Pair
) -> None:
    extra = (f'tls = true\ntls_cert = "{client_pair.crt}"\ntls_key = "{client_pair.key}"\n'
             'tls_server_name = "localhost"')  # fmt: skip
    env = await make_env(routes=grpc_routes(grpc_tls_backend, extra), backends=0)
    await in_thread(grpc_calls, env.port, ca, env.client)


async def test_a_graceful_goaway_from_an_h2_backend_lets_the_stream_finish(
    make_env: Any, nursery: Any
) -> None:
    """gRPC servers send GOAWAY(NO_ERROR) on max_connection_age and at shutdown, then
    finish what they have: the stream in flight is answered, the connection not reused."""
    connections = []

    async def backend(stream: trio.SocketStream) -> None:
        connections.append(stream)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    sid = event.stream_id
                    goaway = GoAwayFrame(0, last_stream_id=sid, error_code=0)
                    await stream.send_all(conn.data_to_send() + goaway.serialize())
                    await trio.sleep(0.05)
                    conn.send_headers(sid, [(b":status", b"200")])
                    conn.send_data(sid, b"answered", end_stream=True)
            await stream.send_all(conn.data_to_send())

    port = await serve_raw(nursery, backend)
    env = await make_env(routes=grpc_routes(port), backends=0)
    for _ in range(2):
        out = await env.curl("--http2", "-sS", env.url + "/x")
        assert out.returncode == 0 and out.stdout == b"answered", out.stderr
    assert len(connections) == 2  # the GOAWAY'd connection was not reused


async def test_a_denied_stream_in_flight_is_cut_after_the_grace_as_over_http_1_1(
    make_env: Any, creds: Path, nursery: Any
) -> None:
    arrived = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        await read_request(stream)
        arrived.set()
        await trio.sleep_forever()  # a long poll that never answers

    port = await serve_raw(nursery, silent)
    tls = 'reload_interval = "200ms"\nenforce_interval = "200ms"\nenforce_grace = "1s"'
    env = await rotatable(make_env, creds, tls=tls, routes=route([port]), backends=0)
    client = await in_thread(H2Client, env)
    try:
        sid = await in_thread(client.start, "/poll")
        with trio.fail_after(10):
            await arrived.wait()
        write_atomic(creds / "deny.txt", f"sha256:{sha256_of(env.client)}\n".encode())
        denied_at = trio.current_time()
        status, _ = await in_thread(client.response, sid)
        assert status == 0 and client.closed  # no answer: cut, not finished
        assert client.goaway is not None  # told first
        assert trio.current_time() - denied_at < 1 + 0.2 + 0.2 + 2  # grace, poll, sweep, slack
    finally:
        client.close()


async def test_a_large_download_flows_through_the_windows(make_env: Any) -> None:
    env = await make_env()
    size = 5 * 1024 * 1024 + 7  # far beyond every window: moved only by WINDOW_UPDATEs
    out = await env.curl("--http2", "-sS", env.url + f"/bytes/{size}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"x" * size


async def test_rfc_9440_headers_are_forwarded_on_a_stream(make_env: Any) -> None:
    env = await make_env(routes='[[listeners.routes]]\nbackends = ["127.0.0.1:{b0}"]\n'
                         'identity_headers = ["client-cert"]')  # fmt: skip
    out = await env.curl("--http2", "-sS", env.url + "/", "-H", "Client-Cert: :Zm9yZ2Vk:")
    headers = decode(out.stdout)["headers"]
    assert len(headers["client-cert"]) == 1 and headers["client-cert"][0] != ":Zm9yZ2Vk:"
    assert "x-forwarded-client-cert" not in headers


async def test_bodies_a_backend_never_read_do_not_shut_the_connection_window(
    make_env: Any, nursery: Any, tmp_path: Path
) -> None:
    """A backend that answers before reading the body (a 401, a 413): the unread bytes
    are given back to the client's windows, so the connection's next streams still flow."""

    async def early(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            await read_request(stream)
            await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno")
            await trio.sleep(1)  # reads nothing more, and keeps the connection open

    port = await serve_raw(nursery, early)
    env = await make_env(routes=route([port]), backends=0)
    payload = tmp_path / "payload"
    payload.write_bytes(b"p" * 200_000)
    urls = [f"{env.url}/up/{i}" for i in range(10)]  # 2 MB: twice the connection window
    out = await env.curl("--http2", "-sS", "--data-binary", f"@{payload}", "-w", " %{http_code}\n",
                         *urls)  # fmt: skip
    assert out.stdout.split() == [b"no", b"401"] * 10, out.stderr
    found = parse_metrics((await env.admin("GET", "/metrics"))[1])
    assert metric_sum(found, "mtlsproxy_http2_connections_total") == 1  # one connection


async def test_a_body_over_the_limit_is_answered_413_once(make_env: Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    env = await make_env(listener='max_body_size = "1KiB"', top=f'[log]\naccess = "{log}"')
    proc = await trio.run_process(
        ["curl", "--http2", "-sS", "--max-time", "20", "--cacert", str(env.ca_bundle),
         "--cert", str(env.client.crt), "--key", str(env.client.key), "-T", "-",
         "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", env.url + "/up"],
        stdin=b"b" * 100_000, capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert proc.stdout == b"413", proc.stderr
    with trio.fail_after(10):
        while not (lines := log.read_text().splitlines()):
            await trio.sleep(0.05)
    await trio.sleep(0.2)  # a second line, if there were one, would be written by now
    lines = log.read_text().splitlines()
    assert [msgspec.json.decode(line)["status"] for line in lines] == [413]


async def test_a_connection_that_starts_during_a_drain_still_gets_its_request_answered(
    make_env: Any,
) -> None:
    env = await make_env()
    env.proxy.sessions.close_all("shutdown")  # every session from now on is asked to close
    client = await in_thread(H2Client, env)
    try:
        status, _ = await in_thread(client.request, "/")
        assert status == 200  # sent before the final GOAWAY: served
        await in_thread(client.wait_closed)
        assert client.goaway is not None and client.goaway.last_stream_id == 1
    finally:
        client.close()


async def test_a_client_leaving_gracefully_still_gets_its_answers(
    make_env: Any, nursery: Any
) -> None:
    """A client's GOAWAY(NO_ERROR) says "no more streams from me", not "drop mine"."""
    port, arrived, release = await slow_backend(nursery)
    env = await make_env(routes=route([port]), backends=0)
    client = await in_thread(H2Client, env)
    try:
        sid = await in_thread(client.start, "/slow")
        with trio.fail_after(10):
            await arrived.wait()
        goaway = GoAwayFrame(0, last_stream_id=0, error_code=0).serialize()
        await in_thread(client.sock.sendall, goaway)  # behind h2's back: it would close
        await trio.sleep(0.1)
        release.set()
        assert await in_thread(client.response, sid) == (200, b"done")
        await in_thread(client.wait_closed)  # nothing left: the proxy closes
    finally:
        client.close()


async def test_request_trailers_reach_an_h2_backend_without_forged_identity(
    make_env: Any, nursery: Any
) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def backend(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.RequestReceived, h2.events.TrailersReceived)):
                    seen.append(list(event.headers))
                elif isinstance(event, h2.events.StreamEnded):
                    conn.send_headers(event.stream_id, [(b":status", b"200")])
                    conn.send_data(event.stream_id, b"ok", end_stream=True)
            await stream.send_all(conn.data_to_send())

    port = await serve_raw(nursery, backend)
    env = await make_env(routes=grpc_routes(port), backends=0)
    client = await in_thread(H2Client, env)

    def send() -> tuple[int, bytes]:
        sid = client.conn.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"https"),
                   (b":authority", client.authority), (b":path", b"/t")]  # fmt: skip
        client.conn.send_headers(sid, headers)
        client.conn.send_data(sid, b"body")
        client.conn.send_headers(sid, [(b"x-forwarded-client-cert", b"Hash=forged"),
                                       (b"checksum", b"abc")], end_stream=True)  # fmt: skip
        client.sock.sendall(client.conn.data_to_send())
        return client.response(sid)

    try:
        assert await in_thread(send) == (200, b"ok")
    finally:
        client.close()
    head, trailers = seen
    assert next(v for n, v in head if n == b"x-forwarded-client-cert").startswith(b"Hash=")
    assert b"forged" not in b"".join(v for _, v in head)
    assert trailers == [(b"checksum", b"abc")]


async def test_an_empty_data_frame_does_not_end_a_chunked_body_early(
    make_env: Any, nursery: Any
) -> None:
    """Go's transport ends an upload of unknown length with an empty DATA frame: that must
    not become HTTP/1.1's last chunk (the backend would read the real end as a request)."""
    received = bytearray()
    done = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                return
            received.extend(data)
        done.set()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    port = await serve_raw(nursery, backend)
    env = await make_env(routes=route([port]), backends=0)
    client = await in_thread(H2Client, env)

    def send() -> tuple[int, bytes]:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                       (b":authority", client.authority), (b":path", b"/u")])  # fmt: skip
        client.conn.send_data(sid, b"abc")
        client.conn.send_data(sid, b"")  # empty, mid-body
        client.conn.send_data(sid, b"def")
        client.conn.send_data(sid, b"", end_stream=True)  # empty, with END_STREAM
        client.sock.sendall(client.conn.data_to_send())
        return client.response(sid)

    try:
        assert await in_thread(send) == (200, b"ok")
    finally:
        client.close()
    body = bytes(received).split(b"\r\n\r\n", 1)[1]
    assert body == b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"


async def test_an_expiring_certificate_gets_goaway_on_its_live_connection(
    make_env: Any, creds: Path, issue: IssueFn
) -> None:
    env = await rotatable(make_env, creds)
    short = issue("client", "short-lived", ttl=timedelta(seconds=2))
    client = await in_thread(H2Client, env, short)
    try:
        assert (await in_thread(client.request, "/"))[0] == 200
        await in_thread(client.wait_closed)
        assert client.goaway is not None and client.goaway.error_code == 0
    finally:
        client.close()
    labels = {"listener": "127.0.0.1:0", "reason": "expired"}
    assert env.proxy.metrics.sample("mtlsproxy_sessions_closed_total", labels) == 1
