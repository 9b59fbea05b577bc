"""The credential store: the one owner of the proxy's current TLS material.

Every accepted connection asks ``current()`` once, at accept time, and handshakes with
the contexts it gets; nothing swaps a context under a handshake in progress (no SNI
callback tricks: OpenSSL does not carry verify settings over to a swapped context).

The session id context is derived from the material's digest, so a session cached under
one CA bundle never resumes under another: after a rotation a client must show its
certificate again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from OpenSSL import SSL

from mtlsproxy.config import TLS
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.credentials import Credentials, load_credentials


@dataclass(frozen=True)
class Material:
    credentials: Credentials
    generation: int
    http_context: SSL.Context  # ALPN http/1.1
    raw_context: SSL.Context  # no ALPN: raw TCP listeners

    def context_for(self, mode: str) -> SSL.Context:
        return self.http_context if mode == "http" else self.raw_context


def build_material(creds: Credentials, tls: TLS, generation: int) -> Material:
    sid = hashlib.sha256(b"mtlsproxy session id context\0" + creds.digest.encode()).digest()

    def context(alpn: list[bytes] | None) -> SSL.Context:
        return build_server_context(
            cert_chain=list(creds.cert_chain),
            key=creds.key,
            client_cas=list(creds.client_cas),
            min_version=tls.min_version,
            alpn=alpn,
            session_id_context=sid,
        )

    return Material(
        creds, generation, http_context=context([b"http/1.1"]), raw_context=context(None)
    )


class CredentialStore:
    def __init__(self, tls: TLS, now: datetime | None = None) -> None:
        self._tls = tls
        creds = load_credentials(tls.cert, tls.key, tls.client_ca, tls.deny, now)
        self._material = build_material(creds, tls, generation=1)

    def current(self) -> Material:
        return self._material
