"""``mtlsproxy ca serve``: the renewal service. Clients trade a CSR for a fresh certificate
over mutual TLS, with the identity of the certificate they present.

    POST /renew   body: a CSR (PEM). Answer 200: the new certificate and its chain (PEM),
                  for the CSR's public key, with the identity (CN, OUs, SANs, kind) copied
                  from the presented certificate (never from the CSR) and the CA's TTL.
    GET  /ca      the current trust bundle (PEM): how clients learn of a rotated CA.

Refusals, each with a status and a one-line reason in the body: 403 when the presented
certificate has expired (the handshake lets an otherwise valid but expired leaf through so
it can be told so, and nothing else) or is on the deny list; 429 with ``Retry-After`` when
its identity renewed less than ``min_interval`` ago; 400 for a CSR that is not one, is
not self-signed correctly, or holds a weak key; 413 for a body over 16 KiB.

Every issuance goes to the CA's audit log (``pki.lifecycle``). This process is, with the
``ca`` commands, the only one that reads the CA key; the CA folder is read again for every
request, so a ``ca rotate`` or ``ca retire`` applies at once. The service presents a
server certificate it issues itself from the CA (re-issued at two thirds of its life and
after a rotation); clients verify it against the bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL, crypto

from mtlsproxy import pem
from mtlsproxy.address import Address, peer_name
from mtlsproxy.atomicfile import stat_signature
from mtlsproxy.denylist import DenyList, parse_deny_list
from mtlsproxy.errors import CAError, CredentialError
from mtlsproxy.identity import Identity, IdentityError
from mtlsproxy.pki.ca import (
    BUNDLE,
    ISSUER_CERT,
    CertificateAuthority,
    grace_end,
    previous_folders,
)
from mtlsproxy.pki.lifecycle import LeafIdentity, renewal_due, sha256_of
from mtlsproxy.policy import standing
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream
from mtlsproxy.units import format_duration

log = logging.getLogger("mtlsproxy.ca")

MAX_HEAD = 8192
MAX_BODY = 16 * 1024
DEADLINE = 10.0
_CERT_HAS_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED


@dataclass
class ServiceSettings:
    folder: Path
    listen: Address
    ttl: timedelta = timedelta(hours=24)
    min_interval: timedelta = timedelta(minutes=1)
    deny: Path | None = None
    name: str = "mtlsproxy-ca"
    dns: list[str] = field(default_factory=lambda: ["localhost"])
    ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])


class Refused(Exception):
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.reason = reason
        self.headers = headers or []
        super().__init__(reason)


def _tolerate_expired_leaf(
    conn: SSL.Connection, _cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    # Only the leaf's expiry is let through, so the handler can answer 403 "expired"
    # instead of a bare TLS alert; every other failure still fails the handshake.
    return bool(ok) or (errnum == _CERT_HAS_EXPIRED and depth == 0)


class RenewalService:
    def __init__(self, settings: ServiceSettings) -> None:
        limit = settings.ttl / 4
        if settings.min_interval > limit:
            # Renewal comes at about 2/3 of a lifetime; a limit longer than the rest of it
            # would refuse every client until its certificate expired.
            log.warning(
                "min_interval %s is more than a quarter of the TTL %s; using %s",
                format_duration(settings.min_interval),
                format_duration(settings.ttl),
                format_duration(limit),
            )
            settings = dataclasses.replace(settings, min_interval=limit)
        self.settings = settings
        self._last: dict[str, float] = {}  # identity key -> monotonic time of last issuance
        self._context: SSL.Context | None = None
        self._context_key: tuple[object, ...] | None = None  # the files it was built on
        self._context_lock = threading.Lock()
        self._own_due: datetime | None = None
        self._deny: tuple[object, DenyList] | None = None
        self._lock = threading.Lock()
        self.issued = 0

    # ---- material -----------------------------------------------------------------

    def _ca(self) -> CertificateAuthority:
        # A rotation rewrites keys then certificates: a load between the two sees a
        # mismatch. It settles in milliseconds; one retry covers it.
        for attempt in range(2):
            try:
                return CertificateAuthority.load(self.settings.folder)
            except CAError:
                if attempt:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _files_signature(self) -> tuple[object, ...]:
        """What the context is built from, by file metadata (a stat, no read)."""
        folder = self.settings.folder
        files = stat_signature(folder / BUNDLE, folder / ISSUER_CERT)
        return (*files, *(p.name for p in previous_folders(folder)))

    def context(self) -> SSL.Context:
        """The TLS context: rebuilt when the bundle, the issuer or the rotation state
        changed, when a rotation's grace period ends, or when our own certificate is due.
        Otherwise a stat of two files: it runs for every connection (in a thread)."""
        with self._context_lock:
            return self._current_context()

    def _current_context(self) -> SSL.Context:
        signature = self._files_signature()
        now = datetime.now(UTC)
        if (
            self._context is not None
            and signature == self._context_key
            and self._own_due is not None
            and now < self._own_due
        ):
            return self._context
        folder = self.settings.folder
        ca = self._ca()
        bundle = (folder / BUNDLE).read_bytes()
        own = ca.issue(
            kind="server",
            name=self.settings.name,
            dns=self.settings.dns,
            ips=self.settings.ips,
            ttl=min(self.settings.ttl, timedelta(hours=24)),
            by="renewal service (its own certificate)",
        )
        roots = pem.load_certificates(bundle, folder / BUNDLE)
        assert own.key is not None
        ctx = build_server_context(
            cert_chain=[own.certificate, *own.chain],
            key=own.key,
            client_cas=roots,
            alpn=[b"http/1.1"],
            session_id_context=hashlib.sha256(bundle).digest(),
        )
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _tolerate_expired_leaf)
        self._context, self._context_key = ctx, signature
        # Rebuilt at our certificate's renewal time, or when a grace period ends (the
        # issuer that signs changes then without any file changing).
        ends = [e for sub in previous_folders(folder) if (e := grace_end(sub)) and e > now]
        self._own_due = min([renewal_due(own.certificate), *ends])
        return ctx

    def _deny_list(self) -> DenyList:
        path = self.settings.deny
        if path is None:
            return DenyList()
        try:
            signature = stat_signature(path)
            if self._deny is None or self._deny[0] != signature:
                self._deny = (signature, parse_deny_list(path.read_text(), path))
        except (OSError, CredentialError) as exc:
            # Fail closed: without a readable deny list nobody is renewed.
            raise Refused(503, f"the deny list cannot be read: {exc}") from exc
        return self._deny[1]

    # ---- serving ------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.context()  # fail at start, not on the first client
        address = self.settings.listen
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise CAError(f"cannot listen on {address}: {exc.strerror}") from exc
        host, port = listeners[0].socket.getsockname()[:2]
        log.info("renewal service listening on https://%s:%d (POST /renew, GET /ca)", host, port)
        task_status.started(Address(host, port))
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle(stream)
        except Exception:
            # One client must never take the service down: log it, drop the connection.
            log.exception("renewal service: a connection failed")
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = peer_name(stream.socket)
        try:
            ctx = await trio.to_thread.run_sync(self.context)  # reads and signs: not here
        except (CAError, CredentialError, OSError) as exc:
            log.error("renewal service: CA unavailable: %s", exc)  # noqa: TRY400
            await stream.aclose()
            return
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=DEADLINE)
        except HandshakeError as exc:
            log.info("refused %s: %s (%s)", peer, exc.reason, exc.detail)
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            with trio.fail_after(DEADLINE):
                request, body = await _read(conn, tls)
                try:
                    status, ctype, payload, headers = await trio.to_thread.run_sync(
                        self.respond, request, body, tls.peer_certificate
                    )
                except Refused as refusal:
                    log.info(
                        "refused %s %s from %s: %d %s",
                        request.method.decode(),
                        request.target.decode(),
                        peer,
                        refusal.status,
                        refusal.reason,
                    )
                    status, ctype = refusal.status, "text/plain; charset=utf-8"
                    payload, headers = (refusal.reason + "\n").encode(), refusal.headers
                out = (
                    conn.send(
                        h11.Response(
                            status_code=status,
                            headers=[
                                ("content-type", ctype),
                                ("content-length", str(len(payload))),
                                ("connection", "close"),
                                *headers,
                            ],
                        )
                    )
                    or b""
                )
                out += (conn.send(h11.Data(data=payload)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await tls.send_all(out)
        except (trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as exc:
            log.info("renewal service: %s: %r", peer, exc)
        except Refused as refusal:  # a request we could not even read
            with trio.move_on_after(1):
                await tls.send_all(
                    f"HTTP/1.1 {refusal.status} \r\ncontent-length: {len(refusal.reason) + 1}\r\n"
                    f"connection: close\r\n\r\n{refusal.reason}\n".encode()
                )
        finally:
            with trio.move_on_after(1, shield=True):
                await tls.aclose()

    def respond(
        self, request: h11.Request, body: bytes, presented: x509.Certificate | None
    ) -> tuple[int, str, bytes, list[tuple[str, str]]]:
        """Answer one request (in a worker thread: it reads files, signs and fsyncs)."""
        path = request.target.split(b"?", 1)[0]
        if path == b"/ca" and request.method == b"GET":
            return 200, "application/x-pem-file", (self.settings.folder / BUNDLE).read_bytes(), []
        if path != b"/renew":
            raise Refused(404, "not found; use POST /renew or GET /ca")
        if request.method != b"POST":
            raise Refused(405, "use POST with a CSR in the body")
        if presented is None:
            raise Refused(403, "no client certificate")
        with self._lock:  # one renewal at a time: the rate limit must see each one
            return 200, "application/x-pem-file", self.renew(presented, body), []

    def renew(self, presented: x509.Certificate, body: bytes) -> bytes:
        """The certificate chain (PEM) for the CSR's key with ``presented``'s identity."""
        fingerprint = sha256_of(presented)
        try:
            identity = Identity.from_certificate(presented)
            leaf = LeafIdentity.of(presented)
        except (IdentityError, CAError) as exc:
            raise Refused(403, f"the client certificate cannot be renewed: {exc}") from exc
        if (refused := standing(identity, self._deny_list(), datetime.now(UTC))) is not None:
            reason, detail = refused
            if reason == "expired":
                raise Refused(
                    403,
                    f"the client certificate expired at {detail}; an expired certificate cannot "
                    "be renewed, ask an operator for a new one (`mtlsproxy ca issue`)",
                )
            raise Refused(403, f"{identity.name} is on the deny list ({detail}); not renewed")
        last = self._last.get(leaf.key)
        wait = self.settings.min_interval.total_seconds()
        if last is not None and time.monotonic() - last < wait:
            retry = max(1, int(wait - (time.monotonic() - last)) + 1)
            raise Refused(
                429,
                f"{identity.name} renewed less than {wait:g} s ago; retry in {retry} s",
                [("retry-after", str(retry))],
            )
        public_key = _csr_key(body)
        try:
            issued = self._ca().reissue(
                leaf,
                ttl=self.settings.ttl,
                public_key=public_key,
                by="renewal service",
                requester=fingerprint,
            )
        except CAError as exc:
            raise Refused(503, f"cannot issue: {exc}") from exc
        self._last[leaf.key] = time.monotonic()
        self.issued += 1
        log.info(
            "renewed %s for %s: serial %x, valid until %s",
            identity.name,
            fingerprint,
            issued.certificate.serial_number,
            issued.certificate.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return issued.chain_pem()


def _csr_key(body: bytes) -> pem.PublicKey:
    try:
        csr = x509.load_pem_x509_csr(body)
    except ValueError as exc:
        raise Refused(400, "the body is not a PEM certificate signing request") from exc
    try:
        # cryptography raises more than ValueError for exotic keys (UnsupportedAlgorithm
        # for an SM2 CSR): whatever it is, it is the client's CSR that is wrong.
        valid = csr.is_signature_valid
        key = csr.public_key()
    except Exception as exc:
        raise Refused(400, f"the CSR cannot be used: {exc}") from exc
    if not valid:
        raise Refused(400, "the CSR's signature does not verify")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise Refused(400, f"EC curve {key.curve.name} is not accepted (P-256/384/521)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise Refused(400, f"an RSA key of {key.key_size} bits is too weak (2048 or more)")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise Refused(400, f"{type(key).__name__} keys are not accepted")


async def _read(conn: h11.Connection, stream: TLSStream) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise Refused(400, "malformed request") from exc
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise Refused(413, f"the body is over {MAX_BODY} bytes; send a CSR only")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        else:
            raise Refused(400, "connection closed before a whole request")
