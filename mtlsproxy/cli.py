"""The ``mtlsproxy`` command: argparse in, one function per verb, project errors out.

Exit codes: 0 success; 2 bad input (usage, config, credential files); 1 anything else the
project refused or could not do; 130 interrupted. Errors print one line to stderr, never a
traceback: a traceback on a bad config is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from mtlsproxy import __version__, cli_lifecycle, config, demo_backend, logs, pem, quickstart
from mtlsproxy.check import check_config
from mtlsproxy.denylist import add_entry, describe_entry
from mtlsproxy.errors import MtlsProxyError, UsageError
from mtlsproxy.pki import KEY_TYPES, CertificateAuthority, KeyType
from mtlsproxy.pki.ca import DEFAULT_ISSUER_TTL, DEFAULT_ROOT_TTL
from mtlsproxy.pki.describe import render, summarize
from mtlsproxy.server.run import serve
from mtlsproxy.server.workers import prepare_worker
from mtlsproxy.units import format_duration, parse_duration
from mtlsproxy.workerenv import ENV_WORKER


def main(argv: Sequence[str] | None = None) -> int:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlsproxy", description="A mutual-TLS reverse proxy that trusts only your own CA."
    )
    parser.add_argument("--version", action="version", version=f"mtlsproxy {__version__}")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = verbs.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, type=Path, metavar="FILE")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    serve.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        help="diagnostic log format (default: [log] format in the config, else auto: text "
        "on a terminal, JSON otherwise)",
    )
    serve.set_defaults(handler=_serve)

    check = verbs.add_parser("check", help="load a config and the files it names; report")
    check.add_argument("--config", required=True, type=Path, metavar="FILE")
    check.set_defaults(handler=_check)

    quick = verbs.add_parser("quickstart", help="a CA, certificates and a config, ready to try")
    quick.add_argument("--dir", type=Path, default=Path("mtlsproxy-quickstart"))
    quick.set_defaults(handler=_quickstart)

    _add_demo_backend(verbs)

    deny = verbs.add_parser("deny", help="the deny list").add_subparsers(
        title="deny commands", metavar="COMMAND"
    )
    deny_add = deny.add_parser("add", help="deny an identity on every route, live sessions too")
    deny_add.add_argument("--config", required=True, type=Path, metavar="FILE")
    deny_add.add_argument(
        "entry",
        help="sha256:<hex>, serial:<hex>, uri:<uri>, cn:<name>, or a certificate file "
        "(its fingerprint is added)",
    )
    deny_add.set_defaults(handler=_deny_add)

    ca = verbs.add_parser(
        "ca", help="the private CA: init, issue, show, renew, rotate, retire, serve"
    ).add_subparsers(title="ca commands", metavar="COMMAND")
    init = ca.add_parser("init", help="create a root and an issuing CA in a folder")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--name", default="mtlsproxy", help="names the CAs (default: mtlsproxy)")
    init.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256")
    init.add_argument(
        "--root-ttl", type=_duration, default=DEFAULT_ROOT_TTL.total_seconds(), metavar="TTL"
    )
    init.add_argument(
        "--issuer-ttl", type=_duration, default=DEFAULT_ISSUER_TTL.total_seconds(), metavar="TTL"
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(handler=_ca_init)

    issue = ca.add_parser("issue", help="issue a server or client certificate")
    issue.add_argument("--dir", required=True, type=Path, help="the CA folder")
    issue.add_argument("--kind", required=True, choices=("server", "client"))
    issue.add_argument("--name", required=True, help="the subject CN")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR")
    issue.add_argument("--uri", action="append", default=[], metavar="URI")
    issue.add_argument("--ou", action="append", default=[], metavar="UNIT")
    issue.add_argument("--ttl", type=_duration, default=24 * 3600.0, help="default 24h")
    issue.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256")
    issue.add_argument("--out", required=True, type=Path, metavar="PREFIX")
    issue.set_defaults(handler=_ca_issue)

    show = ca.add_parser("show", help="describe the certificates in a PEM file")
    show.add_argument("file", type=Path)
    show.add_argument("--json", action="store_true", help="one JSON object per certificate")
    show.set_defaults(handler=_ca_show)
    cli_lifecycle.register(ca, verbs, _duration)
    return parser


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
    return quickstart.run(args.dir)


def _add_demo_backend(verbs: Any) -> None:
    demo = verbs.add_parser(
        "demo-backend",
        help="the demo game/API backend alone (HTTP, TCP and WebSocket echo), for containers",
    )
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; only the proxy may reach it)",
    )
    demo.add_argument("--http-port", type=int, default=8080)
    demo.add_argument("--tcp-port", type=int, default=8081)
    demo.add_argument("--ws-port", type=int, default=8082)
    demo.set_defaults(handler=_demo_backend)


def _demo_backend(args: argparse.Namespace) -> int:
    logs.configure("info")
    demo_backend.run(args.host, args.http_port, args.tcp_port, args.ws_port)
    return 0


def _deny_add(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if cfg.tls.deny is None:
        raise UsageError(
            f'{args.config}: tls.deny is not set; add `deny = "deny.txt"` under [tls] '
            "(and create the file) to use a deny list"
        )
    entry, comment = args.entry.strip(), ""
    if ":" not in entry or Path(entry).is_file():
        cert_path = Path(entry)
        leaf = pem.load_certificates(pem.read_file(cert_path), cert_path)[0]
        summary = summarize(leaf)
        entry, comment = summary.fingerprint, f"{summary.subject}, serial {summary.serial}"
    kind = entry.partition(":")[0].strip().lower()
    entry = f"{kind}:{entry.partition(':')[2].strip()}"
    stamp = f"added {datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    if not add_entry(cfg.tls.deny, entry, f"{comment}; {stamp}" if comment else stamp):
        print(f"{entry} is already in {cfg.tls.deny}")
        return 0
    print(f"denied {entry}: {describe_entry(entry)}" + (f" ({comment})" if comment else ""))
    print(
        f"  written to {cfg.tls.deny}; the running proxy applies it within "
        f"{cfg.tls.reload_interval.text} and closes matching live sessions "
        f"(now: kill -HUP <pid>, or curl -X POST http://{cfg.admin.listen}/reload)"
    )
    return 0


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
