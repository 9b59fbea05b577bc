"""The client side of TLS towards backends (``tls = true`` on a route).

Loaded and proved like the server material (``tls.credentials``), once at start: a route
whose backend certificate files are wrong fails the config, never the first request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from mtlsproxy import pem
from mtlsproxy.config import Config, Route
from mtlsproxy.errors import ConfigError, CredentialError
from mtlsproxy.tls.context import build_client_context


def backend_context(route: Route, config: Config, where: str) -> SSL.Context:
    assert route.tls_cert is not None and route.tls_key is not None  # the config says so
    ca_path = route.tls_ca or config.tls.client_ca
    try:
        cas = pem.load_certificates(pem.read_file(ca_path), ca_path)
        chain, key = _client_identity(route.tls_cert, route.tls_key)
    except CredentialError as exc:
        raise ConfigError(exc.file, where, exc.reason) from exc
    return build_client_context(
        server_cas=cas, cert_chain=chain, key=key, min_version=config.tls.min_version
    )


def _client_identity(cert: Path, key_path: Path) -> tuple[list[x509.Certificate], pem.PrivateKey]:
    chain = pem.load_certificates(pem.read_file(cert), cert)
    key = pem.load_private_key(pem.read_file(key_path), key_path)
    if not pem.key_matches(key, chain[0]):
        raise CredentialError(key_path, f"not the key of {cert}")
    if datetime.now(UTC) >= chain[0].not_valid_after_utc:
        raise CredentialError(cert, "the certificate has expired")
    return chain, key
