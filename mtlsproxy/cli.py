"""The ``mtlsproxy`` command: argparse in, one function per verb, project errors out.

Exit codes: 0 success; 2 bad input (usage, config, credential files); 1 anything else the
project refused or could not do; 130 interrupted. Errors print one line to stderr, never a
traceback: a traceback on a bad config is a bug.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509

from mtlsproxy import __version__, cli_lifecycle, config, demo_backend, logs, pem, quickstart
from mtlsproxy.address import Address
from mtlsproxy.check import check_config
from mtlsproxy.client import PrivateTrustContext
from mtlsproxy.denylist import add_entry, describe_entry, parse_deny_list, remove_entry
from mtlsproxy.errors import CredentialError, MtlsProxyError, UsageError
from mtlsproxy.identity import Identity, IdentityError
from mtlsproxy.pki import KEY_TYPES, CertificateAuthority, KeyType
from mtlsproxy.pki.ca import DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL
from mtlsproxy.pki.describe import render, summarize
from mtlsproxy.policy import denied_by
from mtlsproxy.server.run import serve
from mtlsproxy.server.workers import prepare_worker
from mtlsproxy.tls.store import ReloadResult
from mtlsproxy.units import format_duration, parse_duration
from mtlsproxy.workerenv import ENV_WORKER


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # a reader gone away shows here, not at exit
    except BrokenPipeError:
        # `mtlsproxy ca show f | head -1`: the reader has what it wanted. Exit quietly, as
        # a tool killed by SIGPIPE does; stdout now points at /dev/null so the final flush
        # at interpreter exit has nowhere to fail (the Python docs' recipe, "Note on
        # SIGPIPE" in the signal module).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except MtlsProxyError as exc:
        print(f"mtlsproxy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # trio nurseries wrap what their tasks raise; a project error or an interrupt
        # inside one still deserves its one-line message, not a traceback.
        return _exit_for_group(group)


def _exit_for_group(group: BaseExceptionGroup[BaseException]) -> int:
    for exc in _leaves(group):
        if isinstance(exc, MtlsProxyError):
            print(f"mtlsproxy: error: {exc}", file=sys.stderr)
            return exc.exit_code
    if all(isinstance(exc, KeyboardInterrupt) for exc in _leaves(group)):
        return 130
    raise group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def _duration(text: str) -> float:
    if text.strip() == "0":
        return 0.0  # "none at all" needs no unit
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0: any free port)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlsproxy", description="A mutual-TLS reverse proxy that trusts only your own CA."
    )
    parser.add_argument("--version", action="version", version=f"mtlsproxy {__version__}")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")
    config_help = "the proxy's config file (TOML; README.md, Configuration)"

    serve = verbs.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, type=Path, metavar="FILE", help=config_help)
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning"),
        help="diagnostic log level (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        help="diagnostic log format (default: [log] format in the config, else auto: text "
        "on a terminal, JSON otherwise)",
    )
    serve.set_defaults(handler=_serve)

    check = verbs.add_parser("check", help="load a config and the files it names; report")
    check.add_argument("--config", required=True, type=Path, metavar="FILE", help=config_help)
    check.set_defaults(handler=_check)
    _add_reload(verbs)
    _add_quickstart(verbs)
    _add_demo_backend(verbs)
    _add_deny(verbs)
    _add_ca(verbs)
    return parser


def _add_reload(verbs: Any) -> None:
    reload = verbs.add_parser(
        "reload",
        help="make a running proxy reload its certificates, CA bundle and deny list now "
        "(POST /reload on its admin listener)",
    )
    reload.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help="the running proxy's config file: its admin.listen says where to ask",
    )
    reload.add_argument(
        "--cert",
        type=Path,
        metavar="FILE",
        help="with admin.mtls = true: a client certificate from tls.client_ca "
        "(default: none; needed only then)",
    )
    reload.add_argument(
        "--key", type=Path, metavar="FILE", help="the key of --cert (default: none)"
    )
    reload.add_argument(
        "--server-name",
        metavar="NAME",
        help="with admin.mtls = true: the name to check in the proxy's certificate "
        "(default: the admin listener's host)",
    )
    reload.add_argument(
        "--timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="how long to wait for the answer (default: 10s)",
    )
    reload.set_defaults(handler=_reload)


def _add_quickstart(verbs: Any) -> None:
    quick = verbs.add_parser(
        "quickstart",
        help="a CA, certificates and a config, ready to try",
        description="Make (or reuse) a folder with a CA, certificates and a config, then run "
        "the demo backends and the proxy until Ctrl-C. The port options shape the config "
        "when it is written; a config kept from an earlier run keeps its own ports (edit "
        "it, or delete it to have it written again: the CA and certificates are kept).",
    )
    quick.add_argument(
        "--dir",
        type=Path,
        default=Path("mtlsproxy-quickstart"),
        help="the folder for the CA, certificates and config; kept and reused "
        "(default: %(default)s)",
    )
    ports = quickstart.DEFAULT_PORTS
    quick.add_argument(
        "--port",
        type=_port,
        metavar="PORT",
        help=f"the HTTPS and WebSocket listener (default: {ports.https}, or a free port when "
        f"{ports.https} is taken; 0: any free port)",
    )
    quick.add_argument(
        "--tcp-port",
        type=_port,
        metavar="PORT",
        help=f"the raw TCP listener (default: {ports.tcp}, or a free port when it is taken)",
    )
    quick.add_argument(
        "--admin-port",
        type=_port,
        metavar="PORT",
        help=f"the admin listener (default: {ports.admin}, or a free port when it is taken)",
    )
    quick.add_argument(
        "--backend-port",
        type=_port,
        metavar="PORT",
        help="the first of the demo backends' three ports: HTTP, TCP echo, WebSocket echo "
        f"(default: {ports.http_backend}, so {ports.http_backend}-{ports.ws_backend}; a free "
        "port for any that is taken)",
    )
    quick.set_defaults(handler=_quickstart)


def _add_deny(verbs: Any) -> None:
    deny = verbs.add_parser("deny", help="the deny list: add, remove").add_subparsers(
        title="deny commands", metavar="COMMAND"
    )
    deny_config = "the proxy's config file; its tls.deny names the deny list"
    deny_add = deny.add_parser("add", help="deny an identity on every route, live sessions too")
    deny_add.add_argument("--config", required=True, type=Path, metavar="FILE", help=deny_config)
    deny_add.add_argument(
        "entry",
        help="sha256:<hex>, serial:<hex>, uri:<uri>, cn:<name>, or a certificate file "
        "(its fingerprint is added)",
    )
    deny_add.set_defaults(handler=_deny_add)
    deny_remove = deny.add_parser(
        "remove", help="lift a deny entry: every line that denies exactly this"
    )
    deny_remove.add_argument("--config", required=True, type=Path, metavar="FILE", help=deny_config)
    deny_remove.add_argument(
        "entry",
        help="as for `deny add`, in any spelling the deny list accepts (sha256 in either case "
        "or with colons, serial with 0x); a certificate file stands for its fingerprint",
    )
    deny_remove.set_defaults(handler=_deny_remove)


def _add_ca(verbs: Any) -> None:
    ca = verbs.add_parser(
        "ca", help="the private CA: init, issue, show, renew, rotate, retire, serve"
    ).add_subparsers(title="ca commands", metavar="COMMAND")
    init = ca.add_parser("init", help="create a root and an issuing CA in a folder")
    init.add_argument("--dir", required=True, type=Path, help="the CA folder to create")
    init.add_argument("--name", default="mtlsproxy", help="names the CAs (default: %(default)s)")
    init.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa-p256",
        help="the CAs' key type (default: %(default)s)",
    )
    init.add_argument(
        "--root-ttl",
        type=_duration,
        default=DEFAULT_ROOT_TTL.total_seconds(),
        metavar="TTL",
        help=f"the root's lifetime (default: {format_duration(DEFAULT_ROOT_TTL)})",
    )
    init.add_argument(
        "--issuer-ttl",
        type=_duration,
        default=DEFAULT_ISSUER_TTL.total_seconds(),
        metavar="TTL",
        help=f"the issuing CA's lifetime, never past the root's "
        f"(default: {format_duration(DEFAULT_ISSUER_TTL)})",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(handler=_ca_init)

    issue = ca.add_parser("issue", help="issue a server or client certificate")
    issue.add_argument("--dir", required=True, type=Path, help="the CA folder")
    issue.add_argument("--kind", required=True, choices=("server", "client"), help="its EKU")
    issue.add_argument("--name", required=True, help="the subject CN")
    issue.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS SAN; repeatable (default: none; a server certificate without any SAN "
        "gets DNS:NAME)",
    )
    issue.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address SAN; repeatable (default: none)",
    )
    issue.add_argument(
        "--uri",
        action="append",
        default=[],
        metavar="URI",
        help="a URI SAN such as a SPIFFE id; repeatable (default: none)",
    )
    issue.add_argument(
        "--ou",
        action="append",
        default=[],
        metavar="UNIT",
        help="a subject OU; repeatable (default: none)",
    )
    issue.add_argument(
        "--ttl",
        type=_duration,
        default=24 * 3600.0,
        help="the certificate's lifetime, within the issuing CA's (default: 24h)",
    )
    issue.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa-p256",
        help="the certificate's key type (default: %(default)s)",
    )
    issue.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PREFIX",
        help="writes PREFIX.crt (leaf + chain) and PREFIX.key",
    )
    issue.set_defaults(handler=_ca_issue)

    show = ca.add_parser("show", help="describe the certificates in a PEM file")
    show.add_argument("file", type=Path, help="a PEM file of one or more certificates")
    show.add_argument("--json", action="store_true", help="one JSON object per certificate")
    show.set_defaults(handler=_ca_show)
    cli_lifecycle.register(ca, verbs, _duration)


def _serve(args: argparse.Namespace) -> int:
    if os.environ.get(ENV_WORKER) is not None:
        prepare_worker()
    cfg = config.load(args.config)
    logs.configure(args.log_level, args.log_format or cfg.log.format)
    return serve(cfg, str(args.config), args.log_level, args.log_format)


def _check(args: argparse.Namespace) -> int:
    print(check_config(args.config))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    ports = quickstart.requested_ports(
        https=args.port, tcp=args.tcp_port, admin=args.admin_port, backend=args.backend_port
    )
    return quickstart.run(args.dir, ports, command=quickstart.invocation())


def _add_demo_backend(verbs: Any) -> None:
    demo = verbs.add_parser(
        "demo-backend",
        help="the demo game/API backend alone (HTTP, TCP and WebSocket echo), for containers",
    )
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; only the proxy may reach it)",
    )
    demo.add_argument(
        "--http-port", type=int, default=8080, help="the HTTP echo (default: %(default)s)"
    )
    demo.add_argument(
        "--tcp-port",
        type=int,
        default=8081,
        help="the TCP echo, which reads a PROXY v2 header first (default: %(default)s)",
    )
    demo.add_argument(
        "--ws-port", type=int, default=8082, help="the WebSocket echo (default: %(default)s)"
    )
    demo.set_defaults(handler=_demo_backend)


def _demo_backend(args: argparse.Namespace) -> int:
    logs.configure("info")
    demo_backend.run(args.host, args.http_port, args.tcp_port, args.ws_port)
    return 0


def _deny_file(path: Path) -> tuple[config.Config, Path]:
    cfg = config.load(path)
    if cfg.tls.deny is None:
        raise UsageError(
            f'{path}: tls.deny is not set; add `deny = "deny.txt"` under [tls] '
            "(and create the file) to use a deny list"
        )
    return cfg, cfg.tls.deny


def _deny_entry(text: str) -> tuple[str, str, x509.Certificate | None]:
    """``(entry, comment, certificate)`` from what the user typed: an entry (its kind
    lowercased) or a certificate file, which stands for its fingerprint."""
    entry, comment, leaf = text.strip(), "", None
    if ":" not in entry or Path(entry).is_file():
        cert_path = Path(entry)
        leaf = pem.load_certificates(pem.read_file(cert_path), cert_path)[0]
        summary = summarize(leaf)
        entry, comment = summary.fingerprint, f"{summary.subject}, serial {summary.serial}"
    kind = entry.partition(":")[0].strip().lower()
    return f"{kind}:{entry.partition(':')[2].strip()}", comment, leaf


def _deny_add(args: argparse.Namespace) -> int:
    cfg, deny = _deny_file(args.config)
    entry, comment, _ = _deny_entry(args.entry)
    stamp = f"added {datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    if not add_entry(deny, entry, f"{comment}; {stamp}" if comment else stamp):
        print(f"{entry} is already in {deny}")
        return 0
    print(f"denied {entry}: {describe_entry(entry)}" + (f" ({comment})" if comment else ""))
    print(
        f"  written to {deny}; the running proxy applies it within "
        f"{cfg.tls.reload_interval.text} and closes matching live sessions "
        f"(now: {quickstart.invocation()} reload --config {shlex.quote(str(args.config))})"
    )
    return 0


def _deny_remove(args: argparse.Namespace) -> int:
    cfg, deny = _deny_file(args.config)
    entry, comment, leaf = _deny_entry(args.entry)
    entry = _as_read(entry)
    removed, left = remove_entry(deny, entry)
    if not removed:
        raise MtlsProxyError(
            f"nothing in {deny} denies {entry}"
            + (f" ({comment})" if comment else "")
            + f"; the file is unchanged ({len(left)} {'entry' if len(left) == 1 else 'entries'})"
        )
    print(f"lifted {entry}: {describe_entry(entry)}" + (f" ({comment})" if comment else ""))
    for lineno, line in removed:
        print(f"  removed line {lineno}: {line}")
    twice = 2 * cfg.tls.reload_interval.seconds
    within = format_duration(timedelta(seconds=twice)) if twice >= 1 else f"{twice * 1000:g}ms"
    print(
        f"  written to {deny}; a running proxy lets it in again once it has read the file "
        f"unchanged {cfg.tls.reload_interval.text} apart (by itself: within {within}; a "
        "removal waits for a stable file, so a half-written one never lets anyone in)"
    )
    if leaf is not None:
        try:
            kind = denied_by(left, Identity.from_certificate(leaf))
        except IdentityError:
            kind = None
        if kind is not None:
            print(f"  note: {args.entry} is still denied by its {kind} (another line of {deny})")
    return 0


def _as_read(entry: str) -> str:
    """The entry as the deny list reads it: a fingerprint in lowercase hex without
    colons, a serial in hex without leading zeros."""
    parsed = parse_deny_list(entry, "the entry")
    for digest in parsed.sha256:
        return f"sha256:{digest}"
    for serial in parsed.serials:
        return f"serial:{serial:x}"
    return entry


def _reload(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    listen = cfg.admin.listen
    where = f"admin.listen in {args.config}"
    if listen.port == 0:
        raise UsageError(
            f"{args.config}: admin.listen {listen} has no fixed port, so there is no address "
            "to ask; give it a port, or send the proxy SIGHUP"
        )
    peer = quickstart.reachable(listen)
    conn = http.client.HTTPConnection(peer.host, peer.port, timeout=args.timeout)
    scheme = "http"
    try:
        if cfg.admin.mtls:
            scheme = "https"
            conn.sock = _admin_tls(cfg, args, peer)
        conn.request("POST", "/reload")
        answer = conn.getresponse()
        body = answer.read()
    except ssl.SSLCertVerificationError as exc:
        raise MtlsProxyError(
            f"{scheme}://{peer}/reload ({where}): its certificate does not verify against "
            f"{cfg.tls.server_ca or cfg.tls.client_ca} ({exc.verify_message})"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise MtlsProxyError(
            f"cannot reach the proxy's admin listener at {scheme}://{peer} ({where}): "
            f"{reason}; is the proxy running with this config?"
        ) from exc
    finally:
        conn.close()
    text = body.decode("utf-8", "replace").strip()
    if answer.status not in (200, 422):
        raise MtlsProxyError(f"{scheme}://{peer}/reload answered {answer.status}: {text}")
    try:
        result = msgspec.json.decode(body, type=ReloadResult)  # what admin.py sends
    except msgspec.DecodeError as exc:  # ValidationError included
        raise MtlsProxyError(f"{scheme}://{peer}/reload answered {answer.status}: {text}") from exc
    outcome, generation, error = result.result, result.generation, result.error
    if answer.status == 422:
        raise MtlsProxyError(
            f"the proxy at {peer} refused the files and keeps serving with what it had "
            f"(generation {generation}): {error}"
        )
    if outcome == "swapped":
        print(f"reloaded: the proxy at {peer} now serves generation {generation}")
    else:
        print(f"reloaded: nothing new for the proxy at {peer} (generation {generation})")
    return 0


def _admin_tls(cfg: config.Config, args: argparse.Namespace, peer: Address) -> ssl.SSLSocket:
    """admin.mtls = true: TLS to the admin listener, trusting only the proxy's own CA."""
    if args.cert is None or args.key is None:
        raise UsageError(
            f"{args.config}: the admin listener {peer} requires a client certificate "
            "(admin.mtls = true): pass --cert and --key"
        )
    ctx = PrivateTrustContext(cfg.tls.server_ca or cfg.tls.client_ca)
    try:
        ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(args.cert, f"cannot be used with {args.key}: {exc}") from exc
    raw = socket.create_connection((peer.host, peer.port), timeout=args.timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=args.server_name or peer.host)
    except BaseException:
        raw.close()
        raise


def _ca_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(
        args.dir,
        name=args.name,
        key_type=args.key_type,
        root_ttl=timedelta(seconds=args.root_ttl),
        issuer_ttl=timedelta(seconds=args.issuer_ttl),
        force=args.force,
    )
    print(f"created a CA in {args.dir}")
    for role, cert in (("root", ca.root), ("issuer", ca.issuer)):
        print(f"  {role:<7} {cert.subject.rfc4514_string()}, until {cert.not_valid_after_utc:%F}")
    print(f"  trust bundle: {args.dir / 'ca.crt'}  (point client_ca and clients' verify here)")
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    key_type: KeyType = args.key_type
    ca = CertificateAuthority.load(args.dir)
    issued = ca.issue(
        kind=args.kind,
        name=args.name,
        dns=args.dns,
        ips=args.ip,
        uris=args.uri,
        ous=args.ou,
        ttl=timedelta(seconds=args.ttl),
        key_type=key_type,
    )
    cert_path, key_path = issued.write(args.out)
    summary = summarize(issued.certificate)
    print(f"issued a {args.kind} certificate for {summary.subject}")
    print(f"  SANs         {', '.join(summary.sans) or '(none)'}")
    print(f"  fingerprint  {summary.fingerprint}")
    left = format_duration(summary.not_after - datetime.now(UTC))
    print(f"  valid until  {summary.not_after:%Y-%m-%d %H:%M:%S}Z ({left} from now)")
    print(f"  wrote        {cert_path} (leaf + chain), {key_path} (0600)")
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    certs = pem.load_certificates(pem.read_file(args.file), args.file)
    summaries = [summarize(c) for c in certs]
    if args.json:
        for s in summaries:
            print(msgspec.json.encode(s).decode())
        return 0
    for n, s in enumerate(summaries):
        if len(certs) > 1:
            print(f"--- certificate {n + 1} of {len(certs)}")
        print(render(s))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
