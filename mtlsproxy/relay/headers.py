"""The header lists sent upstream and back downstream, built from parsed fields.

Theory of operation: the proxy never copies header bytes from one side to the other. It
takes the parsed head (``relay.h1``, already checked by ``framing``), drops what belongs
to one hop or claims to come from a proxy, and adds its own forwarding headers. The
client's Transfer-Encoding never passes: a chunked request gets a fresh ``chunked`` of
ours, and ``relay.exchange`` frames responses itself (chunked, or close-delimited for an
HTTP/1.0 client). The tests that use h11 as the oracle adapt its events to these
functions themselves.

Dropped on every request (RFC 9110 §7.6.1, plus what proxies actually abuse):

- ``Connection`` and every field it names, except Host and Content-Length: a client
  must not be able to make the proxy strip what routing and framing rest on
  ("hop-by-hop header abuse"). Anything else it names is its own header to lose.
- ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, every ``Proxy-*``
  (Proxy-Authorization, Proxy-Connection...).
- ``Upgrade``, unless the route allows WebSocket and this is a well-formed WebSocket
  handshake; then exactly ``Connection: Upgrade`` and ``Upgrade: websocket`` are sent.
  Any other upgrade (``h2c`` above all, "h2c smuggling") is dropped: the backend answers
  the request as plain HTTP/1.1.
- Every header that claims to be written by a proxy: ``X-Forwarded-Client-Cert``,
  ``Client-Cert``, ``Client-Cert-Chain`` (RFC 9440 §2.4), ``X-Forwarded-For``,
  ``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Port``, ``Forwarded``,
  ``X-Real-IP``; any case, any count, with ``_`` for ``-``, on every route, whichever
  identity headers the route itself forwards.

The identity headers a route forwards (``identity_headers`` in the config: XFCC, RFC
9440's Client-Cert and Client-Cert-Chain, or none) are built once per connection and
route (``forwarding_headers``), from the verified identity and certificates only.

X-Forwarded-For is *replaced* by the connecting address, not appended to. mtlsproxy is
the edge: whatever a client put there is the client's claim, and the usual backend
habit of reading the leftmost XFF entry would turn an appended list into a spoofable
client address. (Envoy at the edge appends but only trusts the rightmost entry; a
backend cannot tell which convention its proxy used, so we give it one address.)
"""

from __future__ import annotations

import ipaddress

from mtlsproxy.identity import Identity, PeerCertificates
from mtlsproxy.relay.client_cert import (
    CLIENT_CERT,
    CLIENT_CERT_CHAIN,
    client_cert,
    client_cert_chain,
)
from mtlsproxy.relay.errors import HttpError
from mtlsproxy.relay.framing import connection_tokens
from mtlsproxy.relay.h1 import RequestHead
from mtlsproxy.relay.xfcc import format_xfcc

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
PROXY_OWNED = frozenset(
    {
        b"x-forwarded-client-cert",
        b"client-cert",
        b"client-cert-chain",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
        b"x-real-ip",
    }
)
# What a route forwards when its config does not say (config.Route.identity_headers).
DEFAULT_IDENTITY_HEADERS = ("xfcc",)
# Fields a Connection header may name without effect.
_PROTECTED = frozenset({b"host", b"content-length"})


def is_websocket_upgrade(head: RequestHead) -> bool:
    """RFC 6455 §4.1: GET, HTTP/1.1, ``Upgrade: websocket``, ``Connection`` with upgrade."""
    upgrades = [v for n, v in head.headers if n.lower() == b"upgrade"]
    return (
        head.method == b"GET"
        and head.version == b"1.1"
        and len(upgrades) == 1
        and upgrades[0].strip().lower() == b"websocket"
        and b"upgrade" in head.connection
    )


def accepts_websocket(status: int, headers: Headers) -> bool:
    """A 101 that switches to WebSocket (``headers`` with names in any case)."""
    upgrades = [v for n, v in headers if n.lower() == b"upgrade"]
    return (
        status == 101
        and len(upgrades) == 1
        and upgrades[0].strip().lower() == b"websocket"
        and b"upgrade" in connection_tokens(headers)
    )


def _is_hop(name: bytes, nominated: frozenset[bytes]) -> bool:
    return (
        name in HOP_BY_HOP
        or name.startswith(b"proxy-")
        or (name in nominated and name not in _PROTECTED)
    )


def forwarding_headers(
    identity: Identity,
    client_ip: str,
    *,
    by: str | None = None,
    identity_headers: tuple[str, ...] = DEFAULT_IDENTITY_HEADERS,
    certificates: PeerCertificates | None = None,
) -> Headers:
    """The headers that say who the client is: the same for every request of a connection
    and route, so built once per connection and route
    (``upstream_request_headers(forwarding=...)``): X-Forwarded-For, X-Forwarded-Proto,
    then the route's ``identity_headers`` in a fixed order (XFCC, Client-Cert,
    Client-Cert-Chain). ``certificates``: what the handshake verified, needed for
    Client-Cert; without it the request is refused (500), never sent without.
    Client-Cert-Chain goes only with Client-Cert, and not when the chain is empty or not
    known (a resumed session whose chain was not remembered)."""
    out: Headers = [
        (b"X-Forwarded-For", _address(client_ip).encode("ascii")),
        (b"X-Forwarded-Proto", b"https"),
    ]
    if "xfcc" in identity_headers:
        out.append((b"X-Forwarded-Client-Cert", format_xfcc(identity, by=by).encode("utf-8")))
    if "client-cert" in identity_headers:
        if certificates is None:
            raise HttpError(
                "client certificate not available",
                log_detail="the verified client certificate is not known on this connection",
            )
        out.append((CLIENT_CERT, client_cert(certificates.leaf)))
        if "client-cert-chain" in identity_headers and certificates.chain is not None:
            chain = client_cert_chain(certificates.chain)
            if chain is not None:
                out.append((CLIENT_CERT_CHAIN, chain))
    return out


def upstream_request_headers(
    head: RequestHead,
    identity: Identity,
    client_ip: str,
    *,
    allow_websocket: bool = False,
    by: str | None = None,
    forwarding: Headers | None = None,
    identity_headers: tuple[str, ...] = DEFAULT_IDENTITY_HEADERS,
    certificates: PeerCertificates | None = None,
) -> Headers:
    """Headers for the backend. ``by`` is the proxy's own URI SAN, for XFCC ``By=``;
    ``forwarding``: ``forwarding_headers`` of this connection and route, when already
    built (else built from ``identity_headers`` and ``certificates``)."""
    nominated = head.connection
    host: bytes | None = None
    chunked = False
    out: Headers = []
    # The client's spelling of each name is kept: some backends still look headers up
    # case-sensitively. The parser has validated every name and value.
    for raw_name, value in head.headers:
        name = raw_name.lower()
        if name == b"transfer-encoding":
            chunked = True
        if name == b"host":
            host = value
        # CGI-style servers (PHP-FPM, WSGI) read X_Forwarded_Client_Cert and
        # X-Forwarded-Client-Cert as the same variable: an underscore spelling of a
        # header we own or strip would slip a forged identity past us.
        folded = name.replace(b"_", b"-")
        # Expect: the proxy answers 100-continue itself (``Exchange``): it never travels on.
        if _is_hop(folded, nominated) or folded in PROXY_OWNED or name == b"expect":
            continue
        out.append((raw_name, value))
    # A chunked request needs the header back: ours (framing allows only ``chunked``),
    # not the client's bytes; its body goes up in chunks we frame.
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    if allow_websocket and is_websocket_upgrade(head):
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    if forwarding is None:
        forwarding = forwarding_headers(
            identity,
            client_ip,
            by=by,
            identity_headers=identity_headers,
            certificates=certificates,
        )
    # X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, then the identity headers.
    out += forwarding
    if host is not None:
        out.insert(len(out) - len(forwarding) + 2, (b"X-Forwarded-Host", host))
    return out


def client_response_headers(
    status: int,
    headers: Headers,
    *,
    websocket: bool = False,
    nominated: frozenset[bytes] | None = None,
) -> Headers:
    """Headers for the client: the backend's (names in any case), minus its hop-by-hop
    fields. ``websocket``: the request was a permitted WebSocket handshake; only when the
    backend accepted it do Connection/Upgrade pass. ``nominated``: the head's Connection
    tokens, when known already."""
    if nominated is None:
        nominated = connection_tokens(headers)
    out: Headers = [(n, v) for n, v in headers if not _is_hop(n.lower(), nominated)]
    if websocket and accepts_websocket(status, headers):
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    return out


def _address(client_ip: str) -> str:
    # Normalised so the header is one canonical spelling; an IPv4 client on a dual-stack
    # socket arrives as ::ffff:a.b.c.d and backends expect a.b.c.d.
    address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
