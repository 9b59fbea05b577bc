"""The client side of TLS towards backends (``tls = true`` on a route).

The proxy's own client certificate towards its backends lives 24 hours like every other
certificate, and the CA bundle it verifies backends against rotates like the client CA.
So these files belong to the credential store (``tls.store``) like the server material:
loaded and proved at start (a wrong file fails the config, never the first request),
re-read on every reload, swapped only when proved, reported in ``/certs`` and in the
expiry metrics. A route names its files (``BackendFiles``); the upstream pool asks the
store for the current context of those files at every connect, and retires pooled
connections that were made with older material.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from mtlsproxy import pem
from mtlsproxy.config import Config, Route
from mtlsproxy.errors import CredentialError
from mtlsproxy.tls.context import DEFAULT_GROUPS, build_client_context
from mtlsproxy.tls.credentials import digest_of


@dataclass(frozen=True)
class BackendFiles:
    """The files of one backend identity: what a ``tls = true`` route names."""

    cert: Path
    key: Path
    ca: Path
    # ALPN offered to the backend: (b"h2",) for a route with upstream_protocol = "h2".
    alpn: tuple[bytes, ...] | None = None

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return (self.cert, self.key, self.ca)


@dataclass(frozen=True)
class BackendCredentials:
    files: BackendFiles
    cert_chain: tuple[x509.Certificate, ...]  # the proxy's client certificate, then its chain
    key: pem.PrivateKey
    server_cas: tuple[x509.Certificate, ...]  # what backends' certificates must chain to
    digest: str = ""  # of the three files' bytes: unchanged files keep their context

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]


def backend_files(route: Route, config: Config) -> BackendFiles:
    assert route.tls_cert is not None and route.tls_key is not None  # the config says so
    alpn = (b"h2",) if route.upstream_protocol == "h2" else None
    return BackendFiles(
        route.tls_cert, route.tls_key, route.tls_ca or config.tls.client_ca, alpn=alpn
    )


def all_backend_files(config: Config) -> list[BackendFiles]:
    """Every client identity towards TLS backends in the config, for the store to own."""
    return [
        backend_files(route, config)
        for listener in config.listeners
        for route in listener.routes
        if route.tls
    ]


def load_backend_credentials(
    files: BackendFiles, blobs: dict[Path, bytes], now: datetime | None = None
) -> BackendCredentials:
    """Prove one backend identity from its files' bytes (``blobs``, read once by the store)."""
    now = now or datetime.now(UTC)
    cas = pem.load_certificates(blobs[files.ca], files.ca)
    chain = pem.load_certificates(blobs[files.cert], files.cert)
    key = pem.load_private_key(blobs[files.key], files.key)
    if not pem.key_matches(key, chain[0]):
        raise CredentialError(files.key, f"not the key of the first certificate in {files.cert}")
    if now >= chain[0].not_valid_after_utc:
        raise CredentialError(
            files.cert,
            f"the certificate expired at {chain[0].not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        )
    digest = digest_of(list(files.paths), blobs)
    return BackendCredentials(files, tuple(chain), key, tuple(cas), digest)


def build_backend_context(
    creds: BackendCredentials, min_version: str, groups: Sequence[str] = DEFAULT_GROUPS
) -> SSL.Context:
    return build_client_context(
        server_cas=list(creds.server_cas),
        cert_chain=list(creds.cert_chain),
        key=creds.key,
        min_version=min_version,
        groups=groups,
        alpn=None if creds.files.alpn is None else list(creds.files.alpn),
    )
