"""What ``mtlsproxy ca show`` prints: a certificate as an operator needs to read it.

Reading a certificate (``summarize``, ``fingerprint``) lives in ``mtlsproxy.certinfo``, a floor
the proxy process may import; this module only renders the summary for a terminal.
"""

from __future__ import annotations

from datetime import UTC, datetime

from mtlsproxy.certinfo import CertificateSummary, fingerprint, summarize
from mtlsproxy.units import format_duration

__all__ = ["CertificateSummary", "fingerprint", "render", "summarize"]


def render(summary: CertificateSummary, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if now < summary.not_before:
        state = f"not valid yet: starts in {format_duration(summary.not_before - now)}"
    elif now >= summary.not_after:
        state = f"EXPIRED {format_duration(now - summary.not_after)} ago"
    else:
        state = f"{format_duration(summary.not_after - now)} left"
    rows = [
        ("subject", summary.subject),
        ("issuer", summary.issuer),
        ("serial", summary.serial),
        ("fingerprint", summary.fingerprint),
        ("SANs", ", ".join(summary.sans) or "(none)"),
        ("key", summary.key),
        ("usage", ", ".join(summary.usage) + (" (CA)" if summary.is_ca else "")),
        ("not before", f"{summary.not_before:%Y-%m-%d %H:%M:%S}Z"),
        ("not after", f"{summary.not_after:%Y-%m-%d %H:%M:%S}Z ({state})"),
    ]
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)
