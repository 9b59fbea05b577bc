"""``mtlsproxy check``: load a config and every file it names, exactly as ``serve`` would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mtlsproxy import config
from mtlsproxy.pki.describe import summarize
from mtlsproxy.tls.credentials import load_credentials
from mtlsproxy.units import format_duration


def check_config(path: Path) -> str:
    """Raise a ConfigError/CredentialError naming what is wrong, or return a short summary."""
    cfg = config.load(path)
    tls = cfg.tls
    creds = load_credentials(tls.cert, tls.key, tls.client_ca, tls.deny)
    now = datetime.now(UTC)
    leaf = summarize(creds.leaf)
    lines = [
        f"{path}: ok",
        f"  server cert  {leaf.subject} [{', '.join(leaf.sans) or 'no SANs'}], "
        f"{format_duration(leaf.not_after - now)} left, chain of {len(creds.cert_chain)}",
        f"  client CAs   {len(creds.client_cas)}: "
        + "; ".join(ca.subject.rfc4514_string() for ca in creds.client_cas),
        f"  deny list    {len(creds.deny)} entries" + (f" ({tls.deny})" if tls.deny else ""),
    ]
    for listener in cfg.listeners:
        if listener.mode == "http":
            what = f"{len(listener.routes)} route(s)"
        else:
            what = "-> " + ", ".join(str(b) for b in listener.backends)
        lines.append(f"  listener     {listener.listen} {listener.mode}, {what}")
    lines.append(f"  admin        {cfg.admin.listen}")
    return "\n".join(lines)
