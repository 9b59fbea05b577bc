"""``mtlsproxy quickstart``: the embedded default, what ``make run`` runs.

It makes a folder holding a private CA, a server certificate for localhost, a client
certificate and a config (keeping what already exists, re-issuing leaves that are about
to expire: they live 24 hours), starts the demo backends and the proxy in front of them,
and prints commands that work as printed. Ctrl-C stops both.

"As printed" means pasted into a fresh shell in the same folder: commands name the
``mtlsproxy`` that is running by its path (``.venv/bin/mtlsproxy``: a virtualenv's ``bin``
is not on a fresh shell's PATH), and every address comes from the config as it is, not
from the defaults. The ports are chosen when the config is written: the options, else
the defaults (8443, 8444, 9901, 8080-8082), else a free port for a default that is taken.
A kept config keeps its ports; the demo backends start where its routes point. A deny
list that refuses the demo client is said, with the command that lifts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from mtlsproxy import config, demo_backend, pem
from mtlsproxy.address import Address
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.denylist import parse_deny_list
from mtlsproxy.errors import CredentialError, UsageError
from mtlsproxy.identity import Identity
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.policy import denied_by
from mtlsproxy.server.proxy import Bound, Proxy

CLIENT_NAME = "demo-player"
CLIENT_SPIFFE_ID = "spiffe://quickstart.mtlsproxy/player/demo"
PROXY_PORT, BACKEND_PORT, ADMIN_PORT = 8443, 8080, 9901
TCP_PORT, TCP_BACKEND_PORT, WS_BACKEND_PORT = 8444, 8081, 8082


@dataclass(frozen=True)
class Ports:
    """The ports a quickstart config is written with."""

    https: int = PROXY_PORT
    tcp: int = TCP_PORT
    admin: int = ADMIN_PORT
    http_backend: int = BACKEND_PORT
    tcp_backend: int = TCP_BACKEND_PORT
    ws_backend: int = WS_BACKEND_PORT


DEFAULT_PORTS = Ports()
_WHAT = {
    "https": ("the HTTPS listener", "--port"),
    "tcp": ("the raw TCP listener", "--tcp-port"),
    "admin": ("the admin listener", "--admin-port"),
    "http_backend": ("the demo HTTP backend", "--backend-port"),
    "tcp_backend": ("the TCP echo backend", "--backend-port"),
    "ws_backend": ("the WebSocket echo backend", "--backend-port"),
}

_TEMPLATE = """\
# Written by `mtlsproxy quickstart`; edit freely, it is kept on the next run.
# Every key and its default: README.md, "Configuration".
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca/ca.crt"
deny = "deny.txt"

[admin]
listen = "127.0.0.1:{admin}"

[[listeners]]
listen = "127.0.0.1:{https}"
mode = "http"

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{http_backend}"]
# No `allow` rules: every client holding a valid certificate from client_ca gets in.
# To narrow it down, add rules; a client is admitted when any one of them matches:
# [[listeners.routes.allow]]
# uri_prefix = "spiffe://quickstart.mtlsproxy/player/"

# WebSocket: /ws upgrades go to the demo WebSocket echo, identity headers included.
[[listeners.routes]]
path_prefix = "/ws"
backends = ["127.0.0.1:{ws_backend}"]
websocket = true

# A game's own protocol over TCP: the backend first gets a PROXY protocol v2 header
# with the client's address and identity, then the bytes.
[[listeners]]
listen = "127.0.0.1:{tcp}"
mode = "tcp"
backends = ["127.0.0.1:{tcp_backend}"]
proxy_protocol = "v2"
"""


def config_text(ports: Ports = DEFAULT_PORTS) -> str:
    return _TEMPLATE.format(**asdict(ports))


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


def prepare(
    folder: Path, now: datetime | None = None, ports: Ports = DEFAULT_PORTS
) -> QuickstartFiles:
    """Make what is missing; ``ports`` shape the config only when it is written."""
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
        write_atomic(files.config, config_text(ports).encode())
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


# ---- ports -------------------------------------------------------------------------------


def requested_ports(
    https: int | None = None,
    tcp: int | None = None,
    admin: int | None = None,
    backend: int | None = None,
) -> dict[str, int]:
    """The ports asked for on the command line (0: any free port); ``backend`` is the first
    of the three demo backends' (HTTP, TCP echo, WebSocket echo)."""
    asked = {"https": https, "tcp": tcp, "admin": admin}
    if backend is not None:
        if backend > 65535 - 2:
            raise UsageError(f"--backend-port {backend}: it and the next two must be ports")
        step = 1 if backend else 0  # 0: three free ports
        asked |= {
            "http_backend": backend,
            "tcp_backend": backend + step,
            "ws_backend": backend + 2 * step,
        }
    return {name: port for name, port in asked.items() if port is not None}


def choose_ports(
    requested: Mapping[str, int], defaults: Ports = DEFAULT_PORTS
) -> tuple[Ports, list[str]]:
    """Ports for a new config: what was asked for, else the default, else (a default that
    is taken, or 0) a free port; and a note for each default that had to move."""
    chosen = {name: port for name, port in requested.items() if port}
    notes: list[str] = []
    held: list[socket.socket] = []  # held until all are chosen: no port is chosen twice
    try:
        for name in (f.name for f in fields(Ports)):
            if name in chosen:
                continue
            default = getattr(defaults, name)
            free = name not in requested and default not in chosen.values()
            if free and (sock := _hold(Address("127.0.0.1", default))) is not None:
                held.append(sock)
                chosen[name] = default
                continue
            sock = None
            if name not in requested:
                # Near the default, below the ephemeral range (a port from there would be
                # written to the kept config and be taken by some client now and then).
                taken = {*chosen.values(), *(getattr(defaults, f.name) for f in fields(Ports))}
                for port in range(default + 100, min(default + 1100, 32768), 100):
                    if port not in taken and (sock := _hold(Address("127.0.0.1", port))):
                        break
            sock = sock or _hold(Address("127.0.0.1", 0))
            if sock is None:
                raise UsageError("no free port on 127.0.0.1")
            held.append(sock)
            chosen[name] = sock.getsockname()[1]
            if name not in requested:
                what, option = _WHAT[name]
                notes.append(
                    f"port {default} is in use: {what} gets {chosen[name]} instead "
                    f"(written to the config; {option} picks another)"
                )
    finally:
        for sock in held:
            sock.close()
    return Ports(**chosen), notes


def _hold(address: Address) -> socket.socket | None:
    """A socket bound to ``address`` as a listener would bind it, or None when taken (or
    not a numeric address: the real bind will say)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners
        sock.bind((address.host, address.port))
    except OSError:
        sock.close()
        return None
    return sock


def _in_use(address: Address) -> bool:
    sock = _hold(address)
    if sock is None:
        try:
            socket.inet_pton(
                socket.AF_INET6 if ":" in address.host else socket.AF_INET, address.host
            )
        except OSError:
            return False  # a name: let the real bind speak
        return True
    sock.close()
    return False


# ---- what the config says ----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the pieces are, read from the config as it is (and from the bound sockets,
    for a port 0)."""

    https: Address | None  # the first http listener
    https_key: str
    ws_path: str | None  # the first WebSocket route on it
    tcp: Address | None  # the first tcp listener
    tcp_key: str
    admin: Address
    admin_mtls: bool
    http_backends: tuple[Address, ...]  # loopback backends: where demo backends may start
    ws_backends: tuple[Address, ...]
    tcp_backends: tuple[Address, ...]
    deny: Path | None
    reload_interval: str


def layout(cfg: config.Config, bound: Sequence[Bound] = ()) -> Layout:
    def actual(label: str, address: Address) -> Address:
        if address.port:
            return address
        return next((b.address for b in bound if b.listener == label), address)

    https = tcp = None
    https_key = tcp_key = ""
    ws_path = None
    http_b: list[Address] = []
    ws_b: list[Address] = []
    tcp_b: list[Address] = []
    for i, listener in enumerate(cfg.listeners):
        if listener.mode == "http":
            if https is None:
                https, https_key = actual(listener.label, listener.listen), f"listeners[{i}].listen"
                ws_path = next((r.path_prefix for r in listener.routes if r.websocket), None)
            for route in listener.routes:
                (ws_b if route.websocket else http_b).extend(route.backends)
        else:
            if tcp is None:
                tcp, tcp_key = actual(listener.label, listener.listen), f"listeners[{i}].listen"
            tcp_b.extend(listener.backends)

    def mine(found: list[Address], *taken: list[Address]) -> tuple[Address, ...]:
        seen = {a for t in taken for a in t}
        return tuple(a for a in dict.fromkeys(found) if a.is_loopback and a not in seen)

    return Layout(
        https=https,
        https_key=https_key,
        ws_path=ws_path,
        tcp=tcp,
        tcp_key=tcp_key,
        admin=actual("admin", cfg.admin.listen),
        admin_mtls=cfg.admin.mtls,
        http_backends=mine(http_b),
        ws_backends=mine(ws_b, http_b),
        tcp_backends=mine(tcp_b, http_b, ws_b),
        deny=cfg.tls.deny,
        reload_interval=cfg.tls.reload_interval.text,
    )


def _kept_config_conflicts(lay: Layout, requested: Mapping[str, int], path: Path) -> None:
    """Options that ask for other ports than a kept config has: say so, change nothing."""
    have: dict[str, tuple[Address | None, str]] = {
        "https": (lay.https, lay.https_key),
        "tcp": (lay.tcp, lay.tcp_key),
        "admin": (lay.admin, "admin.listen"),
        "http_backend": (next(iter(lay.http_backends), None), "the / route's backends"),
        "tcp_backend": (next(iter(lay.tcp_backends), None), "the tcp listener's backends"),
        "ws_backend": (next(iter(lay.ws_backends), None), "the /ws route's backends"),
    }
    wrong = []
    for name, port in requested.items():
        address, key = have[name]
        if port and (address is None or address.port != port):
            option = _WHAT[name][1]
            wrong.append(f"{option} {port}, but {key} is {address or 'not there'}")
    if wrong:
        raise UsageError(
            f"{path} is kept from an earlier run and has its own ports ({'; '.join(wrong)}). "
            "Port options shape a new config only: edit that file, or delete it to have it "
            "written with these ports (the CA and certificates are kept)"
        )


def _check_listeners_free(lay: Layout, path: Path) -> None:
    listeners = ((lay.https, lay.https_key), (lay.tcp, lay.tcp_key), (lay.admin, "admin.listen"))
    for address, key in listeners:
        if address is not None and address.port and _in_use(address):
            raise UsageError(
                f"{address} ({key} in {path}) is in use: stop what listens there (another "
                f"quickstart?), or change {key} in that file"
            )


def denied_entries(files: QuickstartFiles, cfg: config.Config) -> list[tuple[int, str]]:
    """The deny list's lines that refuse the demo client: ``(line number, entry)``, the
    entry spelt as ``deny remove`` takes it. Matching is the proxy's own (``denied_by``)."""
    if cfg.tls.deny is None:
        return []
    leaf_path = files.crt(files.client)
    identity = Identity.from_certificate(
        pem.load_certificates(pem.read_file(leaf_path), leaf_path)[0]
    )
    text = cfg.tls.deny.read_text(encoding="utf-8")
    parse_deny_list(text, cfg.tls.deny)  # the whole file first: it names a bad line
    found = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        entry = parse_deny_list(line, cfg.tls.deny)
        kind = denied_by(entry, identity)
        if kind == "sha256":
            found.append((lineno, identity.fingerprint))
        elif kind == "serial":
            found.append((lineno, f"serial:{identity.serial}"))
        elif kind == "uri":
            found.append((lineno, "uri:" + next(u for u in identity.uris if u in entry.uris)))
        elif kind == "cn":
            found.append((lineno, f"cn:{identity.cn}"))
    return found


# ---- running -----------------------------------------------------------------------------


def run(folder: Path, ports: Mapping[str, int] | None = None, *, command: str = "mtlsproxy") -> int:
    """Prepare the folder, then run the demo backends and the proxy until Ctrl-C.

    ``ports``: as ``requested_ports`` returns; ``command``: how printed commands run
    mtlsproxy (``cli.invocation()``)."""
    requested = dict(ports or {})
    notes: list[str] = []
    chosen = DEFAULT_PORTS
    kept = (folder / "mtlsproxy.toml").exists()
    if not kept:
        chosen, notes = choose_ports(requested)
    files = prepare(folder, ports=chosen)
    cfg = config.load(files.config)
    lay = layout(cfg)
    if kept:
        _kept_config_conflicts(lay, requested, files.config)
    _check_listeners_free(lay, files.config)
    proxy = Proxy(cfg, str(files.config))  # proves every file before anything is bound
    warnings = [*notes, *_denied_warnings(files, cfg, command)]
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop without draining
        trio.run(_serve, proxy, files, cfg, command, warnings)
    print("\nmtlsproxy quickstart: stopped")
    return 0


def _denied_warnings(files: QuickstartFiles, cfg: config.Config, command: str) -> list[str]:
    found = denied_entries(files, cfg)
    if not found or cfg.tls.deny is None:
        return []
    rel = _relative_to_cwd
    lines = [
        f"the demo client ({rel(files.crt(files.client))}) is on the deny list, so the proxy "
        "refuses it (403) and the commands above that use its certificate fail:"
    ]
    for lineno, entry in found:
        lines.append(f"    {rel(cfg.tls.deny)} line {lineno}: {entry}")
    for entry in dict.fromkeys(entry for _, entry in found):
        lines.append(f"  undo: {command} deny remove --config {_q(rel(files.config))} {_q(entry)}")
    return ["\n".join(lines)]


async def _serve(
    proxy: Proxy,
    files: QuickstartFiles,
    cfg: config.Config,
    command: str,
    warnings: list[str],
) -> None:
    lay = layout(cfg)
    demos: list[tuple[Any, Sequence[Address], str]] = [
        (demo_backend.serve, lay.http_backends, "HTTP backend"),
        (demo_backend.serve_tcp_echo, lay.tcp_backends, "TCP echo"),
        (demo_backend.serve_websocket_echo, lay.ws_backends, "WebSocket echo"),
    ]
    async with trio.open_nursery() as nursery:
        for serve, addresses, what in demos:
            for address in addresses:
                if _in_use(address):
                    warnings.append(
                        f"{address} is in use, so the demo {what} does not start there: the "
                        "proxy forwards to whatever listens on it"
                    )
                    continue
                await nursery.start(serve, address.host, address.port)
        bound = await nursery.start(proxy.run)
        # "Ctrl-C stops" holds once printed: the watcher's receiver is installed first (a
        # Ctrl-C before that would interrupt instead of draining).
        await nursery.start(proxy.watch_signals)
        print(instructions(files, layout(cfg, bound), command, warnings), flush=True)
        await proxy.stopped()
        nursery.cancel_scope.cancel()


def instructions(files: QuickstartFiles, lay: Layout, command: str, warnings: Sequence[str]) -> str:
    rel = _relative_to_cwd
    a, c, k = (
        rel(files.ca_dir / "ca.crt"),
        rel(files.crt(files.client)),
        rel(files.key(files.client)),
    )
    ca, crt, key, cfg_file = _q(a), _q(c), _q(k), _q(rel(files.config))
    tls = f"--cacert {ca} --capath /dev/null"
    out = [f"\nmtlsproxy quickstart: everything lives in {rel(files.folder)}/"]
    url = ws_url = None
    if lay.https is not None:
        base = f"https://{_url_host(lay.https)}"
        url = f"{base}/hello"
        out.append(f"  proxy        {url}  (mTLS: only certificates from your CA get in)")
    for backend in lay.http_backends[:1]:
        out.append(
            f"  demo backend http://{backend}  (loopback only; echoes what the proxy forwards)"
        )
    if lay.https is not None and lay.ws_path is not None:
        ws_url = f"wss://{_url_host(lay.https)}{lay.ws_path}"
        echo = f" -> WebSocket echo {lay.ws_backends[0]}" if lay.ws_backends else ""
        out.append(f"  WebSocket    {ws_url}{echo}")
    if lay.tcp is not None:
        echo = f" -> TCP echo {lay.tcp_backends[0]}" if lay.tcp_backends else ""
        out.append(f"  raw TCP      {_connect(lay.tcp)}{echo} (PROXY protocol v2)")
    out.append(f"  config       {rel(files.config)}")
    if url is not None:
        out += [
            "",
            "With the client certificate (the backend answers with the identity it received):",
            f"  curl {tls} --cert {crt} --key {key} {url}",
            "",
            'Without it (refused during the TLS handshake: "certificate required"):',
            f"  curl {tls} {url}",
            "",
            "From Python (the standard library here; for requests and httpx see mtlsproxy.client):",
            f'  {_q(_shortest(sys.executable))} -c "import json, ssl, urllib.request as u; '
            f"ctx = ssl.create_default_context(cafile='{a}'); ctx.load_cert_chain('{c}', '{k}'); "
            f"print(json.load(u.urlopen('{url}', context=ctx))['headers'])\"",
        ]
    if lay.deny is not None:
        out += [
            "",
            f"Shut a client out, live connections included (applied within {lay.reload_interval};"
            " `deny remove` lifts it):",
            f"  {command} deny add --config {cfg_file} {crt}",
        ]
    if ws_url is not None:
        python = _q(_shortest(sys.executable))
        out += [
            "",
            "WebSocket (the echo first sends the identity headers it received):",
            f'''  {python} -c "import ssl, trio, trio_websocket as w
ctx = ssl.create_default_context(cafile='{a}'); ctx.load_cert_chain('{c}', '{k}')
async def main():
    async with w.open_websocket_url('{ws_url}', ssl_context=ctx) as ws:
        print(await ws.get_message()); await ws.send_message('hello'); print(await ws.get_message())
trio.run(main)"''',
        ]
    if lay.tcp is not None:
        out += [
            "",
            "Raw TCP (a game protocol): the echo backend first says who you are, then echoes.",
            f"  openssl s_client -connect {_connect(lay.tcp)} -CAfile {ca} \\",
            f"      -cert {crt} -cert_chain {crt} -key {key} -quiet",
        ]
    admin = f"http://{_connect(lay.admin)}"
    admin_curl = f"curl {admin}/certs"
    client = ""
    if lay.admin_mtls:
        admin = f"https://{_connect(lay.admin)}"
        admin_curl = f"curl {tls} --cert {crt} --key {key} {admin}/certs"
        client = f" --cert {crt} --key {key}"
    out += [
        "",
        f"Admin: {admin_curl}   (also /metrics, /readyz; POST /reload)",
        "Reload the certificates, CA bundle and deny list now (the proxy also polls them):",
        f"  {command} reload --config {cfg_file}{client}",
    ]
    for warning in warnings:
        out += ["", f"warning: {warning}"]
    out.append("Ctrl-C stops the proxy and the backend.")
    return "\n".join(out) + "\n"


# Not a bind: where a client reaches a listener bound to every address.
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def reachable(address: Address) -> Address:
    """The address a local client connects to for a listen address."""
    return Address(_WILDCARD.get(address.host, address.host), address.port)


def _url_host(address: Address) -> str:
    """The server certificate names localhost, 127.0.0.1 and ::1."""
    if address.is_loopback or address.host in _WILDCARD:
        return f"localhost:{address.port}"
    return str(address)


def _connect(address: Address) -> str:
    return str(reachable(address))


def _q(text: str) -> str:
    return shlex.quote(text)


def invocation() -> str:
    """How to run this same mtlsproxy from a fresh shell in the current folder, where a
    virtualenv's ``bin`` is not on PATH: the executable's path, relative when shorter
    (``.venv/bin/mtlsproxy``), or ``<python> -m mtlsproxy`` under ``python -m``."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "mtlsproxy"
    if Path(argv0).name == "__main__.py":
        return f"{_q(_shortest(sys.executable))} -m mtlsproxy"
    return _q(_shortest(argv0 if os.sep in argv0 else shutil.which(argv0) or argv0))


def _shortest(path: str) -> str:
    absolute = os.path.abspath(path)  # noqa: PTH100 - keep a venv's symlinks as they are
    relative = _relative_to_cwd(Path(absolute))
    shown = relative if len(relative) < len(absolute) else absolute
    # A bare name would be looked up on PATH.
    return shown if os.sep in shown else os.curdir + os.sep + shown


def _relative_to_cwd(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
