"""Operability: metrics that move, the access log, JSON logs, expiry warnings, admin access."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h11
import msgspec
import pytest
import requests
import trio
import trio_websocket
from prometheus_client import generate_latest
from proxy_env import CLIENT_TIMEOUT, start_backend
from support import MTLSPROXY, IssueFn, Pair, Samples, fetch_metrics, metric_sum, parse_metrics

from mtlsproxy import config, demo_backend
from mtlsproxy.accesslog import AccessLog, AccessRecord, record
from mtlsproxy.admin import Admin
from mtlsproxy.errors import ConfigError
from mtlsproxy.identity import Identity
from mtlsproxy.logs import JsonFormatter
from mtlsproxy.metrics import Expiry, Metrics
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.server.proxy import Proxy


class Stack:
    """A proxy with an HTTP listener (a plain route, an allow-limited route, a WebSocket
    route) and a TCP listener, writing its access log to a file."""

    def __init__(self, proxy: Proxy, http: int, tcp: int, admin: int, access: Path) -> None:
        self.proxy, self.http, self.tcp, self.admin_port, self.access = (
            proxy, http, tcp, admin, access,
        )  # fmt: skip

    async def metrics(self) -> Samples:
        return await trio.to_thread.run_sync(fetch_metrics, self.admin_port)

    def records(self) -> list[AccessRecord]:
        lines = self.access.read_bytes().splitlines()
        return [msgspec.json.decode(line, type=AccessRecord) for line in lines]


async def stack(
    nursery: trio.Nursery, folder: Path, ca: CertificateAuthority, server: Pair, tls: str = ""
) -> Stack:
    http_backend = await start_backend(nursery)
    ws_backend = await nursery.start(demo_backend.serve_websocket_echo, "127.0.0.1", 0)
    tcp_listeners = await nursery.start(demo_backend.serve_tcp_echo, "127.0.0.1", 0)
    tcp_backend = tcp_listeners[0].socket.getsockname()[1]
    access = folder / "access.log"
    path = folder / "ops.toml"
    path.write_text(f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca.folder / "ca.crt"}"
deny = "{folder / "deny.txt"}"
reload_interval = "1h"
enforce_interval = "200ms"
{tls}

[admin]
listen = "127.0.0.1:0"

[log]
access = "access.log"

[[listeners]]
listen = "127.0.0.1:0"
mode = "http"

[[listeners.routes]]
name = "ops-only"
path_prefix = "/ops"
backends = ["127.0.0.1:{http_backend}"]
allow = [{{ ou = "ops" }}]

[[listeners.routes]]
name = "ws"
path_prefix = "/ws"
backends = ["127.0.0.1:{ws_backend.port}"]
websocket = true

[[listeners.routes]]
name = "api"
path_prefix = "/"
backends = ["127.0.0.1:{http_backend}"]

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:{tcp_backend}"]
""")
    (folder / "deny.txt").write_text("")
    proxy = Proxy(config.load(path), str(path))
    bound = await nursery.start(proxy.run)
    http_port, tcp_port, admin_port = (b.address.port for b in bound)
    return Stack(proxy, http_port, tcp_port, admin_port, access)


def client_context(ca: CertificateAuthority, pair: Pair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.folder / "ca.crt"))
    ctx.load_cert_chain(pair.crt, pair.key)
    return ctx


def https(port: int, ca: CertificateAuthority, pair: Pair | None, path: str) -> requests.Response:
    return requests.get(
        f"https://localhost:{port}{path}",
        verify=str(ca.folder / "ca.crt"),
        cert=(str(pair.crt), str(pair.key)) if pair else None,
        timeout=CLIENT_TIMEOUT,
    )


def tcp_echo(port: int, ca: CertificateAuthority, pair: Pair, payload: bytes) -> bytes:
    ctx = client_context(ca, pair)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        got = b""  # the demo echo greets with a JSON line first
        while not got.endswith(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return got.split(b"\n", 1)[1]


async def test_metrics_move_and_the_access_log_names_who_did_what(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    issue: IssueFn,
) -> None:  # fmt: skip
    s = await stack(nursery, tmp_path, ca, server_pair)
    player = issue("client", "player-7", uris=["spiffe://game.example/player/7"])
    before = await s.metrics()
    assert metric_sum(before, "mtlsproxy_requests_total", listener="127.0.0.1:0", route="api",
                 code="2xx") == 0  # fmt: skip

    def traffic() -> None:
        assert https(s.http, ca, player, "/hello?token=secret").status_code == 200
        assert https(s.http, ca, player, "/ops/x").status_code == 403  # no OU "ops"
        with pytest.raises(requests.exceptions.RequestException):
            https(s.http, ca, None, "/")  # no client certificate: refused in the handshake
        assert tcp_echo(s.tcp, ca, player, b"ping\n") == b"ping\n"

    await trio.to_thread.run_sync(traffic)
    ctx = client_context(ca, player)
    with trio.fail_after(20):
        async with trio_websocket.open_websocket_url(
            f"wss://localhost:{s.http}/ws", ssl_context=ctx
        ) as ws:
            await ws.get_message()  # the echo server's hello
            for i in range(3):
                await ws.send_message(f"m{i}")
                assert await ws.get_message() == f"m{i}"

    with trio.fail_after(10):
        while len(s.records()) < 4:  # the WebSocket session is logged when the proxy sees it end
            await trio.sleep(0.05)
    m = await s.metrics()
    http_l = "127.0.0.1:0"
    assert metric_sum(m, "mtlsproxy_requests_total", listener=http_l, route="api", code="2xx") == 1
    assert metric_sum(m, "mtlsproxy_requests_total", listener=http_l, route="ops-only",
                 code="4xx") == 1  # fmt: skip
    assert metric_sum(m, "mtlsproxy_handshakes_total", listener=http_l, result="no_cert",
                 resumed="false") == 1  # fmt: skip
    ok = sum(v for (name, labels), v in m.items()
             if name == "mtlsproxy_handshakes_total" and ("result", "ok") in labels)  # fmt: skip
    assert ok >= 4
    assert metric_sum(m, "mtlsproxy_upstream_duration_seconds_count", route="api") == 1
    assert metric_sum(m, "mtlsproxy_bytes_total", listener=http_l, direction="out") > 0
    assert metric_sum(m, "mtlsproxy_websocket_sessions_total", route="ws") == 1
    assert metric_sum(m, "mtlsproxy_websocket_messages_total", route="ws", direction="in") == 3
    assert metric_sum(m, "mtlsproxy_websocket_messages_total", route="ws", direction="out") >= 4
    tcp_sessions = sum(v for (name, _), v in m.items() if name == "mtlsproxy_tcp_sessions_total")
    assert tcp_sessions == 1
    remaining = sum(v for (name, _), v in m.items()
                    if name == "mtlsproxy_client_cert_remaining_seconds_count")  # fmt: skip
    assert remaining >= 4
    # a 24-hour certificate lands in the (12h, 24h] bucket
    assert metric_sum(m, "mtlsproxy_client_cert_remaining_seconds_bucket", listener=http_l,
                 le="43200.0") == 0  # fmt: skip
    expiry = metric_sum(m, "mtlsproxy_certificate_expiry_timestamp_seconds", kind="server",
                   subject="CN=localhost")  # fmt: skip
    assert abs(expiry - (datetime.now(UTC) + timedelta(hours=24)).timestamp()) < 3600
    cas = [labels for (name, labels) in m
           if name == "mtlsproxy_certificate_expiry_timestamp_seconds"
           and ("kind", "client_ca") in labels]  # fmt: skip
    assert len(cas) == 1
    # No label holds a per-client value: neither the CN nor the fingerprint appears.
    metrics_text = str(m)
    assert "player-7" not in metrics_text and "spiffe://" not in metrics_text

    records = s.records()
    by_kind = {r.kind: [x for x in records if x.kind == r.kind] for r in records}
    ok_http = next(r for r in by_kind["http"] if r.status == 200)
    assert ok_http.cn == "player-7"
    assert ok_http.spiffe_id == "spiffe://game.example/player/7"
    assert ok_http.fingerprint.startswith("sha256:") and len(ok_http.fingerprint) == 71
    assert ok_http.path == "/hello"  # never the query string
    assert ok_http.method == "GET" and ok_http.route == "api" and ok_http.bytes_out > 0
    assert ok_http.upstream is not None and ok_http.duration_ms >= 0
    assert ok_http.resumed is False
    refused = next(r for r in by_kind["http"] if r.status == 403)
    assert refused.route == "ops-only" and refused.cn == "player-7"
    (tcp,) = by_kind["tcp"]
    assert tcp.bytes_in == 5 and tcp.bytes_out > 5 and tcp.end == "closed"
    assert tcp.alpn is None and ok_http.alpn is None  # no alpn on that listener
    (ws,) = by_kind["websocket"]
    assert ws.status == 101 and ws.path == "/ws" and ws.bytes_in > 0 and ws.cn == "player-7"
    text = s.access.read_text()
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text


async def test_reloads_and_enforcement_are_counted(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    issue: IssueFn,
) -> None:  # fmt: skip
    s = await stack(nursery, tmp_path, ca, server_pair)
    player = issue("client", "to-be-denied")
    ctx = client_context(ca, player)

    def open_session() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", s.http), timeout=CLIENT_TIMEOUT)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        tls.recv(65536)
        return tls

    live = await trio.to_thread.run_sync(open_session)
    (tmp_path / "deny.txt").write_text("cn:to-be-denied\n")

    def reload() -> requests.Response:
        return requests.post(f"http://127.0.0.1:{s.admin_port}/reload", timeout=10)

    assert (await trio.to_thread.run_sync(reload)).status_code == 200
    with trio.fail_after(10):
        while True:
            m = await s.metrics()
            if metric_sum(m, "mtlsproxy_sessions_closed_total", listener="127.0.0.1:0",
                     reason="denied") == 1:  # fmt: skip
                break
            await trio.sleep(0.1)
    assert (
        metric_sum(m, "mtlsproxy_reloads_total", result="swapped") == 1
    )  # the load at start is not a reload
    assert metric_sum(m, "mtlsproxy_credentials_generation") == 2
    (tmp_path / "deny.txt").write_text("sha256:not-hex\n")
    assert (await trio.to_thread.run_sync(reload)).status_code == 422
    m = await s.metrics()
    assert metric_sum(m, "mtlsproxy_reloads_total", result="failed") == 1
    live.close()


async def test_expiry_is_warned_in_logs_and_metrics_and_fails_readyz(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # A server certificate with 3 seconds left, and a warning threshold of 2 hours.
    now = datetime.now(UTC)
    short = ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"],
                     ttl=timedelta(hours=1), now=now - timedelta(hours=1) + timedelta(seconds=3))  # fmt: skip
    crt, key = short.write(tmp_path / "short")
    caplog.set_level(logging.WARNING, logger="mtlsproxy")
    s = await stack(nursery, tmp_path, ca, Pair(crt, key), tls='expiry_warning = "2h"')
    with trio.fail_after(5):
        while not any("expires in" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.05)
    warning = next(r.getMessage() for r in caplog.records if "expires in" in r.getMessage())
    assert "server certificate CN=localhost" in warning
    assert s.proxy.warn_expiring() == []  # not again within the hour
    m = await s.metrics()
    assert (
        metric_sum(m, "mtlsproxy_certificate_expiring", kind="server", subject="CN=localhost") == 1
    )
    # the CA lives for years: not flagged
    assert all(v == 0 for (name, labels), v in m.items()
               if name == "mtlsproxy_certificate_expiring" and ("kind", "client_ca") in labels)  # fmt: skip

    def readyz() -> requests.Response:
        return requests.get(f"http://127.0.0.1:{s.admin_port}/readyz", timeout=10)

    assert (await trio.to_thread.run_sync(readyz)).status_code == 200
    await trio.sleep(4)
    answer = await trio.to_thread.run_sync(readyz)
    assert answer.status_code == 503
    assert "expired" in answer.text


# --- the admin listener's access rules ---------------------------------------------------


def admin_config(
    tmp_path: Path, ca: CertificateAuthority, server: Pair, admin: str, tls: str = ""
) -> Path:
    path = tmp_path / "admin.toml"
    path.write_text(f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca.folder / "ca.crt"}"
{tls}

[admin]
{admin}

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:9"]
""")
    return path


@pytest.mark.parametrize("address", ["0.0.0.0:9901", "[::]:9901", "192.0.2.10:9901"])
def test_a_non_loopback_admin_needs_mtls_or_an_explicit_opt_in(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, address: str
) -> None:
    path = admin_config(tmp_path, ca, server_pair, f'listen = "{address}"')
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    message = str(refused.value)
    assert "admin" in message and "mtls = true" in message and "insecure_remote" in message
    for opt_in in ("mtls = true", "insecure_remote = true"):
        path = admin_config(tmp_path, ca, server_pair, f'listen = "{address}"\n{opt_in}')
        assert config.load(path).admin.listen.port == 9901


def test_admin_allow_rules_need_mtls(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    path = admin_config(tmp_path, ca, server_pair, 'allow = [{ ou = "ops" }]')
    with pytest.raises(ConfigError, match="mtls"):
        config.load(path)


def test_an_opted_in_remote_admin_takes_any_host_but_still_refuses_browsers(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    remote = admin_config(tmp_path, ca, server_pair,
                          'listen = "0.0.0.0:9901"\ninsecure_remote = true')  # fmt: skip
    proxy = Proxy(config.load(remote), str(remote))
    admin: Admin = proxy.admin
    ok = h11.Request(method="GET", target="/healthz", headers=[("host", "proxy-1.internal:9901")])
    assert admin.guarded(ok)[0] == 200
    browser = h11.Request(method="POST", target="/reload",
                          headers=[("host", "proxy-1.internal"), ("origin", "https://evil")])  # fmt: skip
    assert admin.guarded(browser)[0] == 403
    local = Proxy(config.load(admin_config(tmp_path, ca, server_pair, "")), "x").admin
    assert local.guarded(ok)[0] == 403  # on loopback, a foreign Host is DNS rebinding


async def test_an_mtls_admin_requires_a_client_certificate_that_passes_allow(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    issue: IssueFn, issue_other: IssueFn,
) -> None:  # fmt: skip
    (tmp_path / "deny.txt").write_text("cn:mallory\n")
    path = admin_config(tmp_path, ca, server_pair,
                        'listen = "127.0.0.1:0"\nmtls = true\nallow = [{ ou = "ops" }]',
                        tls=f'deny = "{tmp_path / "deny.txt"}"')  # fmt: skip
    proxy = Proxy(config.load(path), str(path))
    bound = await nursery.start(proxy.run)
    port = next(b for b in bound if b.listener == "admin").address.port
    operator = issue("client", "alice", ous=["ops"])
    player = issue("client", "player-1")
    mallory = issue("client", "mallory", ous=["ops"])  # matches allow, but denied
    bundle = str(ca.folder / "ca.crt")

    def get(pair: Pair | None) -> requests.Response:
        return requests.get(
            f"https://localhost:{port}/certs",
            verify=bundle,
            cert=(str(pair.crt), str(pair.key)) if pair else None,
            timeout=CLIENT_TIMEOUT,
        )

    answer = await trio.to_thread.run_sync(get, operator)
    assert answer.status_code == 200 and answer.json()["server"]["subject"] == "CN=localhost"
    denied = await trio.to_thread.run_sync(get, player)
    assert denied.status_code == 403 and "allow" in denied.text
    denied = await trio.to_thread.run_sync(get, mallory)
    assert denied.status_code == 403 and "deny list" in denied.text
    certs = answer.json()
    assert certs["client_cas"][0]["subject"] == ca.root.subject.rfc4514_string()
    assert certs["chain"][0]["subject"] == ca.issuer.subject.rfc4514_string()
    assert certs["deny_entries"] == 1 and certs["generation"] == 1
    assert certs["last_reload"]["result"] == "swapped"
    assert certs["server"]["fingerprint"].startswith("sha256:")
    assert "BEGIN" not in answer.text  # a summary, never a certificate or a key
    with pytest.raises(requests.exceptions.RequestException):
        await trio.to_thread.run_sync(get, None)
    stranger = issue_other("client", "alice", ous=["ops"])  # another CA: refused in TLS
    with pytest.raises(requests.exceptions.RequestException):
        await trio.to_thread.run_sync(get, stranger)

    def plain() -> requests.Response:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=CLIENT_TIMEOUT)

    with pytest.raises(requests.exceptions.RequestException):
        await trio.to_thread.run_sync(plain)  # no plain HTTP on an mTLS admin


# --- diagnostic logs ---------------------------------------------------------------------


def test_json_log_lines() -> None:
    record = logging.LogRecord("mtlsproxy.listener", logging.INFO, __file__, 1,
                               "refused %s: %s", ("127.0.0.1:5", "no_cert"), None)  # fmt: skip
    line = json.loads(JsonFormatter(worker="1").format(record))
    assert line["level"] == "info" and line["logger"] == "mtlsproxy.listener"
    assert line["message"] == "refused 127.0.0.1:5: no_cert"
    assert line["worker"] == 1 and line["time"].endswith("Z")


async def test_serve_logs_json_when_not_on_a_terminal(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    path = admin_config(tmp_path, ca, server_pair, 'listen = "127.0.0.1:0"')
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                lambda task_status: trio.run_process(
                    [*MTLSPROXY, "serve", "--config", str(path)],
                    stderr=-1, check=False, task_status=task_status,
                )
            )  # fmt: skip
            assert proc.stderr is not None
            data = b""
            while b"admin listening" not in data:
                chunk = await proc.stderr.receive_some(65536)
                assert chunk, data
                data += chunk
            proc.terminate()
    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    assert any("admin listening on http://127.0.0.1:" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


def test_the_default_warning_window_fits_24_hour_certificates() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    day = Expiry("server", "CN=x", start, start + timedelta(hours=24))
    assert day.warn_within(None) == 6 * 3600  # renewal at 2/3 leaves 8 h: a failure shows
    ca = Expiry("client_ca", "CN=root", start, start + timedelta(days=3650))
    assert ca.warn_within(None) == 30 * 86400
    assert day.warn_within(3600.0) == 3600.0


async def test_a_client_gone_before_its_answer_is_logged_as_499(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    issue: IssueFn,
) -> None:  # fmt: skip
    s = await stack(nursery, tmp_path, ca, server_pair)
    player = issue("client", "quitter")
    ctx = client_context(ca, player)

    def send_half_a_body() -> None:
        with (
            socket.create_connection(("127.0.0.1", s.http), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Length: 100000\r\n\r\n" + b"x" * 10)  # fmt: skip

    await trio.to_thread.run_sync(send_half_a_body)
    with trio.fail_after(10):
        while not s.access.exists() or not s.records():
            await trio.sleep(0.05)
    (gone,) = s.records()
    assert gone.status == 499 and gone.method == "POST" and gone.cn == "quitter"
    assert gone.bytes_in == 10
    m = await s.metrics()
    assert metric_sum(m, "mtlsproxy_requests_total", route="api", code="4xx") == 1


def test_certificates_with_one_subject_stay_apart_in_metrics() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    metrics = Metrics()
    metrics.watch_certificates(lambda: [
        Expiry("client_ca", "CN=Root", start, start + timedelta(days=1), "aa" * 32),
        Expiry("client_ca", "CN=Root", start, start + timedelta(days=3650), "bb" * 32),
    ], None)  # fmt: skip
    found = parse_metrics(generate_latest(metrics.registry))
    series = [labels for (name, labels) in found if name == "mtlsproxy_certificate_expiring"]
    assert len(series) == 2 and len(set(series)) == 2


def some_identity() -> Identity:
    now = datetime.now(UTC)
    return Identity(subject="CN=x", issuer="CN=ca", cn="x", ous=(), dns=(), ips=(), uris=(),
                    spiffe_id=None, serial="1", sha256="ab" * 32, not_before=now, not_after=now)  # fmt: skip


def test_the_access_log_never_blocks_and_counts_what_it_drops(tmp_path: Path) -> None:
    identity = some_identity()
    fifo = tmp_path / "log"  # a reader that never reads
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    drops = []
    log = AccessLog(str(fifo), capacity=100, on_drop=lambda: drops.append(1))
    started = time.monotonic()
    for _ in range(5000):  # far more than the pipe and the queue hold
        log.write(record("http", listener="l", client="c", identity=identity, resumed=False,
                         duration=0.0, path="/" + "x" * 200))  # fmt: skip
    assert time.monotonic() - started < 2  # never waited for the reader
    assert log.dropped > 0 and len(drops) == log.dropped
    os.close(reader)  # the writer thread gets EPIPE: reported, not raised
    log.close(timeout=1)


def test_sighup_reopens_a_rotated_access_log(tmp_path: Path) -> None:
    identity = some_identity()
    path = tmp_path / "access.log"
    log = AccessLog(str(path))

    def line(n: int) -> None:
        log.write(record("tcp", listener="l", client=str(n), identity=identity, resumed=True,
                         duration=0.0))  # fmt: skip

    line(1)
    log.close()  # flushes
    log = AccessLog(str(path))
    line(2)
    time.sleep(0.2)
    path.rename(tmp_path / "access.log.1")  # logrotate
    log.reopen()
    line(3)
    log.close()
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [json.loads(x)["client"] for x in old] == ["1", "2"]
    assert [json.loads(x)["client"] for x in new] == ["3"]
    assert json.loads(new[0])["resumed"] is True and "route" in json.loads(new[0])  # all fields


def test_polls_that_find_nothing_new_are_not_counted_as_reloads(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    proxy = Proxy(config.load(admin_config(tmp_path, ca, server_pair, "")), "x")
    for _ in range(3):
        proxy.store.reload("poll")
    proxy.store.reload("signal")
    found = parse_metrics(generate_latest(proxy.metrics.registry))
    assert metric_sum(found, "mtlsproxy_reloads_total", result="unchanged") == 1  # the SIGHUP only


async def test_an_insecure_remote_admin_says_so_at_start(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="mtlsproxy")
    # Bound on every interface for the test's few seconds; only loopback is ever contacted.
    path = admin_config(tmp_path, ca, server_pair, 'listen = "0.0.0.0:0"\ninsecure_remote = true')
    proxy = Proxy(config.load(path), str(path))
    bound = await nursery.start(proxy.run)
    port = next(b for b in bound if b.listener == "admin").address.port
    warning = next(r for r in caplog.records if "admin listening" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "WITHOUT authentication" in warning.getMessage()
    assert "insecure_remote" in warning.getMessage()

    def healthz() -> requests.Response:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10,
                            headers={"Host": "proxy-1.internal"})  # fmt: skip

    assert (await trio.to_thread.run_sync(healthz)).status_code == 200
    proxy.shutdown()


async def test_refused_requests_reloads_and_enforcement_are_logged_with_their_reason(
    nursery: trio.Nursery, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair,
    issue: IssueFn, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="mtlsproxy")
    s = await stack(nursery, tmp_path, ca, server_pair)
    player = issue("client", "logged-player")
    ctx = client_context(ca, player)

    def refused_then_idle() -> ssl.SSLSocket:
        assert https(s.http, ca, player, "/ops/secret").status_code == 403
        raw = socket.create_connection(("127.0.0.1", s.http), timeout=CLIENT_TIMEOUT)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        tls.recv(65536)
        return tls

    live = await trio.to_thread.run_sync(refused_then_idle)
    (tmp_path / "deny.txt").write_text("cn:logged-player\n")
    assert s.proxy.reload("admin").result == "swapped"
    with trio.fail_after(10):
        while not any("closing session" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records]
    refused = next(x for x in lines if x.startswith("refused /ops/secret"))
    assert "logged-player" in refused and "403" in refused and "no allow rule" in refused
    reload = next(x for x in lines if x.startswith("reload (admin)"))
    assert "generation 2" in reload and "deny" in reload
    closing = next(x for x in lines if "closing session" in x)
    assert "logged-player" in closing and closing.endswith("denied")
    live.close()
