"""WebSocket frames as the proxy sees them after the 101: boundaries, sizes, closes.

The proxy relays frames untouched (subprotocols, extensions, fragmentation, pings and
close codes all pass through as the two ends negotiated them), but it must still know
where frames begin, for three things of its own: refusing a message larger than the
route allows (close 1009), closing a session the enforcer condemns (close 1008), and
telling activity from idleness. ``FrameScanner`` follows one direction's frame headers
(RFC 6455 §5.2) as bytes stream past, without ever holding a payload.
"""

from __future__ import annotations

import os
import struct

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009


class FrameError(Exception):
    """The stream broke a rule; ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class FrameScanner:
    """Follows frame headers in one direction; ``feed`` raises FrameError on a breach.

    ``masked``: frames from a client must be masked, frames from a server must not be.
    ``max_message``: the largest data message (all its fragments), None for no limit.
    """

    def __init__(self, *, masked: bool, max_message: int | None) -> None:
        self._masked = masked
        self._max = max_message
        self._header = bytearray()
        self._skip = 0  # payload bytes of the current frame still to pass
        self._message = 0  # bytes of the data message in progress
        self._in_message = False
        self.closed = False  # a close frame went by
        self.messages = 0  # data messages begun (a fragmented one counts once)
        self.bytes = 0  # everything fed, headers included

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            if not self._header and len(view) >= 2:  # a whole header in view: no copy-in
                size = _header_size(view[1])
                if len(view) >= size:
                    self._frame(bytes(view[:size]))
                    view = view[size:]
                    continue
            need = self._header_length()
            take = min(need - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == self._header_length():  # the length may have grown
                self._frame(bytes(self._header))
                self._header.clear()

    @property
    def at_boundary(self) -> bool:
        """Between two frames: the only place a frame of our own may be put in."""
        return not self._skip and not self._header

    def _header_length(self) -> int:
        return 2 if len(self._header) < 2 else _header_size(self._header[1])

    def _frame(self, header: bytes) -> None:
        fin, opcode = header[0] & 0x80, header[0] & 0x0F
        masked, length7 = bool(header[1] & 0x80), header[1] & 0x7F
        if masked != self._masked:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "frame masking is wrong for its direction")
        if length7 == 126:
            (length,) = struct.unpack("!H", header[2:4])
        elif length7 == 127:
            (length,) = struct.unpack("!Q", header[2:10])
        else:
            length = length7
        if opcode >= OP_CLOSE:  # control frames: small, never fragmented
            if length > 125 or not fin:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "malformed control frame")
            if opcode == OP_CLOSE:
                self.closed = True
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            if (opcode == OP_CONTINUATION) != self._in_message:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "fragments out of order")
            if opcode != OP_CONTINUATION:
                self.messages += 1
            self._message = (self._message if opcode == OP_CONTINUATION else 0) + length
            if self._max is not None and self._message > self._max:
                raise FrameError(CLOSE_TOO_BIG, "message too big")
            self._in_message = not fin
        else:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "unknown opcode")
        self._skip = length


def _header_size(second: int) -> int:
    """A frame header's length, from its second byte (mask bit, 7-bit length)."""
    length7 = second & 0x7F
    return 2 + (4 if second & 0x80 else 0) + (2 if length7 == 126 else 8 if length7 == 127 else 0)


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame; ``masked`` for one we send to a server (as a client must)."""
    payload = struct.pack("!H", code) + reason.encode("utf-8")[:123]
    if not masked:
        return bytes([0x80 | OP_CLOSE, len(payload)]) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | OP_CLOSE, 0x80 | len(payload)]) + key + body
