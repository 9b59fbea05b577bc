"""WebSocket sessions after the 101: frames relayed untouched, closes the proxy's own.

Why frames and not trio-websocket on both legs: relaying frames keeps
everything the two ends negotiated (subprotocol, extensions such as permessage-deflate,
fragmentation, ping payloads, close codes and reasons) exactly as sent, costs no
re-encoding, and needs no second WebSocket handshake towards the backend. The proxy still
follows frame boundaries (``relay.websocket.FrameScanner``), which is all it needs for its
own duties: the message-size limit (close 1009), enforcement (close 1008), idleness.

When the proxy ends a session itself it sends a close frame to each side that is between
frames (injecting one in the middle of a frame would corrupt the stream; that side just
sees the connection close), then closes both connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from mtlsproxy.config import Route
from mtlsproxy.relay.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    FrameError,
    FrameScanner,
    close_frame,
)
from mtlsproxy.server.idle import IdleClock
from mtlsproxy.sessions import Session

log = logging.getLogger("mtlsproxy.websocket")

CHUNK = 65536
COUNT_SECONDS = 1.0  # how often a session's traffic reaches the metrics
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True)
class WebSocketSummary:
    """What went through a session, for the access log (metrics count as it passes)."""

    bytes_in: int  # from the client, frame headers included
    bytes_out: int
    end: str  # "closed" by the ends, or the proxy's close reason


@dataclass
class _State:
    idle: IdleClock
    stop: trio.CancelScope | None = None  # ends both directions
    error: FrameError | None = None


async def relay_websocket(
    client: Any,
    backend: Any,
    *,
    client_rest: bytes,
    backend_rest: bytes,
    session: Session,
    route: Route,
    count: Callable[[str, int, int], None] = lambda _d, _b, _m: None,
) -> WebSocketSummary:
    """Relay frames both ways until either end closes; ``count(direction, bytes,
    messages)`` hears of the traffic as it passes ("in": from the client), at most once
    per ``COUNT_SECONDS`` and direction, and at the end."""
    limit = route.websocket_max_message or None
    from_client = FrameScanner(masked=True, max_message=limit)
    from_backend = FrameScanner(masked=False, max_message=limit)
    state = _State(IdleClock(route.websocket_idle_timeout.seconds))
    with trio.CancelScope() as scope:
        session.idle_scope = scope  # the enforcer and drains end the session through it
        if session.closing is not None:
            scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state.idle.watch, nursery.cancel_scope)
            state.stop = nursery.cancel_scope
            async with trio.open_nursery() as pipes:
                inwards = partial(_pipe, count=partial(count, "in"))
                outwards = partial(_pipe, count=partial(count, "out"))
                pipes.start_soon(inwards, client, backend, from_client, client_rest, state)
                pipes.start_soon(outwards, backend, client, from_backend, backend_rest, state)
            nursery.cancel_scope.cancel()
    session.idle_scope = None

    def summary(end: str) -> WebSocketSummary:
        return WebSocketSummary(from_client.bytes, from_backend.bytes, end)

    if session.closing is not None:
        code, reason = CLOSE_POLICY_VIOLATION, f"closed by the proxy: {session.closing}"
    elif state.error is not None:
        code, reason = state.error.code, state.error.reason
    elif state.idle.expired:
        code, reason = CLOSE_GOING_AWAY, "idle timeout"
    else:
        return summary("closed")  # the ends closed it themselves
    log.info(
        "websocket of %s from %s: closing %d (%s)",
        session.identity.name,
        session.peer,
        code,
        reason,
    )
    with trio.move_on_after(2, shield=True):
        if from_backend.at_boundary and not from_backend.closed:
            with suppress(*_STREAM_ERRORS):
                await client.send_all(close_frame(code, reason, masked=False))
        if from_client.at_boundary and not from_client.closed:
            with suppress(*_STREAM_ERRORS):
                await backend.send_all(close_frame(CLOSE_GOING_AWAY, "client gone", masked=True))
    return summary(reason)


async def _pipe(
    source: Any,
    sink: Any,
    scanner: FrameScanner,
    first: bytes,
    state: _State,
    *,
    count: Callable[[int, int], None],
) -> None:
    assert state.stop is not None
    # Counted into the metrics at most once a second (and at the end), not per chunk:
    # a lock and two increments per 64-byte message showed in the profile.
    counted_bytes = counted_messages = 0
    flushed = trio.current_time()
    try:
        data = first
        while True:
            if data:
                try:
                    scanner.feed(data)
                except FrameError as exc:
                    state.error = exc
                    state.stop.cancel()
                    return
                await sink.send_all(data)
                now = state.idle.touch()
                if now - flushed >= COUNT_SECONDS:
                    count(scanner.bytes - counted_bytes, scanner.messages - counted_messages)
                    counted_bytes, counted_messages, flushed = scanner.bytes, scanner.messages, now
            data = await source.receive_some(CHUNK)
            if not data:
                break
        with suppress(*_STREAM_ERRORS):
            await sink.send_eof()
    except _STREAM_ERRORS:
        state.stop.cancel()
    finally:
        count(scanner.bytes - counted_bytes, scanner.messages - counted_messages)
