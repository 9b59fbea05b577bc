"""The admin listener: health, readiness, metrics, certificates, and reload on demand.

Who may use it (``[admin]``, checked by the config):

* default: plain HTTP on a loopback address; requests that look like a browser's (an
  ``Origin`` header, or a ``Host`` that is not a loopback name) are refused, so a web page
  cannot reach it through the user's browser or DNS rebinding;
* ``mtls = true``: TLS with the proxy's own server certificate, and a client certificate
  from ``tls.client_ca`` required (not expired, not on the deny list, matching ``allow``
  when given) on any address;
* ``insecure_remote = true``: plain HTTP on a non-loopback address, for networks where
  anyone who reaches the port may reload and read /certs; said loudly at start.

One request per connection, a small head limit and a deadline on every read and write:
it is an operator's tool, not a second proxy.

    GET  /healthz   200 "ok" while the process serves
    GET  /readyz    200 when listeners are bound, credentials are loaded and the server
                    certificate is valid, and the proxy is not draining; 503 and the reason
    GET  /metrics   Prometheus text
    GET  /certs     JSON: server certificate, client CAs, deny list size, generation,
                    last reload
    POST /reload    prove and swap now; 200 with the result, 422 when refused
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime

import h11
import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtlsproxy import config
from mtlsproxy.address import peer_name
from mtlsproxy.certinfo import summarize
from mtlsproxy.identity import Identity, IdentityError
from mtlsproxy.metrics import Metrics
from mtlsproxy.policy import Allow, standing
from mtlsproxy.tls.engine import HandshakeError, TLSStream
from mtlsproxy.tls.store import CredentialStore, ReloadResult

log = logging.getLogger("mtlsproxy.admin")

_MAX_HEAD = 8192
_LOOPBACK_HOST = re.compile(rb"(?:127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]|localhost)(?::\d{1,5})?")
_DEADLINE = 10.0


class Admin:
    def __init__(
        self,
        store: CredentialStore,
        metrics: Metrics,
        not_ready: Callable[[], str | None],
        reload: Callable[[str], ReloadResult] | None = None,
        settings: config.Admin | None = None,
    ) -> None:
        self.store = store
        self._reload_with = reload or store.reload
        self.metrics = metrics
        self.not_ready = not_ready  # None when ready, else the reason
        self.settings = settings or config.Admin()
        # Normalized once (policy.Allow), not at every request.
        self._allow = None if self.settings.allow is None else Allow(self.settings.allow)
        # Off loopback, Host names whatever the operator's tools use to reach us.
        self._loopback_hosts_only = self.settings.listen.is_loopback

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        peer = peer_name(stream.socket)
        channel: trio.abc.Stream = stream
        try:
            with trio.fail_after(_DEADLINE):
                refusal: str | None = None
                if self.settings.mtls:
                    tls = TLSStream(
                        stream, self.store.current().context_for(config.H1_ALPN), server_side=True
                    )
                    channel = tls
                    try:
                        await tls.do_handshake(timeout=_DEADLINE)
                    except HandshakeError as exc:
                        log.info("admin: refused %s: %s (%s)", peer, exc.reason, exc.detail)
                        return
                    refusal = self._refusal(tls)
                request = await _read_request(conn, channel)
                if request is None:
                    return
                if refusal is not None:
                    log.info("admin: refused %s: %s", peer, refusal)
                    text = "text/plain; charset=utf-8"
                    status, content_type, body = 403, text, f"forbidden: {refusal}\n".encode()
                else:
                    status, content_type, body = self.guarded(request)
                headers = [
                    ("content-type", content_type),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                    ("cache-control", "no-store"),
                ]
                await channel.send_all(
                    (conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
        except (
            trio.TooSlowError,
            h11.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            log.debug("admin: connection ended: %r", exc)
        finally:
            with trio.move_on_after(1, shield=True):
                await channel.aclose()

    def _refusal(self, tls: TLSStream) -> str | None:
        """Why this verified client may not use the admin listener, or None."""
        cert = tls.peer_certificate
        if cert is None:
            return "no client certificate"
        try:
            identity = Identity.from_certificate(cert)
        except IdentityError as exc:
            return str(exc)
        deny = self.store.current().credentials.deny
        if (refused := standing(identity, deny, datetime.now(UTC))) is not None:
            reason, detail = refused
            if reason == "expired":
                return f"{identity.name}: certificate expired at {detail}"
            return f"{identity.name}: on the deny list ({detail})"
        if self._allow is not None and not self._allow.admits(identity):
            return f"{identity.name}: no admin.allow rule matched"
        return None

    def guarded(self, request: h11.Request) -> tuple[int, str, bytes]:
        """Refuse what a browser could send, and never let a handler take the proxy down."""
        text = "text/plain; charset=utf-8"
        headers = {k: v for k, v in request.headers}
        # A web page may POST to a loopback address (no preflight for a simple request)
        # and, with DNS rebinding, read the answer. Browsers always send Origin on those
        # and a Host that names the attacker's domain; curl, Prometheus and kubelet send
        # neither an Origin nor a non-loopback Host.
        foreign_host = self._loopback_hosts_only and not _LOOPBACK_HOST.fullmatch(
            headers.get(b"host", b"")
        )
        if b"origin" in headers or foreign_host:
            return 403, text, b"admin requests must come from loopback tools, not a browser\n"
        try:
            return self.respond(request.method, request.target)
        except Exception:
            log.exception("admin: %s %r failed", request.method.decode(), request.target)
            return 500, text, b"internal error; see the proxy's log\n"

    def respond(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?", 1)[0]
        text = "text/plain; charset=utf-8"
        routes: dict[bytes, tuple[bytes, Callable[[], tuple[int, str, bytes]]]] = {
            b"/healthz": (b"GET", lambda: (200, text, b"ok\n")),
            b"/readyz": (b"GET", self._readyz),
            b"/metrics": (
                b"GET",
                lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.exposition)),
            ),
            b"/certs": (b"GET", self._certs),
            b"/reload": (b"POST", self._reload),
        }
        if path not in routes:
            return 404, text, b"not found\n"
        wanted, handler = routes[path]
        if method != wanted:
            return 405, text, f"use {wanted.decode()}\n".encode()
        return handler()

    def _readyz(self) -> tuple[int, str, bytes]:
        reason = self.not_ready()
        leaf = self.store.current().credentials.leaf
        if reason is None and datetime.now(UTC) >= leaf.not_valid_after_utc:
            reason = "the server certificate has expired"
        if reason is not None:
            return 503, "text/plain; charset=utf-8", f"not ready: {reason}\n".encode()
        return 200, "text/plain; charset=utf-8", b"ready\n"

    def _certs(self) -> tuple[int, str, bytes]:
        material = self.store.current()
        creds = material.credentials
        body = {
            "generation": material.generation,
            "loaded_at": material.loaded_at,
            "server": summarize(creds.leaf),
            "chain": [summarize(c) for c in creds.cert_chain[1:]],
            "client_cas": [summarize(c) for c in creds.client_cas],
            "deny_entries": len(creds.deny),
            "backends": [
                {
                    "cert": str(backend.files.cert),
                    "client": summarize(backend.leaf),
                    "chain": [summarize(c) for c in backend.cert_chain[1:]],
                    "ca": str(backend.files.ca),
                    "server_cas": [summarize(c) for c in backend.server_cas],
                }
                for backend, _ in material.backends.values()
            ],
            # Removals read from the files but held until the file stays the same.
            "pending_removals": None
            if material.pending is None
            else {
                "deny_entries": material.pending.deny_entries,
                "client_cas": [summarize(c) for c in material.pending.client_cas],
                "since": material.pending.since,
            },
            "last_reload": self.store.last_result,
        }
        return 200, "application/json", msgspec.json.encode(body)

    def _reload(self) -> tuple[int, str, bytes]:
        result = self._reload_with("admin")
        status = 422 if result.result == "failed" else 200
        return status, "application/json", msgspec.json.encode(result)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_MAX_HEAD)
            conn.receive_data(bytes(data))  # b"" is EOF: h11 then reports ConnectionClosed
            continue
        if isinstance(event, h11.Request):
            return event
        return None
