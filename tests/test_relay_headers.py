"""Header rewriting, checked through real h11 connections in memory (no sockets)."""

from __future__ import annotations

import base64
import datetime as dt

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.identity import Identity, PeerCertificates
from mtlsproxy.relay import headers as relay_headers
from mtlsproxy.relay.client_cert import client_cert, client_cert_chain
from mtlsproxy.relay.errors import HttpError
from mtlsproxy.relay.framing import HeadReader, validate_request, validate_response
from mtlsproxy.relay.headers import HOP_BY_HOP, PROXY_OWNED, connection_tokens
from mtlsproxy.relay.xfcc import format_xfcc, parse_xfcc


# h11 is the oracle here: its events, adapted to the relay's parsed-head shape.
class FromH11:
    """An h11 request in the shape of ``relay.h1.RequestHead``."""

    def __init__(self, request: h11.Request) -> None:
        self.method = request.method
        self.target = request.target
        self.version = request.http_version
        self.headers = list(request.headers.raw_items())
        self.connection = connection_tokens(self.headers)


def upstream_request_headers(request: h11.Request, *args: object, **kwargs: object) -> list:
    return relay_headers.upstream_request_headers(FromH11(request), *args, **kwargs)  # type: ignore[arg-type]


def is_websocket_upgrade(request: h11.Request) -> bool:
    return relay_headers.is_websocket_upgrade(FromH11(request))  # type: ignore[arg-type]


def upstream_request(request: h11.Request, *args: object, **kwargs: object) -> h11.Request:
    """The Request event to send to the backend; always HTTP/1.1 on the upstream hop."""
    headers = upstream_request_headers(request, *args, **kwargs)
    return h11.Request(method=request.method, target=request.target, headers=headers)


def downstream_response_headers(
    response: h11.Response | h11.InformationalResponse, *, websocket: bool = False
) -> list[tuple[bytes, bytes]]:
    return relay_headers.client_response_headers(
        response.status_code, list(response.headers.raw_items()), websocket=websocket
    )


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
IDENT = Identity(
    subject="CN=player-1,O=Game Co",
    issuer="CN=CA",
    cn="player-1",
    ous=(),
    dns=("player-1.game.example",),
    ips=(),
    uris=("spiffe://game.example/player/1",),
    spiffe_id="spiffe://game.example/player/1",
    serial="1",
    sha256="ab" * 32,
    not_before=T0,
    not_after=T0,
)
OUR_XFCC = format_xfcc(IDENT).encode()


def parsed(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def get_all(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def test_hop_by_hop_and_spoofed_identity_are_removed() -> None:
    request = parsed(
        b"POST /api HTTP/1.1\r\n"
        b"Host: api.example:8443\r\n"
        b"Connection: keep-alive, X-Secret, Host, Content-Length\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Sum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Secret: drop-me\r\n"
        b'x-forwarded-client-cert: Hash=00;Subject="CN=admin"\r\n'
        b"X-FORWARDED-CLIENT-CERT: URI=spiffe://game.example/admin\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"Forwarded: for=1.2.3.4\r\n"
        b"X-Real-IP: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"Authorization: Bearer t\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    )
    out = upstream_request_headers(request, IDENT, "192.0.2.9", allow_websocket=True)
    assert out == [
        (b"Host", b"api.example:8443"),
        (b"Authorization", b"Bearer t"),
        (b"Content-Length", b"0"),
        (b"X-Forwarded-For", b"192.0.2.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"api.example:8443"),
        (b"X-Forwarded-Client-Cert", OUR_XFCC),
    ]


def test_chunked_request_is_reframed_by_h11() -> None:
    request = parsed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream = upstream_request(request, IDENT, "192.0.2.9")
    # Ours, after the forwarding headers: not the client's bytes carried along.
    assert names(list(upstream.headers))[:2] == [b"host", b"transfer-encoding"]
    assert upstream.headers.raw_items()[1] == (b"Transfer-Encoding", b"chunked")
    client = h11.Connection(h11.CLIENT)
    client.send(upstream)
    assert client.send(h11.Data(data=b"abc")) == b"3\r\nabc\r\n"


WEBSOCKET = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_websocket_upgrade_only_when_allowed() -> None:
    request = parsed(WEBSOCKET)
    assert is_websocket_upgrade(request)
    allowed = upstream_request_headers(request, IDENT, "192.0.2.9", allow_websocket=True)
    assert get_all(allowed, b"connection") == [b"Upgrade"]
    assert get_all(allowed, b"upgrade") == [b"websocket"]
    assert get_all(allowed, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    refused = upstream_request_headers(request, IDENT, "192.0.2.9", allow_websocket=False)
    assert b"connection" not in names(refused) and b"upgrade" not in names(refused)


@pytest.mark.parametrize(
    "raw",
    [
        WEBSOCKET.replace(b"GET", b"POST"),
        WEBSOCKET.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"),
        WEBSOCKET.replace(b"Upgrade: WebSocket", b"Upgrade: websocket, h2c"),
        WEBSOCKET.replace(b"keep-alive, Upgrade", b"keep-alive"),
        WEBSOCKET.replace(b"HTTP/1.1", b"HTTP/1.0"),
    ],
)
def test_not_a_websocket_handshake_is_never_upgraded(raw: bytes) -> None:
    out = upstream_request_headers(parsed(raw), IDENT, "192.0.2.9", allow_websocket=True)
    assert b"upgrade" not in names(out) and b"connection" not in names(out)


@pytest.mark.parametrize(
    ("peer", "xff"),
    [
        ("192.0.2.9", b"192.0.2.9"),
        ("::ffff:192.0.2.9", b"192.0.2.9"),
        ("2001:DB8::1", b"2001:db8::1"),
    ],
)
def test_xff_is_the_connecting_address(peer: str, xff: bytes) -> None:
    request = parsed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n\r\n")
    assert get_all(upstream_request_headers(request, IDENT, peer), b"x-forwarded-for") == [xff]


def test_response_hop_by_hop_removed() -> None:
    response = h11.Response(
        status_code=200,
        headers=[
            ("Content-Length", "2"),
            ("Connection", "close, X-Internal, Content-Length"),
            ("Keep-Alive", "timeout=5"),
            ("X-Internal", "secret"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X-Sum"),
            ("Upgrade", "h2c"),
            ("Set-Cookie", "a=1"),
        ],
    )
    assert downstream_response_headers(response) == [
        (b"Content-Length", b"2"),
        (b"Set-Cookie", b"a=1"),
    ]
    switching = h11.InformationalResponse(
        status_code=101,
        headers=[
            ("Connection", "upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Accept", "x"),
        ],
    )
    assert downstream_response_headers(switching, websocket=True) == [
        (b"Sec-WebSocket-Accept", b"x"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
    ]
    assert names(downstream_response_headers(switching)) == [b"sec-websocket-accept"]


def test_full_exchange_through_four_h11_connections() -> None:
    """client -> proxy(server side) -> proxy(client side) -> backend, and back."""
    client = h11.Connection(h11.CLIENT)
    proxy_in = h11.Connection(h11.SERVER)
    proxy_out = h11.Connection(h11.CLIENT)
    backend = h11.Connection(h11.SERVER)

    wire = (
        client.send(
            h11.Request(
                method="POST",
                target="/api/v1?x=1",
                headers=[
                    ("Host", "api.example"),
                    ("Content-Length", "5"),
                    ("X-Forwarded-Client-Cert", "Hash=forged"),
                    ("Connection", "keep-alive"),
                ],
            )
        )
        or b""
    )
    wire += client.send(h11.Data(data=b"hello")) or b""
    wire += client.send(h11.EndOfMessage()) or b""

    head = HeadReader().feed(wire)
    assert head is not None
    proxy_in.receive_data(head.raw)
    request = proxy_in.next_event()
    assert isinstance(request, h11.Request)
    validate_request(head.raw, request)
    proxy_in.receive_data(head.rest)

    upstream = proxy_out.send(upstream_request(request, IDENT, "192.0.2.9")) or b""
    while True:
        event = proxy_in.next_event()
        if isinstance(event, h11.Data):
            upstream += proxy_out.send(h11.Data(data=event.data)) or b""
        else:
            assert isinstance(event, h11.EndOfMessage)
            upstream += proxy_out.send(h11.EndOfMessage()) or b""
            break

    backend.receive_data(upstream)
    seen = backend.next_event()
    assert isinstance(seen, h11.Request)
    assert seen.target == b"/api/v1?x=1"
    assert get_all(list(seen.headers), b"x-forwarded-client-cert") == [OUR_XFCC]
    assert parse_xfcc(OUR_XFCC.decode())[0].get("URI") == "spiffe://game.example/player/1"
    assert get_all(list(seen.headers), b"host") == [b"api.example"]
    assert backend.next_event() == h11.Data(data=b"hello")
    assert isinstance(backend.next_event(), h11.EndOfMessage)

    back = (
        backend.send(
            h11.Response(
                status_code=200, headers=[("Content-Length", "2"), ("Connection", "keep-alive")]
            )
        )
        or b""
    )
    back += backend.send(h11.Data(data=b"ok")) or b""
    back += backend.send(h11.EndOfMessage()) or b""
    response_head = HeadReader(response=True).feed(back)
    assert response_head is not None
    proxy_out.receive_data(response_head.raw)
    response = proxy_out.next_event()
    assert isinstance(response, h11.Response)
    validate_response(response_head.raw, response)

    down = (
        proxy_in.send(
            h11.Response(
                status_code=response.status_code, headers=downstream_response_headers(response)
            )
        )
        or b""
    )
    client.receive_data(down)
    final = client.next_event()
    assert isinstance(final, h11.Response)
    assert final.status_code == 200
    assert get_all(list(final.headers), b"connection") == []


# --- property: nothing a client sends can smuggle a hop-by-hop header or an identity -----

_special = st.sampled_from(
    sorted(HOP_BY_HOP | PROXY_OWNED | {b"proxy-authorization", b"proxy-x", b"x-secret", b"host"})
).map(lambda n: n.decode())
_ordinary = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z")
_name = st.one_of(_special, _ordinary).flatmap(
    lambda n: st.sampled_from([n, n.upper(), n.title(), n.lower()])
)
_value = st.from_regex(r"\A[\x21-\x7e]([\x20-\x7e]{0,20}[\x21-\x7e])?\Z")


@given(
    fields=st.lists(st.tuples(_name, _value), max_size=15),
    nominate=st.lists(st.one_of(_special, _ordinary), max_size=4),
    allow_websocket=st.booleans(),
)
def test_upstream_never_carries_client_identity_or_hop_headers(
    fields: list[tuple[str, str]], nominate: list[str], allow_websocket: bool
) -> None:
    fields = [
        (n, v)
        for n, v in fields
        if n.lower() not in {"host", "content-length", "transfer-encoding"}
    ]
    headers = [("Host", "a.example"), *fields]
    if nominate:
        headers.append(("Connection", ", ".join(nominate)))
    request = h11.Request(method="GET", target="/", headers=headers)
    out = upstream_request_headers(request, IDENT, "192.0.2.9", allow_websocket=allow_websocket)

    assert get_all(out, b"x-forwarded-client-cert") == [OUR_XFCC]
    assert get_all(out, b"client-cert") == get_all(out, b"client-cert-chain") == []
    assert get_all(out, b"x-forwarded-for") == [b"192.0.2.9"]
    assert get_all(out, b"host") == [b"a.example"]
    # What Connection names is dropped, except what framing rests on and what we set.
    kept = {b"host", b"content-length", b"upgrade", b"connection"} | PROXY_OWNED
    nominated = connection_tokens(request.headers) - kept
    websocket = allow_websocket and is_websocket_upgrade(request)
    for name in names(out):
        assert not name.startswith(b"proxy-")
        assert name not in nominated
        if name in HOP_BY_HOP:
            assert websocket and name in {b"connection", b"upgrade"}
    for name in PROXY_OWNED:
        assert len(get_all(out, name)) <= 1

    # And h11 takes the result on the upstream hop, and a backend reads it back intact.
    proxy_out = h11.Connection(h11.CLIENT)
    backend = h11.Connection(h11.SERVER)
    backend.receive_data(proxy_out.send(h11.Request(method="GET", target="/", headers=out)) or b"")
    seen = backend.next_event()
    assert isinstance(seen, h11.Request)
    assert [(n.lower(), v) for n, v in out] == list(seen.headers)


# ---- identity headers chosen per route (issue 16 item 6: RFC 9440 Client-Cert) ----------

CERTS = PeerCertificates(leaf=b"\x30\x82leaf-der\xff", chain=(b"\x30\x82issuer-der\xfb",))
SPOOFED_CERT = (
    b"Client-Cert: :AAAA:\r\n"
    b"client-cert: :AAAA:\r\n"
    b"CLIENT-CERT: :AAAA:\r\n"
    b"Client_Cert: :AAAA:\r\n"
    b"Client-Cert-Chain: :AAAA:, :BBBB:\r\n"
    b"client-cert-chain: :CCCC:\r\n"
    b"CLIENT_CERT_CHAIN: :DDDD:\r\n"
)
SELECTIONS = [
    (),
    ("xfcc",),
    ("client-cert",),
    ("client-cert", "client-cert-chain"),
    ("client-cert-chain", "client-cert", "xfcc"),
]


def test_the_default_route_forwards_exactly_what_it_did_before() -> None:
    request = parsed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert upstream_request_headers(request, IDENT, "192.0.2.9") == [
        (b"Host", b"a"),
        (b"X-Forwarded-For", b"192.0.2.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"a"),
        (b"X-Forwarded-Client-Cert", OUR_XFCC),
    ]
    assert relay_headers.forwarding_headers(IDENT, "192.0.2.9") == relay_headers.forwarding_headers(
        IDENT, "192.0.2.9", identity_headers=("xfcc",), certificates=CERTS
    )


def test_each_identity_header_when_chosen_in_a_fixed_order() -> None:
    request = parsed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = upstream_request_headers(
        request,
        IDENT,
        "192.0.2.9",
        identity_headers=("client-cert-chain", "client-cert", "xfcc"),
        certificates=CERTS,
    )
    assert out[-3:] == [
        (b"X-Forwarded-Client-Cert", OUR_XFCC),
        (b"Client-Cert", client_cert(CERTS.leaf)),
        (b"Client-Cert-Chain", client_cert_chain(CERTS.chain or ())),
    ]
    only_cert = upstream_request_headers(
        request, IDENT, "192.0.2.9", identity_headers=("client-cert",), certificates=CERTS
    )
    assert only_cert[-1] == (b"Client-Cert", b":" + base64.b64encode(CERTS.leaf) + b":")
    assert b"x-forwarded-client-cert" not in names(only_cert)
    assert b"client-cert-chain" not in names(only_cert)


def test_an_empty_list_forwards_no_identity_header_at_all() -> None:
    request = parsed(b"GET / HTTP/1.1\r\nHost: a\r\n" + SPOOFED_CERT + b"\r\n")
    out = upstream_request_headers(request, IDENT, "192.0.2.9", identity_headers=())
    assert names(out) == [b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]


def test_no_chain_field_when_the_chain_is_empty_or_unknown() -> None:
    chosen = ("client-cert", "client-cert-chain")
    for chain in ((), None):
        certs = PeerCertificates(leaf=b"leaf", chain=chain)
        out = relay_headers.forwarding_headers(
            IDENT, "192.0.2.9", identity_headers=chosen, certificates=certs
        )
        assert names(out)[-1] == b"client-cert"


def test_client_cert_without_the_verified_certificate_is_refused_not_sent_empty() -> None:
    with pytest.raises(HttpError) as caught:
        relay_headers.forwarding_headers(IDENT, "192.0.2.9", identity_headers=("client-cert",))
    assert caught.value.status == 500


@pytest.mark.parametrize("chosen", SELECTIONS)
@pytest.mark.parametrize("websocket", [False, True])
@pytest.mark.parametrize("nominate", [False, True])
def test_client_sent_client_cert_never_passes_whatever_the_route_forwards(
    chosen: tuple[str, ...], websocket: bool, nominate: bool
) -> None:
    raw = (WEBSOCKET if websocket else b"GET / HTTP/1.1\r\nHost: a\r\n").replace(
        b"\r\n\r\n", b"\r\n"
    )
    raw += SPOOFED_CERT
    if nominate:  # named as hop-by-hop too: that must not make the proxy drop its own
        raw += b"Connection: Client-Cert, client-cert-chain\r\n"
    raw += b"\r\n"
    request = parsed(raw)
    out = upstream_request_headers(
        request,
        IDENT,
        "192.0.2.9",
        allow_websocket=websocket,
        identity_headers=chosen,
        certificates=CERTS,
    )
    folded = [n.replace(b"_", b"-") for n in names(out)]
    want_cert = [client_cert(CERTS.leaf)] if "client-cert" in chosen else []
    chained = "client-cert-chain" in chosen and "client-cert" in chosen
    want_chain = [client_cert_chain(CERTS.chain or ())] if chained else []
    assert get_all(out, b"client-cert") == want_cert
    assert get_all(out, b"client-cert-chain") == want_chain
    assert folded.count(b"client-cert") == len(want_cert)
    assert folded.count(b"client-cert-chain") == len(want_chain)
    assert b":AAAA:" not in b"".join(v for _, v in out)
    if websocket:
        assert get_all(out, b"upgrade") == [b"websocket"]
