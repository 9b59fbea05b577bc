"""HTTP/1.1 messages read by llhttp (Node's parser) and written by us: no I/O here.

Theory of operation
===================

One ``MessageReader`` per connection and direction (requests from a client, responses
from a backend). Bytes go in with ``receive_data`` (``b""``: the peer closed); events
come out of ``next_event`` in h11's manner: ``RequestHead`` / ``ResponseHead``, then
``Body`` pieces, then ``End``; ``NEED_DATA`` when the buffer holds no more of the
message. After ``End`` the reader stops, exactly at the message's last byte, until
``start_next_cycle``: pipelined bytes wait in ``trailing_data``, unparsed.

**One parser decides framing.** llhttp (the ``llhttp`` package: Node's parser in C,
strict by default, no leniency flag is ever set here) finds where a head and a message
end, and pauses there, so the reader knows the exact offset (llhttp reports how many
bytes it took). The head cap is exact too: the bytes llhttp took while in the head.
On top of llhttp's own strictness (CRLF only, no obs-fold, no white space before the
colon, tokens, no control characters, one Content-Length, Transfer-Encoding with
Content-Length refused), the project's rules run once over the parsed fields
(``framing.request_framing`` / ``response_framing``, the same functions that checked
h11's parse before): versions, CONNECT, targets, exactly one well-formed Host,
``chunked`` as the only coding.

**The fields come from the head's bytes.** llhttp only reports events here (begin,
version, head complete, body, end); the head's bytes stay in the buffer until it is
complete, and are then split on CRLF and the first colon. That is exact because llhttp
has refused everything a split could read differently (bare CR or LF, obs-fold, white
space before a colon, empty names), and it is half the cost of collecting every span
through a Python callback. The HTTP/2 preface is refused at its version (llhttp would
take it as a connection to wait on), and a status under 100 at the head.

What llhttp is stricter about than h11: only the methods it knows are accepted (its
table: the RFC 9110 ones, WebDAV, PATCH, PURGE, QUERY, ...); an extension method is
refused with 400.

**Bodies.** ``Body.data`` is a memoryview of the received bytes (no copy). A chunked
body is de-chunked by llhttp: the pieces are the chunk data; chunk extensions and
trailers never leave the reader (the writer below frames chunks anew), so a backend
never reads the client's chunk-size lines, only ours.

**What the reader is told.** A response to HEAD has no body whatever its headers say;
call ``no_body_expected`` before its head is read. A response head with status 101 ends
the reader's work: the bytes after it (``trailing_data``) are the new protocol's.
"""

from __future__ import annotations

import re
from typing import Final

import llhttp

from mtlsproxy.relay.errors import BadGateway, BadRequest, HeadersTooLarge, HttpError
from mtlsproxy.relay.framing import (
    FIELD_VALUE,
    MAX_HEAD_BYTES,
    TARGET,
    Framing,
    connection_tokens,
    request_framing,
    response_framing,
)

Headers = list[tuple[bytes, bytes]]
# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ); relayed, so checked.
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _Paused:
    def __repr__(self) -> str:
        return "PAUSED"


NEED_DATA: Final = _NeedData()
PAUSED: Final = _Paused()  # after End (or a 101): start_next_cycle before reading on


class RequestHead:
    __slots__ = ("connection", "framing", "headers", "method", "target", "version")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        framing: Framing,
        *,
        connection: frozenset[bytes] = frozenset(),
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # the client's spelling of names; values trimmed
        self.framing = framing
        self.connection = connection  # the Connection header's tokens, lowercased

    @property
    def has_body(self) -> bool:
        return self.framing.chunked or bool(self.framing.content_length)


class ResponseHead:
    __slots__ = ("connection", "framing", "headers", "reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        framing: Framing,
        *,
        connection: frozenset[bytes] = frozenset(),
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.connection = connection


class Body:
    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


class End:
    __slots__ = ()


END: Final = End()
Event = RequestHead | ResponseHead | Body | End | _NeedData | _Paused

_HEAD, _BODY, _DONE = 0, 1, 2


class _Callbacks:
    """What llhttp tells us, gathered for the reader (a mixin of its parser classes).

    Only the events: the head's fields are read from its bytes once llhttp has checked
    them (a callback per span into Python cost twice llhttp's own parse)."""

    def _begin(self) -> None:
        self.head_done = False
        self.done = False
        self.bad_version = False
        self.begun = False  # a byte of the message itself (not a CRLF before it) was taken
        self.pieces: list[memoryview] = []
        self.finishing = False

    def on_message_begin(self) -> None:
        self.begun = True

    def on_version_complete(self) -> None:
        # Before llhttp goes on: it takes the HTTP/2 preface (``PRI * HTTP/2.0``) as the
        # start of a connection it would then wait on forever. Refused in _execute.
        if (self.major, self.minor) not in ((1, 0), (1, 1)):  # type: ignore[attr-defined]
            self.bad_version = True
            self.pause()  # type: ignore[attr-defined]

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.pause()  # type: ignore[attr-defined]  # llhttp's, on the parser class

    def on_body(self, data: memoryview) -> None:
        if data:  # llhttp reports an empty span when run on no bytes mid-body
            self.pieces.append(data)

    def on_message_complete(self) -> None:
        self.done = True
        if not self.finishing:  # llhttp's finish() cannot report a pause
            self.pause()  # type: ignore[attr-defined]


class _RequestParser(_Callbacks, llhttp.Request):  # type: ignore[misc]
    pass


class _ResponseParser(_Callbacks, llhttp.Response):  # type: ignore[misc]
    pass


class MessageReader:
    """Reads one message at a time from one direction of one connection."""

    __slots__ = (
        "_buf", "_eof", "_head_bytes", "_head_start", "_informational", "_max_head", "_no_body",
        "_parser", "_pos", "_response", "_state",
    )  # fmt: skip

    def __init__(self, *, response: bool = False, max_head: int = MAX_HEAD_BYTES) -> None:
        self._response = response
        self._max_head = max_head
        self._parser: _Callbacks = _ResponseParser() if response else _RequestParser()
        self._parser._begin()
        self._buf = b""
        self._pos = 0
        self._head_start = 0  # where the current head's bytes begin in _buf
        self._eof = False
        self._state = _HEAD
        self._head_bytes = 0
        self._no_body = False
        self._informational = False

    # ---- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means it closed its side."""
        if not data:
            self._eof = True
        elif self._state == _HEAD:  # the head's bytes stay, to be read when it is complete
            start = self._head_start
            self._buf = self._buf[start:] + data if start < len(self._buf) else data
            self._pos -= min(start, self._pos)
            self._head_start = 0
        elif self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """The bytes not parsed yet (after the message: a pipelined one), and EOF seen."""
        return self._buf[self._pos :], self._eof

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def untouched(self) -> bool:
        """Not a byte of the current message received yet, empty lines aside (a stale
        keep-alive connection that closes now has said nothing, so its request may be
        replayed; a client that is between requests is idle)."""
        return self._state == _HEAD and not self._parser.begun and self.buffered == 0

    def no_body_expected(self) -> None:
        """The next response answers a HEAD request: it ends with its head."""
        self._no_body = True

    def start_next_cycle(self) -> None:
        if self._state != _DONE:
            raise RuntimeError("start_next_cycle before the message ended")
        self._parser.reset()  # type: ignore[attr-defined]
        self._parser._begin()
        self._state = _HEAD
        self._head_bytes = 0
        self._head_start = self._pos
        # A 1xx answers a HEAD request too; the final response that follows has no body.
        self._no_body = self._no_body and self._informational
        self._informational = False

    # ---- output --------------------------------------------------------------------

    def next_event(self) -> Event:
        parser = self._parser
        if self._state == _DONE:
            return PAUSED
        while True:
            if self._state == _HEAD and parser.head_done:
                return self._head()  # first: a bodyless request may have ended with it
            if parser.pieces:
                return Body(parser.pieces.pop(0))
            if parser.done:
                self._state = _DONE
                return END
            if self._pos >= len(self._buf):
                if self._state == _BODY:
                    self._execute()  # lets llhttp end a message that needs no more bytes
                    if parser.pieces or parser.done:
                        continue
                if self._eof:
                    return self._at_eof()
                return NEED_DATA
            before = self._pos
            self._execute()
            if self._state == _HEAD:
                # Exact: llhttp pauses at the end of the head, so it took no body byte.
                self._head_bytes += self._pos - before
                if self._head_bytes > self._max_head:
                    raise self._error(HeadersTooLarge, "header section too large")

    def _execute(self) -> None:
        parser = self._parser
        view = memoryview(self._buf)[self._pos :]
        try:
            taken = parser.execute(view)  # type: ignore[attr-defined]
        except llhttp.Error as exc:
            raise self._translate(exc) from None
        self._pos += taken
        if parser.bad_version:
            if self._response:
                raise BadGateway("backend HTTP version not supported")
            raise BadRequest("HTTP version not supported")
        if parser.is_paused:  # type: ignore[attr-defined]
            parser.unpause()  # type: ignore[attr-defined]

    def _head(self) -> RequestHead | ResponseHead:
        parser = self._parser
        # llhttp has checked these bytes (CRLF only, no obs-fold, tokens, one colon rule),
        # so plain splitting reads them exactly; empty lines before a request are skipped.
        lines = self._buf[self._head_start : self._pos].lstrip(b"\r\n")[:-4].split(b"\r\n")
        raw: Headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            raw.append((name, value.strip(b" \t")))
        lowered = [(name.lower(), value) for name, value in raw]
        # llhttp's rule too, kept as a floor; one match over all values (a class star).
        if not FIELD_VALUE.fullmatch(b"".join([value for _, value in raw])):
            raise self._error(BadRequest, "control character in header field value")
        connection = connection_tokens(lowered)
        version = b"%d.%d" % (parser.major, parser.minor)  # type: ignore[attr-defined]
        self._state = _BODY
        head: RequestHead | ResponseHead
        if self._response:
            status = parser.status  # type: ignore[attr-defined]
            if not isinstance(status, int) or status < 100:  # llhttp takes "000" and "099"
                raise self._error(BadRequest, "malformed status line")
            framing = response_framing(version, status, lowered)
            start = lines[0].split(b" ", 2)
            reason = start[2] if len(start) == 3 else b""
            if not _REASON.fullmatch(reason):
                raise self._error(BadRequest, "malformed status line")
            head = ResponseHead(status, reason, version, raw, framing, connection=connection)
            self._informational = status < 200
            if status == 101:
                self._state = _DONE  # what follows is the new protocol's: trailing_data
            elif self._no_body and status >= 200:
                parser.done = True  # its body is empty whatever its headers say
            return head
        start = lines[0].split(b" ")
        if len(start) != 3:
            raise BadRequest("malformed start line")
        method, target, _ = start
        if not TARGET.fullmatch(target):
            raise BadRequest("malformed start line")
        framing = request_framing(method, target, version, lowered)
        return RequestHead(method, target, version, raw, framing, connection=connection)

    def _at_eof(self) -> Event:
        parser = self._parser
        if self._state == _HEAD:
            if not parser.begun:
                return PAUSED  # closed between messages: a clean end
            raise self._error(BadRequest, "connection closed inside a message head")
        parser.finishing = True
        try:
            parser.finish()  # type: ignore[attr-defined]
        except llhttp.Error:
            raise self._cut_short() from None
        if not parser.done:
            raise self._cut_short()
        return self.next_event()

    def _cut_short(self) -> HttpError:
        if self._response:
            return BadGateway("backend response body was malformed or cut short")
        return BadRequest("request body cut short")

    def _error(self, request: type[HttpError], why: str) -> HttpError:
        if self._response:
            return BadGateway(f"backend response: {why}")
        return request(why)

    def _translate(self, exc: llhttp.Error) -> HttpError:
        # llhttp's reason names the rule, not the bytes: for our log, never the client.
        detail = f"llhttp: {exc}"
        if self._response:
            if self._state == _HEAD:
                return BadGateway("backend sent a malformed response", log_detail=detail)
            return BadGateway("backend response body was malformed or cut short", log_detail=detail)
        if self._state == _HEAD:
            return BadRequest("malformed request", log_detail=detail)
        return BadRequest("malformed request body", log_detail=detail)


# ---- writing -----------------------------------------------------------------------


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head for the backend; always HTTP/1.1. Host first, as h11 writes it
    (RFC 9110 §7.2: a user agent SHOULD send Host first)."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % field for field in headers if field[0].lower() == b"host"]
    lines += [b"%s: %s\r\n" % field for field in headers if field[0].lower() != b"host"]
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [b"%s: %s\r\n" % field for field in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes | memoryview) -> bytes:
    """One chunk of a body we frame ourselves (never an empty one: that is the end)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
