"""Types and constants shared by the test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# The interpreter running the tests; `python -m mtlsproxy` is the real CLI, entry point included.
MTLSPROXY = [sys.executable, "-m", "mtlsproxy"]


@dataclass(frozen=True)
class Pair:
    crt: Path
    key: Path


IssueFn = Callable[..., Pair]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """The real CLI, to its end; ``ok``: it must exit 0."""
    proc = subprocess.run(
        [*MTLSPROXY, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def free_port() -> int:
    """A TCP port nothing listens on now (for a process that must be told its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: bytes) -> Samples:
    """Every sample of a /metrics answer, parsed by prometheus_client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def fetch_metrics(admin_port: int) -> Samples:
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return parse_metrics(answer.read())


def metric_sum(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = frozenset(labels.items())
    return sum(v for (n, have), v in found.items() if n == name and wanted <= have)
