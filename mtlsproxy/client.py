"""Clients of an mtlsproxy deployment: TLS settings that trust only the private CA and
present a client certificate that renews itself.

    from mtlsproxy import client

    session = client.requests_session("player.crt", "player.key", "ca.crt")
    session.get("https://api.example:8443/")          # requests
    with client.httpx_client("player.crt", "player.key", "ca.crt") as http:
        http.get("https://api.example:8443/")         # httpx
    ctx = client.ssl_context("player.crt", "player.key", "ca.crt")  # anything on ssl

Every new connection first looks at the files (a ``stat``, no read unless they changed)
and loads a renewed certificate and key, and a changed CA bundle, into the context. A
half-written renewal (the key already new, the certificate not yet) is skipped until it is
whole. The requests session also closes its idle keep-alive connections when the
certificate changes, so the old certificate is not used again; httpx keeps already-open
connections until they close. A CA dropped from the bundle stays trusted by a running
context (OpenSSL cannot forget a CA): restart long-lived clients after ``ca retire``.

``renew_once`` is what ``mtlsproxy client renew`` runs: a new key, a CSR, ``POST /renew``
to the renewal service over mutual TLS, then the new pair written atomically (key first),
and the trust bundle refreshed from ``GET /ca`` over that same verified connection.
requests and httpx are needed only for their helpers (``pip install mtlsproxy[client]``).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mtlsproxy import pem
from mtlsproxy.atomicfile import stat_signature, write_atomic
from mtlsproxy.errors import CAError
from mtlsproxy.pki.ca import pair_paths
from mtlsproxy.pki.keys import KeyType, generate_key
from mtlsproxy.pki.lifecycle import RetryLater

if TYPE_CHECKING:
    import httpx
    import requests

__all__ = [
    "RenewingContext",
    "httpx_client",
    "renew_once",
    "requests_session",
    "ssl_context",
]

TIMEOUT = 15.0
log = logging.getLogger("mtlsproxy.renew")


class RenewingContext(ssl.SSLContext):
    """An ``ssl.SSLContext`` for clients that reloads its certificate when the files change."""

    cert: Path
    key: Path
    ca: Path

    def __new__(cls, cert: str | Path, key: str | Path, ca: str | Path) -> RenewingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, cert: str | Path, key: str | Path, ca: str | Path) -> None:
        # SSLContext is set up in __new__ (with the protocol); nothing to pass on here.
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca)
        self.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_verify_locations(cafile=str(self.ca))  # only the private CA, no system roots
        self.load_cert_chain(str(self.cert), str(self.key))
        self._lock = threading.Lock()
        self._seen = (stat_signature(self.cert, self.key), stat_signature(self.ca))
        self.generation = 0  # +1 on every reload of the certificate

    def refresh(self) -> bool:
        """Load changed files; True when the certificate changed."""
        with self._lock:
            try:
                pair, bundle = stat_signature(self.cert, self.key), stat_signature(self.ca)
            except OSError:
                return False  # a rename in progress: next time
            changed = False
            if bundle != self._seen[1]:
                try:
                    self.load_verify_locations(cafile=str(self.ca))
                    self._seen = (self._seen[0], bundle)
                except (OSError, ssl.SSLError):
                    pass
            if pair != self._seen[0]:
                try:
                    self.load_cert_chain(str(self.cert), str(self.key))
                except (OSError, ssl.SSLError):
                    return False  # key and certificate do not match yet: half-way through
                self._seen = (pair, self._seen[1])
                self.generation += 1
                changed = True
            return changed

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.refresh()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.refresh()
        return super().wrap_bio(*args, **kwargs)


def ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> RenewingContext:
    """A client context: trusts only ``ca``, presents ``cert``/``key``, picks up renewals."""
    return RenewingContext(cert, key, ca)


def requests_session(cert: str | Path, key: str | Path, ca: str | Path) -> requests.Session:
    """A ``requests.Session`` on a ``RenewingContext``; idle connections are dropped when the
    certificate is renewed, so every request after a renewal shows the new certificate."""
    import requests  # noqa: PLC0415 - optional: only this helper needs it
    from requests.adapters import HTTPAdapter  # noqa: PLC0415

    ctx = ssl_context(cert, key, ca)

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = ctx
            super().init_poolmanager(*args, **kwargs)

    class _Session(requests.Session):
        seen = ctx.generation

        def send(self, request: Any, **kwargs: Any) -> Any:
            # By generation, not by refresh()'s answer: a new connection elsewhere may
            # have loaded the renewal already (refresh() then says "no change").
            ctx.refresh()
            if ctx.generation != self.seen:
                self.seen = ctx.generation
                for adapter in self.adapters.values():
                    adapter.close()
            return super().send(request, **kwargs)

    session = _Session()
    session.verify = str(ca)  # what requests hands urllib3: the private CA, never certifi
    session.mount("https://", _Adapter())
    session.ssl_context = ctx  # type: ignore[attr-defined]
    return session


def httpx_client(cert: str | Path, key: str | Path, ca: str | Path, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` on a ``RenewingContext`` (new connections use the renewed
    certificate)."""
    import httpx  # noqa: PLC0415 - optional: only this helper needs it

    return httpx.Client(verify=ssl_context(cert, key, ca), **kwargs)


# ---- renewal -----------------------------------------------------------------------------


class RenewRefused(CAError):
    """The renewal service said no (expired, denied, bad request): retrying will not help."""


def renew_once(
    url: str, ca: Path, prefix: Path, *, key_type: KeyType = "ecdsa-p256"
) -> x509.Certificate:
    """Renew ``PREFIX.crt``/``PREFIX.key`` at the service ``url``; returns the new leaf.

    Raises ``RetryLater`` when the service is unreachable, busy or rate-limiting, and
    ``RenewRefused`` when it refuses for good.
    """
    cert_path, key_path = pair_paths(prefix)
    current = pem.load_certificates(pem.read_file(cert_path), cert_path)[0]
    key = generate_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(current.subject)  # informational: the service copies the identity
        .sign(key, None if key_type == "ed25519" else hashes.SHA256())
    )
    call = _caller(url, ca, cert_path, key_path)
    status, body = call("POST", "/renew", csr.public_bytes(serialization.Encoding.PEM))
    reason = body.decode("utf-8", "replace").strip()
    if status != 200:
        raise RenewRefused(f"{url} refused the renewal: {status} {reason}")
    chain = pem.load_certificates(body, url)
    leaf = chain[0]
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise RenewRefused(f"{url} answered a certificate for another key")
    # Key first: a reader between the two writes sees a mismatched pair and keeps the old.
    # The old key stays as PREFIX.key.prev, so an interruption between the two writes does
    # not lock us out of the next renewal.
    if key_path.exists():
        write_atomic(key_path.with_name(key_path.name + ".prev"), key_path.read_bytes(), 0o600)
    write_atomic(key_path, pem.private_key_pem(key), mode=0o600)
    write_atomic(cert_path, body, mode=0o644)
    try:
        _store_bundle(call, url, ca)
    except (RetryLater, CAError) as exc:  # the renewal itself succeeded
        log.warning("renewed %s, but could not refresh %s: %s", cert_path, ca, exc)
    return leaf


def refresh_bundle(url: str, ca: Path, prefix: Path) -> bool:
    """Fetch ``GET /ca`` over mutual TLS (verified by the bundle we hold) and store it if it
    changed; True when it did. This is how a client learns of a rotated CA in time."""
    cert_path, key_path = pair_paths(prefix)
    return _store_bundle(_caller(url, ca, cert_path, key_path), url, ca)


def _store_bundle(call: Any, url: str, ca: Path) -> bool:
    status, bundle = call("GET", "/ca")
    if status != 200 or bundle == ca.read_bytes():
        return False
    pem.load_certificates(bundle, f"{url}/ca")  # only a well-formed bundle replaces ours
    write_atomic(ca, bundle, mode=0o644)
    return True


def _caller(url: str, ca: Path, cert_path: Path, key_path: Path) -> Any:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise CAError(f"{url}: the renewal service URL must be https://host:port")
    ctx = ssl.create_default_context(cafile=str(ca)) if ca.exists() else None
    if ctx is None:
        raise CAError(f"{ca}: no such trust bundle")
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        # A renewal interrupted between its two writes leaves the new key beside the old
        # certificate: the previous key (kept for this) still matches it.
        previous = key_path.with_name(key_path.name + ".prev")
        try:
            ctx.load_cert_chain(str(cert_path), str(previous))
        except (OSError, ssl.SSLError):
            raise CAError(f"cannot use {cert_path} with {key_path}: {exc}") from exc
    except OSError as exc:
        raise CAError(f"cannot read {cert_path} or {key_path}: {exc}") from exc
    base = parts.path.rstrip("/")

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, context=ctx, timeout=TIMEOUT
        )
        try:
            headers = {"content-type": "application/pkcs10"} if body else {}
            conn.request(method, base + path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RetryLater(f"{url}: {exc}") from exc
        finally:
            conn.close()
        if answer.status == 429 or answer.status >= 500:
            retry = answer.getheader("retry-after")
            reason = data.decode("utf-8", "replace").strip()
            raise RetryLater(
                f"{url}: {answer.status} {reason}",
                float(retry) if retry and retry.isdigit() else None,
            )
        return answer.status, data

    return call


def default_prefix(cert: str) -> Path:
    """``client renew --cert player`` and ``--cert player.crt`` mean the same pair."""
    path = Path(cert)
    return path.with_suffix("") if path.suffix in (".crt", ".key") else path
