"""``mtlsproxy quickstart``: the embedded default, what ``make run`` runs.

It makes a folder holding a private CA, a server certificate for localhost, a client
certificate and a config (keeping what already exists, re-issuing leaves that are about
to expire: they live 24 hours), starts the demo backend and the proxy in front of it, and
prints commands that work as printed. Ctrl-C stops both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from mtlsproxy import config, demo_backend, pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.errors import CredentialError
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.server.proxy import Proxy

CLIENT_NAME = "demo-player"
CLIENT_SPIFFE_ID = "spiffe://quickstart.mtlsproxy/player/demo"
PROXY_PORT, BACKEND_PORT, ADMIN_PORT = 8443, 8080, 9901
TCP_PORT, TCP_BACKEND_PORT, WS_BACKEND_PORT = 8444, 8081, 8082

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
# No `allow` rules: every client holding a valid certificate from client_ca gets in.
# To narrow it down, add rules; a client is admitted when any one of them matches:
# [[listeners.routes.allow]]
# uri_prefix = "spiffe://quickstart.mtlsproxy/player/"

# WebSocket: /ws upgrades go to the demo WebSocket echo, identity headers included.
[[listeners.routes]]
path_prefix = "/ws"
backends = ["127.0.0.1:{WS_BACKEND_PORT}"]
websocket = true

# A game's own protocol over TCP: the backend first gets a PROXY protocol v2 header
# with the client's address and identity, then the bytes.
[[listeners]]
listen = "127.0.0.1:{TCP_PORT}"
mode = "tcp"
backends = ["127.0.0.1:{TCP_BACKEND_PORT}"]
proxy_protocol = "v2"
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
    """Prepare the folder, then run the demo backend and the proxy until Ctrl-C."""
    files = prepare(folder)
    cfg = config.load(files.config)
    proxy = Proxy(cfg, str(files.config))  # proves every file before anything is bound
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop without draining
        trio.run(_serve, proxy, files)
    print("\nmtlsproxy quickstart: stopped")
    return 0


async def _serve(proxy: Proxy, files: QuickstartFiles) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(demo_backend.serve, "127.0.0.1", BACKEND_PORT)
        await nursery.start(demo_backend.serve_tcp_echo, "127.0.0.1", TCP_BACKEND_PORT)
        await nursery.start(demo_backend.serve_websocket_echo, "127.0.0.1", WS_BACKEND_PORT)
        await nursery.start(proxy.run)
        nursery.start_soon(proxy.watch_signals)
        print(instructions(files), flush=True)
        await proxy.stopped()
        nursery.cancel_scope.cancel()


def instructions(files: QuickstartFiles) -> str:
    rel = _relative_to_cwd
    ca = rel(files.ca_dir / "ca.crt")
    crt, key = rel(files.crt(files.client)), rel(files.key(files.client))
    url = f"https://localhost:{PROXY_PORT}/hello"
    return f"""
mtlsproxy quickstart: everything lives in {rel(files.folder)}/
  proxy        {url}  (mTLS: only certificates from your CA get in)
  demo backend http://127.0.0.1:{BACKEND_PORT}  (loopback only; echoes what the proxy forwards)
  WebSocket    wss://localhost:{PROXY_PORT}/ws -> WebSocket echo 127.0.0.1:{WS_BACKEND_PORT}
  raw TCP      127.0.0.1:{TCP_PORT} -> TCP echo 127.0.0.1:{TCP_BACKEND_PORT} (PROXY protocol v2)
  config       {rel(files.config)}

With the client certificate (the backend answers with the identity it received):
  curl --cacert {ca} --capath /dev/null --cert {crt} --key {key} {url}

Without it (refused during the TLS handshake: "certificate required"):
  curl --cacert {ca} --capath /dev/null {url}

From Python:
  import requests
  requests.get("{url}", verify="{ca}", cert=("{crt}", "{key}")).json()

Shut a client out, live connections included (applied within 2 s):
  mtlsproxy deny add --config {rel(files.config)} {crt}

WebSocket (the echo first sends the identity headers it received):
  {sys.executable} -c "import ssl, trio, trio_websocket as w
ctx = ssl.create_default_context(cafile='{ca}'); ctx.load_cert_chain('{crt}', '{key}')
async def main():
    async with w.open_websocket_url('wss://localhost:{PROXY_PORT}/ws', ssl_context=ctx) as ws:
        print(await ws.get_message()); await ws.send_message('hello'); print(await ws.get_message())
trio.run(main)"

Raw TCP (a game protocol): the echo backend first says who you are, then echoes.
  openssl s_client -connect 127.0.0.1:{TCP_PORT} -CAfile {ca} \\
      -cert {crt} -cert_chain {crt} -key {key} -quiet

Admin: curl http://127.0.0.1:{ADMIN_PORT}/certs   (also /metrics, /readyz; POST /reload)
Ctrl-C stops the proxy and the backend.
"""


def _relative_to_cwd(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
