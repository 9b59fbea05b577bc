"""``mtlsproxy quickstart``: the embedded default, what ``make run`` runs.

It makes a folder holding a private CA, a server certificate for localhost, a client
certificate and a config (keeping what already exists, re-issuing leaves that are about
to expire: they live 24 hours), then prints commands that work as printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mtlsproxy import pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.check import check_config
from mtlsproxy.errors import CredentialError
from mtlsproxy.pki import CertificateAuthority

CLIENT_NAME = "demo-player"
CLIENT_SPIFFE_ID = "spiffe://quickstart.mtlsproxy/player/demo"
PROXY_PORT, BACKEND_PORT, ADMIN_PORT = 8443, 8080, 9901

CONFIG = f"""\
# Written by `mtlsproxy quickstart`; edit freely, it is kept on the next run.
# Every key and its default: README.md, "Configuration".
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca/ca.crt"
deny = "deny.txt"

[admin]
listen = "127.0.0.1:{ADMIN_PORT}"

[[listeners]]
listen = "127.0.0.1:{PROXY_PORT}"
mode = "http"

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{BACKEND_PORT}"]
"""

DENY = """\
# One identity a line: sha256:<hex>, serial:<hex>, uri:<uri>, cn:<name>.
# `mtlsproxy ca show client.crt` prints a certificate's fingerprint.
"""


@dataclass(frozen=True)
class QuickstartFiles:
    folder: Path
    ca_dir: Path
    server: Path  # prefix: server.crt / server.key
    client: Path
    config: Path

    def crt(self, prefix: Path) -> Path:
        return prefix.with_name(prefix.name + ".crt")

    def key(self, prefix: Path) -> Path:
        return prefix.with_name(prefix.name + ".key")


def prepare(folder: Path, now: datetime | None = None) -> QuickstartFiles:
    now = now or datetime.now(UTC)
    files = QuickstartFiles(
        folder, folder / "ca", folder / "server", folder / "client", folder / "mtlsproxy.toml"
    )
    folder.mkdir(parents=True, exist_ok=True)
    if (files.ca_dir / "ca.crt").exists():
        ca = CertificateAuthority.load(files.ca_dir)
    else:
        ca = CertificateAuthority.init(files.ca_dir, name="mtlsproxy quickstart")
    if _needs_issue(files.crt(files.server), now):
        ca.issue(
            kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1", "::1"]
        ).write(files.server)
    if _needs_issue(files.crt(files.client), now):
        ca.issue(kind="client", name=CLIENT_NAME, ous=["players"], uris=[CLIENT_SPIFFE_ID]).write(
            files.client
        )
    if not files.config.exists():
        write_atomic(files.config, CONFIG.encode())
    if not (folder / "deny.txt").exists():
        write_atomic(folder / "deny.txt", DENY.encode())
    return files


def _needs_issue(cert_path: Path, now: datetime) -> bool:
    """Missing, unreadable, or within an hour of expiry: issue a fresh one."""
    try:
        leaf = pem.load_certificates(pem.read_file(cert_path), cert_path)[0]
    except CredentialError:
        return True
    return leaf.not_valid_after_utc - now < timedelta(hours=1)


def run(folder: Path) -> int:
    files = prepare(folder)
    rel = _relative_to_cwd
    print(f"mtlsproxy quickstart: everything lives in {rel(folder)}/")
    print(check_config(files.config))
    ca, issuer = rel(files.ca_dir / "ca.crt"), rel(files.ca_dir / "issuer.crt")
    crt, key = rel(files.crt(files.client)), rel(files.key(files.client))
    s_crt, s_key = rel(files.crt(files.server)), rel(files.key(files.server))
    print(
        f"""
The client certificate chains to your private CA:
  openssl verify -CAfile {ca} -untrusted {issuer} {crt}

Until `mtlsproxy serve` lands (issue "The mTLS HTTP/1.1 reverse proxy"), OpenSSL can play
the server that trusts only this CA. In one terminal:
  openssl s_server -accept {PROXY_PORT} -cert {s_crt} -cert_chain {s_crt} -key {s_key} \\
      -CAfile {ca} -Verify 1 -verify_return_error -www
In another, with the client certificate (and without it, to see the refusal):
  curl --cacert {ca} --cert {crt} --key {key} https://localhost:{PROXY_PORT}/
  curl --cacert {ca} https://localhost:{PROXY_PORT}/
Describe a certificate: mtlsproxy ca show {crt}"""
    )
    return 0


def _relative_to_cwd(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
