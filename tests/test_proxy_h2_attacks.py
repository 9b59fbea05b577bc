"""HTTP/2 attack shapes against a real proxy: each one ends in GOAWAY, and nothing more.

A hand-written HTTP/2 client (stdlib ``ssl`` with ALPN h2 and the test client
certificate, frames from ``hyperframe``, header blocks from ``hpack``) sends each known
flood at a listener: rapid reset (CVE-2023-44487) and MadeYouReset (CVE-2025-8671), a
CONTINUATION flood, an HPACK bomb and a plain oversized header list, more than
MAX_STREAMS concurrent streams, PING, SETTINGS, WINDOW_UPDATE, PRIORITY and empty DATA
floods, a flood while a response streams; and the slow kinds: a client that never sends
a request, or leaves a header block unfinished, or idles. Each test asserts the GOAWAY
code the proxy sends, that the attack did not fan out to the backend (a hand-written
backend counts the request heads it receives), and that the listener still serves a
normal client (curl --http2) afterwards. A legitimate client (sequential requests, a few
PINGs and cancelled streams, 100 concurrent streams, downloads acknowledged the nghttp2
way and the Go way) is never hit.

The client is blocking and runs in a thread; every read has a socket timeout and every
loop a deadline, so a test that goes wrong fails in seconds instead of hanging.
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hpack
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from proxy_env import Env, route, serve_raw
from support import fetch_metrics, metric_sum

from mtlsproxy.relay.h2limits import MAX_STREAMS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 §7 error codes, as they appear on the wire.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
CANCEL = 0x8
REFUSED_STREAM = 0x7
ENHANCE_YOUR_CALM = 0xB
FRAME_SIZE = 16384  # SETTINGS_MAX_FRAME_SIZE's initial value: the proxy does not raise it
WAIT = 10.0  # the bound on any one wait for the proxy (it answers in milliseconds)
MAX_HEADER_SIZE = 16 * 1024  # the listener's default max_header_size


# ---- a hand-written HTTP/2 client --------------------------------------------------------


class H2Client:
    """One HTTP/2 connection over mTLS, frame by frame. Blocking: run it in a thread."""

    def __init__(self, env: Env, *, timeout: float = WAIT) -> None:
        ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
        ctx.load_cert_chain(env.client.crt, env.client.key)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", env.port), timeout=timeout)
        self.timeout = timeout
        self.tls = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.tls.selected_alpn_protocol() == "h2"
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._buffer = b""
        self.received: list[Frame] = []
        self.eof = False
        self.send_failed = False
        self.ack_settings = True  # answer the proxy's SETTINGS, as a client must

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.tls.close()

    # -- writing --

    def preface(self, settings: dict[int, int] | None = None) -> None:
        """The connection preface and our SETTINGS (a big window: we read everything)."""
        values = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**24, **(settings or {})}
        self.send_bytes(PREFACE + SettingsFrame(0, settings=values).serialize())
        self.send(WindowUpdateFrame(0, window_increment=2**30))

    def send(self, *frames: Frame) -> bool:
        return self.send_bytes(b"".join(f.serialize() for f in frames))

    def send_bytes(self, data: bytes) -> bool:
        """False once the proxy stopped taking bytes (it closed the connection)."""
        if self.send_failed:
            return False
        try:
            self.tls.sendall(data)
        except (OSError, ssl.SSLError):
            self.send_failed = True
        return not self.send_failed

    def block(
        self, path: str = "/", method: str = "GET", extra: Sequence[tuple[str, str]] = ()
    ) -> bytes:
        headers = [(":method", method), (":scheme", "https"), (":authority", "localhost"),
                   (":path", path), *extra]  # fmt: skip
        return self.encoder.encode(headers)

    def headers(self, stream_id: int, *, end_stream: bool = True, **kwargs: Any) -> HeadersFrame:
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        return HeadersFrame(stream_id, data=self.block(**kwargs), flags=flags)

    # -- reading --

    def _fill(self) -> bool:
        """Read once more from the socket; False at EOF (a close or a reset)."""
        try:
            data = self.tls.recv(65536)
        except (ssl.SSLWantReadError, TimeoutError):
            raise  # nothing yet: poll's or next_frame's business
        except (OSError, ssl.SSLError):  # a reset, or a record cut short: the end
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    def _parse(self) -> Frame | None:
        if len(self._buffer) < 9:
            return None
        frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
        if len(self._buffer) < 9 + length:
            return None
        frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
        self._buffer = self._buffer[9 + length :]
        self.received.append(frame)
        if self.ack_settings and isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.send(SettingsFrame(0, flags=["ACK"]))
        return frame

    def next_frame(self, deadline: float) -> Frame | None:
        """The next frame from the proxy; None at EOF. TimeoutError past ``deadline``."""
        while (frame := self._parse()) is None:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the proxy in time")
            self.tls.settimeout(min(left, self.timeout))
            self._fill()
        return frame

    def poll(self) -> GoAwayFrame | None:
        """Take what already arrived, without waiting: the GOAWAY among it, if any."""
        self.tls.settimeout(0)
        try:
            while not self.eof:
                self._fill()
        except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
            pass
        finally:
            self.tls.settimeout(self.timeout)
        while self._parse() is not None:
            pass
        return self.goaway()

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.received if isinstance(f, GoAwayFrame)), None)

    def until_goaway(self, wait: float = WAIT) -> GoAwayFrame:
        """Read until the proxy's GOAWAY (failing if the connection ends without one)."""
        deadline = time.monotonic() + wait
        while (found := self.goaway()) is None:
            if self.next_frame(deadline) is None:
                raise AssertionError(f"closed without GOAWAY; got {self.kinds()}")
        return found

    def until_closed(self, wait: float = WAIT) -> None:
        """Read (and keep) everything until the proxy closes the connection."""
        deadline = time.monotonic() + wait
        while self.next_frame(deadline) is not None:
            pass

    def response(self, stream_id: int, wait: float = WAIT) -> tuple[int, bytes]:
        """Read until ``stream_id`` ends: its status and body."""
        deadline = time.monotonic() + wait
        status, body = 0, b""
        while True:
            frame = self.next_frame(deadline)
            if frame is None or isinstance(frame, GoAwayFrame):
                raise AssertionError(f"stream {stream_id}: connection ended: {frame}")
            if frame.stream_id != stream_id:
                continue
            if isinstance(frame, HeadersFrame):
                fields = dict(self.decoder.decode(frame.data))
                status = int(fields.get(":status", status))
            elif isinstance(frame, DataFrame):
                body += frame.data
            elif isinstance(frame, RstStreamFrame):
                raise AssertionError(f"stream {stream_id} reset: {frame.error_code}")
            if "END_STREAM" in frame.flags:
                return status, body

    def kinds(self) -> list[str]:
        return [type(f).__name__ for f in self.received]


# ---- a backend that counts what reaches it ----------------------------------------------


class CountingBackend:
    """HTTP/1.1 behind the proxy that counts the request heads reaching it. A bodiless
    request gets 200 "ok" (``/bytes/N``: N bytes, streamed); a chunked one is answered
    once its last chunk came, so a stream left open holds its backend request open."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        data, in_body = b"", False
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
                while True:
                    if in_body:
                        if b"0\r\n\r\n" not in data:
                            break
                        data = data.split(b"0\r\n\r\n", 1)[1]
                        in_body = False
                        await stream.send_all(answer(200, b"ok"))
                        continue
                    if b"\r\n\r\n" not in data:
                        break
                    head, data = data.split(b"\r\n\r\n", 1)
                    self.requests += 1
                    if b"transfer-encoding: chunked" in head.lower():
                        in_body = True
                    else:
                        await answer_to(stream, head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy cut the request (its stream was reset or its connection ended)


def answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d OK\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


async def answer_to(stream: trio.SocketStream, head: bytes) -> None:
    target = head.split(b" ", 2)[1]
    if not target.startswith(b"/bytes/"):
        await stream.send_all(answer(200, b"ok"))
        return
    size = int(target.removeprefix(b"/bytes/"))
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
    block = b"x" * 65536
    while size:
        await stream.send_all(block[: min(size, len(block))])
        size -= min(size, len(block))


async def counting_env(
    nursery: trio.Nursery, make_env: Any, listener: str = ""
) -> tuple[Env, CountingBackend]:
    backend = CountingBackend()
    port = await serve_raw(nursery, backend.handle)
    env = await make_env(routes=route([port]), backends=0, listener=listener)
    return env, backend


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def still_serves(env: Env) -> None:
    """A normal client after the attack: curl over HTTP/2 gets its answer."""
    done = await env.curl("--http2", "-w", "\n%{http_version} %{http_code}", env.url + "/after")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"ok\n2 200"), done.stdout


async def metric(env: Env, name: str, **labels: str) -> float:
    found = await in_thread(fetch_metrics, env.admin_port)
    return metric_sum(found, name, **labels)


async def goaways(env: Env, reason: str) -> float:
    """GOAWAYs the proxy sent for a reason of its own (idle, protocol_error, ...)."""
    return await metric(env, "mtlsproxy_http2_goaway_total", reason=reason)


async def answered(env: Env) -> float:
    """Streams the proxy answered or cut (each counted once; 499 for a cancelled one)."""
    return await metric(env, "mtlsproxy_requests_total")


async def stable(read: Callable[[], Awaitable[float]]) -> float:
    """A count once it stops moving for a moment (bounded): what arrives late has."""
    with trio.fail_after(WAIT):
        seen = await read()
        while True:
            await trio.sleep(0.2)
            if (now := await read()) == seen:
                return now
            seen = now


async def settled(backend: CountingBackend) -> int:
    """The requests that reached the backend, once no more arrive."""

    async def count() -> float:
        return backend.requests

    return int(await stable(count))


async def reaches(backend: CountingBackend, count: int) -> None:
    with trio.fail_after(WAIT):
        while backend.requests < count:
            await trio.sleep(0.01)


# ---- 1. rapid reset (CVE-2023-44487) -----------------------------------------------------

RAPID_STREAMS = 5000
AT_LEAST = 1000  # streams an attacker sends before it looks for the GOAWAY


def rapid_reset(client: H2Client, writes: str) -> int:
    """HEADERS then RST_STREAM(CANCEL), stream after stream, up to RAPID_STREAMS.
    ``writes``: "burst" (everything in one write), "pairs" (a write per stream: the
    proxy reads each stream with its reset), "split" (a write per frame: each stream
    can start before its reset arrives). Past AT_LEAST streams, stops once the GOAWAY
    came (or the proxy stopped reading); returns the streams sent."""
    client.preface()
    frames: list[list[Frame]] = []
    for n in range(RAPID_STREAMS):
        stream_id = 2 * n + 1
        frames.append([client.headers(stream_id), RstStreamFrame(stream_id, error_code=CANCEL)])
    if writes == "burst":
        return RAPID_STREAMS if client.send(*(f for pair in frames for f in pair)) else 0
    sent = 0
    for pair in frames:
        ok = client.send(*pair) if writes == "pairs" else all(client.send(f) for f in pair)
        if not ok:
            break
        sent += 1
        # Read what came every 50 streams (a GOAWAY must not sit unread under a reset).
        if sent % 50 == 0 and client.poll() is not None and sent >= AT_LEAST:
            break
    return sent


@pytest.mark.parametrize("writes", ["burst", "pairs", "split"])
async def test_rapid_reset_gets_enhance_your_calm_and_spares_the_backend(
    nursery: trio.Nursery, make_env: Any, writes: str
) -> None:
    env, backend = await counting_env(nursery, make_env)

    def attack() -> tuple[int, GoAwayFrame]:
        with H2Client(env) as client:
            sent = rapid_reset(client, writes)
            return sent, client.until_goaway()

    sent, goaway = await in_thread(attack)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    # The reset budget is MAX_STREAMS at once, plus 20 a second: the proxy took about
    # that many streams (each answered once, as 499) of the thousands on their way.
    taken = await stable(lambda: answered(env))
    assert MAX_STREAMS < taken < 2 * MAX_STREAMS, taken
    assert sent >= AT_LEAST
    # The last stream id covers every stream h2 parsed in the read that broke the
    # budget: at least those taken (in a burst, more: parsed, never started).
    assert goaway.last_stream_id >= 2 * taken - 1
    # A stream reset in the same read never starts; one reset a write later could reach
    # the backend before its reset does; either way far fewer than the streams taken.
    reached = await settled(backend)
    assert reached < MAX_STREAMS // 2, reached
    assert await goaways(env, "enhance_your_calm") == 1
    await still_serves(env)
    assert backend.requests == reached + 1


async def test_made_you_reset_gets_enhance_your_calm(nursery: trio.Nursery, make_env: Any) -> None:
    """The rapid reset without a RST_STREAM of the client's: each stream is made invalid
    (its window overflowed past 2^31-1), so the proxy's own h2 resets it
    (RST_STREAM(FLOW_CONTROL_ERROR)); those resets spend the same budget."""
    env, backend = await counting_env(nursery, make_env)

    def attack() -> tuple[GoAwayFrame | None, int]:
        with H2Client(env) as client:
            client.preface()
            for n in range(RAPID_STREAMS // 50):  # in writes of 50 streams
                frames: list[Frame] = []
                for stream_id in range(100 * n + 1, 100 * n + 100, 2):
                    frames += [client.headers(stream_id),
                               WindowUpdateFrame(stream_id, window_increment=2**31 - 1)]  # fmt: skip
                if not client.send(*frames) or client.poll() is not None:
                    break
            client.send(PingFrame(0, opaque_data=b"the-end!"))  # then: a GOAWAY, or its ACK
            deadline = time.monotonic() + WAIT
            while client.goaway() is None and not any(
                isinstance(f, PingFrame) and f.opaque_data == b"the-end!" for f in client.received
            ):
                if client.next_frame(deadline) is None:
                    break
            resets = sum(isinstance(f, RstStreamFrame) for f in client.received)
            return client.goaway(), resets

    goaway, resets = await in_thread(attack)
    assert goaway is not None, f"no GOAWAY; the proxy reset {resets} streams itself"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert resets < 2 * MAX_STREAMS  # the proxy's RST_STREAMs: one per stream it took
    assert await stable(lambda: answered(env)) < 2 * MAX_STREAMS
    assert await settled(backend) < MAX_STREAMS // 2
    assert await goaways(env, "enhance_your_calm") == 1
    await still_serves(env)


# ---- 2. CONTINUATION flood ---------------------------------------------------------------


async def test_continuation_flood_is_cut_after_64_frames_and_nothing_is_forwarded(
    nursery: trio.Nursery, make_env: Any
) -> None:
    env, backend = await counting_env(nursery, make_env)

    def attack() -> GoAwayFrame:
        with H2Client(env) as client:
            client.preface()
            block = client.block()
            flood = [ContinuationFrame(1, data=b"a" * 1000) for _ in range(1000)]
            client.send(HeadersFrame(1, data=block, flags=[]), *flood)  # no END_HEADERS
            return client.until_goaway()

    goaway = await in_thread(attack)
    # h2 buffers at most 64 CONTINUATION frames of a header block and then raises a
    # ProtocolError ("Too many continuation frames"), which the proxy answers with h2's
    # own GOAWAY: PROTOCOL_ERROR, not ENHANCE_YOUR_CALM. The header block was never
    # decoded, so no stream was ever taken (last stream 0).
    assert goaway.error_code == PROTOCOL_ERROR
    assert goaway.last_stream_id == 0
    assert await goaways(env, "protocol_error") == 1
    assert backend.requests == 0 and await answered(env) == 0
    await still_serves(env)


# ---- 3. HPACK bomb and oversized header lists --------------------------------------------


async def test_an_hpack_bomb_stops_at_max_header_size(nursery: trio.Nursery, make_env: Any) -> None:
    """One 4000-byte literal added to the dynamic table, then referenced 12 000 times by
    a one-byte index: 16 KiB on the wire that would decode to 48 MB of header list."""
    env, backend = await counting_env(nursery, make_env)

    def attack() -> GoAwayFrame:
        with H2Client(env) as client:
            client.preface()
            block = client.block()
            block += client.encoder.encode([("x-bomb", "a" * 4000)], huffman=False)
            block += bytes([0x80 | 62]) * 12_000  # index 62: the newest dynamic entry
            assert len(block) <= FRAME_SIZE
            client.send(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]))
            return client.until_goaway()

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's peak
    started = time.monotonic()
    goaway = await in_thread(attack)
    # The decoder counts the list as it inflates it and stops past max_header_size
    # (SETTINGS_MAX_HEADER_LIST_SIZE); h2 calls that a DenialOfServiceError, whose
    # GOAWAY code is ENHANCE_YOUR_CALM. The block never became a stream.
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.last_stream_id == 0
    assert time.monotonic() - started < 5
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 16 * 1024, f"the proxy's peak memory grew {grown} KiB"  # not 48 MB
    assert backend.requests == 0 and await answered(env) == 0
    assert await goaways(env, "protocol_error") == 1  # the proxy's name for h2's errors
    await still_serves(env)


@pytest.mark.parametrize(
    "size",
    [MAX_HEADER_SIZE + 1024, 63 * FRAME_SIZE],
    ids=["just-over-the-limit", "one-MiB-in-64-frames"],
)
async def test_an_oversized_header_list_is_refused(
    nursery: trio.Nursery, make_env: Any, size: int
) -> None:
    """A plain header list over max_header_size, one literal cut into HEADERS and as
    many CONTINUATION frames as it takes (at most 64: h2's bound on what it buffers)."""
    env, backend = await counting_env(nursery, make_env)

    def attack() -> GoAwayFrame:
        with H2Client(env) as client:
            client.preface()
            block = client.block() + client.encoder.encode([("x-big", "a" * size)], huffman=False)
            pieces = [block[i : i + FRAME_SIZE] for i in range(0, len(block), FRAME_SIZE)]
            assert len(pieces) <= 64
            frames: list[Frame] = [HeadersFrame(1, data=pieces[0], flags=["END_STREAM"])]
            frames += [ContinuationFrame(1, data=p) for p in pieces[1:]]
            frames[-1].flags.add("END_HEADERS")
            client.send(*frames)
            return client.until_goaway()

    goaway = await in_thread(attack)
    # As for the bomb: h2's DenialOfServiceError (oversized header list), so the whole
    # connection gets ENHANCE_YOUR_CALM (an HTTP/1.1 client would get 431 instead).
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.last_stream_id == 0
    assert backend.requests == 0 and await answered(env) == 0
    await still_serves(env)


# ---- 4. too many streams -----------------------------------------------------------------


def open_streams(client: H2Client, count: int, first: int = 1) -> None:
    """``count`` POST streams, their bodies never ended (each stays open)."""
    client.send(*(client.headers(first + 2 * n, end_stream=False, method="POST")
                  for n in range(count)))  # fmt: skip


def advertised(client: H2Client) -> dict[int, int]:
    deadline = time.monotonic() + WAIT
    while True:
        for frame in client.received:
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                return dict(frame.settings)
        if client.next_frame(deadline) is None:
            raise AssertionError("closed before its SETTINGS")


async def test_a_stream_over_max_streams_is_refused_and_none_reaches_the_backend(
    nursery: trio.Nursery, make_env: Any
) -> None:
    """100 streams left open (each a request held at the backend), then a 101st."""
    env, backend = await counting_env(nursery, make_env)
    client: H2Client = await in_thread(H2Client, env)
    try:
        await in_thread(client.preface)
        assert (await in_thread(advertised, client))[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
        await in_thread(open_streams, client, MAX_STREAMS)
        await reaches(backend, MAX_STREAMS)
        extra = 2 * MAX_STREAMS + 1

        def one_more() -> Frame:
            client.send(client.headers(extra))  # over the limit, and told so
            deadline = time.monotonic() + WAIT
            while True:
                frame = client.next_frame(deadline)
                assert frame is not None, "closed without a word"
                if isinstance(frame, GoAwayFrame):
                    return frame
                if isinstance(frame, RstStreamFrame) and frame.stream_id == extra:
                    return frame

        refusal = await in_thread(one_more)
        # A client that ignores the limit it was told ends its connection: h2's
        # TooManyStreamsError is a ProtocolError, so GOAWAY(PROTOCOL_ERROR), the 100
        # streams in flight cut with it (their backend requests too), the last stream
        # taken the 100th. RFC 9113 §5.1.2 makes it a stream error, and §5.4 lets an
        # endpoint treat a stream error as a connection error: relay/h2limits.py chose so.
        assert isinstance(refusal, GoAwayFrame), refusal
        assert refusal.error_code == PROTOCOL_ERROR
        assert refusal.last_stream_id == extra - 2
    finally:
        await in_thread(client.tls.close)
    assert await settled(backend) == MAX_STREAMS  # never the 101st
    await still_serves(env)


async def test_a_client_with_max_streams_concurrent_requests_is_served(
    nursery: trio.Nursery, make_env: Any
) -> None:
    env, backend = await counting_env(nursery, make_env)

    def burst() -> list[tuple[int, bytes]]:
        with H2Client(env) as client:
            client.preface()
            ids = [2 * n + 1 for n in range(MAX_STREAMS)]
            client.send(*(client.headers(i, path=f"/{i}") for i in ids))  # all at once
            answers: dict[int, tuple[int, bytes]] = {}
            statuses: dict[int, int] = {}
            deadline = time.monotonic() + WAIT
            while len(answers) < len(ids):
                frame = client.next_frame(deadline)
                assert frame is not None and not isinstance(frame, GoAwayFrame), frame
                assert not isinstance(frame, RstStreamFrame), frame
                if isinstance(frame, HeadersFrame):
                    statuses[frame.stream_id] = int(
                        dict(client.decoder.decode(frame.data))[":status"]
                    )
                if isinstance(frame, DataFrame | HeadersFrame) and "END_STREAM" in frame.flags:
                    body = b"".join(f.data for f in client.received
                                    if isinstance(f, DataFrame) and f.stream_id == frame.stream_id)  # fmt: skip
                    answers[frame.stream_id] = (statuses[frame.stream_id], body)
            return [answers[i] for i in ids]

    answers = await in_thread(burst)
    assert answers == [(200, b"ok")] * MAX_STREAMS
    assert backend.requests == MAX_STREAMS
    assert await goaways(env, "enhance_your_calm") == 0


# ---- 5. control-frame floods -------------------------------------------------------------


def flood_frames(kind: str) -> list[Frame]:
    if kind == "ping":
        return [PingFrame(0, opaque_data=n.to_bytes(8, "big")) for n in range(500)]
    if kind == "settings":
        return [SettingsFrame(0) for _ in range(500)]
    if kind == "window_update":
        return [WindowUpdateFrame(0, window_increment=1) for _ in range(5000)]
    if kind == "priority":
        return [PriorityFrame(1, depends_on=0, stream_weight=n % 256) for n in range(5000)]
    assert kind == "empty_data"
    return [DataFrame(1, data=b"") for _ in range(5000)]


@pytest.mark.parametrize("kind", ["ping", "settings", "window_update", "priority", "empty_data"])
async def test_a_control_frame_flood_gets_enhance_your_calm(
    nursery: trio.Nursery, make_env: Any, kind: str
) -> None:
    env, backend = await counting_env(nursery, make_env)

    frames = flood_frames(kind)

    def attack() -> tuple[GoAwayFrame, list[Frame]]:
        with H2Client(env) as client:
            client.preface()
            opener = []
            if kind in ("priority", "empty_data"):  # on an open stream: a POST, body unended
                opener = [client.headers(1, end_stream=False, method="POST")]
            client.send(*opener, *frames)
            return client.until_goaway(), client.received

    goaway, received = await in_thread(attack)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    # PING and SETTINGS are answered (an ACK each) within their budget only, 50 at once
    # and 10 a second: what h2 queued for the rest of the read is dropped, only the
    # GOAWAY goes out. The flood is not mirrored back.
    acks = [f for f in received if isinstance(f, PingFrame | SettingsFrame) and "ACK" in f.flags]
    assert len(acks) <= 50 + 10 + 1, len(acks)  # + 1: the ACK of our preface's SETTINGS
    assert await goaways(env, "enhance_your_calm") == 1
    # The stream of the DATA and PRIORITY floods is one request at most, cut with them.
    assert await settled(backend) <= (1 if kind in ("priority", "empty_data") else 0)
    await still_serves(env)


async def test_a_flood_during_a_download_ends_the_connection_cleanly(
    nursery: trio.Nursery, make_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream still relaying its response when the flood's GOAWAY closed the
    connection ends as a stream (counted and logged once), not as a crash of the
    connection's task (h2's ProtocolError on a write after close is the stream's end)."""
    env, _ = await counting_env(nursery, make_env)

    def attack() -> GoAwayFrame:
        with H2Client(env) as client:
            client.preface()
            client.send(client.headers(1, path=f"/bytes/{64 << 20}"))
            deadline = time.monotonic() + WAIT
            while not any(isinstance(f, DataFrame) for f in client.received):
                assert client.next_frame(deadline) is not None
            client.send(*flood_frames("ping"))  # while the response streams
            return client.until_goaway()

    goaway = await in_thread(attack)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert await stable(lambda: answered(env)) == 1  # the download: counted and logged
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_http1_bytes_after_choosing_h2_close_the_connection(
    nursery: trio.Nursery, make_env: Any
) -> None:
    env, backend = await counting_env(nursery, make_env)

    def confused() -> list[Frame]:
        with H2Client(env) as client:
            client.ack_settings = False  # the client does not speak HTTP/2 at all
            client.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            client.until_closed()
            return client.received

    received = await in_thread(confused)
    # An invalid preface: h2 raises ProtocolError before it queues a GOAWAY, so the
    # proxy closes after its own SETTINGS and WINDOW_UPDATE, without one. RFC 9113 §3.4
    # allows that ("a GOAWAY frame MAY be omitted": the peer is not speaking HTTP/2).
    assert [type(f) for f in received] == [SettingsFrame, WindowUpdateFrame]
    assert await goaways(env, "protocol_error") == 1
    assert backend.requests == 0
    await still_serves(env)


# ---- 6. a legitimate client is not hit ---------------------------------------------------


def download(client: H2Client, stream_id: int, size: int, every: int) -> int:
    """GET /bytes/size, acknowledging (a WINDOW_UPDATE for the stream and one for the
    connection) each time ``every`` more bytes were read; the bytes that came."""
    client.send(client.headers(stream_id, path=f"/bytes/{size}"))
    deadline, got, unsent = time.monotonic() + WAIT, 0, 0
    while True:
        frame = client.next_frame(deadline)
        assert frame is not None and not isinstance(frame, GoAwayFrame), (got, frame)
        if not isinstance(frame, DataFrame) or frame.stream_id != stream_id:
            continue
        got += len(frame.data)
        if "END_STREAM" in frame.flags:
            return got
        unsent += len(frame.data)
        while unsent >= every:
            client.send(WindowUpdateFrame(stream_id, window_increment=every),
                        WindowUpdateFrame(0, window_increment=every))  # fmt: skip
            unsent -= every


async def test_a_busy_but_legitimate_client_gets_no_goaway(
    nursery: trio.Nursery, make_env: Any
) -> None:
    """50 sequential requests on one connection, a keepalive PING and a cancelled upload
    every ten, then an 8 MiB download acknowledged at half its window (as nghttp2 does)."""
    env, backend = await counting_env(nursery, make_env)
    window = 1024 * 1024

    def session() -> tuple[list[tuple[int, bytes]], int, list[Frame]]:
        with H2Client(env) as client:
            client.preface({SettingsFrame.INITIAL_WINDOW_SIZE: window})
            answers, stream_id = [], 1
            for n in range(50):
                if n % 10 == 5:
                    client.send(PingFrame(0, opaque_data=b"keepaliv"))
                    client.send(client.headers(stream_id, end_stream=False, method="POST"))
                    client.send(DataFrame(stream_id, data=b"part"))
                    client.send(RstStreamFrame(stream_id, error_code=CANCEL))
                    stream_id += 2
                client.send(client.headers(stream_id, path=f"/{n}"))
                answers.append(client.response(stream_id))
                stream_id += 2
            got = download(client, stream_id, 8 * 1024 * 1024, every=window // 2)
            client.send(PingFrame(0, opaque_data=b"lastping"))
            deadline = time.monotonic() + WAIT
            while not any(isinstance(f, PingFrame) and f.opaque_data == b"lastping"
                          for f in client.received):  # fmt: skip
                assert client.next_frame(deadline) is not None
            return answers, got, client.received

    answers, got, received = await in_thread(session)
    assert answers == [(200, b"ok")] * 50
    assert got == 8 * 1024 * 1024
    assert not any(isinstance(f, GoAwayFrame) for f in received)
    pongs = [f for f in received if isinstance(f, PingFrame) and "ACK" in f.flags]
    assert len(pongs) == 6
    assert await goaways(env, "enhance_your_calm") == 0
    assert await metric(env, "mtlsproxy_requests_total", code="2xx") == 51
    assert backend.requests >= 51  # the cancelled uploads may have reached it, or not


async def test_a_fast_download_acknowledged_read_by_read_is_not_a_flood(
    nursery: trio.Nursery, make_env: Any
) -> None:
    """A client that reopens its windows per 32 KiB read, as Go's x/net/http2 transport
    does (inflow.add: a WINDOW_UPDATE once 4 KiB are owed, for the stream and for the
    connection): 4096 WINDOW_UPDATEs for 64 MiB in about a second, four times the
    control budget's burst. They answer DATA the proxy sent, so they are not a flood."""
    env, _ = await counting_env(nursery, make_env)
    size = 64 * 1024 * 1024

    def go_like() -> int:
        with H2Client(env) as client:
            client.preface({SettingsFrame.INITIAL_WINDOW_SIZE: 4 << 20})  # Go's stream window
            return download(client, 1, size, every=32 * 1024)  # io.Copy's 32 KiB reads

    assert await in_thread(go_like) == size
    assert await goaways(env, "enhance_your_calm") == 0


async def test_the_window_credit_of_a_download_does_not_free_a_flood(
    nursery: trio.Nursery, make_env: Any
) -> None:
    """WINDOW_UPDATEs are free only as far as DATA was sent: after a 1 MiB download (some
    2000 frames of credit), a flood of 20 000 still gets ENHANCE_YOUR_CALM."""
    env, _ = await counting_env(nursery, make_env)

    def attack() -> GoAwayFrame:
        with H2Client(env) as client:
            client.preface()
            client.send(client.headers(1, path=f"/bytes/{1 << 20}"))
            assert client.response(1) == (200, b"x" * (1 << 20))
            client.send(*(WindowUpdateFrame(0, window_increment=1) for _ in range(20_000)))
            return client.until_goaway()

    goaway = await in_thread(attack)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.last_stream_id == 1
    assert await goaways(env, "enhance_your_calm") == 1


# ---- slow clients: the clocks ------------------------------------------------------------


@pytest.mark.parametrize("sends", ["nothing", "preface", "half-a-header-block"])
async def test_a_client_without_a_request_is_closed_after_header_timeout(
    nursery: trio.Nursery, make_env: Any, sends: str
) -> None:
    env, backend = await counting_env(nursery, make_env, listener='header_timeout = "1s"')

    def idle() -> tuple[float, GoAwayFrame, H2Client]:
        with H2Client(env) as client:
            started = time.monotonic()
            client.ack_settings = sends == "preface"  # an ACK would be a preface, or a
            # frame inside the header block: a protocol error, not a silent client
            if sends != "nothing":
                client.preface()
            if sends == "half-a-header-block":  # a slow CONTINUATION: never END_HEADERS
                client.send(HeadersFrame(1, data=client.block()[:3], flags=[]))
            goaway = client.until_goaway()
            elapsed = time.monotonic() - started
            client.until_closed()
            return elapsed, goaway, client

    elapsed, goaway, client = await in_thread(idle)
    assert 0.9 <= elapsed < 5, elapsed
    assert goaway.error_code == NO_ERROR and goaway.last_stream_id == 0
    assert client.eof
    assert await goaways(env, "idle") == 1
    assert backend.requests == 0
    await still_serves(env)


async def test_an_idle_connection_gets_goaway_no_error_after_idle_timeout(
    nursery: trio.Nursery, make_env: Any
) -> None:
    env, _ = await counting_env(nursery, make_env, listener='idle_timeout = "1s"')

    def idle() -> tuple[tuple[int, bytes], float, GoAwayFrame, bool]:
        with H2Client(env) as client:
            client.preface()
            client.send(client.headers(1))
            first = client.response(1)
            served = time.monotonic()
            goaway = client.until_goaway()
            elapsed = time.monotonic() - served
            client.until_closed()
            return first, elapsed, goaway, client.eof

    first, elapsed, goaway, closed = await in_thread(idle)
    assert first == (200, b"ok")
    assert 0.9 <= elapsed < 5, elapsed
    assert goaway.error_code == NO_ERROR and goaway.last_stream_id == 1
    assert closed
    assert await goaways(env, "idle") == 1
    await still_serves(env)
