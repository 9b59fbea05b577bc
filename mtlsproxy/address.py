"""``host:port`` addresses as written in the config and on the command line.

IPv6 literals take brackets (``[::1]:8443``), as in URLs; a bare ``::1:8443`` is ambiguous
and refused rather than guessed.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol


class Address:
    """A host and a port: a plain class, so the config decoder reads it from a string."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"Address({self.host!r}, {self.port})"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or raise ``ValueError`` saying what is wrong."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r}: write an IPv6 address as '[::1]:8443'")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port (e.g. '127.0.0.1:8443')")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. '[::1]:8443'")
    # Port 0 (any free port) is for listen addresses; the config refuses it for backends.
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return Address(host, int(port_text))


class _Connected(Protocol):
    def getpeername(self) -> Any: ...


def peer_name(sock: _Connected) -> str:
    """``host:port`` (``[v6]:port``) of a connected socket's peer, or ``?`` once it is gone:
    how logs name a client."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return str(Address(host, port))
