"""Clients of an mtlsproxy deployment: TLS settings that trust only the private CA and
present a client certificate that renews itself.

    from mtlsproxy import client

    session = client.requests_session("player.crt", "player.key", "ca.crt")
    session.get("https://localhost:8443/")            # requests
    with client.httpx_client("player.crt", "player.key", "ca.crt") as http:
        http.get("https://localhost:8443/")           # httpx
    ctx = client.ssl_context("player.crt", "player.key", "ca.crt")  # anything on ssl

One trust rule for every helper, the renewal client included: a ``PrivateTrustContext``
trusts the CA bundle it was made with and nothing else. ``REQUESTS_CA_BUNDLE``,
``CURL_CA_BUNDLE``, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` change nothing, nor does a
per-request ``verify=`` (even ``False``: the session verifies regardless). A library that
tries to add CAs to the context (another bundle, the system's) or to turn verification or
the hostname check off gets ``TrustChangeRefused``, so such a mistake fails loudly instead
of widening the trust of every connection made with the context from then on. Proxy
settings from the environment (``HTTPS_PROXY``...) are still honoured.

Every new connection first looks at the files (a ``stat``, no read unless they changed)
and loads a renewed certificate and key, and a changed CA bundle, into the context. A
half-written renewal (the key already new, the certificate not yet) is skipped until it is
whole. The requests session also closes its idle keep-alive connections when the
certificate changes, so the old certificate is not used again; httpx keeps already-open
connections until they close. A CA dropped from the bundle stays trusted by a running
context (OpenSSL cannot forget a CA): restart long-lived clients after ``ca retire``.

``renew_once`` is what ``mtlsproxy client renew`` runs: a new key, a CSR, ``POST /renew``
to the renewal service over mutual TLS, then the new pair written atomically (key first),
and the trust bundle refreshed from ``GET /ca`` over a connection verified the same way.
A service whose certificate does not verify raises ``ServiceNotTrusted``, not
``RetryLater``: waiting does not make an impostor genuine, so a person has to look.
requests and httpx are needed only for their helpers (``pip install mtlsproxy[client]``).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
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
    from _typeshed import ReadableBuffer, StrOrBytesPath

__all__ = [
    "PrivateTrustContext",
    "RenewingContext",
    "TrustChangeRefused",
    "httpx_client",
    "renew_once",
    "requests_session",
    "ssl_context",
]

TIMEOUT = 15.0
log = logging.getLogger("mtlsproxy.renew")


class TrustChangeRefused(CAError):
    """Something tried to widen or weaken a ``PrivateTrustContext``."""


class PrivateTrustContext(ssl.SSLContext):
    """A TLS client context that trusts only the CA bundle it was made with, and always
    verifies the server's certificate and name.

    It refuses, with ``TrustChangeRefused``, whatever would change that for every later
    connection: ``load_verify_locations`` with anything but its own bundle,
    ``load_default_certs``, ``set_default_verify_paths``, a ``verify_mode`` other than
    ``CERT_REQUIRED`` and ``check_hostname = False``.
    """

    ca: Path

    def __new__(cls, *_args: Any, **_kwargs: Any) -> Self:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, ca: str | Path) -> None:
        # SSLContext is set up in __new__ (with the protocol); nothing to pass on here.
        # PROTOCOL_TLS_CLIENT starts with CERT_REQUIRED and check_hostname on; the setters
        # below keep them so.
        self.ca = Path(ca)
        self.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_bundle()

    def _load_bundle(self) -> None:
        super().load_verify_locations(cafile=str(self.ca))

    def load_verify_locations(
        self,
        cafile: StrOrBytesPath | None = None,
        capath: StrOrBytesPath | None = None,
        cadata: str | ReadableBuffer | None = None,
    ) -> None:
        # Its own bundle again is harmless (and what a library handed the same path does).
        if cafile is not None and capath is None and cadata is None and self._is_own(cafile):
            self._load_bundle()
            return
        offered = [
            f"{name} {os.fsdecode(value)}"
            for name, value in (("cafile", cafile), ("capath", capath))
            if value is not None
        ] + (["cadata"] if cadata is not None else [])
        raise TrustChangeRefused(
            f"this TLS context trusts only {self.ca}; refusing to add CAs from "
            f"{', '.join(offered) or 'nowhere'}"
        )

    def _is_own(self, cafile: StrOrBytesPath) -> bool:
        return Path(os.fsdecode(cafile)).resolve() == self.ca.resolve()

    def load_default_certs(self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        raise TrustChangeRefused(
            f"this TLS context trusts only {self.ca}; refusing to add the system's CAs"
        )

    def set_default_verify_paths(self) -> None:
        raise TrustChangeRefused(
            f"this TLS context trusts only {self.ca}; refusing to add the default CA paths"
        )

    # Setting a value the context already has is allowed: urllib3 and http.client set
    # CERT_REQUIRED and check_hostname = True on every context they are given.
    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return super().verify_mode

    @verify_mode.setter
    def verify_mode(self, value: int) -> None:
        if value != ssl.CERT_REQUIRED:
            raise TrustChangeRefused(
                f"this TLS context always verifies the server; refusing verify_mode={value!r}"
            )

    @property
    def check_hostname(self) -> bool:
        return super().check_hostname

    @check_hostname.setter
    def check_hostname(self, value: bool) -> None:
        if not value:
            raise TrustChangeRefused(
                "this TLS context always checks the server's name; refusing check_hostname=False"
            )


class RenewingContext(PrivateTrustContext):
    """A ``PrivateTrustContext`` for clients that reloads its certificate when the files
    change."""

    cert: Path
    key: Path

    def __init__(self, cert: str | Path, key: str | Path, ca: str | Path) -> None:
        super().__init__(ca)
        self.cert, self.key = Path(cert), Path(key)
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
                    self._load_bundle()
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


@contextlib.contextmanager
def _optional(module: str, helper: str) -> Iterator[None]:
    """An ImportError that says what to install: the ``[client]`` extra."""
    try:
        yield
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"mtlsproxy.client.{helper} needs {module}, which is not installed ({exc}): "
            "pip install 'mtlsproxy[client]'",
            name=module,
        ) from exc


def requests_session(cert: str | Path, key: str | Path, ca: str | Path) -> requests.Session:
    """A ``requests.Session`` on a ``RenewingContext``; idle connections are dropped when the
    certificate is renewed, so every request after a renewal shows the new certificate.

    Whom it trusts is the context's alone: ``verify=`` (per request or ``Session.verify``)
    and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are ignored, and every request verifies."""
    with _optional("requests", "requests_session"):
        import requests  # noqa: PLC0415 - optional: only this helper needs it
        from requests.adapters import HTTPAdapter  # noqa: PLC0415

    ctx = ssl_context(cert, key, ca)

    class _Adapter(HTTPAdapter):
        # requests turns verify= (or, with trust_env, REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE,
        # which win over Session.verify) into urllib3's ca_certs/ca_cert_dir and cert_reqs;
        # urllib3 would load that bundle into the shared context, widening it for the life
        # of the process, and set its verify_mode. So urllib3 never gets either.
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = ctx
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            # Tunnels through HTTPS_PROXY & co. are TLS to the server too: same context
            # (without it urllib3 makes one from the system's CAs, with no certificate).
            proxy_kwargs["ssl_context"] = ctx
            return super().proxy_manager_for(proxy, **proxy_kwargs)

        def build_connection_pool_key_attributes(
            self, request: Any, verify: Any, cert: Any = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            host, pool = super().build_connection_pool_key_attributes(request, True, cert)
            pool.pop("ca_certs", None)
            pool.pop("ca_cert_dir", None)
            pool["cert_reqs"] = "CERT_REQUIRED"
            return host, pool

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            super().cert_verify(conn, url, False, cert)  # for cert=; it clears the CA settings
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None

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

    # trust_env stays on: it also carries the proxy settings people rely on, and the
    # adapter already makes its CA bundles irrelevant.
    session = _Session()
    session.mount("https://", _Adapter())
    session.ssl_context = ctx  # type: ignore[attr-defined]
    return session


def httpx_client(cert: str | Path, key: str | Path, ca: str | Path, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` on a ``RenewingContext`` (new connections use the renewed
    certificate)."""
    with _optional("httpx", "httpx_client"):
        import httpx  # noqa: PLC0415 - optional: only this helper needs it

    return httpx.Client(verify=ssl_context(cert, key, ca), **kwargs)


# ---- renewal -----------------------------------------------------------------------------


class RenewRefused(CAError):
    """The renewal service said no (expired, denied, bad request): retrying will not help."""


class ServiceNotTrusted(CAError):
    """The renewal service's certificate does not verify against the trust bundle."""


def renew_once(
    url: str, ca: Path, prefix: Path, *, key_type: KeyType = "ecdsa-p256"
) -> x509.Certificate:
    """Renew ``PREFIX.crt``/``PREFIX.key`` at the service ``url``; returns the new leaf.

    Raises ``RetryLater`` when the service is unreachable, busy or rate-limiting,
    ``RenewRefused`` when it refuses for good, and ``ServiceNotTrusted`` when its
    certificate does not verify against ``ca``.
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
    if not ca.exists():
        raise CAError(f"{ca}: no such trust bundle")
    ctx = PrivateTrustContext(ca)
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
        except ssl.SSLCertVerificationError as exc:
            raise ServiceNotTrusted(
                f"{url}: its certificate does not verify against {ca} ({exc.verify_message}):"
                " an impostor, or a service on a CA this bundle does not hold; not retrying"
            ) from exc
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
