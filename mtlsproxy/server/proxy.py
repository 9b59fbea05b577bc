"""The proxy process: build everything from the config, bind, serve, drain, exit.

Lifecycle: ``Proxy(config)`` loads and proves the credentials and builds every route
table (so a bad config or file fails before a socket is bound); ``run()`` binds every
listener first and reports the bound addresses (tests use port 0), then accepts until
``shutdown()``. Shutdown stops accepting at once, asks every live session to finish what
it is doing (an idle keep-alive connection closes now, one mid-response finishes it),
waits up to ``drain_timeout``, and then cancels what is left.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes

from mtlsproxy.accesslog import AccessLog
from mtlsproxy.address import Address
from mtlsproxy.admin import Admin
from mtlsproxy.config import Config, Listener
from mtlsproxy.errors import ConfigError, MtlsProxyError
from mtlsproxy.metrics import Expiry, Metrics
from mtlsproxy.policy import Allow
from mtlsproxy.relay.errors import RouteError
from mtlsproxy.relay.routing import RoundRobin, Route, RouteTable
from mtlsproxy.server.http import RouteRuntime
from mtlsproxy.server.listener import ListenerRuntime, Shared, accept_loop, bind
from mtlsproxy.server.tcp import tcp_route
from mtlsproxy.server.upstream import Target, UpstreamPool
from mtlsproxy.server.workers import ask_supervisor_to_reload
from mtlsproxy.sessions import Enforcer, SessionRegistry
from mtlsproxy.tls.backend import all_backend_files, backend_files
from mtlsproxy.tls.credentials import trust_warnings
from mtlsproxy.tls.store import CredentialStore, ReloadResult
from mtlsproxy.units import format_duration

log = logging.getLogger("mtlsproxy")

EXPIRY_CHECK_SECONDS = 60.0
EXPIRY_REPEAT_SECONDS = 3600.0  # a certificate still close to its end is logged again hourly


@dataclass(frozen=True)
class Bound:
    listener: str
    address: Address


class Proxy:
    def __init__(
        self, config: Config, config_path: str = "config", worker: int | None = None
    ) -> None:
        self.config = config
        # A worker of a supervisor shares its ports (SO_REUSEPORT); only worker 0 (or a
        # lone proxy) serves the admin listener.
        self.worker = worker
        self.metrics = Metrics()
        self.sessions = SessionRegistry()
        self.store = CredentialStore(
            config.tls,
            backends=all_backend_files(config),
            alpns=[listener.alpn_protocols for listener in config.listeners],
        )
        for trouble in trust_warnings(self.store.current().credentials, config.tls.client_ca):
            log.warning("%s", trouble)
        self.access = AccessLog(config.log.access, on_drop=self.metrics.access_log_dropped.inc)
        self.shared = Shared(
            store=self.store,
            sessions=self.sessions,
            pool=UpstreamPool(lambda files: self.store.current().backend_context(files)),
            metrics=self.metrics,
            handshake_timeout=config.tls.handshake_timeout.seconds,
            access=self.access,
        )
        self.listeners = [
            listener_runtime(i, listener, config, config_path)
            for i, listener in enumerate(config.listeners)
        ]
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self.draining = False
        self.serving = False
        self.enforcer = Enforcer(
            self.sessions,
            self.store,
            self.metrics,
            config.tls.enforce_interval.seconds,
            grace=config.tls.enforce_grace.seconds,
        )
        self.admin = Admin(
            self.store, self.metrics, self._not_ready, reload=self.reload, settings=config.admin
        )
        self.metrics.generation.set(self.store.current().generation)
        warning = config.tls.expiry_warning
        self._expiry_warning = warning.seconds if warning is not None else None
        self.metrics.watch_certificates(self.certificates, self._expiry_warning)
        self.store.subscribe(on_result=self._count_reload)
        self._warned: dict[tuple[str, str, datetime], float] = {}
        self._last_poll_error: str | None = None

    def certificates(self) -> list[Expiry]:
        """The certificates in use, for expiry metrics and warnings."""
        material = self.store.current()
        creds = material.credentials
        kinds = (
            [("server", creds.leaf)]
            + [("chain", c) for c in creds.cert_chain[1:]]
            + [("client_ca", c) for c in creds.client_cas]
        )
        # The proxy's own client certificate towards TLS backends renews like the rest,
        # and a CA that verifies backends can run out too.
        for backend, _ in material.backends.values():
            kinds.append(("backend_client", backend.leaf))
            kinds += [("backend_ca", c) for c in backend.server_cas if c not in creds.client_cas]
        return [
            Expiry(
                kind,
                c.subject.rfc4514_string(),
                c.not_valid_before_utc,
                c.not_valid_after_utc,
                c.fingerprint(hashes.SHA256()).hex(),
            )
            for kind, c in kinds
        ]

    def warn_expiring(self) -> list[str]:
        """Log a warning for each certificate in use that is within its warning window
        (``tls.expiry_warning``) of its end, again every hour while it stays so; return the
        warnings logged now."""
        now, clock = datetime.now(UTC), trio.current_time()
        configured = self._expiry_warning
        logged = []
        for cert in self.certificates():
            left = (cert.not_after - now).total_seconds()
            key = (cert.kind, cert.sha256, cert.not_after)
            if left > cert.warn_within(configured):
                continue
            if clock - self._warned.get(key, -1e18) < EXPIRY_REPEAT_SECONDS:
                continue
            self._warned[key] = clock
            when = cert.not_after.isoformat(timespec="seconds")
            what = {"server": "server certificate", "chain": "intermediate CA certificate",
                    "client_ca": "client CA certificate",
                    "backend_client": "client certificate towards backends",
                    "backend_ca": "backend CA certificate"}[cert.kind]  # fmt: skip
            if left <= 0:
                message = f"the {what} {cert.subject} has EXPIRED (at {when})"
            else:
                remaining = format_duration(timedelta(seconds=left))
                message = f"the {what} {cert.subject} expires in {remaining} (at {when})"
            log.warning("%s", message)
            logged.append(message)
        return logged

    async def _watch_expiry(self) -> None:
        while True:
            self.warn_expiring()
            await trio.sleep(EXPIRY_CHECK_SECONDS)

    def _count_reload(self, result: ReloadResult) -> None:
        # The poll runs every few seconds: an unchanged poll is no event, and a file that
        # stays broken counts once, not once per poll (its error repeats unchanged).
        repeated = result.source == "poll" and (
            result.result == "unchanged"
            or (result.result == "failed" and result.error == self._last_poll_error)
        )
        if result.source == "poll":
            self._last_poll_error = result.error if result.result == "failed" else None
        if not repeated:
            self.metrics.reloads.labels(result.result).inc()
        self.metrics.generation.set(result.generation)

    def _not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.serving:
            return "starting"
        return None

    def reload(self, source: str) -> ReloadResult:
        result = self.store.reload(source)
        if source == "admin" and self.worker is not None:
            ask_supervisor_to_reload()  # and every other worker with it
        return result

    def shutdown(self) -> None:
        self._shutdown.set()

    async def stopped(self) -> None:
        """Return once ``run()`` has finished draining."""
        await self._stopped.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        bound: list[tuple[ListenerRuntime, trio.SocketListener]] = []
        try:
            for runtime in self.listeners:
                address = runtime.config.listen
                try:
                    sockets = await bind(address, reuse_port=self.worker is not None)
                except OSError as exc:
                    raise MtlsProxyError(
                        f"cannot listen on {address} ({runtime.label}): {exc.strerror}"
                    ) from exc
                bound += [(runtime, s) for s in sockets]
            addresses = [Bound(r.label, _local(s)) for r, s in bound]
            for b in addresses:
                log.info("listening on %s (%s)", b.address, b.listener)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    if not self.worker:
                        admin = await accepting.start(self._serve_admin)
                        addresses.append(Bound("admin", admin))
                    for runtime, sock in bound:
                        accepting.start_soon(accept_loop, runtime, sock, self.shared, connections)
                    accepting.start_soon(self._poll)
                    accepting.start_soon(self.shared.pool.reap)
                    accepting.start_soon(self.enforcer.run)
                    if not self.worker:  # one process warns, not every worker
                        accepting.start_soon(self._watch_expiry)
                    self.serving = True
                    task_status.started(addresses)
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                for _, sock in bound:
                    await sock.aclose()
                await self._drain(connections)
        finally:
            with trio.CancelScope(shield=True):
                for _, sock in bound:
                    await sock.aclose()
                await self.shared.pool.aclose()
            self.access.close()
            self._stopped.set()

    async def _serve_admin(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        address = self.config.admin.listen
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise MtlsProxyError(f"cannot listen on {address} (admin): {exc.strerror}") from exc
        bound = _local(listeners[0])
        settings = self.config.admin
        if settings.mtls:
            log.info(
                "admin listening on https://%s (mTLS: a client certificate from tls.client_ca "
                "is required%s)",
                bound,
                ", and an admin.allow rule must match" if settings.allow is not None else "",
            )
        elif settings.insecure_remote and not address.is_loopback:
            log.warning(
                "admin listening on http://%s WITHOUT authentication (admin.insecure_remote = "
                "true): anyone who can reach this address can reload the proxy and read /certs",
                bound,
            )
        else:
            log.info("admin listening on http://%s", bound)
        task_status.started(bound)
        await trio.serve_listeners(self.admin.handle, listeners)

    async def _poll(self) -> None:
        """Reload when the files' content changes: works with os.replace, symlink swaps
        (Kubernetes ``..data``) and in-place rewrites alike."""
        while True:
            await trio.sleep(self.config.tls.reload_interval.seconds)
            self.store.reload("poll")

    async def _drain(self, connections: trio.Nursery) -> None:
        self.draining = True
        timeout = self.config.drain_timeout.seconds
        live = len(self.sessions)
        log.info("draining %d connection(s), at most %g s", live, timeout)
        self.sessions.close_all("shutdown")
        connections.cancel_scope.deadline = trio.current_time() + timeout

    async def watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGHUP: reload now. SIGTERM/SIGINT: drain and exit; a second one: stop now.
        ``nursery.start`` returns once the receiver is installed (from then on a Ctrl-C
        drains instead of interrupting)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.store.reload("signal")
                    self.access.reopen()  # after a log rotation moved the file
                    continue
                if self._shutdown.is_set():
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    raise KeyboardInterrupt
                log.info("%s: draining", signal.Signals(signum).name)
                self.shutdown()


def listener_runtime(
    index: int, listener: Listener, config: Config, config_path: str
) -> ListenerRuntime:
    """Everything a listener serves with, built and checked from the config (the route
    table refuses duplicates and bad hosts/prefixes): ``check`` builds it too."""
    routes: RouteTable[RouteRuntime] | None = None
    if listener.mode == "http":
        entries = []
        for j, route in enumerate(listener.routes):
            where = f"listeners[{index}].routes[{j}]"
            label = route.name or f"{route.host or '*'}{route.path_prefix}"
            files = backend_files(route, config) if route.tls else None
            h2 = route.upstream_protocol == "h2"
            targets = [Target(b, files, route.tls_server_name, h2) for b in route.backends]
            allow = None if route.allow is None else Allow(route.allow)
            runtime = RouteRuntime(j, label, route, RoundRobin(targets), allow)
            if route.allow is None:
                log.info(
                    "route %s (%s): no allow rules, admits every client certificate from client_ca",
                    label,
                    where,
                )
            entries.append(Route(j, runtime, host=route.host, path_prefix=route.path_prefix))
        try:
            routes = RouteTable(entries)
        except RouteError as exc:
            raise ConfigError(
                config_path, f"listeners[{index}].routes[{exc.index}]", exc.reason
            ) from exc
        return ListenerRuntime(listener, routes, None, trio.Semaphore(listener.max_connections))
    return ListenerRuntime(
        listener, None, tcp_route(listener.backends), trio.Semaphore(listener.max_connections)
    )


def _local(sock: trio.SocketListener) -> Address:
    host, port = sock.socket.getsockname()[:2]
    return Address(host, port)
