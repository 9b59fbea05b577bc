"""Strict framing: every head h11 would take leniently, and a few it would refuse too."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.relay.errors import (
    BadGateway,
    BadRequest,
    HeadersTooLarge,
    HttpError,
    PayloadTooLarge,
)
from mtlsproxy.relay.framing import (
    MAX_HEAD_BYTES,
    BodyLimit,
    Framing,
    Head,
    HeadReader,
    check_chunk_size,
    translate_h11_error,
    validate_request,
    validate_response,
)

_PLACEHOLDER = h11.Request(method="GET", target="/", headers=[("Host", "placeholder")])


def h11_request(raw: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, h11.Request)
    return event


def accept(raw: bytes) -> Framing:
    """What the server does: read the head, let h11 parse it, then validate."""
    head = HeadReader().feed(raw)
    assert head is not None
    event = h11_request(head.raw)
    assert event is not None, "h11 refused a head we expected to accept"
    return validate_request(head.raw, event)


def refuse(raw: bytes) -> HttpError:
    """Our checks must refuse on their own, whether or not h11 would have."""
    with pytest.raises(HttpError) as info:
        head = HeadReader().feed(raw)
        assert head is not None
        validate_request(head.raw, h11_request(head.raw) or _PLACEHOLDER)
    return info.value


def req(*headers: str, line: str = "POST / HTTP/1.1", host: str | None = "api.example") -> bytes:
    lines = [line] + ([f"Host: {host}"] if host is not None else []) + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def test_plain_requests_are_accepted() -> None:
    assert accept(req(line="GET / HTTP/1.1")) == Framing(content_length=None, chunked=False)
    assert accept(req("Content-Length: 5")) == Framing(content_length=5, chunked=False)
    assert accept(req("Content-Length:  0 \t")) == Framing(content_length=0, chunked=False)
    assert accept(req("Transfer-Encoding: chunked")) == Framing(content_length=None, chunked=True)
    assert accept(req(line="GET /a/b?x=../y HTTP/1.0", host="a.example:8443")).chunked is False
    assert accept(req(line="OPTIONS * HTTP/1.1")).content_length is None


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", "  chunked\t"])
def test_te_spellings_accepted(value: str) -> None:
    assert accept(req(f"Transfer-Encoding:{value}")).chunked


@pytest.mark.parametrize(
    ("headers", "line", "reason"),
    [
        (["Content-Length: 3", "Transfer-Encoding: chunked"], None, "both Content-Length"),
        (["Transfer-Encoding: chunked", "Content-Length: 3"], None, "both Content-Length"),
        (["Transfer-Encoding: chunked"], "POST / HTTP/1.0", "HTTP/1.0"),
        (["Transfer-Encoding: chunked, chunked"], None, "other than chunked"),
        (["Transfer-Encoding: chunked, gzip, chunked"], None, "other than chunked"),
        (["Transfer-Encoding: chunked, gzip"], None, "other than chunked"),
        (["Transfer-Encoding: gzip, chunked"], None, "other than chunked"),
        (["Transfer-Encoding: gzip"], None, "other than chunked"),
        (["Transfer-Encoding: identity"], None, "other than chunked"),
        (["Transfer-Encoding: chunked;ext=1"], None, "other than chunked"),
        (["Transfer-Encoding: chunked,"], None, "other than chunked"),
        (["Transfer-Encoding: ,chunked"], None, "other than chunked"),
        (["Transfer-Encoding: chunked chunked"], None, "other than chunked"),
        (["Transfer-Encoding: xchunked"], None, "other than chunked"),
        (["Transfer-Encoding:"], None, "other than chunked"),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], None, "more than one"),
        (["Transfer-Encoding: chunked\x0b"], None, "control character"),
        (["Content-Length: 1, 1"], None, "malformed Content-Length"),
        (["Content-Length: 1,1"], None, "malformed Content-Length"),
        (["Content-Length: 1", "Content-Length: 1"], None, "more than one Content-Length"),
        (["Content-Length: 1", "Content-Length: 2"], None, "more than one Content-Length"),
        (["Content-Length:"], None, "malformed Content-Length"),
        (["Content-Length: +1"], None, "malformed Content-Length"),
        (["Content-Length: -1"], None, "malformed Content-Length"),
        (["Content-Length: 0x10"], None, "malformed Content-Length"),
        (["Content-Length: 1 2"], None, "malformed Content-Length"),
        (["Content-Length: 1e3"], None, "malformed Content-Length"),
        (["Content-Length: \u0661"], None, "malformed Content-Length"),  # Arabic-Indic one
        (["Content-Length: " + "9" * 19], None, "malformed Content-Length"),
        (["X-A: b", " folded"], None, "folding"),
        (["X-A: b", "\tfolded"], None, "folding"),
        ([": empty-name"], None, "field name"),
        (["Content-Length : 3"], None, "malformed header field name"),
        (["Content-Length\t: 3"], None, "malformed header field name"),
        (["X A: b"], None, "malformed header field name"),
        (["no colon here"], None, "field name"),
        (["X-A: a\x00b"], None, "control character"),
        (["X-A: a\x01b"], None, "control character"),
        (["X-A: a\x7fb"], None, "control character"),
        (["X-A: a\rb"], None, "bare CR"),
        ([], "PRI * HTTP/2.0", "version"),
        ([], "GET / HTTP/1.2", "version"),
        ([], "GET / HTTP/2.0", "version"),
        ([], "CONNECT api.example:443 HTTP/1.1", "CONNECT"),
        ([], "GET  / HTTP/1.1", "start line"),
        ([], "GET / HTTP/1.1 ", "start line"),
        ([], "GET /", "start line"),
        ([], "GET / http/1.1", "start line"),
        ([], "GET * HTTP/1.1", "asterisk"),
    ],
)
def test_refused_with_400(headers: list[str], line: str | None, reason: str) -> None:
    error = refuse(req(*headers, line=line or "POST / HTTP/1.1"))
    assert isinstance(error, BadRequest)
    assert error.status == 400
    assert reason in error.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (req(host=None), "exactly one Host"),
        (req(host=None, line="GET / HTTP/1.0"), "exactly one Host"),
        (req("Host: other.example"), "exactly one Host"),
        (req(host=""), "malformed Host"),
        (req(host="a b"), "malformed Host"),
        (req(host="a/b"), "malformed Host"),
        (req(host="user@a.example"), "malformed Host"),
        (req(host="a.example:99999999"), "malformed Host"),
    ],
)
def test_host_rules(raw: bytes, reason: str) -> None:
    assert reason in refuse(raw).reason


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: y\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_bare_lf_refused_by_the_reader(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="bare LF"):
        HeadReader().feed(raw)


def test_bare_lf_is_caught_before_the_cap() -> None:
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r") is None
    with pytest.raises(BadRequest, match="bare LF"):
        reader.feed(b"\nHost: a\n")


def test_reader_returns_head_and_rest_and_ignores_leading_crlf() -> None:
    reader = HeadReader()
    raw = req("Content-Length: 4")
    assert reader.feed(b"\r\n\r\n") is None
    assert reader.buffered == 0
    assert reader.feed(raw[:10]) is None
    assert reader.buffered == 10
    # Body bytes after the head may hold bare LFs: they are not head.
    assert reader.feed(raw[10:] + b"a\nb\n") == Head(raw, b"a\nb\n")


def test_reader_cap_is_431_and_counts_every_byte() -> None:
    base = req(line="GET / HTTP/1.1")
    pad = MAX_HEAD_BYTES - len(base) - len("X-Pad: \r\n")
    exact = req(f"X-Pad: {'p' * pad}", line="GET / HTTP/1.1")
    assert len(exact) == MAX_HEAD_BYTES
    assert HeadReader().feed(exact) is not None
    over = req(f"X-Pad: {'p' * (pad + 1)}", line="GET / HTTP/1.1")
    with pytest.raises(HeadersTooLarge) as info:
        HeadReader().feed(over)
    assert info.value.status == 431
    # Without a terminator the reader gives up as soon as the cap is passed.
    reader = HeadReader(max_bytes=100)
    assert reader.feed(b"GET /" + b"a" * 90) is None
    with pytest.raises(HeadersTooLarge):
        reader.feed(b"a" * 10)
    # Leading CRLFs count too: an endless stream of them is not free.
    with pytest.raises(HeadersTooLarge):
        HeadReader(max_bytes=100).feed(b"\r\n" * 51)


def test_many_header_fields_are_fine_within_the_byte_cap() -> None:
    """Real traffic has heads with more than 100 fields (150 Set-Cookie in a response, a
    request with many small headers): only bytes are capped, as nginx and HAProxy do."""
    raw = req(*(f"X-{i}: v" for i in range(300)))
    validate_request(raw, h11_request(raw) or _PLACEHOLDER)
    head, event = resp(*(f"Set-Cookie: c{i}=v; Path=/" for i in range(150)), "Content-Length: 0")
    assert event is not None
    validate_response(head, event)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\rHost: a\r\r",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\r\n",
    ],
)
def test_bare_cr_is_refused_at_once(raw: bytes) -> None:
    """CR-only line endings never make a CRLF CRLF: they were answered 408 after the
    header timeout instead of 400 at once."""
    with pytest.raises(BadRequest, match="bare CR"):
        HeadReader().feed(raw)


def test_a_cr_at_the_end_of_a_read_waits_for_its_lf() -> None:
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r") is None
    assert reader.feed(b"\nHost: a\r\n\r") is None
    assert reader.feed(b"\n") is not None


def test_a_disagreeing_h11_event_is_refused() -> None:
    raw = req("X-A: 1")
    with pytest.raises(BadRequest, match="ambiguously"):
        validate_request(
            raw, h11.Request(method="POST", target="/", headers=[("Host", "api.example")])
        )
    with pytest.raises(BadRequest, match="ambiguously"):
        validate_request(
            raw, h11.Request(method="GET", target="/", headers=[("Host", "api.example")])
        )


# --- responses from the backend ---------------------------------------------------------


def resp(*headers: str, line: str = "HTTP/1.1 200 OK") -> tuple[bytes, h11.Response | None]:
    raw = ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("latin-1")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return raw, None
    assert isinstance(event, h11.Response)
    return raw, event


def test_good_responses() -> None:
    raw, event = resp("Content-Length: 2")
    assert event is not None
    assert validate_response(raw, event) == Framing(content_length=2, chunked=False)
    raw, event = resp("Transfer-Encoding: chunked", line="HTTP/1.1 200")
    assert event is not None
    assert validate_response(raw, event).chunked
    raw, event = resp("Content-Length: 0", line="HTTP/1.0 204 No Content")
    assert event is not None
    validate_response(raw, event)


@pytest.mark.parametrize(
    ("headers", "line", "reason"),
    [
        (["Transfer-Encoding: chunked", "Content-Length: 30"], None, "both"),
        (["Transfer-Encoding: chunked, chunked"], None, "other than chunked"),
        (["Transfer-Encoding: chunked, gzip"], None, "other than chunked"),
        (["Transfer-Encoding: gzip"], None, "other than chunked"),
        (["Transfer-Encoding: chunked"], "HTTP/1.0 200 Ok", "HTTP/1.0"),
        (["Content-Length: 3", "Content-Length: 3"], None, "more than one"),
        (["Content-Length: 3, 3"], None, "malformed Content-Length"),
        (["Transfer-Encoding: chunked"], "HTTP/1.1 204 No Content", "bodiless"),
        (["Content-Length: 5"], "HTTP/1.1 204 No Content", "bodiless"),
        (["X: a", " folded"], None, "folding"),
        ([], "HTTP/2.0 200 OK", "version"),
        ([], "HTTP/1.1 2000 OK", "start line"),
    ],
)
def test_bad_responses_are_502(headers: list[str], line: str | None, reason: str) -> None:
    raw, event = resp(*headers, line=line or "HTTP/1.1 200 OK")
    placeholder = h11.Response(status_code=200, headers=[])
    with pytest.raises(BadGateway) as info:
        validate_response(raw, event or placeholder)
    assert info.value.status == 502
    assert reason in info.value.reason


def test_response_reader_errors_are_502() -> None:
    with pytest.raises(BadGateway, match="bare LF"):
        HeadReader(response=True).feed(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n")
    with pytest.raises(BadGateway, match="too large"):
        HeadReader(response=True, max_bytes=10).feed(b"HTTP/1.1 200 OK\r\n")


def test_body_limit() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        BodyLimit(10, Framing(content_length=11, chunked=False))
    assert info.value.status == 413
    limit = BodyLimit(10, Framing(content_length=None, chunked=True))
    limit.add(6)
    limit.add(4)
    with pytest.raises(PayloadTooLarge):
        limit.add(1)
    BodyLimit(None, Framing(content_length=10**12, chunked=False)).add(10**12)


# --- properties ---------------------------------------------------------------------------

_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z").filter(
    lambda n: n.lower() not in {"host", "content-length", "transfer-encoding", "connection"}
)
_values = st.from_regex(r"\A[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?\Z")
_fields = st.lists(st.tuples(_names, _values), max_size=12)


@given(fields=_fields, data=st.data())
def test_a_bare_lf_anywhere_in_the_head_is_never_accepted(
    fields: list[tuple[str, str]], data: st.DataObject
) -> None:
    lines = [b"GET / HTTP/1.1", b"Host: a.example"] + [f"{n}: {v}".encode() for n, v in fields]
    endings = [b"\r\n"] * len(lines)
    bad = data.draw(st.sets(st.integers(0, len(lines) - 1), min_size=1))
    for i in bad:
        endings[i] = b"\n"
    raw = b"".join(line + end for line, end in zip(lines, endings, strict=True)) + b"\r\n"
    cut = data.draw(st.integers(0, len(raw)))
    reader = HeadReader()
    try:
        head = reader.feed(raw[:cut]) or reader.feed(raw[cut:])
        if head is not None:
            validate_request(head.raw, h11_request(head.raw) or _PLACEHOLDER)
    except BadRequest:
        return
    raise AssertionError(f"accepted a head with a bare LF: {raw!r}")


@given(fields=_fields, body=st.binary(max_size=50), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_what_h11_writes_we_accept_however_it_is_split(
    fields: list[tuple[str, str]], body: bytes, cuts: list[int]
) -> None:
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", "a.example"), *fields, ("Content-Length", str(len(body)))]
    wire = client.send(h11.Request(method="POST", target="/up", headers=headers)) or b""
    wire += client.send(h11.Data(data=body)) or b""
    reader = HeadReader()
    head = None
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(wire)), len(wire)]:
        head = reader.feed(wire[start:cut])
        start = cut
        if head is not None:
            break
    assert head is not None
    assert head.raw + head.rest + wire[start:] == wire
    assert head.rest + wire[start:] == body
    event = h11_request(head.raw)
    assert event is not None
    assert validate_request(head.raw, event) == Framing(content_length=len(body), chunked=False)


def test_h11_errors_translate_without_echoing_input() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Evil\x01: <script>\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    error = translate_h11_error(info.value)
    assert isinstance(error, BadRequest)
    assert "script" not in str(error)
    assert isinstance(translate_h11_error(info.value, response=True), BadGateway)
    big = h11.Connection(h11.SERVER, max_incomplete_event_size=10)
    big.receive_data(b"GET /" + b"a" * 100)
    with pytest.raises(h11.RemoteProtocolError) as info:
        big.next_event()
    assert translate_h11_error(info.value).status == 431


def test_check_chunk_size_reads_h11s_chunk_count() -> None:
    """Pins the h11 internal that check_chunk_size relies on: an h11 that renames it
    must fail here, not silently stop refusing huge chunks."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7FFFFFFFFFFFFFFF\r\nabc"
    )
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.Data)
    assert conn._reader._bytes_in_chunk == 0x7FFFFFFFFFFFFFFF - 3  # type: ignore[union-attr]
    with pytest.raises(BadRequest, match="chunk size"):
        check_chunk_size(conn)
    small = h11.Connection(h11.SERVER)
    small.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\nabc"
    )
    small.next_event()
    small.next_event()
    check_chunk_size(small)
