"""Prometheus metrics. Names and labels are public surface: dashboards depend on them.

One ``Metrics`` per proxy, on its own registry, so tests can run several proxies in one
process and read each one's numbers. No label ever holds a per-client value (address,
CN, fingerprint): cardinality stays bounded by the config.

With ``workers = N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers:
prometheus_client then keeps every worker's values in files there, and the admin
listener (worker 0) answers with all workers added up (``exposition``). Gauges say how
they combine: open connections are summed over live workers, the credential generation
is the lowest one still in use (a worker that has not swapped yet shows).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# ``ca_cert``: a CA certificate presented as a client's; ``bad_signature``: a valid chain
# whose key the client does not hold (its CertificateVerify failed): an impersonation
# attempt, kept apart from ``protocol_error`` (scanners, old clients).
HANDSHAKE_RESULTS = (
    "ok", "no_cert", "unknown_ca", "expired", "bad_cert", "ca_cert", "bad_signature", "denied",
    "timeout", "protocol_error",
)  # fmt: skip


# Remaining lifetime of presented client certificates: minutes to a year, with the
# 24-hour certificates this project issues landing in the middle.
REMAINING_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 7 * 86400, 30 * 86400,
                     365 * 86400)  # fmt: skip


AUTO_WARNING_MAX = 30 * 86400.0


@dataclass(frozen=True)
class Expiry:
    """One certificate the proxy holds: what it is, and until when it is valid."""

    # "server" (our leaf), "chain" (intermediates we send), "client_ca" (trusted),
    # "backend_client" (our certificate towards TLS backends), "backend_ca" (verifies them)
    kind: str
    subject: str
    not_before: datetime
    not_after: datetime
    sha256: str = ""  # hex; two CAs may share a subject (a re-key, a cross-sign)

    def warn_within(self, configured: float | None) -> float:
        """Seconds before the end from which this certificate is worth a warning: the
        configured window, else a quarter of its lifetime and at most 30 days."""
        if configured is not None:
            return configured
        lifetime = (self.not_after - self.not_before).total_seconds()
        return min(lifetime / 4, AUTO_WARNING_MAX)


class _ExpiryCollector(Collector):
    """Expiry of the certificates in use, read from the credential store at scrape time."""

    def __init__(
        self, certificates: Callable[[], list[Expiry]], warn_seconds: float | None
    ) -> None:
        self._certificates = certificates
        self._warn = warn_seconds

    def collect(self) -> Iterator[Metric]:
        timestamps = GaugeMetricFamily(
            "mtlsproxy_certificate_expiry_timestamp_seconds",
            "Unix time at which a certificate in use expires",
            labels=["kind", "subject", "sha256"],
        )
        expiring = GaugeMetricFamily(
            "mtlsproxy_certificate_expiring",
            "1 when a certificate in use expires within tls.expiry_warning (or has expired)",
            labels=["kind", "subject", "sha256"],
        )
        now = datetime.now().astimezone()
        for cert in self._certificates():
            labels = [cert.kind, cert.subject, cert.sha256[:16]]
            timestamps.add_metric(labels, cert.not_after.timestamp())
            left = (cert.not_after - now).total_seconds()
            expiring.add_metric(labels, 1.0 if left <= cert.warn_within(self._warn) else 0.0)
        yield timestamps
        yield expiring


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What /metrics shows: this registry, or every worker's values added up.
        self.exposition = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposition)  # type: ignore[no-untyped-call]
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.handshakes = Counter(
            "mtlsproxy_handshakes",
            "TLS handshakes by outcome, and whether the session was resumed",
            ["listener", "result", "resumed"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "mtlsproxy_handshake_duration_seconds",
            "Time from accept to a finished (or failed) handshake",
            ["listener"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.active_connections = Gauge(
            "mtlsproxy_active_connections",
            "Open client connections",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "mtlsproxy_requests",
            "HTTP requests answered, by route and status class",
            ["listener", "route", "code"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "mtlsproxy_upstream_duration_seconds",
            "Time from sending a request upstream to the end of the response",
            ["route"],
            registry=r,
        )
        self.upstream_connect_errors = Counter(
            "mtlsproxy_upstream_connect_errors",
            "Failed connections to a backend",
            ["route", "backend"],
            registry=r,
        )
        self.bytes = Counter(
            "mtlsproxy_bytes",
            "Body bytes relayed, by direction (in: from clients, out: to clients)",
            ["listener", "direction"],
            registry=r,
        )

        self.websocket_messages = Counter(
            "mtlsproxy_websocket_messages",
            "WebSocket data messages relayed (in: from clients, out: to clients)",
            ["route", "direction"],
            registry=r,
        )
        self.websocket_sessions = Counter(
            "mtlsproxy_websocket_sessions", "WebSocket sessions relayed", ["route"], registry=r
        )
        self.tcp_sessions = Counter(
            "mtlsproxy_tcp_sessions",
            "TCP sessions relayed, by how they ended: closed (by the ends), idle, enforced, "
            "error (backend unreachable or a connection failed)",
            ["listener", "end"],
            registry=r,
        )
        self.client_cert_remaining = Histogram(
            "mtlsproxy_client_cert_remaining_seconds",
            "Remaining lifetime of the client certificates presented in accepted handshakes",
            ["listener"],
            buckets=REMAINING_BUCKETS,
            registry=r,
        )
        self.access_log_dropped = Counter(
            "mtlsproxy_access_log_dropped",
            "Access log lines dropped because the log's reader did not keep up",
            registry=r,
        )
        self.sessions_closed = Counter(
            "mtlsproxy_sessions_closed",
            "Live sessions closed by the proxy: expired, denied, ca_removed, shutdown",
            ["listener", "reason"],
            registry=r,
        )
        self.http2_connections = Counter(
            "mtlsproxy_http2_connections",
            "Client connections that selected HTTP/2 (h2) in ALPN",
            ["listener"],
            registry=r,
        )
        self.http2_goaway = Counter(
            "mtlsproxy_http2_goaway",
            "HTTP/2 connections the proxy ended with GOAWAY for a reason of its own: idle, "
            "protocol_error, enhance_your_calm (a flood: resets, streams, control frames)",
            ["listener", "reason"],
            registry=r,
        )
        self.reloads = Counter(
            "mtlsproxy_reloads",
            "Credential reloads by result: swapped, unchanged, failed",
            ["result"],
            registry=r,
        )
        self.generation = Gauge(
            "mtlsproxy_credentials_generation",
            "Generation of the TLS material in use; +1 on every successful swap (with "
            "workers: the highest among live workers, each counting from its own start)",
            registry=r,
            multiprocess_mode="livemax",
        )

    def watch_certificates(
        self, certificates: Callable[[], list[Expiry]], warn_seconds: float | None
    ) -> None:
        """Export the expiry of ``certificates()`` (called at every scrape)."""
        collector = _ExpiryCollector(certificates, warn_seconds)
        self.registry.register(collector)
        if self.exposition is not self.registry:
            self.exposition.register(collector)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` takes a lock and formats its
        arguments on every call, which shows in a per-connection profile. The label sets
        are bounded by the config (no per-client values), so is this cache."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def refused(self, listener: str, result: str) -> None:
        self.child(self.handshakes, listener, result, "false").inc()

    def sample(self, name: str, labels: dict[str, str]) -> float:
        """The current value of one sample (0 when absent): for tests and /certs."""
        return self.registry.get_sample_value(name, labels) or 0.0
