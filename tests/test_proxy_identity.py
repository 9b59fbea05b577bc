"""Only clients of the private CA get through, and the backend learns exactly who they are."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from proxy_env import decode, parse_responses, read_request, serve_raw
from support import IssueFn, Pair

from mtlsproxy import pem
from mtlsproxy.relay.xfcc import parse_xfcc

XFCC = "x-forwarded-client-cert"


def leaf_sha256(pair: Pair) -> str:
    leaf = pem.load_certificates(pair.crt.read_bytes(), pair.crt)[0]
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


async def test_curl_requests_and_httpx_carry_the_identity(make_env, client_pair: Pair) -> None:
    env = await make_env()
    want = leaf_sha256(client_pair)

    proc = await env.curl(env.url + "/curl?x=1")
    assert proc.returncode == 0, proc.stderr
    seen = decode(proc.stdout)
    assert seen["path"] == "/curl?x=1"
    (xfcc,) = seen["headers"][XFCC]
    (element,) = parse_xfcc(xfcc)
    assert element.get("Hash") == want
    assert element.get("Subject") == "CN=player-1,OU=players"
    assert element.get_all("URI") == ["spiffe://game.example/player/1"]
    assert seen["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["headers"]["x-forwarded-proto"] == ["https"]
    assert seen["headers"]["host"] == [f"localhost:{env.port}"]
    assert seen["headers"]["x-forwarded-host"] == [f"localhost:{env.port}"]

    seen = await env.get_json("/requests")
    assert parse_xfcc(seen["headers"][XFCC][0])[0].get("Hash") == want

    def with_httpx() -> httpx.Response:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(client_pair.crt, client_pair.key)
        with httpx.Client(verify=ctx, timeout=20) as client:
            return client.post(env.url + "/httpx", content=b"payload")

    response = await trio.to_thread.run_sync(with_httpx)
    assert response.status_code == 200
    body = response.json()
    assert body["body_bytes"] == 7 and body["method"] == "POST"
    assert parse_xfcc(body["headers"][XFCC][0])[0].get("Hash") == want
    assert (
        env.proxy.metrics.sample(
            "mtlsproxy_handshakes_total",
            {"listener": "127.0.0.1:0", "result": "ok", "resumed": "false"},
        )
        >= 1
    )


async def test_a_client_supplied_xfcc_never_reaches_the_backend(
    make_env, client_pair: Pair
) -> None:
    env = await make_env()
    spoof = 'Hash=0000;Subject="CN=admin";URI=spiffe://game.example/admin'
    raw = (
        f"GET /spoof HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Client-Cert: {spoof}\r\n"
        f"x-forwarded-client-cert: {spoof}\r\nX-FORWARDED-CLIENT-CERT: {spoof}\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nConnection: close\r\n\r\n"
    ).encode()
    (answer,) = parse_responses(await env.raw(raw))
    assert answer.status == 200
    seen = decode(answer.body)
    (xfcc,) = seen["headers"][XFCC]
    assert parse_xfcc(xfcc)[0].get("Hash") == leaf_sha256(client_pair)
    assert "admin" not in xfcc
    assert seen["headers"]["x-forwarded-for"] == ["127.0.0.1"]


async def test_openssl_without_a_certificate_gets_the_alert_and_no_http(make_env) -> None:
    env = await make_env()
    proc = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{env.port}", "-servername", "localhost",
         "-CAfile", str(env.ca_bundle), "-quiet"],
        stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert b"certificate required" in output
    assert b"HTTP/1.1" not in proc.stdout
    assert (
        env.proxy.metrics.sample(
            "mtlsproxy_handshakes_total",
            {"listener": "127.0.0.1:0", "result": "no_cert", "resumed": "false"},
        )
        == 1
    )


async def test_curl_without_a_certificate_is_told_why(make_env) -> None:
    env = await make_env()
    proc = await env.curl(env.url + "/", pair=None)
    assert proc.returncode != 0
    assert b"alert certificate required" in proc.stderr


async def test_strangers_and_expired_certificates_are_refused(
    make_env, issue: IssueFn, issue_other: IssueFn
) -> None:
    env = await make_env()
    stranger = issue_other("client", "mallory")
    expired = issue("client", "old", now=datetime.now(UTC) - timedelta(days=2))
    server_only = issue("server", "not-a-client")
    for pair, alert, result in (
        (stranger, b"unknown ca", "unknown_ca"),
        (expired, b"certificate expired", "expired"),
        (server_only, b"unsupported certificate", "bad_cert"),
    ):
        proc = await env.curl(env.url + "/", pair=pair)
        assert proc.returncode != 0, result
        assert alert in proc.stderr, (result, proc.stderr)
        assert b"x-forwarded-client-cert" not in proc.stdout
        labels = {"listener": "127.0.0.1:0", "result": result, "resumed": "false"}
        assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


async def test_a_denied_identity_gets_403(make_env, issue: IssueFn, tmp_path) -> None:
    thief = issue("client", "thief", uris=["spiffe://game.example/player/666"])
    (tmp_path / "deny.txt").write_text(
        f"# stolen\nsha256:{leaf_sha256(thief)}\nuri:spiffe://nobody.example/x\n"
    )
    env = await make_env(tls=f'deny = "{tmp_path / "deny.txt"}"')
    proc = await env.curl("--http1.1", "-i", env.url + "/", pair=thief)
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"HTTP/1.1 403")
    assert b"denied" in proc.stdout and b"sha256" not in proc.stdout
    labels = {"listener": "127.0.0.1:0", "result": "denied", "resumed": "false"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1
    assert (await env.curl(env.url + "/")).returncode == 0  # others still pass


async def test_route_allow_rules(make_env, issue: IssueFn) -> None:
    routes = """
[[listeners.routes]]
path_prefix = "/admin"
backends = ["127.0.0.1:{b0}"]
[[listeners.routes.allow]]
ou = "admins"
[[listeners.routes.allow]]
uri_prefix = "spiffe://game.example/ops"

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{b0}"]
"""
    env = await make_env(routes=routes)
    admin = issue("client", "alice", ous=["admins"])
    ops = issue("client", "bot", uris=["spiffe://game.example/ops/deployer"])
    lookalike = issue("client", "eve", uris=["spiffe://game.example/opsx"])

    refused = await env.request("GET", "/admin/users")
    assert refused.status_code == 403
    assert refused.text == "403 Forbidden: client certificate not allowed on this route\n"
    assert (await env.request("GET", "/admin/users", pair=admin)).status_code == 200
    assert (await env.request("GET", "/admin", pair=ops)).status_code == 200
    assert (await env.request("GET", "/admin", pair=lookalike)).status_code == 403
    assert (await env.request("GET", "/administrators")).status_code == 200  # segment boundary
    assert (await env.request("GET", "/elsewhere")).status_code == 200


async def test_no_route_is_404(make_env) -> None:
    routes = """
[[listeners.routes]]
host = "api.example"
path_prefix = "/"
backends = ["127.0.0.1:{b0}"]
"""
    env = await make_env(routes=routes)
    response = await env.request("GET", "/")
    assert response.status_code == 404
    ok = await env.raw(b"GET / HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


async def test_session_resumption_keeps_checking(make_env, client_pair: Pair) -> None:
    """A resumed session (no certificate shown) still gets the identity forwarded."""
    env = await make_env()

    def two_connections() -> tuple[bool, bytes]:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(client_pair.crt, client_pair.key)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # sessions are available right away

        def one(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, bytes]:
            with (
                socket.create_connection(("127.0.0.1", env.port), timeout=20) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
            ):
                tls.sendall(b"GET /r HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return tls.session, tls.session_reused, data

        session, _, _ = one(None)
        _, reused, data = one(session)
        return reused, data

    reused, data = await trio.to_thread.run_sync(two_connections)
    assert reused
    assert leaf_sha256(client_pair).encode() in data
    labels = {"listener": "127.0.0.1:0", "result": "ok", "resumed": "true"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


async def test_each_refusal_is_logged_with_peer_and_reason(
    make_env, issue_other: IssueFn, caplog: pytest.LogCaptureFixture
) -> None:
    env = await make_env()
    with caplog.at_level(logging.INFO, logger="mtlsproxy.listener"):
        await env.curl(env.url + "/", pair=None)
        await env.curl(env.url + "/", pair=issue_other("client", "mallory"))
        await trio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records]
    for reason in ("no_cert", "unknown_ca"):
        assert any("refused 127.0.0.1:" in x and f": {reason} " in x for x in lines), lines


# ---- RFC 9440 Client-Cert / Client-Cert-Chain, chosen per route (issue 16 item 6) --------

IDENTITY_ROUTES = """
[[listeners.routes]]
path_prefix = "/cert"
backends = ["127.0.0.1:{port}"]
identity_headers = ["client-cert"]

[[listeners.routes]]
path_prefix = "/chain"
backends = ["127.0.0.1:{port}"]
identity_headers = ["xfcc", "client-cert", "client-cert-chain"]
websocket = true

[[listeners.routes]]
path_prefix = "/none"
backends = ["127.0.0.1:{port}"]
identity_headers = []

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
websocket = true
"""
IDENTITY_NAMES = ("x-forwarded-client-cert", "client-cert", "client-cert-chain")
# Every spelling a client might try: cases, duplicates, CGI's underscore, a list value.
SPOOF = (
    "Client-Cert: :AAAA:\r\nclient-cert: :AAAA:\r\nCLIENT-CERT: :AAAA:\r\nClient_Cert: :AAAA:\r\n"
    "Client-Cert-Chain: :AAAA:, :AAAA:\r\nclient-cert-chain: :AAAA:\r\n"
    "CLIENT_CERT_CHAIN: :AAAA:\r\n"
)


async def _echo_every_header(stream: trio.SocketStream) -> None:
    """A backend that answers every header it received (names lowercased, values as
    received, in order), unlike the demo backend, which answers a fixed list."""
    await _answer_headers(stream, await read_request(stream))


async def _answer_headers(stream: trio.SocketStream, head: bytes) -> None:
    seen: dict[str, list[str]] = {}
    for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        seen.setdefault(name.decode().lower(), []).append(value.strip().decode())
    body = json.dumps({"target": head.split(b" ")[1].decode(), "headers": seen}).encode()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await stream.aclose()


async def identity_env(make_env, nursery):  # -> proxy_env.Env
    port = await serve_raw(nursery, _echo_every_header)
    return await make_env(routes=IDENTITY_ROUTES.replace("{port}", str(port)), backends=0)


def der_of(path: Path) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in pem.load_certificates(path.read_bytes(), path)]


def byte_sequences(values: list[str]) -> list[bytes]:
    """Decoded apart from the proxy's encoder: one field, RFC 8941 members split on ", "."""
    out = []
    for value in values:
        for member in value.split(", "):
            assert member.startswith(":") and member.endswith(":"), member
            out.append(base64.b64decode(member[1:-1], validate=True))
    return out


async def test_a_client_cert_route_gives_the_backend_exactly_the_client_s_certificate(
    make_env, nursery, client_pair: Pair
) -> None:
    env = await identity_env(make_env, nursery)
    leaf, _issuer = der_of(client_pair.crt)
    # curl and requests send the leaf and the intermediate, as `ca issue` writes them.
    proc = await env.curl(env.url + "/cert/x")
    assert proc.returncode == 0, proc.stderr
    for seen in (decode(proc.stdout), await env.get_json("/cert/y")):
        headers = seen["headers"]
        (value,) = headers["client-cert"]  # one field, one value
        assert byte_sequences([value]) == [leaf]
        assert x509.load_der_x509_certificate(leaf).subject.rfc4514_string() == (
            "CN=player-1,OU=players"
        )
        assert "client-cert-chain" not in headers and XFCC not in headers
        assert headers["x-forwarded-for"] == ["127.0.0.1"]


async def test_a_chain_route_gives_the_intermediates_without_the_root(
    make_env, nursery, client_pair: Pair, ca
) -> None:
    env = await identity_env(make_env, nursery)
    leaf, issuer = der_of(client_pair.crt)
    (root,) = der_of(ca.folder / "ca.crt")
    seen = (await env.get_json("/chain/x"))["headers"]
    assert byte_sequences(seen["client-cert"]) == [leaf]
    assert byte_sequences(seen["client-cert-chain"]) == [issuer]  # the trust anchor left out
    assert root not in byte_sequences(seen["client-cert-chain"])
    (xfcc,) = seen[XFCC]
    assert parse_xfcc(xfcc)[0].get("Hash") == leaf_sha256(client_pair)


async def test_the_default_route_gives_xfcc_only_and_an_empty_list_gives_none(
    make_env, nursery, client_pair: Pair
) -> None:
    env = await identity_env(make_env, nursery)
    seen = (await env.get_json("/elsewhere"))["headers"]
    assert [n for n in IDENTITY_NAMES if n in seen] == [XFCC]
    assert parse_xfcc(seen[XFCC][0])[0].get("Hash") == leaf_sha256(client_pair)
    seen = (await env.get_json("/none/x"))["headers"]
    assert [n for n in IDENTITY_NAMES if n in seen] == []
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize("path", ["/cert", "/chain", "/none", "/"])
@pytest.mark.parametrize(
    "connection", ["close", "close, Client-Cert, Client-Cert-Chain"], ids=["plain", "nominated"]
)
async def test_client_sent_identity_headers_never_reach_the_backend_on_any_route(
    make_env, nursery, client_pair: Pair, path: str, connection: str
) -> None:
    env = await identity_env(make_env, nursery)
    leaf, issuer = der_of(client_pair.crt)
    for upgrade in ("", "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n"):  # fmt: skip
        hop = "Connection: Upgrade\r\n" if upgrade else ""
        raw = (
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{upgrade}{SPOOF}"
            f"Connection: {connection}\r\n{hop}"
            f"X-Forwarded-Client-Cert: Hash=00\r\n\r\n"
        ).encode()
        (answer,) = parse_responses(await env.raw(raw))
        assert answer.status == 200
        seen = decode(answer.body)["headers"]
        assert not any(":AAAA:" in v for values in seen.values() for v in values)
        assert not any(k.replace("_", "-") in IDENTITY_NAMES and "_" in k for k in seen)
        want = {
            "/cert": {"client-cert": [leaf]},
            "/chain": {"client-cert": [leaf], "client-cert-chain": [issuer]},
            "/none": {},
            "/": {},
        }[path]
        for name in ("client-cert", "client-cert-chain"):
            assert byte_sequences(seen.get(name, [])) == want.get(name, [])
        assert len(seen.get(XFCC, [])) == (1 if path in ("/chain", "/") else 0)
        if upgrade and path in ("/chain", "/"):  # the WebSocket handshake went up as one
            assert seen["upgrade"] == ["websocket"]


async def test_a_resumed_session_forwards_the_same_certificate_and_chain(
    make_env, nursery, client_pair: Pair
) -> None:
    """OpenSSL keeps only the leaf in a session: the chain of a resumed session is the one
    its full handshake verified, remembered even when that connection used no route that
    forwards it."""
    env = await identity_env(make_env, nursery)

    def connections(paths: list[str]) -> list[tuple[bool, bytes]]:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(client_pair.crt, client_pair.key)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # sessions are available right away
        session = None
        out = []
        for path in paths:
            with (
                socket.create_connection(("127.0.0.1", env.port), timeout=20) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
            ):
                tls.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
                )
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                session = tls.session
                out.append((tls.session_reused, data))
        return out

    paths = ["/elsewhere", "/chain", "/chain"]
    answers = await trio.to_thread.run_sync(connections, paths)
    assert [reused for reused, _ in answers] == [False, True, True]
    leaf, issuer = der_of(client_pair.crt)
    for _, data in answers[1:]:
        seen = decode(parse_responses(data)[0].body)["headers"]
        assert byte_sequences(seen["client-cert"]) == [leaf]
        assert byte_sequences(seen["client-cert-chain"]) == [issuer]


async def test_a_denied_client_s_certificate_never_reaches_a_client_cert_backend(
    make_env, nursery, issue: IssueFn, tmp_path
) -> None:
    """Verified by the CA but denied: 403 from the proxy, nothing sent to the backend."""
    thief = issue("client", "thief")
    (tmp_path / "deny.txt").write_text(f"sha256:{leaf_sha256(thief)}\n")
    seen: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        seen.append(await read_request(stream))
        await _answer_headers(stream, seen[-1])

    port = await serve_raw(nursery, record)
    routes = IDENTITY_ROUTES.replace("{port}", str(port))
    env = await make_env(routes=routes, backends=0, tls=f'deny = "{tmp_path / "deny.txt"}"')
    for path in ("/cert", "/chain"):
        assert (await env.request("GET", path, pair=thief)).status_code == 403
    assert seen == []
    assert (await env.request("GET", "/cert")).status_code == 200  # others still pass
    assert len(seen) == 1
