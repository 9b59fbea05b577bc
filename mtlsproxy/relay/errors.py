"""Errors that end one HTTP exchange, each carrying the status the proxy answers with.

    MtlsProxyError
    ├── HttpError                 .status, .reason (short, safe to send to the client)
    │   ├── BadRequest            400  framing the proxy refuses to forward
    │   ├── Forbidden             403  the identity may not use this route (or at all)
    │   ├── NoRoute               404  no route for this host and path
    │   ├── RequestTimeout        408  the client was too slow sending its head or body
    │   ├── PayloadTooLarge       413  body over the route's limit
    │   ├── HeadersTooLarge       431  head over the byte cap
    │   ├── BadGateway            502  the backend answered with something we will not relay
    │   └── GatewayTimeout        504  the backend did not answer in time
    └── RouteError                a route table that cannot be built (names the route)

The reason is written for the client and the access log: it names the rule, never echoes
request bytes back (no reflection of attacker-controlled input into the response).
Every HttpError ends the connection after the response: once framing is in doubt, the
next byte on the wire cannot be trusted to start a new request.
"""

from __future__ import annotations

from mtlsproxy.errors import MtlsProxyError


class HttpError(MtlsProxyError):
    status = 500

    def __init__(self, reason: str, *, log_detail: str | None = None) -> None:
        self.reason = reason
        # For the proxy's own log only (which rule refused, which deny entry matched):
        # never sent to the client, whose answer must not map the configuration.
        self.log_detail = log_detail
        super().__init__(f"{self.status}: {reason}")


class BadRequest(HttpError):
    status = 400


class Forbidden(HttpError):
    status = 403


class NoRoute(HttpError):
    status = 404


class RequestTimeout(HttpError):
    status = 408


class PayloadTooLarge(HttpError):
    status = 413


class HeadersTooLarge(HttpError):
    status = 431


class BadGateway(HttpError):
    status = 502


class GatewayTimeout(HttpError):
    status = 504


class RouteError(MtlsProxyError):
    """A route that cannot go in the table; ``index`` is its position in the config."""

    exit_code = 2

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"route {index}: {reason}")
