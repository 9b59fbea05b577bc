"""Build the OpenSSL contexts the TLS engine runs on.

Inputs are ``cryptography`` objects: the credential store owns reading and proving PEM
files, and this module only turns proven material into an ``OpenSSL.SSL.Context``.

Two kinds of context:

* ``build_server_context`` — the proxy's listeners. Mutual TLS: a client certificate is
  required, it must chain to ``client_cas`` (and nothing else: no system roots), and it
  must be fit for TLS client authentication. OpenSSL already checks the extended key
  usage: on the server side it verifies with the ``sslclient`` purpose, so a certificate
  whose EKU lacks clientAuth fails with X509_V_ERR_INVALID_PURPOSE (26) and the client
  gets an ``unsupported_certificate`` alert (see tests). No extra Python check is needed.
* ``build_client_context`` — the proxy's connections to TLS backends. The backend's
  certificate must chain to ``server_cas``; the host name is checked per connection by
  the engine (``TLSStream(server_hostname=...)``) through OpenSSL's own RFC 6125 matcher.

Verification is OpenSSL's own, with no Python callback per certificate (measured: it
costs on every handshake). When it fails, OpenSSL keeps the first X509_V_ERR code on the
connection (``verify_result``); ``classify_failure`` turns that (or, without one,
OpenSSL's error queue) into the reason category the engine reports: *why* a handshake
failed. Two of them name attacks rather than mistakes: ``bad_signature`` (a valid chain,
but the CertificateVerify does not verify with its key: the peer does not hold it, e.g.
a copied certificate) and ``unknown_ca`` also for chains whose names lead to our CA but
whose signatures do not verify (a rogue CA copying our subject names).

Key exchange groups (``mtlsproxy.kexgroups``): Mozilla's intermediate profile by default,
set through ``SSL_CTX_set1_curves_list`` (pyOpenSSL has no setter; in OpenSSL 3+ it is
the same function as ``set1_groups_list``, for every group kind). A client that offers
only other groups (secp521r1, X448, finite-field DH) gets a handshake failure.

Session resumption and context rotation: every ``SSL_CTX`` has its own in-memory session
cache and draws its own random TLS session ticket keys when it is created. A session
(stateful id or stateless ticket) issued under one context therefore cannot resume on a
new context, even one built from identical material: the id is not in the new cache and
the ticket does not decrypt. That is what CA rotation needs — a client admitted under the
old trust bundle must do a full handshake (and a fresh verification) against the new one.
``session_id_context`` additionally tags sessions; the credential store should derive it
from the material (e.g. a hash of the CA bundle) so that even a shared external cache
would refuse to mix generations.

TLS 1.3 ticket count: pyOpenSSL has no setter and ``SSL_CTX_set_num_tickets`` is not in
the ``cryptography`` bindings (checked on cryptography 50), so OpenSSL's default applies:
two tickets after a full handshake, one after a resumption.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtlsproxy.kexgroups import DEFAULT_GROUPS, check_groups, set_groups

__all__ = [
    "DEFAULT_GROUPS",
    "TLS12_CIPHERS",
    "HandshakeFailure",
    "NoApplicationProtocol",
    "build_client_context",
    "build_server_context",
    "check_groups",
    "classify_failure",
    "expect_host",
    "verify_result",
]

# TLS 1.2 only: forward secrecy (ECDHE) and AEAD ciphers, nothing else. TLS 1.3 suites are
# all AEAD with ephemeral key exchange already, so OpenSSL's default list stays.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# How many of the first groups a client sends a key share for (OpenSSL 3.5+'s ``*``):
# two, as OpenSSL's own default does, so that with the default list a backend that
# lacks ML-KEM picks X25519 without a HelloRetryRequest round trip.
_CLIENT_KEY_SHARES = 2

# SSL_MODE_NO_AUTO_CHAIN (openssl/ssl.h). Not exported by the bindings. Without it, a
# context given only a leaf builds the chain to send from its *verify* store — which here
# is the client CA bundle, root included. We send exactly what the caller gave us.
_SSL_MODE_NO_AUTO_CHAIN = 0x00000008

# Hardening that applies to both directions. Renegotiation is refused: it is a DoS lever
# on a server and it would let a TLS 1.2 peer change identity mid-connection.
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE


HandshakeFailure = Literal[
    "no_cert", "unknown_ca", "expired", "bad_cert", "bad_signature", "timeout", "protocol_error"
]


class NoApplicationProtocol(SSL.Error):
    """The client offered ALPN protocols and none of ours."""


def verify_result(conn: SSL.Connection) -> int:
    """The X509_V_ERR code of the peer's chain verification (0: none, or it passed).

    OpenSSL stops at the first failure and keeps its code on the connection; it is the one
    its alert was built from. Read after a failed handshake, it says why, with no Python
    verify callback running for every certificate of every handshake.
    """
    # pyOpenSSL keeps the SSL* in the private ``_ssl`` (as for session_reused).
    return int(_lib.SSL_get_verify_result(conn._ssl))


# X509_V_ERR_* codes (openssl/x509_vfy.h) grouped by what the operator has to do;
# every other verification error is "bad_cert" (wrong purpose, name, path length...).
#
# 4, 6 and 7 are "not our CA" too. OpenSSL finds a certificate's issuer by *name* (and
# by AKID when the certificate has one), so a chain whose names copy ours and whose AKIDs
# are left out leads to our CA, and the signature check against our CA's key is where it
# fails: 7 (CERT_SIGNATURE_FAILURE), or 6/4 when the key or signature named cannot even
# be decoded. Our own CAs' keys decode and their signatures verify (a certificate cannot
# be corrupted in transit: TLS protects the bytes), so these codes mean "signed by
# someone else under our names", which for the operator is a certificate from another CA.
_VERIFY_CATEGORY: dict[int, HandshakeFailure] = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    4: "unknown_ca",  # UNABLE_TO_DECRYPT_CERT_SIGNATURE (legacy RSA; kept for older OpenSSL)
    6: "unknown_ca",  # UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY
    7: "unknown_ca",  # CERT_SIGNATURE_FAILURE
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: "unknown_ca",  # CERT_UNTRUSTED
    9: "expired",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
}


def _verify_error_text(code: int) -> str:
    return str(_ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace"))


def classify_failure(exc: BaseException, verify_code: int) -> tuple[HandshakeFailure, str]:
    """The reason category of a failed handshake, from the chain verification's result
    (``verify_result``) or else from OpenSSL's error queue."""
    if verify_code:
        text = f"X509_V_ERR {verify_code}: {_verify_error_text(verify_code)}"
        return _VERIFY_CATEGORY.get(verify_code, "bad_cert"), text
    if isinstance(exc, NoApplicationProtocol):
        return "protocol_error", f"no_application_protocol: {exc}"
    reasons: list[str] = []
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        # pyOpenSSL: [(library, function, reason), ...] from OpenSSL's error queue
        reasons = [str(item[-1]) for item in exc.args[0] if isinstance(item, tuple)]
    if "peer did not return a certificate" in reasons:
        return "no_cert", "the client sent no certificate"
    if "bad signature" in reasons:
        # SSL_R_BAD_SIGNATURE: the chain verified (else verify_code would be set), but
        # the handshake signature (CertificateVerify; a server's key exchange on the
        # client side) does not verify with the certificate's key.
        return "bad_signature", (
            "the peer's handshake signature does not verify with the key of the certificate "
            "it sent: it does not hold that key (OpenSSL: " + "; ".join(reasons) + ")"
        )
    return "protocol_error", "; ".join(reasons) or repr(exc)


def _use_groups(ctx: SSL.Context, groups: Sequence[str], *, client: bool) -> None:
    check_groups(groups)
    if client:
        shares = [f"*{n}" if i < _CLIENT_KEY_SHARES else n for i, n in enumerate(groups)]
        if set_groups(ctx, ":".join(shares)):
            return
        # An OpenSSL before 3.5 has no "*": it sends a key share for the first group only.
    if not set_groups(ctx, ":".join(groups)):  # check_groups() took this very list
        raise AssertionError(f"OpenSSL refused the group list {list(groups)!r}")


def _base_context(
    min_version: str, mode: int, groups: Sequence[str], *, client: bool
) -> SSL.Context:
    try:
        version = _VERSIONS[min_version]
    except KeyError:
        raise ValueError(f"min_version must be '1.2' or '1.3', not {min_version!r}") from None
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_options(_OPTIONS)
    # RELEASE_BUFFERS: an idle connection gives its read and write buffers back (about
    # 22 KiB each connection, measured by benchmarks/idle_memory.py); nginx sets it too.
    ctx.set_mode(_SSL_MODE_NO_AUTO_CHAIN | SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    _use_groups(ctx, groups, client=client)
    ctx.set_verify(mode)  # OpenSSL's own verification; verify_result() says why it failed
    return ctx


def _use_identity(
    ctx: SSL.Context, cert_chain: Sequence[x509.Certificate], key: PrivateKeyTypes
) -> None:
    if not cert_chain:
        raise ValueError("cert_chain is empty: need the leaf, then its intermediates")
    ctx.use_certificate(cert_chain[0])
    for cert in cert_chain[1:]:
        # A self-signed certificate is a root: peers must already have it, sending it only
        # costs bytes and invites clients that wrongly trust whatever root is sent.
        if cert.subject == cert.issuer:
            continue
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(key)  # type: ignore[arg-type]  # pyOpenSSL lists fewer key types
    ctx.check_privatekey()  # raises if the key does not belong to the leaf


def _trust_only(ctx: SSL.Context, cas: Sequence[x509.Certificate]) -> None:
    if not cas:
        # An empty store would refuse everyone with a confusing "unknown ca"; fail at build.
        raise ValueError("no CA certificates to trust")
    store = ctx.get_cert_store()
    assert store is not None
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))


def build_server_context(
    *,
    cert_chain: list[x509.Certificate],
    key: PrivateKeyTypes,
    client_cas: list[x509.Certificate],
    min_version: str = "1.2",
    groups: Sequence[str] = DEFAULT_GROUPS,
    alpn: list[bytes] | None = [b"http/1.1"],  # noqa: B006  # read only, never mutated
    session_id_context: bytes,
    session_timeout: int = 3600,
) -> SSL.Context:
    """A listener context: present ``cert_chain``, require a client cert from ``client_cas``.

    ``groups``: the key exchange groups, in order of preference (ValueError naming an
    unknown one). ``alpn=None`` turns ALPN off (raw TCP listeners). ``session_timeout``
    (seconds) bounds how long a verified client may resume without showing its
    certificate again; keep it well under the certificates' lifetime.
    """
    ctx = _base_context(
        min_version, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, groups, client=False
    )
    _use_identity(ctx, cert_chain, key)
    _trust_only(ctx, client_cas)
    for ca in client_cas:
        # The CertificateRequest names these CAs, so a client holding several identities
        # (browsers, curl with a store) picks the one we can verify.
        ctx.add_client_ca(ca)
    if alpn is not None:
        ctx.set_alpn_select_callback(_alpn_selector(list(alpn)))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    # Mandatory with VERIFY_PEER and caching: without it OpenSSL refuses every resumption
    # ("session id context uninitialized"). Max 32 bytes.
    ctx.set_session_id(session_id_context)
    ctx.set_timeout(session_timeout)
    return ctx


def _alpn_selector(accepted: list[bytes]) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    def select(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
        # Server preference order. A client that offers ALPN but none of ours (say only h2)
        # must get a no_application_protocol alert (RFC 7301 3.2), not a connection it
        # cannot speak on. pyOpenSSL's NO_OVERLAPPING_PROTOCOLS answers NOACK (carry on
        # without ALPN); only an exception makes it return ALERT_FATAL, and pyOpenSSL
        # re-raises it from do_handshake, where the engine classifies it as an SSL.Error.
        # (Clients that send no ALPN at all, like s_client, never reach this callback.)
        for proto in accepted:
            if proto in offered:
                return proto
        raise NoApplicationProtocol(f"client offered {offered!r}, we speak {accepted!r}")

    return select


def build_client_context(
    *,
    server_cas: list[x509.Certificate],
    cert_chain: list[x509.Certificate] | None = None,
    key: PrivateKeyTypes | None = None,
    min_version: str = "1.2",
    groups: Sequence[str] = DEFAULT_GROUPS,
    alpn: list[bytes] | None = None,
) -> SSL.Context:
    """A context for connecting to TLS backends; verifies the server against ``server_cas``.

    Pass ``cert_chain`` and ``key`` to present a client certificate (backends that require
    mTLS themselves). The host name check is per connection: ``TLSStream(server_hostname=)``.
    ``groups`` as for the server; key shares go with the first two (see above).
    """
    ctx = _base_context(min_version, SSL.VERIFY_PEER, groups, client=True)
    _trust_only(ctx, server_cas)
    if cert_chain is not None or key is not None:
        if cert_chain is None or key is None:
            raise ValueError("a client certificate needs both cert_chain and key")
        _use_identity(ctx, cert_chain, key)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    return ctx


def expect_host(conn: SSL.Connection, host: str) -> None:
    """Client side: send SNI for ``host`` and make OpenSSL verify the server's names
    against it (RFC 6125 matching, DNS name or IP address; X509_V_ERR 62/64 if not)."""
    # pyOpenSSL exposes SNI but not host name verification; the X509_VERIFY_PARAM calls
    # are in the bindings it ships on. They need the SSL*, which pyOpenSSL keeps in the
    # private ``_ssl`` (also used by TLSStream.session_reused; nowhere else).
    param = _lib.SSL_get0_param(conn._ssl)
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        name = host.encode("idna")
        conn.set_tlsext_host_name(name)
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise ValueError(f"cannot verify against host name {host!r}")
