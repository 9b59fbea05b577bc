"""Helpers for TLS tests: certificates, a TLSStream echo server, and real clients.

Certificates are built with ``cryptography`` directly: root CA -> issuing CA -> leaves,
plus the odd ones the tests need (expired, serverAuth-only EKU, another CA). Temporary
until ``mtlsproxy.pki`` can issue these shapes itself.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from mtlsproxy.tls.context import build_client_context, build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream

Handler = Callable[[TLSStream], Awaitable[None]]

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # intermediates, never the root

    @property
    def cert_chain(self) -> list[x509.Certificate]:
        return [self.cert, *self.chain]

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)
        )
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return crt, key


@dataclass
class PrivateCA:
    """A root and an issuing intermediate, like ``mtlsproxy ca init`` makes."""

    name: str = "Test"
    root_key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    inter_key: ec.EllipticCurvePrivateKey = field(init=False)
    inter: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca_cert(
            f"{self.name} Root", self.root_key, f"{self.name} Root", self.root_key, 1
        )
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._ca_cert(
            f"{self.name} Issuing", self.inter_key, f"{self.name} Root", self.root_key, 0
        )

    @staticmethod
    def _ca_cert(
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer_cn: str,
        issuer_key: ec.EllipticCurvePrivateKey,
        path_length: int,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(issuer_cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(issuer_key, hashes.SHA256())
        )

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.root]

    def bundle_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

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
        key = ec.generate_private_key(ec.SECP256R1())
        eku = {
            "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
            "server": [ExtendedKeyUsageOID.SERVER_AUTH],
        }[kind]
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.inter.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(minutes=5))
            .not_valid_after(not_after or NOW + dt.timedelta(hours=24))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage(eku), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
        cert = builder.sign(self.inter_key, hashes.SHA256())
        return Leaf(cert=cert, key=key, chain=[self.inter])


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
