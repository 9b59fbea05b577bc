"""Helpers for TLS tests: certificates, a TLSStream echo server, and real clients.

Certificates come from the project's own CA (``mtlsproxy.pki``): root -> issuing CA ->
leaves, including the odd ones the tests need (expired, not yet valid, serverAuth-only
EKU, another CA).
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from mtlsproxy.pem import PrivateKey, certificate_pem, private_key_pem
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.pki.ca import BACKDATE
from mtlsproxy.tls.context import build_client_context, build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream

Handler = Callable[[TLSStream], Awaitable[None]]

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Leaf:
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate]  # intermediates, never the root

    @property
    def cert_chain(self) -> list[x509.Certificate]:
        return [self.cert, *self.chain]

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt.write_bytes(b"".join(certificate_pem(c) for c in self.cert_chain))
        key.write_bytes(private_key_pem(self.key))
        return crt, key


@dataclass
class PrivateCA:
    """The project's own CA (``mtlsproxy.pki``), with the small interface these tests use:
    leaves given by their validity window, including expired and not-yet-valid ones."""

    name: str = "Test"
    _ca: CertificateAuthority = field(init=False)

    def __post_init__(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="tls-engine-ca-"))
        weakref.finalize(self, shutil.rmtree, folder, True)
        self._ca = CertificateAuthority.init(folder / "ca", name=self.name)

    @property
    def root(self) -> x509.Certificate:
        return self._ca.root

    @property
    def inter(self) -> x509.Certificate:
        return self._ca.issuer

    @property
    def root_cn(self) -> str:
        return str(self.root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.root]

    def bundle_pem(self) -> bytes:
        return certificate_pem(self.root)

    def issue(
        self,
        cn: str,
        *,
        kind: str = "client",
        dns: list[str] | None = None,
        ips: list[str] | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Leaf:
        # The CA backdates not_before by BACKDATE; ``now`` places the window as asked.
        now = not_before + BACKDATE if not_before else NOW
        ttl = not_after - now if not_after else dt.timedelta(hours=24)
        issued = self._ca.issue(
            kind="server" if kind == "server" else "client",
            name=cn, dns=dns or [], ips=ips or [], ttl=ttl, now=now,
        )  # fmt: skip
        return Leaf(cert=issued.certificate, key=issued.key, chain=list(issued.chain))


# ---- material ----------------------------------------------------------------------


@dataclass
class Material:
    ca: PrivateCA
    server: Leaf
    client: Leaf
    folder: Path

    def server_context(self, **kw: object) -> SSL.Context:
        args: dict[str, object] = {
            "cert_chain": self.server.cert_chain,
            "key": self.server.key,
            "client_cas": self.ca.bundle,
            "session_id_context": b"test",
        }
        args.update(kw)
        return build_server_context(**args)  # type: ignore[arg-type]

    def client_files(self, leaf: Leaf, stem: str) -> tuple[str, str]:
        crt, key = leaf.write(self.folder, stem)
        return str(crt), str(key)

    @property
    def cafile(self) -> str:
        return str(self.folder / "ca.crt")


# ---- a server ----------------------------------------------------------------------


@dataclass
class Server:
    port: int
    results: trio.MemoryReceiveChannel[TLSStream | HandshakeError]

    async def next_result(self) -> TLSStream | HandshakeError:
        with trio.fail_after(10):
            return await self.results.receive()


async def echo_line(tls: TLSStream) -> None:
    # s_client -quiet ignores its stdin EOF: answer one line, then close.
    line = b""
    while not line.endswith(b"\n"):
        line += await tls.receive_some()
    await tls.send_all(line)


async def echo(tls: TLSStream) -> None:
    while data := await tls.receive_some():
        await tls.send_all(data)


@asynccontextmanager
async def serve(
    ctx: SSL.Context, handler: Handler = echo, *, handshake_timeout: float = 5.0
) -> AsyncIterator[Server]:
    send, receive = trio.open_memory_channel[TLSStream | HandshakeError](math.inf)

    async def one(stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=handshake_timeout)
        except HandshakeError as exc:
            send.send_nowait(exc)
            return
        send.send_nowait(tls)
        try:
            await handler(tls)
        finally:
            await tls.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, one, listeners))
        yield Server(listeners[0].socket.getsockname()[1], receive)
        nursery.cancel_scope.cancel()


def fingerprint(leaf: Leaf) -> bytes:
    return leaf.cert.fingerprint(hashes.SHA256())


# ---- clients -----------------------------------------------------------------------


def stdlib_context(
    pki: Material, leaf: Leaf | None, *, version: str | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.cafile)
    if leaf is not None:
        ctx.load_cert_chain(*pki.client_files(leaf, f"client-{id(leaf)}"))
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def stdlib_exchange(
    port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """Connect, send, read the echo; returns (echo, session, session_reused)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return got, tls.session, bool(tls.session_reused)


def stdlib_expect_alert(port: int, ctx: ssl.SSLContext, delay: float = 0.0) -> str:
    """Connect and read until the server's verdict; returns the SSLError reason."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3: the client finishes first; the server's alert arrives on read.
                time.sleep(delay)
                tls.sendall(b"ping")
                if delay:
                    time.sleep(delay)  # lets a RST (if any) come back...
                    tls.sendall(b"ping")  # ...so that this write fails with EPIPE
                tls.recv(100)
        except ssl.SSLError as exc:
            return str(exc.reason or exc)
    raise AssertionError("the handshake was not refused")


async def run_tool(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(15):
        return await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


def s_client(port: int, pki: Material, *extra: str) -> list[str]:
    return [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", pki.cafile, "-verify_return_error", "-quiet", *extra,
    ]  # fmt: skip


# ---- our own client side ----------------------------------------------------------


async def connect(port: int, ctx: SSL.Context, host: str | None = "localhost") -> TLSStream:
    tls = TLSStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_side=False, server_hostname=host
    )
    await tls.do_handshake(timeout=5)
    return tls


def client_context(pki: Material, **kw: object) -> SSL.Context:
    args: dict[str, object] = {
        "server_cas": pki.ca.bundle,
        "cert_chain": pki.client.cert_chain,
        "key": pki.client.key,
    }
    args.update(kw)
    return build_client_context(**args)  # type: ignore[arg-type]
