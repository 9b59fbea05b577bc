"""relay/h2.py and relay/h2limits.py without sockets: stream heads and flood budgets."""

from __future__ import annotations

import pytest
from h2 import events
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PingFrame
from hypothesis import given
from hypothesis import strategies as st
from test_relay_connection import IDENT

from mtlsproxy.denylist import DenyList
from mtlsproxy.relay import h2 as rules
from mtlsproxy.relay.errors import BadRequest
from mtlsproxy.relay.exchange import admit
from mtlsproxy.relay.h2limits import Abuse, AbuseGuard, Budget
from mtlsproxy.relay.headers import upstream_request_headers
from mtlsproxy.relay.routing import Route, RouteTable

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"api.example"),
       (b":path", b"/a?b=1")]  # fmt: skip


def test_a_stream_becomes_the_request_an_http_1_1_client_would_have_sent() -> None:
    head = rules.request_head([*GET, (b"accept", b"*/*")], end_stream=True)
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b=1", b"2")
    assert head.headers == [(b"host", b"api.example"), (b"accept", b"*/*")]
    assert head.framing.content_length == 0 and not head.framing.chunked


def test_a_body_without_a_length_goes_up_chunked_and_a_length_as_it_is() -> None:
    post = [(b":method", b"POST"), *GET[1:]]
    unknown = rules.request_head(post, end_stream=False)
    assert unknown.framing.chunked and (b"transfer-encoding", b"chunked") in unknown.headers
    known = rules.request_head([*post, (b"content-length", b"5")], end_stream=False)
    assert known.framing.content_length == 5 and not known.framing.chunked


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({b":method": b"CONNECT"}, "CONNECT is not supported"),
        ({b":scheme": b"http"}, "scheme must be https"),
        ({b":path": b"*"}, "asterisk-form"),
        ({b":path": b"http://evil/"}, "malformed :path"),
        ({b":authority": b"bad host"}, "malformed Host"),
        ({b":path": None}, "missing pseudo-header"),
    ],
)
def test_malformed_stream_heads_are_refused(change: dict[bytes, bytes | None], error: str) -> None:
    headers = [(n, change.get(n, v)) for n, v in GET if change.get(n, v) is not None]
    with pytest.raises(BadRequest, match=error):
        rules.request_head(headers, end_stream=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([(b"host", b"other.example")], "Host disagrees"),
        ([(b"content-length", b"1"), (b"content-length", b"1")], "more than one"),
        ([(b"content-length", b"-1")], "malformed Content-Length"),
        ([(b"x-a", b"a\x01b")], "control character"),
        ([(b":protocol", b"websocket")], "unsupported pseudo-header"),
    ],
)
def test_fields_that_http_1_1_refuses_are_refused_on_a_stream(
    extra: list[tuple[bytes, bytes]], error: str
) -> None:
    with pytest.raises(BadRequest, match=error):
        rules.request_head([*GET, *extra], end_stream=True)


def test_without_authority_the_one_host_field_names_the_host() -> None:
    head = rules.request_head([*GET[:2], GET[3], (b"host", b"h.example")], end_stream=True)
    assert head.headers[0] == (b"host", b"h.example")
    with pytest.raises(BadRequest, match="exactly one Host"):
        rules.request_head([*GET[:2], GET[3]], end_stream=True)


def test_the_path_rule_and_routing_see_the_same_target_as_over_http_1_1() -> None:
    table = RouteTable([Route(0, "admin", path_prefix="/admin"), Route(1, "rest")])
    for spelling in (b"//admin", b"/%61dmin", b"/ADMIN/x", b"/admin;x"):
        head = rules.request_head([*GET[:3], (b":path", spelling)], end_stream=True)
        try:
            _, route = admit(head, table, IDENT, DenyList(), IDENT.not_before)
        except BadRequest:
            continue  # a spelling backends read differently: refused, as over HTTP/1.1
        assert route == "admin", spelling
    with pytest.raises(BadRequest, match="dot-segment"):
        head = rules.request_head([*GET[:3], (b":path", b"/x/../admin")], end_stream=True)
        admit(head, table, IDENT, DenyList(), IDENT.not_before)


def test_upstream_fields_keep_te_trailers_and_drop_the_chunked_framing() -> None:
    post = [(b":method", b"POST"), *GET[1:], (b"te", b"trailers"), (b"x-forwarded-for", b"1")]
    head = rules.request_head(post, end_stream=False)
    fields = upstream_request_headers(head, IDENT, "127.0.0.1")
    out = rules.upstream_h2_headers(head, b"/a?b=1", fields)
    assert out[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                       (b":authority", b"api.example"), (b":path", b"/a?b=1")]  # fmt: skip
    names = [n for n, _ in out]
    assert (b"te", b"trailers") in out and b"transfer-encoding" not in names
    assert b"host" not in names and names.count(b"x-forwarded-for") == 1
    assert all(n == n.lower() for n in names)


def test_responses_and_trailers_lose_hop_by_hop_fields() -> None:
    out = rules.client_headers(200, [(b"Content-Type", b"x"), (b"Connection", b"close"),
                                     (b"Transfer-Encoding", b"chunked")])  # fmt: skip
    assert out == [(b":status", b"200"), (b"content-type", b"x")]
    trailers = rules.client_trailers([(b"grpc-status", b"7"), (b":status", b"200"),
                                      (b"Grpc-Message", b"no")])  # fmt: skip
    assert trailers == [(b"grpc-status", b"7"), (b"grpc-message", b"no")]


# ---- budgets -------------------------------------------------------------------------


def test_a_budget_allows_its_burst_then_its_rate() -> None:
    budget = Budget(burst=3, rate=1)
    assert [budget.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(1.5) is True  # 1.5 s later: refilled by 1.5, minus one
    assert budget.spend(1.5) is False


@given(st.lists(st.floats(min_value=0, max_value=0.001), min_size=1, max_size=500))
def test_a_budget_never_allows_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    budget = Budget(burst=10, rate=100)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += budget.spend(now)
    assert allowed <= 10 + 100 * now + 1e-9


def _reset(stream_id: int) -> events.StreamReset:
    return events.StreamReset(stream_id=stream_id, remote_reset=True)


def test_rapid_reset_is_abuse_and_a_few_cancelled_streams_are_not() -> None:
    guard = AbuseGuard()
    for i in range(50):  # a page that cancels fifty requests at once: fine
        guard.check(_reset(2 * i + 1), now=0.0)
    with pytest.raises(Abuse, match="resets"):
        for i in range(50, 10_000):
            guard.check(_reset(2 * i + 1), now=0.0)


def test_ping_and_settings_floods_are_abuse() -> None:
    guard = AbuseGuard()
    with pytest.raises(Abuse, match="PING or SETTINGS"):
        for _ in range(1000):
            guard.check(events.PingReceived(ping_data=b"12345678"), now=0.0)
    guard = AbuseGuard()
    for second in range(600):  # a keepalive PING every second for ten minutes: fine
        guard.check(events.PingReceived(ping_data=b"12345678"), now=float(second))


# ---- GOAWAY out of h2's sight ----------------------------------------------------------


def _frames() -> tuple[bytes, list[tuple[int, int]], bytes]:
    data = DataFrame(1, data=b"x" * 3000)
    goaway = GoAwayFrame(0, last_stream_id=3, error_code=0, additional_data=b"bye")
    bad = GoAwayFrame(0, last_stream_id=5, error_code=2)
    stream = [HeadersFrame(1, data=b"\x88", flags=["END_HEADERS"]), data, goaway, PingFrame(0),
              bad, DataFrame(1, data=b"end", flags=["END_STREAM"])]  # fmt: skip
    everything = b"".join(f.serialize() for f in stream)
    others = b"".join(f.serialize() for f in stream if not isinstance(f, GoAwayFrame))
    return everything, [(3, 0), (5, 2)], others


@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=20))
def test_the_splitter_finds_every_goaway_however_the_bytes_are_cut(cuts: list[int]) -> None:
    everything, goaways, others = _frames()
    splitter = rules.GoAwaySplitter()
    kept, found, pos = b"", [], 0
    for size in [*cuts, len(everything)]:
        piece = everything[pos : pos + size]
        pos += len(piece)
        out, seen = splitter.feed(piece)
        kept += out
        found += seen
    assert kept == others and found == goaways


def test_an_oversized_goaway_is_left_to_h2_to_refuse() -> None:
    head = (rules.GoAwaySplitter.MAX_GOAWAY + 1).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
    out, found = rules.GoAwaySplitter().feed(head + b"\x00" * 100)
    assert out == head + b"\x00" * 100 and found == []


def test_on_a_server_the_splitter_passes_the_client_preface_first() -> None:
    everything, goaways, others = _frames()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    splitter = rules.GoAwaySplitter(preface=rules.PREFACE)
    out1, found1 = splitter.feed(preface[:10])
    out2, found2 = splitter.feed(preface[10:] + everything)
    assert out1 + out2 == preface + others and found1 + found2 == goaways


def test_request_trailers_never_carry_a_field_the_proxy_owns() -> None:
    trailers = rules.upstream_trailers([
        (b"x-forwarded-client-cert", b"Hash=forged"), (b"client_cert", b":Zm9yZ2Vk:"),
        (b"X-Forwarded-For", b"10.6.6.6"), (b"checksum", b"abc"), (b":path", b"/admin"),
    ])  # fmt: skip
    assert trailers == [(b"checksum", b"abc")]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({b":path": b"/admin? /public"}, "malformed :path"),
        ({b":path": b"/a\x7f"}, "malformed :path"),
        ({b":method": b"G T"}, "malformed method"),
    ],
)
def test_what_would_rewrite_the_http_1_1_request_line_is_refused(
    change: dict[bytes, bytes], error: str
) -> None:
    with pytest.raises(BadRequest, match=error):
        rules.request_head([(n, change.get(n, v)) for n, v in GET], end_stream=True)


@pytest.mark.parametrize("name", [b"x@y", b'x-forwarded-client-cert"', b"a/b", b"{x}"])
def test_header_names_http_1_1_refuses_are_refused(name: bytes) -> None:
    with pytest.raises(BadRequest, match="malformed header field name"):
        rules.request_head([*GET, (name, b"v")], end_stream=True)
