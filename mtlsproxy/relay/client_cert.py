"""RFC 9440 ``Client-Cert`` and ``Client-Cert-Chain``: the verified certificate itself.

Where XFCC (``relay.xfcc``) describes the certificate, these carry it, for backends that
want the whole thing (RFC 8705 token binding, their own parsing, audit):

- ``Client-Cert`` (§2.2): the client's end-entity certificate, its DER as an RFC 8941
  Byte Sequence: standard base64 (RFC 4648 §4, ``+/`` and ``=`` padding, no line
  breaks) between two colons. One field, one value.
- ``Client-Cert-Chain`` (§2.3): an RFC 8941 List of such Byte Sequences, members
  separated by a comma and one space, in TLS order (§4.4.2 of RFC 8446: each one
  certifies the one before it), without the end-entity certificate. The trust anchor
  may be left out when the backend holds it (§2.3); the proxy leaves it out: it is a root
  of ``client_ca``, which a backend checking the chain already has. The field is never
  sent without ``Client-Cert`` (§2.3), and not at all when the chain is empty (an empty
  RFC 8941 List is not serialized, §4.1).

What goes in is ``identity.PeerCertificates``: what OpenSSL verified in the handshake,
never what a client merely sent. Whatever a client sends under these names is removed
from every request on every route (``headers.PROXY_OWNED``), as §2.4 and §4 require.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

CLIENT_CERT = b"Client-Cert"
CLIENT_CERT_CHAIN = b"Client-Cert-Chain"


def byte_sequence(data: bytes) -> bytes:
    """RFC 8941 §4.1.8: ``:`` + base64 with padding + ``:``."""
    return b":" + base64.b64encode(data) + b":"


def client_cert(leaf_der: bytes) -> bytes:
    """The ``Client-Cert`` value for the DER of the client's certificate."""
    return byte_sequence(leaf_der)


def client_cert_chain(chain_der: Sequence[bytes]) -> bytes | None:
    """The ``Client-Cert-Chain`` value for the DER of the certificates above the leaf, or
    None when there are none (the field is then not sent)."""
    if not chain_der:
        return None
    return b", ".join(byte_sequence(der) for der in chain_der)
