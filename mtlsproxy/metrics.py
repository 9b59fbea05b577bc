"""Prometheus metrics. Names and labels are public surface: dashboards depend on them.

One ``Metrics`` per proxy, on its own registry, so tests can run several proxies in one
process and read each one's numbers. No label ever holds a per-client value (address,
CN, fingerprint): cardinality stays bounded by the config.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HANDSHAKE_RESULTS = (
    "ok", "no_cert", "unknown_ca", "expired", "bad_cert", "denied", "timeout", "protocol_error",
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            "mtlsproxy_active_connections", "Open client connections", ["listener"], registry=r
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

        self.sessions_closed = Counter(
            "mtlsproxy_sessions_closed",
            "Live sessions closed by the proxy: expired, denied, ca_removed, shutdown",
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
            "Generation of the TLS material in use; +1 on every successful swap",
            registry=r,
        )

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
