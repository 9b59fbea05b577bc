"""One listening address: accept, handshake, identify, hand over to the protocol.

The connection cap is taken *before* accept: at the cap we stop accepting and the kernel
backlog holds the queue, instead of accepting sockets we cannot serve. Every connection
runs in its own task and every error it raises is caught there, so one bad client never
affects another.

What is checked on every connection, resumed or not: a resumed TLS session skips
certificate verification (OpenSSL trusts the cached session), so expiry and the deny list
are checked here against the identity from the session. CA membership is covered by the
session id context, which changes with the CA bundle (see ``tls.store``).
"""

from __future__ import annotations

import errno
import logging
import socket
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from mtlsproxy.accesslog import AccessLog
from mtlsproxy.address import Address, peer_name
from mtlsproxy.config import Listener
from mtlsproxy.identity import (
    Identity,
    IdentityCache,
    IdentityError,
    PeerCertificateCache,
    PeerCertificates,
)
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import Allow
from mtlsproxy.relay.routing import RouteTable
from mtlsproxy.server.h2 import Http2Connection
from mtlsproxy.server.http import HttpConnection, RouteRuntime
from mtlsproxy.server.tcp import TcpRoute, proxy_header, relay_tcp
from mtlsproxy.server.upstream import UpstreamPool
from mtlsproxy.sessions import Session, SessionRegistry, identity_verdict
from mtlsproxy.tls.engine import HandshakeError, TLSStream
from mtlsproxy.tls.store import CredentialStore, Material

log = logging.getLogger("mtlsproxy.listener")

# Accept errors that mean "out of resources right now": wait and retry, as trio's
# serve_listeners does, rather than let one burst take the listener down.
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
LINGER_SECONDS = 1.0


@dataclass
class Shared:
    """What every connection of the proxy shares."""

    store: CredentialStore
    sessions: SessionRegistry
    pool: UpstreamPool
    metrics: Metrics
    handshake_timeout: float
    access: AccessLog
    identities: IdentityCache = field(default_factory=IdentityCache)
    # The verified DER of leaves (and the chain each was last verified with) for RFC
    # 9440's headers. ``remember_chains``: some route forwards Client-Cert-Chain, so every
    # full handshake records its chain for the sessions that resume from it (on any http
    # listener: they share one TLS context).
    certificates: PeerCertificateCache = field(default_factory=PeerCertificateCache)
    remember_chains: bool = False


@dataclass
class ListenerRuntime:
    config: Listener
    routes: RouteTable[RouteRuntime] | None  # mode = "http"
    tcp: TcpRoute | None  # mode = "tcp"
    limit: trio.Semaphore
    # Made once: every session refers to this string, not a copy of its own.
    label: str = field(init=False)
    allow: Allow | None = field(init=False)  # mode = "tcp": its rules, normalized at load
    forwards_chain: bool = field(init=False)  # a route sends Client-Cert-Chain
    alpn: tuple[bytes, ...] | None = field(init=False)  # the server context's key

    def __post_init__(self) -> None:
        self.label = self.config.label
        self.alpn = self.config.alpn_protocols
        self.allow = None if self.config.allow is None else Allow(self.config.allow)
        self.forwards_chain = any(
            "client-cert-chain" in route.identity_headers for route in self.config.routes
        )


async def accept_loop(
    runtime: ListenerRuntime,
    sock: trio.SocketListener,
    shared: Shared,
    connections: trio.Nursery,
) -> None:
    if runtime.forwards_chain:  # before this listener's first handshake
        shared.remember_chains = True
    while True:
        await runtime.limit.acquire()
        try:
            stream = await sock.accept()
        except OSError as exc:
            runtime.limit.release()
            if exc.errno in _TRANSIENT_ACCEPT:
                log.warning("listener %s: accept failed (%s); retrying", runtime.label, exc)
                await trio.sleep(0.1)
                continue
            raise
        except BaseException:
            runtime.limit.release()
            raise
        connections.start_soon(_connection, runtime, stream, shared)


async def _connection(runtime: ListenerRuntime, stream: trio.SocketStream, shared: Shared) -> None:
    peer = peer_name(stream.socket)
    label = runtime.label
    try:
        with shared.metrics.child(shared.metrics.active_connections, label).track_inprogress():
            admitted = await _admit(runtime, stream, shared, peer)
            if admitted is not None:
                # Served in this frame, not one more coroutine deep: an idle connection
                # holds its whole await chain, and every frame of it is memory.
                tls, session = admitted
                clean = False
                shared.sessions.add(session)
                try:
                    with session.cancel_scope:
                        if runtime.tcp is not None:
                            await relay_tcp(
                                tls,
                                session=session,
                                listener=runtime.config,
                                route=runtime.tcp,
                                pool=shared.pool,
                                metrics=shared.metrics,
                                access=shared.access,
                            )
                        else:
                            http = _http_connection(runtime, tls, session, shared)
                            await http.run()
                            clean = http.clean_end  # it ended with nothing unread
                finally:
                    shared.sessions.remove(session)
                    await _close(tls, clean=clean)
    except Exception:
        log.exception("listener %s: connection from %s failed", label, peer)
    finally:
        runtime.limit.release()


async def _close(tls: TLSStream, *, clean: bool) -> None:
    if clean:  # nothing unread: a plain close (close_notify, then close) is safe
        with trio.CancelScope(shield=True):
            await tls.aclose()
    else:
        await lingering_close(tls)


async def _admit(
    runtime: ListenerRuntime, stream: trio.SocketStream, shared: Shared, peer: str
) -> tuple[TLSStream, Session] | None:
    """Handshake, identity and verdict: the session to serve, or None when refused (the
    connection is closed then)."""
    label = runtime.label
    metrics = shared.metrics
    material = shared.store.current()
    tls = TLSStream(stream, material.context_for(runtime.alpn), server_side=True)
    started = trio.current_time()
    try:
        await tls.do_handshake(timeout=shared.handshake_timeout)
    except HandshakeError as exc:
        metrics.refused(label, exc.reason)
        log.info("listener %s: refused %s: %s (%s)", label, peer, exc.reason, exc.detail)
        return None
    finally:
        metrics.child(metrics.handshake_seconds, label).observe(trio.current_time() - started)
    session = None
    try:
        session = _verdict(runtime, tls, shared, peer)
    finally:
        if session is None:  # refused, or the verdict failed: nothing will serve it
            await _close(tls, clean=False)
    return None if session is None else (tls, session)


def _verdict(runtime: ListenerRuntime, tls: TLSStream, shared: Shared, peer: str) -> Session | None:
    label = runtime.label
    metrics = shared.metrics
    try:
        identity = _identity(tls, shared)
    except IdentityError as exc:
        # A verified chain, but no identity: a CA certificate (``ca_cert``) or fields
        # we will not pass on (``bad_cert``). The message names the certificate.
        metrics.refused(label, exc.reason)
        log.info("listener %s: refused %s: %s (%s)", label, peer, exc.reason, exc)
        return None
    # Against the material current *now*, not at accept: a reload during the
    # handshake (a new deny list, a CA gone) must already apply to this connection.
    material = shared.store.current()
    anchor = _anchor(tls, identity, shared, material)
    # "ca_removed" of a live session is, for a new connection, an unknown CA.
    now = datetime.now(UTC)
    found = identity_verdict(identity, anchor, material, now)
    result = "unknown_ca" if found == "ca_removed" else found or "ok"
    if (
        result == "ok"
        and runtime.tcp is not None
        and runtime.allow is not None
        and not runtime.allow.admits(identity)
    ):
        # A tcp listener has no request to answer 403 to: its allow rules act here.
        result = "denied"
    reused = tls.session_reused
    metrics.child(metrics.handshakes, label, result, "true" if reused else "false").inc()
    if result == "ok":
        remaining = (identity.not_after - now).total_seconds()
        metrics.child(metrics.client_cert_remaining, label).observe(remaining)
        if shared.remember_chains and not reused:
            _remember_certificates(tls, identity, shared)
    else:
        log.info("listener %s: refused %s (%s): %s", label, peer, identity.name, result)
        if runtime.config.mode != "http" or result not in ("expired", "denied"):
            return None
        # HTTP clients get told why: the relay, which checks expiry and the deny list
        # on every request, answers their first request 403.
    return Session(label, peer, identity, runtime.config.mode, anchor, resumed=reused)


def _http_connection(
    runtime: ListenerRuntime, tls: TLSStream, session: Session, shared: Shared
) -> HttpConnection | Http2Connection:
    """The relay of the protocol the handshake agreed on (no ALPN: HTTP/1.1)."""
    assert runtime.routes is not None
    kind = Http2Connection if tls.alpn_protocol == b"h2" else HttpConnection
    return kind(
        tls,
        session=session,
        listener=runtime.config,
        routes=runtime.routes,
        pool=shared.pool,
        deny_list=shared.store.deny_list,
        metrics=shared.metrics,
        access=shared.access,
        client_ip=session.peer.rsplit(":", 1)[0].strip("[]"),
        proxy_header=lambda: proxy_header(tls, session),
        peer_certificates=lambda: _peer_certificates(tls, session.identity, shared),
    )


def _peer_certificates(
    tls: TLSStream, identity: Identity, shared: Shared
) -> PeerCertificates | None:
    """The verified certificates of this connection's leaf: remembered (the chain of its
    last full handshake, for a resumed session), else read from the connection."""
    known = shared.certificates.get(identity.sha256)
    return known if known is not None else _remember_certificates(tls, identity, shared)


def _remember_certificates(
    tls: TLSStream, identity: Identity, shared: Shared
) -> PeerCertificates | None:
    leaf = tls.peer_certificate  # verified; a resumed session still has it
    if leaf is None:
        return None
    # A resumed session has no verified chain: only the leaf is known then.
    verified = None if tls.session_reused else tls.verified_chain
    found = PeerCertificates.from_verified(identity.sha256, leaf, verified)
    if found is not None:
        shared.certificates.put(identity.sha256, found)
    return found


def _identity(tls: TLSStream, shared: Shared) -> Identity:
    sha256 = tls.peer_sha256
    if sha256 is None:  # VERIFY_FAIL_IF_NO_PEER_CERT makes this unreachable; fail closed
        raise IdentityError("no client certificate")
    identity = shared.identities.get(sha256)
    if identity is None:
        cert = tls.peer_certificate
        assert cert is not None
        identity = Identity.from_certificate(cert)
        shared.identities.put(identity)
    return identity


def _anchor(tls: TLSStream, identity: Identity, shared: Shared, material: Material) -> str | None:
    """The root this certificate chained to. What we remember for the leaf is used while
    that root is still in the bundle (a resumed session has no verified chain anyway);
    otherwise a full handshake's verified chain says it and refreshes the memory (a
    re-issued or cross-signed root). So the chain is walked once per leaf, not per
    connection."""
    known = shared.store.anchor_of(identity.sha256)
    if known in material.root_fingerprints:
        return known
    root = tls.verified_root_sha256
    if root is None:
        return known
    anchor = f"sha256:{root}"
    shared.store.remember_anchor(identity.sha256, anchor)
    return anchor


async def lingering_close(stream: trio.abc.HalfCloseableStream) -> None:
    """Close so that the last response survives: close_notify, drain briefly, then close.

    Closing a socket that still has unread input (a pipelined request after
    ``Connection: close``, the unread body of a refused upload) makes the kernel send
    RST, and a RST makes the client's kernel discard the response it has not read yet.
    So: say we are done (close_notify), read and drop what the client still sends until
    it closes or ``LINGER_SECONDS`` pass, then close for real. Shielded and bounded: a
    cancelled connection still closes cleanly, and a silent client costs at most that.
    """
    with trio.CancelScope(shield=True):
        with (
            trio.move_on_after(LINGER_SECONDS),
            suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError),
        ):
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        await stream.aclose()


async def bind(address: Address, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    """Listening sockets for ``address``, as trio.open_tcp_listeners makes them, plus
    SO_REUSEPORT for workers that share the port."""
    if not reuse_port:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    for family, kind, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners
