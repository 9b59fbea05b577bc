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


def is_allowed(rules: Sequence[AllowRule] | None, identity: Identity) -> bool:
    if rules is None:
        return True
    return any(rule_matches(rule, identity) for rule in rules)


def rule_matches(rule: AllowRule, identity: Identity) -> bool:
    checks: list[bool] = []
    if rule.cn is not None:
        checks.append(identity.cn == rule.cn)
    if rule.ou is not None:
        checks.append(rule.ou in identity.ous)
    if rule.dns is not None:
        want = rule.dns.lower().rstrip(".")
        checks.append(any(d.lower().rstrip(".") == want for d in identity.dns))
    if rule.uri is not None:
        checks.append(rule.uri in identity.uris)
    if rule.uri_prefix is not None:
        checks.append(any(_under(uri, rule.uri_prefix) for uri in identity.uris))
    if rule.sha256 is not None:
        want = rule.sha256.lower().removeprefix("sha256:").replace(":", "")
        checks.append(identity.sha256 == want)
    # The config refuses a rule with no field; should one get here anyway, it matches
    # nothing: an empty conjunction must not mean "everyone".
    return bool(checks) and all(checks)


def _under(uri: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")
