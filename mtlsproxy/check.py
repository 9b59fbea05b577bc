"""``mtlsproxy check``: load a config and every file it names, exactly as ``serve`` would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mtlsproxy import config
from mtlsproxy.certinfo import summarize
from mtlsproxy.server.proxy import listener_runtime
from mtlsproxy.tls.backend import all_backend_files
from mtlsproxy.tls.credentials import trust_warnings
from mtlsproxy.tls.store import CredentialStore
from mtlsproxy.units import format_duration


def check_config(path: Path) -> str:
    """Raise a ConfigError/CredentialError naming what is wrong, or return a short summary."""
    cfg = config.load(path)
    tls = cfg.tls
    # The store proves every file the proxy will load (server, client CAs, deny list,
    # backend identities) and builds the contexts, exactly as `serve` starts.
    material = CredentialStore(
        tls, backends=all_backend_files(cfg), alpns=[lst.alpn_protocols for lst in cfg.listeners]
    ).current()
    creds = material.credentials
    # The route tables too: everything `serve` refuses before it binds, check refuses.
    for i, listener in enumerate(cfg.listeners):
        listener_runtime(i, listener, cfg, str(path))
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
    for backend, _ in material.backends.values():
        summary = summarize(backend.leaf)
        lines.append(
            f"  backend cert {summary.subject} ({backend.files.cert}), "
            f"{format_duration(summary.not_after - now)} left"
        )
    for listener in cfg.listeners:
        if listener.mode == "http":
            what = f"{len(listener.routes)} route(s)"
        else:
            what = "-> " + ", ".join(str(b) for b in listener.backends)
        lines.append(f"  listener     {listener.listen} {listener.mode}, {what}")
    lines.append(f"  admin        {cfg.admin.listen}")
    lines += [f"warning: {w}" for w in trust_warnings(creds, tls.client_ca)]
    return "\n".join(lines)
