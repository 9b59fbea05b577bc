"""Per-connection budgets against the known HTTP/2 floods, as plain code.

Theory of operation
===================

HTTP/2 lets a client make a server work without a request to show for it: every PING
and SETTINGS frame asks for an answer, a RST_STREAM right after HEADERS makes the server
start (and the backend receive) a request the client never waits for (the "rapid reset"
of CVE-2023-44487), and WINDOW_UPDATE, PRIORITY and empty DATA frames cost a parse each.
What ``h2`` bounds by itself, and what is left to this module:

- concurrent streams: ``SETTINGS_MAX_CONCURRENT_STREAMS`` (``MAX_STREAMS``); a stream over
  it ends the connection (h2's TooManyStreamsError, GOAWAY(PROTOCOL_ERROR)): RFC 9113
  §5.1.2 allows a stream error there, but a client that ignores the limit it was told is
  not one to keep;
- header blocks: at most 64 CONTINUATION frames of at most 16 KiB each before h2 ends the
  connection, and the decoded list at most ``SETTINGS_MAX_HEADER_LIST_SIZE`` (the
  listener's ``max_header_size``): an HPACK bomb stops at the limit, not in memory;
- everything else is a rate: each kind of work has a token bucket (``Budget``) of a
  burst and a rate per second. A connection that empties one is abusive: it is closed
  with GOAWAY(ENHANCE_YOUR_CALM), its streams cancelled, their backend requests with them.

Budgets count what a client *asks*: streams that end before their answer (``resets``:
reset by the client, the rapid reset; or reset by h2 itself after a frame the client
knew to be wrong, the "MadeYouReset" shape of CVE-2025-8671, which the server counts as
it sees them), PING and SETTINGS (``pings``), and other control frames (``control``).
Stream openings are not a budget: finished streams are legitimate load however fast
they come, and ``MAX_STREAMS`` bounds the unfinished ones. No clock here: the caller
passes trio's.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2 import events

MAX_STREAMS = 100  # nginx's http2_max_concurrent_streams, Envoy's guidance for the edge
WINDOW_CREDIT = 1 << 16  # WINDOW_UPDATEs owed for DATA sent, at most (64 MiB of it)


@dataclass(slots=True)
class Budget:
    """A token bucket: ``burst`` at once, refilled at ``rate`` per second."""

    burst: float
    rate: float
    tokens: float = 0.0
    at: float | None = None  # when last spent (None: never, so full)

    def spend(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost``; False: the budget is exhausted (the caller ends the connection)."""
        if self.at is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


# Events that are work without a request: h2 answers PING and SETTINGS itself.
_CONTROL = (
    events.PingReceived,
    events.RemoteSettingsChanged,
    events.WindowUpdated,
    events.PriorityUpdated,
)


class Abuse(Exception):
    """The connection broke a budget; ``reason`` names which, for the log and metric."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"HTTP/2 flood: {reason}")


class AbuseGuard:
    """The budgets of one client connection. Defaults: generous for browsers and gRPC
    clients (a download's WINDOW_UPDATEs, a channel's keepalive PINGs, a page's cancelled
    requests), far below what a flood needs to hurt."""

    def __init__(
        self,
        *,
        resets: Budget | None = None,
        control: Budget | None = None,
        pings: Budget | None = None,
    ) -> None:
        self.resets = resets or Budget(burst=MAX_STREAMS, rate=20)
        # WINDOW_UPDATEs that answer DATA we sent are not work asked for: each KiB sent
        # earns two (the stream's and the connection's; clients reopen windows per read,
        # Go's every 4 KiB), up to WINDOW_CREDIT; beyond them they spend ``control``.
        self.window_credit = 0
        self.control = control or Budget(burst=1000, rate=500)
        # PING and SETTINGS each make us write a frame back: a tighter budget.
        self.pings = pings or Budget(burst=50, rate=10)

    def sent(self, nbytes: int) -> None:
        """DATA of ``nbytes`` went to the client: credit for the WINDOW_UPDATEs it brings."""
        self.window_credit = min(WINDOW_CREDIT, self.window_credit + 2 * (nbytes // 1024 + 1))

    def check(self, event: events.Event, now: float) -> None:
        """Count ``event``; raise Abuse when a budget is exhausted."""
        if isinstance(event, events.StreamReset):  # by the client, or by h2 after its
            if not self.resets.spend(now):  # bad frame (remote_reset False): MadeYouReset
                raise Abuse("too many stream resets")
        elif isinstance(event, (events.PingReceived, events.RemoteSettingsChanged)):
            if not self.pings.spend(now):
                raise Abuse("too many PING or SETTINGS frames")
        elif isinstance(event, events.WindowUpdated) and self.window_credit > 0:
            self.window_credit -= 1
        elif isinstance(event, _CONTROL):
            if not self.control.spend(now):
                raise Abuse("too many control frames")
        elif (
            isinstance(event, events.DataReceived)
            and not event.data
            and not event.stream_ended
            and not self.control.spend(now)
        ):
            raise Abuse("too many empty DATA frames")
