"""Raw TCP listeners (``mode = "tcp"``): after the mTLS handshake, bytes both ways.

Games speak their own protocols, so the proxy does not parse anything here: it
authorizes the identity (deny list, expiry, the listener's allow rules), optionally sends
a PROXY protocol v2 header saying who connected (``relay.proxy_protocol``), and pipes.

- **Backpressure**: each direction reads only after the previous chunk was written, so a
  slow reader slows the writer down, through TCP, instead of filling our memory.
- **Half-close**: an EOF from one side is passed on as an EOF to the other (close_notify
  towards the client, FIN towards the backend) and the other direction carries on; the
  session ends when both directions have ended.
- **Idle timeout**: when no byte moved either way for ``idle_timeout``, the session closes.
- **Enforcement**: ``Session.close`` (expired, denied, CA removed, drain) closes a TCP
  session at once: there is no message boundary to wait for.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio

from mtlsproxy import accesslog
from mtlsproxy.address import Address
from mtlsproxy.config import Listener
from mtlsproxy.metrics import Metrics
from mtlsproxy.relay import proxy_protocol
from mtlsproxy.relay.routing import RoundRobin
from mtlsproxy.server.idle import IdleClock
from mtlsproxy.server.upstream import ConnectFailed, Target, UpstreamPool
from mtlsproxy.sessions import Session
from mtlsproxy.tls.engine import TLSStream

log = logging.getLogger("mtlsproxy.tcp")

CHUNK = 65536
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class TcpRoute:
    backends: RoundRobin[Target]


class ByteTally:
    """Bytes of one session in one direction, added to the listener's counter as they go."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        self.counter.inc(n)


async def relay_tcp(
    client: TLSStream,
    *,
    session: Session,
    listener: Listener,
    route: TcpRoute,
    pool: UpstreamPool,
    metrics: Metrics,
    access: accesslog.AccessLog,
) -> None:
    idle = IdleClock(listener.idle_timeout.seconds)
    bytes_in = ByteTally(metrics.child(metrics.bytes, listener.label, "in"))
    bytes_out = ByteTally(metrics.child(metrics.bytes, listener.label, "out"))
    stream: Any = None
    backend: Any = None
    end = "closed"
    started = trio.current_time()
    with trio.CancelScope() as scope:
        # Enforcement and drains close a TCP session at once (Session.close cancels
        # this scope): while connecting and sending the header too.
        session.idle_scope = scope
        try:
            if session.closing is not None:
                return
            backend = await _connect(route, listener, pool, metrics, session)
            if backend is None or session.closing is not None:
                end = "error" if backend is None else end
                return
            stream = backend.stream
            if listener.proxy_protocol == "v2":
                with trio.fail_after(listener.connect_timeout.seconds):
                    await stream.send_all(proxy_header(client, session))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(idle.watch, nursery.cancel_scope)
                async with trio.open_nursery() as pipes:
                    pipes.start_soon(_pipe, client, stream, idle, nursery.cancel_scope, bytes_in)
                    pipes.start_soon(_pipe, stream, client, idle, nursery.cancel_scope, bytes_out)
                nursery.cancel_scope.cancel()  # both directions ended: stop the watchdog
        except (trio.TooSlowError, *_STREAM_ERRORS) as exc:
            end = "error"
            log.info(
                "tcp session of %s from %s: backend failed: %r",
                session.identity.name,
                session.peer,
                exc,
            )
        finally:
            session.idle_scope = None
            if stream is not None:
                with trio.move_on_after(1, shield=True), suppress(*_STREAM_ERRORS):
                    await stream.aclose()
            if idle.expired:
                end = "idle"
                log.info(
                    "tcp session of %s from %s: idle, closed", session.identity.name, session.peer
                )
            elif session.closing is not None:
                end = "enforced"
            metrics.child(metrics.tcp_sessions, listener.label, end).inc()
            access.write_session(
                "tcp",
                session,
                trio.current_time() - started,
                bytes_in=bytes_in.total,
                bytes_out=bytes_out.total,
                upstream=str(backend.backend) if backend is not None else None,
                end=end if session.closing is None else f"{end}: {session.closing}",
                alpn=alpn.decode("ascii", "replace") if (alpn := client.alpn_protocol) else None,
            )


async def _pipe(
    source: Any, sink: Any, idle: IdleClock, session_scope: trio.CancelScope, counter: ByteTally
) -> None:
    """Copy until EOF, then pass the EOF on (half-close). A reset or failure on either
    side ends the whole session at once: a clean EOF is the only half-close."""
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
            counter.add(len(data))
            idle.touch()
        await sink.send_eof()
    except _STREAM_ERRORS:
        session_scope.cancel()


async def _connect(
    route: TcpRoute, listener: Listener, pool: UpstreamPool, metrics: Metrics, session: Session
) -> Any:
    candidates = pool.eligible(route.backends.order())
    for target in candidates:
        try:
            return await pool.acquire(
                target, connect_timeout=listener.connect_timeout.seconds, fresh=True
            )
        except ConnectFailed as exc:
            metrics.child(metrics.upstream_connect_errors, listener.label, str(target)).inc()
            log.warning("listener %s: %s", listener.label, exc)
    log.warning(
        "listener %s: no backend for %s from %s; closing",
        listener.label,
        session.identity.name,
        session.peer,
    )
    return None


def proxy_header(client: TLSStream, session: Session) -> bytes:
    """The PROXY v2 header for this client connection: addresses and identity TLVs."""
    identity = session.identity
    tlvs = b""
    if (alpn := client.alpn_protocol) is not None:  # what the bytes are, e.g. h2
        tlvs += proxy_protocol.tlv(proxy_protocol.PP2_TYPE_ALPN, alpn)
    tlvs += proxy_protocol.ssl_tlv(
        tls_version=client.tls_version, cn=identity.cn, resumed=client.session_reused
    )
    if identity.spiffe_id:
        tlvs += proxy_protocol.tlv(proxy_protocol.PP2_TYPE_SPIFFE_ID, identity.spiffe_id.encode())
    tlvs += proxy_protocol.tlv(proxy_protocol.PP2_TYPE_FINGERPRINT, identity.fingerprint.encode())
    peer, local = client.peer_address, client.local_address
    return proxy_protocol.encode((peer[0], peer[1]), (local[0], local[1]), tlvs)


def tcp_route(backends: list[Address]) -> TcpRoute:
    return TcpRoute(RoundRobin([Target(b) for b in backends]))
