"""Authorization: pure functions of a verified Identity and the configured rules.

Order of questions, for every connection and every request:

1. Is the identity on the deny list? Then no, whatever any rule says.
2. Does the route (or tcp listener) have allow rules? Without an ``allow`` key every
   client holding a certificate from ``client_ca`` is admitted: the private CA is the gate.
   With rules, the client is admitted when any rule matches, and a rule matches when
   every field it sets matches. (``allow = []`` is refused when the config loads.)

Matching is exact, with two deliberate exceptions: DNS names compare case-insensitively,
as DNS does, and ``uri_prefix`` only matches on a path boundary unless it ends in ``/``:
``spiffe://game.example`` matches ``spiffe://game.example/player/1`` but not
``spiffe://game.example.evil.test/``; ``spiffe://game.example/player/`` matches
``spiffe://game.example/player/1`` and, plainly, anything else under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from mtlsproxy.config import AllowRule
from mtlsproxy.denylist import DenyList
from mtlsproxy.identity import Identity


def denied_by(deny: DenyList, identity: Identity) -> str | None:
    """The kind of deny entry that matches (``sha256``, ``serial``, ``uri``, ``cn``), or None."""
    if identity.sha256 in deny.sha256:
        return "sha256"
    if int(identity.serial, 16) in deny.serials:
        return "serial"
    if any(uri in deny.uris for uri in identity.uris):
        return "uri"
    if identity.cn is not None and identity.cn in deny.cns:
        return "cn"
    return None


def standing(
    identity: Identity, deny: DenyList, now: datetime
) -> tuple[Literal["expired", "denied"], str] | None:
    """Why this certificate may not be used at all now, whatever it asks for: ``("expired",
    <its end, ISO 8601>)`` or ``("denied", <the deny entry's kind>)``; None if it may.

    The one rule for the proxy's connections and requests, its admin listener and the
    renewal service (a resumed TLS session skips OpenSSL's expiry check: this does not).
    """
    if now >= identity.not_after:
        return "expired", identity.not_after.isoformat(timespec="seconds")
    if (kind := denied_by(deny, identity)) is not None:
        return "denied", kind
    return None


class Allow:
    """A route's allow rules with their values normalized once, at load: what a request
    asks is then only comparisons (``rule_matches`` is the same rule, for one rule)."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Sequence[AllowRule]) -> None:
        self._rules = tuple(_Normalized(rule) for rule in rules)

    def admits(self, identity: Identity) -> bool:
        return any(rule.matches(identity) for rule in self._rules)


class _Normalized:
    __slots__ = ("cn", "dns", "empty", "ou", "sha256", "uri", "uri_prefix")

    def __init__(self, rule: AllowRule) -> None:
        self.cn = rule.cn
        self.ou = rule.ou
        self.dns = None if rule.dns is None else _dns(rule.dns)
        self.uri = rule.uri
        self.uri_prefix = rule.uri_prefix
        self.sha256 = None if rule.sha256 is None else _sha256(rule.sha256)
        given = (self.cn, self.ou, self.dns, self.uri, self.uri_prefix, self.sha256)
        self.empty = all(value is None for value in given)

    def matches(self, identity: Identity) -> bool:
        # The config refuses a rule with no field; should one get here anyway, it
        # matches nothing: an empty conjunction must not mean "everyone".
        if self.empty:
            return False
        prefix = self.uri_prefix
        return (
            (self.cn is None or identity.cn == self.cn)
            and (self.ou is None or self.ou in identity.ous)
            and (self.dns is None or any(_dns(d) == self.dns for d in identity.dns))
            and (self.uri is None or self.uri in identity.uris)
            and (prefix is None or any(_under(uri, prefix) for uri in identity.uris))
            and (self.sha256 is None or identity.sha256 == self.sha256)
        )


def _dns(name: str) -> str:
    return name.lower().rstrip(".")


def _sha256(value: str) -> str:
    return value.lower().removeprefix("sha256:").replace(":", "")


def is_allowed(rules: Sequence[AllowRule] | None, identity: Identity) -> bool:
    return rules is None or Allow(rules).admits(identity)


def rule_matches(rule: AllowRule, identity: Identity) -> bool:
    return _Normalized(rule).matches(identity)


def _under(uri: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")
