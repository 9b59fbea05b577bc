"""TLS for the proxy: contexts built from proven material, and a trio Stream over them."""

from mtlsproxy.tls.context import build_client_context, build_server_context
from mtlsproxy.tls.engine import HandshakeError, HandshakeFailure, TLSStream

__all__ = [
    "HandshakeError",
    "HandshakeFailure",
    "TLSStream",
    "build_client_context",
    "build_server_context",
]
