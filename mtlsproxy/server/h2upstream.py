"""HTTP/2 to a backend (``upstream_protocol = "h2"``): one stream at a time per connection.

As nginx's ``grpc_pass``: a backend connection carries one request stream at a time and
goes back to the pool when that stream ended cleanly, so pooling, health marks,
deadlines and retirement on renewed material stay those of ``server.upstream``, and one
client's stream never waits behind another's flow control. The connection starts with
the client preface (prior knowledge for cleartext h2c; over TLS the route's context
offers ALPN h2 and the backend must select it).

Only the task that relays the response reads from the backend; it hands on every event
of its stream and keeps the connection-level ones (WINDOW_UPDATE, SETTINGS). GOAWAY
frames never reach h2 (``relay.h2.GoAwaySplitter``): a graceful one lets the stream in
flight finish, and the connection is not reused.
"""

from __future__ import annotations

from collections import deque

import trio
from h2 import events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from mtlsproxy.relay.errors import BadGateway, GatewayTimeout
from mtlsproxy.relay.h2 import GoAwaySplitter
from mtlsproxy.server.h2io import H2Side
from mtlsproxy.server.upstream import Upstream

RECEIVE_SIZE = 65536
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class H2Upstream:
    """The client side of one HTTP/2 backend connection."""

    __slots__ = ("_events", "_splitter", "closed", "side", "stream_id")

    def __init__(self, stream: trio.abc.Stream, write_timeout: float) -> None:
        config = H2Configuration(client_side=True, header_encoding=None)
        conn = H2Connection(config)
        # No server push: pushed streams would hold the connection window shut.
        conn.local_settings = Settings(client=True, initial_values={SettingCodes.ENABLE_PUSH: 0})
        conn.initiate_connection()  # the preface and our SETTINGS, sent with the first flush
        self.side = H2Side(conn, stream, write_timeout)
        self._events: deque[events.Event] = deque()
        self._splitter = GoAwaySplitter()
        self.closed = False  # GOAWAY received, or the connection failed: never reused
        self.stream_id = 0

    @classmethod
    def of(cls, up: Upstream, write_timeout: float) -> H2Upstream:
        """The HTTP/2 side of a pooled ``Upstream``, made on its first use."""
        if up.h2 is None:
            up.h2 = cls(up.stream, write_timeout)
        h2: H2Upstream = up.h2
        return h2

    def start(self) -> int:
        """A new stream id for the next request."""
        self.stream_id = self.side.conn.get_next_available_stream_id()
        return self.stream_id

    @property
    def reusable(self) -> bool:
        conn = self.side.conn
        return not self.closed and conn.open_outbound_streams == 0

    async def next_event(self, timeout: float) -> events.Event:
        """The next event of this connection's current stream (or one about the whole
        connection), reading the backend for up to ``timeout`` per read."""
        while True:
            while self._events:
                event = self._events.popleft()
                if self._keep(event):
                    return event
            with trio.move_on_after(timeout) as waited:
                try:
                    data = await self.side.stream.receive_some(RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    self.closed = True
                    raise BadGateway("backend connection failed") from exc
            if waited.cancelled_caught:
                self.closed = True
                raise GatewayTimeout("backend did not answer in time")
            if not data:
                self.closed = True
                raise BadGateway("backend closed the connection")
            data, goaways = self._splitter.feed(bytes(data))
            for last, code in goaways:
                self._goaway(last, code)
            try:
                self._events.extend(self.side.conn.receive_data(data))
            except ProtocolError as exc:
                self.closed = True
                raise BadGateway("backend broke HTTP/2", log_detail=f"h2: {exc}") from exc
            await self.side.flush()  # the acknowledgements h2 queued (SETTINGS, PING)

    def _goaway(self, last: int, code: int) -> None:
        """The backend is closing: never reused; the stream in flight finishes when the
        GOAWAY is graceful and covers it, else it failed (before any answer: 502)."""
        self.closed = True
        if code != 0 or last < self.stream_id:
            raise BadGateway(
                "backend closed the connection", log_detail=f"GOAWAY {code}, last stream {last}"
            )

    def _keep(self, event: events.Event) -> bool:
        """Handle connection-level events here; True: the stream's caller needs it."""
        if isinstance(event, events.WindowUpdated):
            self.side.window_opened(event.stream_id)
            return False
        if isinstance(event, events.RemoteSettingsChanged):
            self.side.window_opened(0)  # INITIAL_WINDOW_SIZE may have moved
            return False
        stream_id = getattr(event, "stream_id", None)
        return stream_id == self.stream_id
