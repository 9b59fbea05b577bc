"""Checks on the names that go into a certificate, so a typo fails at issue time.

A DNS name with a space or a URI without a scheme would be signed happily by
``cryptography`` and then match nothing, anywhere, forever (well, for 24 hours).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

from cryptography import x509

from mtlsproxy.errors import CAError

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def dns_name(text: str) -> x509.DNSName:
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]  # a wildcard may stand for the leftmost label only
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CAError(f"--dns {text!r} is not a DNS name (letters, digits, '-', dots)")
    return x509.DNSName(name)


def ip_address(text: str) -> x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise CAError(f"--ip {text!r} is not an IPv4 or IPv6 address") from None


def uri(text: str) -> x509.UniformResourceIdentifier:
    parts = urlsplit(text)
    if not parts.scheme or not (parts.netloc or parts.path):
        raise CAError(f"--uri {text!r} is not an absolute URI (e.g. spiffe://game.example/p/1)")
    if parts.scheme == "spiffe" and (why := _spiffe_problem(text, parts)) is not None:
        raise CAError(f"--uri {text!r} is not a valid SPIFFE ID: {why}")
    return x509.UniformResourceIdentifier(text)


def _spiffe_problem(text: str, parts: SplitResult) -> str | None:
    """Why ``text`` breaks the SPIFFE ID rules (spiffe-id.md), or None: a lowercase trust
    domain, no port, user info, query or fragment, and a path without empty, '.' or '..'
    segments."""
    segments = parts.path.split("/")[1:] if parts.path else []
    rules = (
        ("@" in parts.netloc, "the trust domain may not hold user info ('@')"),
        (":" in parts.netloc, "the trust domain may not have a port"),
        (not parts.hostname, "it has no trust domain (spiffe://<trust domain>/<path>)"),
        (
            parts.netloc != parts.netloc.lower(),
            f"the trust domain must be lowercase ({parts.netloc.lower()!r})",
        ),
        ("?" in text, "it may not have a query ('?')"),
        ("#" in text, "it may not have a fragment ('#')"),
        ("" in segments, "its path has an empty segment ('//', or a '/' at the end)"),
        (any(s in (".", "..") for s in segments), "its path may not have '.' or '..' segments"),
    )
    return next((why for broken, why in rules if broken), None)
