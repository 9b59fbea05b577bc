"""HTTP/2 streams, as plain code: what a request stream is, and what goes back and up.

Theory of operation
===================

python-hyper's ``h2`` keeps each connection's state machine, flow-control windows and
HPACK tables, and already refuses what RFC 9113 calls malformed (connection-specific
fields, uppercase names, CR/LF/NUL in values, misplaced or repeated pseudo-headers, a
Host that disagrees with ``:authority``). This module maps a stream onto the proxy's one
request model, so an HTTP/2 request meets exactly the rules an HTTP/1.1 request meets:

- ``request_head`` turns a stream's header block into a ``RequestHead`` with Host taken
  from ``:authority`` (or the Host field), the target from ``:path`` and the framing from
  Content-Length. Then ``relay.exchange.admit`` decides it as any other request: the
  identity's standing, the canonical target (``//admin`` is ``/admin`` here too), the
  route, its allow rules. Version ``b"2"``: never a WebSocket upgrade, never chunked.
- Upstream, the head goes through ``relay.headers.upstream_request_headers`` like every
  request (every proxy-owned field stripped, the identity headers added), then becomes an
  HTTP/1.1 head (``relay.h1.request_head``) or an HTTP/2 header list
  (``upstream_h2_headers``).
- Downstream, ``client_headers`` keeps what ``relay.headers.client_response_headers``
  keeps of a response, names lowercased, hop-by-hop fields gone, ``:status`` first.

The abuse limits of a connection (resets, control frames) are ``relay.h2limits``.
"""

from __future__ import annotations

from mtlsproxy.relay.errors import BadRequest
from mtlsproxy.relay.framing import _HOST, _MAX_CL_DIGITS, _TOKEN, FIELD_VALUE, TARGET, Framing
from mtlsproxy.relay.h1 import RequestHead
from mtlsproxy.relay.headers import HOP_BY_HOP, PROXY_OWNED, Headers, client_response_headers
from mtlsproxy.relay.responses import error_body

VERSION = b"2"
# What a request may carry to a backend beyond HTTP/1.1's fields: TE with "trailers"
# only (RFC 9113 §8.2.2), which gRPC servers expect; h2 refuses any other TE value.
TRAILERS = (b"te", b"trailers")


def request_head(headers: Headers, *, end_stream: bool) -> RequestHead:
    """The request of a stream (``headers``: h2's validated list, pseudo-headers first),
    or BadRequest. ``end_stream``: the header block ended the stream (no body)."""
    pseudo, fields = _split(headers)
    method, path, scheme = pseudo.get(b":method"), pseudo.get(b":path"), pseudo.get(b":scheme")
    if method is None or path is None or scheme is None:
        raise BadRequest("missing pseudo-header")
    # The HTTP/1.1 leg's syntax: the method a token, the target visible ASCII (a space or
    # a control byte in it would rewrite the request line the backend reads).
    if not _TOKEN.fullmatch(method):
        raise BadRequest("malformed method")
    if not TARGET.fullmatch(path):
        raise BadRequest("malformed :path")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")
    if scheme != b"https":
        raise BadRequest("scheme must be https")
    if path == b"*" and method != b"OPTIONS":
        raise BadRequest("asterisk-form target is only for OPTIONS")
    if not (path == b"*" or path.startswith(b"/")):
        raise BadRequest("malformed :path")
    authority = _authority(pseudo.get(b":authority"), fields)
    content_length = _content_length(fields)
    if content_length is None and end_stream:
        content_length = 0
    # Host first, as for HTTP/1.1; a body of unknown length goes up chunked.
    out: Headers = [(b"host", authority)]
    out += [(n, v) for n, v in fields if n != b"host"]
    chunked = content_length is None
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))  # ours: h2 refuses the client's
    framing = Framing(content_length=content_length, chunked=chunked)
    return RequestHead(method, path, VERSION, out, framing)


_PSEUDO = frozenset({b":method", b":path", b":authority", b":scheme"})


def _split(headers: Headers) -> tuple[dict[bytes, bytes], Headers]:
    pseudo: dict[bytes, bytes] = {}
    fields: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name not in _PSEUDO:  # :protocol (extended CONNECT) is not enabled
                raise BadRequest("unsupported pseudo-header")
            pseudo[name] = value  # h2 lets each through once
        elif not _TOKEN.fullmatch(name):  # h2 lets `x@y` and `a"` through; HTTP/1.1 not
            raise BadRequest("malformed header field name")
        elif not FIELD_VALUE.fullmatch(value):  # the HTTP/1.1 floor, on both versions
            raise BadRequest("control character in header field value")
        else:
            fields.append((name, value))
    return pseudo, fields


def _authority(authority: bytes | None, fields: Headers) -> bytes:
    hosts = [value for name, value in fields if name == b"host"]
    if authority is None:
        if len(hosts) != 1:
            raise BadRequest("exactly one Host header is required")
        authority = hosts[0]
    elif hosts and hosts != [authority]:  # h2 compares one Host; more is our refusal
        raise BadRequest("Host disagrees with :authority")
    if not _HOST.fullmatch(authority):
        raise BadRequest("malformed Host header")
    return authority


def _content_length(fields: Headers) -> int | None:
    lengths = [value for name, value in fields if name == b"content-length"]
    if not lengths:
        return None
    if len(lengths) > 1:
        raise BadRequest("more than one Content-Length")
    if not lengths[0].isdigit() or len(lengths[0]) > _MAX_CL_DIGITS:
        raise BadRequest("malformed Content-Length")
    return int(lengths[0])


def wants_trailers(head: RequestHead) -> bool:
    """The client said it takes trailers (``te: trailers``, a gRPC client always does)."""
    return TRAILERS in head.headers


def upstream_h2_headers(head: RequestHead, target: bytes, headers: Headers) -> Headers:
    """The header list for an HTTP/2 backend: pseudo-headers, then ``headers`` (what
    ``upstream_request_headers`` left of the client's, plus ours) without Host and the
    chunked framing of HTTP/1.1, names lowercased."""
    host = next(v for n, v in head.headers if n == b"host")
    out: Headers = [
        (b":method", head.method),
        (b":scheme", b"http"),  # for the backend's eyes; TLS to it or not, as routed
        (b":authority", host),
        (b":path", target),
    ]
    for name, value in headers:
        lowered = name.lower()
        if lowered != b"host" and lowered not in HOP_BY_HOP:
            out.append((lowered, value))
    if wants_trailers(head):
        out.append(TRAILERS)
    return out


def client_headers(status: int, headers: Headers) -> Headers:
    """A response head for an HTTP/2 client: ``:status``, then the backend's fields
    without the hop-by-hop ones, names lowercased."""
    out: Headers = [(b":status", b"%d" % status)]
    out += [(n.lower(), v) for n, v in client_response_headers(status, headers)]
    return out


def client_trailers(headers: Headers) -> Headers:
    """A backend's trailers for the client (grpc-status, grpc-message): no pseudo-headers,
    no hop-by-hop fields."""
    return [
        (name.lower(), value)
        for name, value in headers
        if name[:1] != b":" and name.lower() not in HOP_BY_HOP
    ]


def upstream_trailers(headers: Headers) -> Headers:
    """A client's request trailers for an HTTP/2 backend: as ``client_trailers``, and
    never a field the proxy owns (XFCC, Client-Cert, X-Forwarded-*..., any spelling): a
    backend that merges trailers into headers must not find a forged identity there."""
    return [
        (name, value)
        for name, value in client_trailers(headers)
        if name.replace(b"_", b"-") not in PROXY_OWNED
    ]


def error_response(status: int, reason: str, *, head_only: bool = False) -> tuple[Headers, bytes]:
    """The proxy's own answer on a stream: the text of ``relay.responses``."""
    body = error_body(status, reason)
    headers: Headers = [
        (b":status", b"%d" % status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    return headers, b"" if head_only else body


_GOAWAY = 0x7
_FRAME_HEAD = 9
PREFACE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # a client's first bytes


class GoAwaySplitter:
    """Takes GOAWAY frames out of a peer's byte stream before h2 sees them.

    h2 closes its whole state machine on a received GOAWAY (python-hyper/h2#1181), so a
    graceful one (NO_ERROR, "finish what you have", as gRPC servers send on
    ``max_connection_age`` and at shutdown, and clients when they leave) would fail the
    streams in flight. The splitter
    follows the frame boundaries (9-byte header, 24-bit length), passes every other byte
    on for h2 as it comes, and hands back each GOAWAY as ``(last_stream_id, error_code)``.
    A GOAWAY longer than ``MAX_GOAWAY`` goes to h2 like any frame, which refuses it as
    oversized: nothing here buffers more than that.
    """

    MAX_GOAWAY = 16384  # SETTINGS_MAX_FRAME_SIZE's initial value, which h2 keeps

    __slots__ = ("_pending", "_through")

    def __init__(self, *, preface: int = 0) -> None:
        self._pending = b""
        # Bytes of the current frame still to pass on; first, on a server, the client's
        # 24-byte preface (PREFACE), which is not a frame (h2 checks it).
        self._through = preface

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        buffer = self._pending + data if self._pending else data
        keep = bytearray()
        goaways: list[tuple[int, int]] = []
        pos = 0
        while pos < len(buffer):
            if self._through:
                taken = min(self._through, len(buffer) - pos)
                keep += buffer[pos : pos + taken]
                pos += taken
                self._through -= taken
                continue
            if len(buffer) - pos < _FRAME_HEAD:
                break
            length = int.from_bytes(buffer[pos : pos + 3], "big")
            if buffer[pos + 3] != _GOAWAY or length > self.MAX_GOAWAY:
                self._through = _FRAME_HEAD + length
                continue
            end = pos + _FRAME_HEAD + length
            if end > len(buffer):
                break  # a GOAWAY still arriving: wait for all of it
            body = buffer[pos + _FRAME_HEAD : end]
            if len(body) >= 8:
                last = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
                goaways.append((last, int.from_bytes(body[4:8], "big")))
            else:
                goaways.append((0, 1))  # malformed: the peer's PROTOCOL_ERROR
            pos = end
        self._pending = buffer[pos:]
        return bytes(keep), goaways
