"""The TLS engine against real clients on 127.0.0.1: openssl s_client, curl, stdlib ssl.

Each failure test checks both ends: the server's ``HandshakeError.reason`` and the alert
the client actually received (which proves the alert left before the socket closed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio.testing
from conftest_tls_helpers import (
    NOW,
    Leaf,
    Material,
    PrivateCA,
    client_context,
    connect,
    echo_line,
    fingerprint,
    run_tool,
    s_client,
    serve,
    stdlib_context,
    stdlib_exchange,
    stdlib_expect_alert,
)
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

from mtlsproxy.tls.engine import HandshakeError, TLSStream, _Parker


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Material:
    folder = tmp_path_factory.mktemp("pki")
    ca = PrivateCA("Test")
    (folder / "ca.crt").write_bytes(ca.bundle_pem())
    server = ca.issue("localhost", kind="server", dns=["localhost"], ips=["127.0.0.1"])
    return Material(ca=ca, server=server, client=ca.issue("alice"), folder=folder)


# ---- success with real clients ------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_s_client_echo_and_peer_identity(pki: Material, version: str) -> None:
    crt, key = pki.client_files(pki.client, "alice")
    async with serve(pki.server_context(), echo_line) as server:
        proc = await run_tool(
            *s_client(
                server.port,
                pki,
                "-cert",
                crt,
                "-key",
                key,
                "-cert_chain",
                crt,
                f"-tls{version.replace('.', '_')}",
            ),
            stdin=b"hello over mtls\n",
        )
        tls = await server.next_result()
    assert isinstance(tls, TLSStream), tls
    assert proc.stdout == b"hello over mtls\n", proc.stderr
    assert tls.peer_certificate is not None
    assert tls.peer_certificate.fingerprint(hashes.SHA256()) == fingerprint(pki.client)
    assert tls.tls_version == f"TLSv{version}"
    assert tls.alpn_protocol is None  # s_client offers no ALPN
    # leaf, issuing CA, root: the chain OpenSSL built, not just what the client sent
    chain = tls.verified_chain
    assert chain is not None
    assert [c.subject for c in chain] == [
        pki.client.cert.subject,
        pki.ca.inter.subject,
        pki.ca.root.subject,
    ]


async def test_server_sends_leaf_and_intermediate_but_not_root(pki: Material) -> None:
    crt, key = pki.client_files(pki.client, "alice")
    # Even if the caller's chain has the root at the end, it must not be sent.
    ctx = pki.server_context(cert_chain=[*pki.server.cert_chain, pki.ca.root])
    async with serve(ctx, echo_line) as server:
        argv = s_client(server.port, pki, "-cert", crt, "-key", key, "-showcerts")
        argv[argv.index("-quiet")] = "-ign_eof"  # -quiet would hide the certificates
        proc = await run_tool(*argv, stdin=b"x\n")
    out = proc.stdout.decode()
    assert out.count("-----BEGIN CERTIFICATE-----") == 2, out
    lines = out.splitlines()
    root_cn = pki.ca.root_cn
    assert any(x.strip().startswith("i:") and root_cn in x for x in lines)
    assert not any(x.strip().startswith("s:") and root_cn in x for x in lines)
    # and the CertificateRequest names the CA we trust for clients
    acceptable = out.split("Acceptable client certificate CA names\n", 1)[1].splitlines()[0]
    assert pki.ca.root_cn in acceptable


async def test_stdlib_client_and_alpn(pki: Material) -> None:
    ctx = stdlib_context(pki, pki.client)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    async with serve(pki.server_context()) as server:
        got, _, _ = await trio.to_thread.run_sync(stdlib_exchange, server.port, ctx)
        tls = await server.next_result()
    assert got == b"ping"
    assert isinstance(tls, TLSStream)
    assert tls.alpn_protocol == b"http/1.1"
    assert tls.cipher and tls.tls_version == "TLSv1.3"


async def test_alpn_without_http11_is_refused(pki: Material) -> None:
    ctx = stdlib_context(pki, pki.client)
    ctx.set_alpn_protocols(["h2"])
    async with serve(pki.server_context()) as server:
        reason = await trio.to_thread.run_sync(stdlib_expect_alert, server.port, ctx)
        result = await server.next_result()
    assert "no application protocol" in reason  # CPython has no name for alert 120
    assert isinstance(result, HandshakeError) and result.reason == "protocol_error"


async def test_curl_http_request(pki: Material) -> None:
    crt, key = pki.client_files(pki.client, "alice")

    async def tiny_http(tls: TLSStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await tls.receive_some()
        assert request.startswith(b"GET /hello HTTP/1.1\r\n")
        body = tls.peer_certificate.subject.rfc4514_string().encode()  # type: ignore[union-attr]
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        await tls.send_all(head.encode() + body)

    async with serve(pki.server_context(), tiny_http) as server:
        proc = await run_tool(
            "curl", "-sS", "--max-time", "10", "--cacert", pki.cafile, "--cert", crt,
            "--key", key, f"https://localhost:{server.port}/hello",
        )  # fmt: skip
        tls = await server.next_result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"CN=alice"
    assert isinstance(tls, TLSStream) and tls.alpn_protocol == b"http/1.1"


# ---- refusals: the server's reason and the client's alert --------------------------


@pytest.mark.parametrize(
    ("make_leaf", "reason", "alert"),
    [
        (lambda pki: None, "no_cert", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        (lambda pki: PrivateCA("Other").issue("mallory"), "unknown_ca", "TLSV1_ALERT_UNKNOWN_CA"),
        (
            lambda pki: pki.ca.issue(
                "old", not_before=NOW - dt.timedelta(days=2), not_after=NOW - dt.timedelta(hours=1)
            ),
            "expired",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        ),
        (
            lambda pki: pki.ca.issue("early", not_before=NOW + dt.timedelta(hours=1)),
            "expired",
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ),
        (
            lambda pki: pki.ca.issue("server-only", kind="server"),
            "bad_cert",
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        ),
    ],
    ids=["no-cert", "other-ca", "expired", "not-yet-valid", "server-eku"],
)
async def test_refused_client_sees_the_alert(
    pki: Material, make_leaf: Callable[[Material], Leaf | None], reason: str, alert: str
) -> None:
    ctx = stdlib_context(pki, make_leaf(pki))
    async with serve(pki.server_context()) as server:
        got = await trio.to_thread.run_sync(stdlib_expect_alert, server.port, ctx)
        result = await server.next_result()
    assert isinstance(result, HandshakeError)
    assert result.reason == reason, result.detail
    assert got == alert  # not ConnectionResetError: the drain kept the kernel from RST


async def test_alert_survives_a_client_that_writes_late(pki: Material) -> None:
    # The client's bytes arrive *after* the server failed the handshake. Closing at once
    # would answer them with RST, and the client's next write fails with EPIPE/ECONNRESET
    # before it ever reads the alert waiting in its buffer.
    ctx = stdlib_context(pki, None)
    async with serve(pki.server_context()) as server:
        got = await trio.to_thread.run_sync(stdlib_expect_alert, server.port, ctx, 0.2)
        result = await server.next_result()
    assert isinstance(result, HandshakeError) and result.reason == "no_cert"
    assert got == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_s_client_without_cert_reports_alert(pki: Material, version: str) -> None:
    async with serve(pki.server_context()) as server:
        proc = await run_tool(*s_client(server.port, pki, f"-tls{version.replace('.', '_')}"))
        result = await server.next_result()
    assert isinstance(result, HandshakeError) and result.reason == "no_cert"
    expected = b"certificate required" if version == "1.3" else b"handshake failure"
    assert expected in proc.stderr, proc.stderr


async def test_plain_http_is_a_protocol_error(pki: Material) -> None:
    async with serve(pki.server_context()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            # The server answers with FIN (maybe after an alert), not RST: reading to EOF
            # does not raise, and our close ends the server's drain at once.
            while await stream.receive_some():
                pass
        await stream.aclose()
        result = await server.next_result()
    assert isinstance(result, HandshakeError) and result.reason == "protocol_error"
    assert "wrong version number" in result.detail or "http request" in result.detail


async def test_tls12_refuses_non_ecdhe_ciphers(pki: Material) -> None:
    crt, key = pki.client_files(pki.client, "alice")
    async with serve(pki.server_context()) as server:
        argv = s_client(server.port, pki, "-cert", crt, "-key", key, "-tls1_2")
        proc = await run_tool(*argv, "-cipher", "AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA")
        result = await server.next_result()
    assert isinstance(result, HandshakeError) and result.reason == "protocol_error"
    assert "no shared cipher" in result.detail
    assert b"handshake failure" in proc.stderr


async def test_silent_client_times_out(pki: Material) -> None:
    async with serve(pki.server_context(), handshake_timeout=0.3) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        result = await server.next_result()
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # closed, not left hanging
        await stream.aclose()
    assert isinstance(result, HandshakeError) and result.reason == "timeout"


async def test_tls13_minimum_refuses_tls12(pki: Material) -> None:
    ctx = stdlib_context(pki, pki.client, version="1.2")
    async with serve(pki.server_context(min_version="1.3")) as server:
        got = await trio.to_thread.run_sync(stdlib_expect_alert, server.port, ctx)
        result = await server.next_result()
    assert got == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert isinstance(result, HandshakeError) and result.reason == "protocol_error"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_client_verifies_server_name(pki: Material, host: str) -> None:
    async with serve(pki.server_context()) as server:
        with trio.fail_after(10):
            tls = await connect(server.port, client_context(pki), host)
            await tls.send_all(b"hi")
            assert await tls.receive_some() == b"hi"
            await tls.aclose()


async def test_client_refuses_wrong_server_name(pki: Material) -> None:
    async with serve(pki.server_context()) as server:
        with pytest.raises(HandshakeError) as info, trio.fail_after(10):
            await connect(server.port, client_context(pki), "api.example.com")
    assert info.value.reason == "bad_cert"
    assert "X509_V_ERR 62" in info.value.detail  # hostname mismatch


async def test_large_transfer_both_ways_at_once(pki: Material) -> None:
    size = 20 * 1024 * 1024
    blob = os.urandom(size)
    async with serve(pki.server_context()) as server:
        tls = await connect(server.port, client_context(pki))
        received = bytearray()

        async def sender() -> None:
            view = memoryview(blob)
            for offset in range(0, size, 1024 * 1024):  # uneven writes, big ones
                await tls.send_all(view[offset : offset + 1024 * 1024])

        async def receiver() -> None:
            while len(received) < size:
                received.extend(await tls.receive_some(1 << 20))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
            await tls.aclose()
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()


# ---- sessions ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_session_resumes_on_same_context_only(pki: Material, version: str) -> None:
    client = stdlib_context(pki, pki.client, version=version)
    context_a = pki.server_context()
    async with serve(context_a) as server:
        _, session, reused = await trio.to_thread.run_sync(stdlib_exchange, server.port, client)
        first = await server.next_result()
        assert session is not None and not reused
        _, _, reused = await trio.to_thread.run_sync(
            partial(stdlib_exchange, server.port, client, session=session)
        )
        second = await server.next_result()
    assert isinstance(first, TLSStream) and not first.session_reused
    assert isinstance(second, TLSStream) and second.session_reused and reused
    # Identity survives resumption; the verified chain is not kept in the session.
    assert second.peer_certificate is not None
    assert second.peer_certificate.fingerprint(hashes.SHA256()) == fingerprint(pki.client)
    assert second.verified_chain is None

    # Same material, new context (as after a CA rotation): the old session must not resume.
    async with serve(pki.server_context()) as server:
        _, _, reused = await trio.to_thread.run_sync(
            partial(stdlib_exchange, server.port, client, session=session)
        )
        third = await server.next_result()
    assert isinstance(third, TLSStream) and not third.session_reused and not reused


# ---- EOF, close_notify, half-close -------------------------------------------------


def _client_then(port: int, ctx: ssl.SSLContext, how: str, payload: bytes = b"bye") -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    if how != "reset":
        tls.sendall(payload)
    if how == "close_notify":
        tls.unwrap().close()
    elif how == "eof":
        # TCP FIN without close_notify. (Plain close() would RST here: the server's TLS 1.3
        # session tickets sit unread in our receive buffer.)
        tls.shutdown(socket.SHUT_WR)
        while tls.recv(4096):
            pass
        tls.close()
    else:
        # RST while the server is parked in receive_some. (With bytes still queued at the
        # server, Linux may drop them and report a plain EOF instead: not testable.)
        time.sleep(0.5)
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()


# Full records take a batching path (several records per receive_some): the same ends.
BIG = bytes(range(256)) * 256 * 3 + b"tail"  # three full 16 KiB records and a bit


@pytest.mark.parametrize("payload", [b"bye", BIG], ids=["small", "full-records"])
@pytest.mark.parametrize(
    ("how", "outcome"),
    [("close_notify", "clean"), ("eof", "unclean"), ("reset", "broken")],
)
async def test_receive_after_peer_closes(
    pki: Material, how: str, outcome: str, payload: bytes
) -> None:
    seen: list[tuple[str, object]] = []
    done = trio.Event()

    async def record(tls: TLSStream) -> None:
        try:
            await trio.sleep(0.2)  # let the close (or RST) arrive before we read
            data = b""
            while chunk := await tls.receive_some():
                data += chunk
            seen.append(("clean" if tls.eof_was_clean else "unclean", data))
        except trio.BrokenResourceError as exc:
            seen.append(("broken", exc))
        finally:
            done.set()

    async with serve(pki.server_context(), record) as server:
        ctx = stdlib_context(pki, pki.client)
        await trio.to_thread.run_sync(_client_then, server.port, ctx, how, payload)
        with trio.fail_after(10):
            await done.wait()
    assert seen[0][0] == outcome, seen
    if outcome != "broken":
        assert seen[0][1] == payload  # data before the EOF is delivered, then b""


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_half_close_keeps_the_other_direction(pki: Material, version: str) -> None:
    async def upload_after_eof(tls: TLSStream) -> None:
        await tls.send_eof()  # close_notify; we keep reading
        with pytest.raises(trio.ClosedResourceError):
            await tls.send_all(b"x")
        data = b""
        while chunk := await tls.receive_some():
            data += chunk
        assert data == b"late data" and tls.eof_was_clean

    async with serve(pki.server_context(min_version="1.2"), upload_after_eof) as server:
        ctx = client_context(pki, min_version=version)
        if version == "1.2":
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        with trio.fail_after(10):
            tls = await connect(server.port, ctx)
            assert tls.tls_version == f"TLSv{version}"
            assert await tls.receive_some() == b""  # the server's close_notify
            await tls.send_all(b"late ")
            await tls.send_all(b"data")
            await tls.send_eof()
            await tls.aclose()
            await tls.aclose()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await tls.receive_some()
            result = await server.next_result()
            assert isinstance(result, TLSStream)


async def test_close_notify_after_full_records_ends_the_stream_while_tcp_stays_open(
    pki: Material,
) -> None:
    """Full records are taken several at a time; a close_notify met in that batch must
    still end the stream on the next call, even though the peer keeps its TCP side open
    (a half-close): it waits for our answer. (Fault: the batch swallowed the close_notify
    and the next receive waited on an idle socket.)"""
    payload = bytes(range(256)) * 64 * 2  # two full 16 KiB records

    async def read_all_then_answer(tls: TLSStream) -> None:
        await trio.sleep(0.2)  # the records and the close_notify are all queued first
        data = b""
        while chunk := await tls.receive_some(1 << 20):
            data += chunk
        assert tls.eof_was_clean
        await tls.send_all(b"got %d" % len(data))

    async with serve(pki.server_context(), read_all_then_answer) as server:
        with trio.fail_after(10):
            tls = await connect(server.port, client_context(pki))
            await tls.send_all(payload)
            await tls.send_eof()  # close_notify; TCP stays open, we keep reading
            assert await tls.receive_some() == b"got %d" % len(payload)
            await tls.aclose()


async def test_trio_stream_conformance(pki: Material) -> None:
    # trio's own generic checks: concurrent-use detection, aclose semantics, send_eof...
    server_ctx, client_ctx = pki.server_context(), client_context(pki)

    async def make() -> tuple[TLSStream, TLSStream]:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        client_raw = await trio.open_tcp_stream("127.0.0.1", port)
        server_raw = await listener.accept()
        await listener.aclose()
        server = TLSStream(server_raw, server_ctx, server_side=True)
        client = TLSStream(client_raw, client_ctx, server_side=False, server_hostname="localhost")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
        return client, server

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(make, None)


async def test_parker_lets_a_second_task_piggyback() -> None:
    # trio allows one waiter per fd and direction; a sender that needs to read while the
    # receiver is parked must share that wait instead of raising BusyResourceError.
    a, b = socket.socketpair()
    a.setblocking(False)
    parker = _Parker(trio.lowlevel.wait_readable)
    woke: list[str] = []

    async def waiter(name: str) -> None:
        await parker.wait(a)
        woke.append(name)

    with a, b, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []
            b.send(b"x")
    assert sorted(woke) == ["first", "second"]
