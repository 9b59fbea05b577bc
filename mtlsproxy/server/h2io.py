"""The byte side of one HTTP/2 connection, client or backend: writes and flow control.

``h2`` decides what to send; this writes it. Several tasks (the streams of a client
connection, the body pump and the response reader of a backend stream) produce frames on
one connection, so every write goes through ``flush`` under one lock, in order, and
waits for the socket: a peer that stops reading stops the producers (backpressure), for at
most ``write_timeout``. ``send_data`` cuts a body into what the peer's windows allow and
waits for a WINDOW_UPDATE when they are shut, for at most ``window_timeout``.
"""

from __future__ import annotations

import trio
from h2.connection import H2Connection
from h2.exceptions import ProtocolError

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class Gone(Exception):
    """The connection (or the stream) can take no more: the peer left, stalled, or reset."""


class H2Side:
    __slots__ = ("_lock", "_windows", "conn", "stream", "write_timeout")

    def __init__(self, conn: H2Connection, stream: trio.abc.Stream, write_timeout: float) -> None:
        self.conn = conn
        self.stream = stream
        self.write_timeout = write_timeout
        self._lock = trio.Lock()
        self._windows: dict[int, trio.Event] = {}

    async def flush(self, then: bytes = b"") -> None:
        """Write what h2 has queued (nothing: no write), and ``then`` after it: frames of
        our own that h2 must not know about (a GOAWAY after which streams in flight still
        send: h2's own ``close_connection`` would refuse them)."""
        lock = self._lock
        try:
            lock.acquire_nowait()  # the usual case, without the checkpoint of acquire()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = self.conn.data_to_send() + then
            if not data:
                return
            with trio.fail_after(self.write_timeout):
                await self.stream.send_all(data)
        except (trio.TooSlowError, *_STREAM_ERRORS) as exc:
            raise Gone(f"write failed: {exc or 'timed out'}") from exc
        finally:
            lock.release()

    def window_opened(self, stream_id: int) -> None:
        """A WINDOW_UPDATE (or SETTINGS) arrived: wake what waits on it (0: every stream)."""
        if stream_id == 0:
            waiting, self._windows = self._windows, {}
            for event in waiting.values():
                event.set()
        elif stream_id in self._windows:
            self._windows.pop(stream_id).set()

    async def send_data(
        self,
        stream_id: int,
        data: bytes,
        *,
        window_timeout: float,
        end_stream: bool = False,
        flush: bool = True,
    ) -> None:
        """Send ``data`` on the stream as the peer's windows allow; Gone when the stream
        was reset or the windows stayed shut for ``window_timeout``. ``flush=False``:
        leave what fits queued for the caller's next flush (a small response leaves in
        one write); a shut window is waited for after a flush, whatever the caller said."""
        if not data and not end_stream:
            return
        conn = self.conn
        view = memoryview(data)
        while True:
            try:
                room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if room > 0 or not view:
                    piece, view = view[:room], view[room:]
                    last = end_stream and not view
                    conn.send_data(stream_id, bytes(piece), end_stream=last)
            except ProtocolError as exc:  # the stream was reset, or the connection closed
                raise Gone("stream closed") from exc
            if room > 0 or not view:
                if not view:
                    if flush:
                        await self.flush()
                    return
                continue
            await self.flush()  # what is queued may be what the peer waits for
            event = self._windows.setdefault(stream_id, trio.Event())
            with trio.move_on_after(window_timeout) as waited:
                await event.wait()
            if waited.cancelled_caught:
                raise Gone("flow-control window stayed shut")
