"""The lifecycle verbs of the command line: ``ca renew``, ``ca rotate``, ``ca retire``,
``ca publish-secret``, ``ca serve`` and ``client renew`` (``cli.py`` registers them)."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from mtlsproxy import logs, pem
from mtlsproxy.address import parse_address
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.client import default_prefix, refresh_bundle, renew_once
from mtlsproxy.errors import CAError, UsageError
from mtlsproxy.pki import CertificateAuthority, kube
from mtlsproxy.pki.ca import pair_paths
from mtlsproxy.pki.keys import KEY_TYPES
from mtlsproxy.pki.lifecycle import (
    LeafIdentity,
    RetryLater,
    audited_ttl,
    keep_renewed,
    renewal_due,
)
from mtlsproxy.pki.rotation import retire, rotate
from mtlsproxy.pki.service import RenewalService, ServiceSettings
from mtlsproxy.units import format_duration

log = logging.getLogger("mtlsproxy.renew")

Duration = Callable[[str], float]


def register(ca: Any, verbs: Any, duration: Duration) -> None:
    renew = ca.add_parser(
        "renew", help="re-issue a certificate with the same identity, now or when due"
    )
    renew.add_argument("--dir", required=True, type=Path, help="the CA folder")
    renew.add_argument("--cert", required=True, metavar="PREFIX", help="PREFIX.crt and PREFIX.key")
    renew.add_argument(
        "--watch",
        action="store_true",
        help="stay running and renew at about 2/3 of each certificate's life",
    )
    renew.add_argument("--force", action="store_true", help="renew now even if not due")
    renew.add_argument("--ttl", type=duration, help="default: the TTL it was issued with")
    renew.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa-p256",
        help="the new certificate's key type (default: %(default)s)",
    )
    renew.add_argument(
        "--bundle",
        type=Path,
        metavar="FILE",
        help="also keep a copy of the CA's trust bundle here, rewritten when it changes "
        "(with --watch: checked every 5 s), for a proxy that must not see the CA folder",
    )
    renew.set_defaults(handler=_ca_renew)

    rot = ca.add_parser("rotate", help="new root and issuer; the old root stays trusted")
    rot.add_argument("--dir", required=True, type=Path, help="the CA folder")
    rot.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa-p256",
        help="the new root's and issuer's key type (default: %(default)s)",
    )
    rot.add_argument(
        "--grace",
        type=duration,
        default=3600.0,
        help="keep signing with the previous issuer this long, while every peer picks up the "
        "new bundle (default 1h; 0: switch now)",
    )
    rot.set_defaults(handler=_ca_rotate)

    ret = ca.add_parser("retire", help="drop previous roots from the bundle once unused")
    ret.add_argument("--dir", required=True, type=Path, help="the CA folder")
    ret.add_argument(
        "--force",
        action="store_true",
        help="retire even while certificates they issued are still valid",
    )
    ret.set_defaults(handler=_ca_retire)

    pub = ca.add_parser(
        "publish-secret",
        help="put files into a Kubernetes Secret (the renewal CronJob's last step)",
    )
    pub.add_argument("name", help="the Secret, e.g. mtlsproxy-server-tls")
    pub.add_argument(
        "files", nargs="+", metavar="KEY=FILE", help="a key of the Secret and the file it holds"
    )
    pub.add_argument(
        "--namespace", help="the Secret's namespace (default: the pod's own namespace)"
    )
    pub.add_argument(
        "--api",
        metavar="URL",
        help="https://host:port of the API server (default: the pod's, from the environment)",
    )
    pub.add_argument(
        "--api-ca",
        type=Path,
        metavar="FILE",
        help="the API server's CA (default: the service account's ca.crt)",
    )
    pub.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a bearer token (default: the service account's token)",
    )
    pub.set_defaults(handler=_ca_publish_secret)

    serve = ca.add_parser("serve", help="the renewal service: POST /renew over mutual TLS")
    serve.add_argument("--dir", required=True, type=Path, help="the CA folder")
    serve.add_argument("--listen", required=True, help="host:port, e.g. 127.0.0.1:9443")
    serve.add_argument(
        "--ttl",
        type=duration,
        default=24 * 3600.0,
        help="lifetime of renewed certificates (default 24h)",
    )
    serve.add_argument(
        "--min-interval",
        type=duration,
        default=60.0,
        help="least time between two renewals of one identity (default 1m)",
    )
    serve.add_argument("--deny", type=Path, help="a deny list file, as the proxy's (default: none)")
    serve.add_argument(
        "--name",
        default="mtlsproxy-ca",
        help="CN of the service's certificate (default: %(default)s)",
    )
    serve.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name of the service (default localhost)",
    )
    serve.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="IP address of the service (default 127.0.0.1)",
    )
    serve.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default="auto",
        help="diagnostic log format; auto: text on a terminal, JSON otherwise "
        "(default: %(default)s)",
    )
    serve.set_defaults(handler=_ca_serve)

    client = verbs.add_parser("client", help="client side: renew a client certificate")
    client_verbs = client.add_subparsers(title="client commands", metavar="COMMAND")
    crenew = client_verbs.add_parser("renew", help="renew at the renewal service (ca serve)")
    crenew.add_argument("--url", required=True, help="https://host:port of `ca serve`")
    crenew.add_argument(
        "--ca",
        required=True,
        type=Path,
        help="the trust bundle; refreshed from the service after a renewal",
    )
    crenew.add_argument("--cert", required=True, metavar="PREFIX", help="PREFIX.crt and PREFIX.key")
    crenew.add_argument(
        "--watch",
        action="store_true",
        help="stay running and renew at about 2/3 of each certificate's life",
    )
    crenew.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa-p256",
        help="the new key's key type (default: %(default)s)",
    )
    crenew.set_defaults(handler=_client_renew)


def _load(prefix: Path) -> Any:
    path, _ = pair_paths(prefix)
    return pem.load_certificates(pem.read_file(path), path)[0]


def _stop_on_signals() -> Callable[[], bool]:
    stopped = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, on_signal)
    return lambda: stopped


def _ca_renew(args: argparse.Namespace) -> int:
    prefix = default_prefix(args.cert)
    CertificateAuthority.load_current(args.dir)  # a wrong --dir fails now, not in a loop
    _load(prefix)  # and so does a wrong --cert

    def renew() -> Any:
        try:
            ca = CertificateAuthority.load(args.dir)
        except CAError as exc:
            raise RetryLater(str(exc)) from exc  # a rotation in progress
        current = _load(prefix)
        # The TTL it was issued with, from the audit log; else inferred from its window.
        ttl = timedelta(seconds=args.ttl) if args.ttl else audited_ttl(args.dir, current)
        issued = ca.reissue(LeafIdentity.of(current), ttl=ttl, key_type=args.key_type)
        issued.write(prefix)
        return issued.certificate

    def copy_bundle() -> None:
        if args.bundle is None:
            return
        bundle = (args.dir / "ca.crt").read_bytes()
        if not args.bundle.exists() or args.bundle.read_bytes() != bundle:
            write_atomic(args.bundle, bundle, mode=0o644)
            log.info("%s: the trust bundle changed; wrote %s", prefix, args.bundle)

    copy_bundle()
    if args.watch:
        logs.configure("info")
        if args.force:
            renew()
        keep_renewed(
            lambda: _load(prefix),
            renew,
            what=str(prefix),
            stop=_stop_on_signals(),
            tick=copy_bundle,
            tick_every=lambda _cert: 5.0,
            renew_expired=True,
        )
        return 0
    current = _load(prefix)
    due = renewal_due(current)
    if datetime.now(UTC) < due and not args.force:
        print(f"{prefix}.crt is not due: renew after {due:%Y-%m-%d %H:%M:%S}Z (or pass --force)")
        return 0
    fresh = renew()
    left = format_duration(fresh.not_valid_after_utc - datetime.now(UTC))
    print(
        f"renewed {prefix}.crt: valid until {fresh.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z "
        f"({left} from now)"
    )
    return 0


def _ca_rotate(args: argparse.Namespace) -> int:
    grace = timedelta(seconds=args.grace)
    new, old = rotate(args.dir, key_type=args.key_type, grace=grace)
    switch = datetime.now(UTC) + grace
    print(f"rotated the CA in {args.dir}; {args.dir / 'ca.crt'} now holds both roots")
    print(
        f"  new root    {new.root.subject.rfc4514_string()} (signs from "
        f"{switch:%Y-%m-%d %H:%M:%S}Z, after the {format_duration(grace)} grace period)"
    )
    print(f"  old root    {old.root.subject.rfc4514_string()} (still trusted; signs until then)")
    print(
        "  next: renew certificates (they move to the new issuer as they renew), then "
        "`mtlsproxy ca retire` once the old root's certificates have expired"
    )
    return 0


def _ca_retire(args: argparse.Namespace) -> int:
    retired, waiting = retire(args.dir, force=args.force)
    for p in retired:
        print(f"retired {p.root.subject.rfc4514_string()}: removed from {args.dir / 'ca.crt'}")
    for p, until in waiting:
        print(
            f"kept {p.root.subject.rfc4514_string()}: its certificates can be valid until "
            f"{until:%Y-%m-%d %H:%M:%S}Z"
        )
    return 0


def _ca_publish_secret(args: argparse.Namespace) -> int:
    files: dict[str, bytes] = {}
    for spec in args.files:
        key, sep, name = spec.partition("=")
        if not sep or not key or not name:
            raise UsageError(f"{spec!r}: give KEY=FILE, e.g. tls.crt=/work/out/tls.crt")
        try:
            files[key] = Path(name).read_bytes()
        except OSError as exc:
            raise UsageError(f"{name}: cannot read it for key {key}: {exc}") from exc
    api = kube.Api.in_cluster(args.api, args.api_ca, args.token_file)
    namespace = args.namespace or kube.default_namespace()
    version = kube.publish_secret(api, namespace, args.name, files)
    print(f"published {', '.join(files)} to secret {namespace}/{args.name} (version {version})")
    return 0


def _ca_serve(args: argparse.Namespace) -> int:
    logs.configure("info", args.log_format)
    try:
        listen = parse_address(args.listen)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    settings = ServiceSettings(
        folder=args.dir,
        listen=listen,
        ttl=timedelta(seconds=args.ttl),
        min_interval=timedelta(seconds=args.min_interval),
        deny=args.deny,
        name=args.name,
        dns=args.dns or ["localhost"],
        ips=args.ip or ["127.0.0.1"],
    )
    service = RenewalService(settings)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.serve)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def _client_renew(args: argparse.Namespace) -> int:
    prefix = default_prefix(args.cert)

    def renew() -> Any:
        return renew_once(args.url, args.ca, prefix, key_type=args.key_type)

    def refresh() -> None:
        if refresh_bundle(args.url, args.ca, prefix):
            log.info("%s: the trust bundle changed; wrote %s", prefix, args.ca)

    def every(cert: x509.Certificate) -> float:  # a tenth of the lifetime, 5 s to 10 min
        life = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        return min(max(life / 10, 5.0), 600.0)

    if args.watch:
        logs.configure("info")
        keep_renewed(
            lambda: _load(prefix),
            renew,
            what=str(prefix),
            stop=_stop_on_signals(),
            tick=refresh,
            tick_every=every,
        )
        return 0
    try:
        fresh = renew()
    except RetryLater as exc:
        raise CAError(f"no renewal this time: {exc}; try again later, or use --watch") from exc
    print(
        f"renewed {prefix}.crt at {args.url}: valid until "
        f"{fresh.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    )
    return 0
