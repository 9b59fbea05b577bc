"""The responses the proxy writes itself: errors, always followed by closing the connection.

Written as bytes rather than through h11, because an error can happen in any h11 state
(a garbage request line leaves h11 unable to send anything) and because after an error
the connection is closed anyway: ``Connection: close`` is always set. The body is one
short line that names the status and a reason category, never a rule, a backend
address or a file name: what a refused client learns must not map the configuration.
"""

from __future__ import annotations

from http import HTTPStatus


def error_body(status: int, reason: str) -> bytes:
    """The one line every error response of the proxy says, HTTP/1.1 or HTTP/2."""
    return f"{status} {HTTPStatus(status).phrase}: {reason}\n".encode()


def error_response(status: int, reason: str, *, head_only: bool = False) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = error_body(status, reason)
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()
    return head if head_only else head + body
