"""Which route a request belongs to, and in which order to try its backends.

Theory of operation: a route is (host pattern, path prefix, opaque payload). Matching
is two steps, as Envoy's virtual hosts then routes, and never falls through:

1. The host picks one *group*: the exact host if any route names it, else the longest
   wildcard suffix that matches, else the routes for any host. A request for
   ``admin.example.com`` is judged by the ``admin.example.com`` routes alone; if none of
   their prefixes match it gets 404, not the catch-all route. Falling through would let
   a narrow, tightly authorised host leak into a broad route nobody meant for it.
2. In the group, the longest matching path prefix wins.

Host patterns: ``api.example.com`` (exact), ``*.example.com`` (one *or more* labels
below the suffix: ``a.example.com`` and ``a.b.example.com``, not ``example.com``; Envoy's
suffix wildcard behaves the same, unlike a TLS certificate wildcard), and ``None`` or
``"*"`` for any host. Hosts compare case-insensitively, without port or trailing dot.

Path prefixes match on a segment boundary: ``/api`` matches ``/api``, ``/api/`` and
``/api/x`` but not ``/apix`` (Envoy's ``prefix`` would match ``/apix``; a policy
written for ``/api`` should not cover a sibling that merely shares letters). A prefix
ending in ``/`` is a plain string prefix that also covers the path without its last
``/``: ``/`` matches everything and ``/api/`` matches ``/api`` (some frameworks serve
one as the other).

Paths are compared in their canonical form (``relay.paths``: the one path rule, also what
is forwarded) and without regard to ASCII case, so ``//admin``, ``/%61dmin`` and
``/ADMIN`` all fall under the ``/admin`` route that a slash-merging, decoding or
case-insensitive backend would serve them from; spellings that backends read differently
(``%2F``, ``;``, dot-segments...) never reach a route: they are refused with 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from mtlsproxy.relay.errors import HttpError, RouteError
from mtlsproxy.relay.paths import canonical_target

T = TypeVar("T")

_LABELS = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_IPV6_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    index: int  # position in the config, for errors, logs and metrics
    payload: T
    host: str | None = None
    path_prefix: str = "/"


class RouteTable(Generic[T]):
    def __init__(self, routes: Iterable[Route[T]]) -> None:
        self._exact: dict[str, list[tuple[str, Route[T]]]] = {}
        self._wildcard: dict[str, list[tuple[str, Route[T]]]] = {}
        self._any: list[tuple[str, Route[T]]] = []
        seen: dict[tuple[str, str], int] = {}
        for route in routes:
            kind, host = _host_pattern(route)
            prefix = _prefix(route)
            # "/a" and "/a/" cover the same paths (see _prefix_matches): one route.
            key = (f"{kind}:{host}", prefix.rstrip("/") or "/")
            if key in seen:
                raise RouteError(route.index, f"same host and path_prefix as route {seen[key]}")
            seen[key] = route.index
            if kind == "exact":
                group = self._exact.setdefault(host, [])
            elif kind == "wildcard":
                group = self._wildcard.setdefault(host, [])
            else:
                group = self._any
            group.append((prefix, route))
        for group in (*self._exact.values(), *self._wildcard.values(), self._any):
            group.sort(key=lambda entry: len(entry[0]), reverse=True)
        # Longest suffix first, so *.a.example.com beats *.example.com.
        self._suffixes = sorted(self._wildcard, key=len, reverse=True)

    def match(self, host: str | bytes | None, target: str | bytes) -> Route[T] | None:
        """The route for a Host header value and a request target, or None (404).

        Raises ``BadRequest`` for a target that ``relay.paths`` refuses."""
        return self._lookup(host, route_path(target))

    def match_canonical(self, host: str | bytes | None, target: bytes) -> Route[T] | None:
        """``match`` for a target that is already ``relay.paths.canonical_target``'s
        output, as the server has it: the path rule is not applied a second time."""
        return self._lookup(host, _path_part(target))

    def _lookup(self, host: str | bytes | None, path: str) -> Route[T] | None:
        group = self._group(normalize_host(host))
        path = path.lower()
        for prefix, route in group:
            if _prefix_matches(prefix, path):
                return route
        return None

    def _group(self, host: str | None) -> list[tuple[str, Route[T]]]:
        if host:
            if host in self._exact:
                return self._exact[host]
            for suffix in self._suffixes:
                if host.endswith("." + suffix):
                    return self._wildcard[suffix]
        return self._any


def normalize_host(host: str | bytes | None) -> str | None:
    """Lowercase, no port, no trailing dot; IPv6 literals keep their brackets."""
    if host is None:
        return None
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):
        text = text[: text.find("]") + 1] if "]" in text else text
    else:
        name, colon, port = text.rpartition(":")
        if colon and port.isdigit():
            text = name
    return text.rstrip(".") or None


def route_path(target: str | bytes) -> str:
    """The path a target is routed by: its canonical path (``relay.paths``), no query.

    Raises ``BadRequest`` for a spelling that path rule refuses."""
    raw = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else target
    return _path_part(canonical_target(raw))


def _path_part(canonical: bytes) -> str:
    if canonical == b"*":
        return "/"  # OPTIONS * concerns the whole server: route it as the root
    return canonical.partition(b"?")[0].decode("ascii")


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix.endswith("/"):
        # ``/admin/`` covers ``/admin`` too: Express and koa (non-strict, their default)
        # serve ``/admin`` from the ``/admin/`` handler, so it must not fall to ``/``.
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


def _host_pattern(route: Route[T]) -> tuple[str, str]:
    if route.host is None or route.host == "*":
        return "any", ""
    host = route.host.strip().lower().rstrip(".")
    if host.startswith("*."):
        suffix = host[2:]
        if not _LABELS.fullmatch(suffix):
            raise RouteError(route.index, f"host {route.host!r} is not *.<domain>")
        return "wildcard", suffix
    if not (_LABELS.fullmatch(host) or _IPV6_LITERAL.fullmatch(host)):
        raise RouteError(
            route.index, f"host {route.host!r} is not a host name, *.<domain> or '*' (no port)"
        )
    return "exact", host


def _prefix(route: Route[T]) -> str:
    prefix = route.path_prefix
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix:
        raise RouteError(route.index, f"path_prefix {prefix!r} must be a path starting with '/'")
    try:
        canonical = route_path(prefix)
    except HttpError as exc:
        raise RouteError(route.index, f"path_prefix {prefix!r}: {exc.reason}") from None
    if canonical != prefix:
        # A prefix no request can spell (requests are canonicalized before matching)
        # would silently never match: say which spelling is meant instead.
        raise RouteError(route.index, f"path_prefix {prefix!r} is written {canonical!r}")
    return canonical.lower()


class RoundRobin(Generic[T]):
    """Each call to ``order()`` starts one further along, so retries try the others next."""

    def __init__(self, items: Sequence[T]) -> None:
        if not items:
            raise ValueError("RoundRobin needs at least one item")
        self._items = tuple(items)
        self._next = 0

    def order(self) -> list[T]:
        start = self._next
        self._next = (start + 1) % len(self._items)
        return [*self._items[start:], *self._items[:start]]
