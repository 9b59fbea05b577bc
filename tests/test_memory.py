"""Memory per idle mTLS connection: a guard against regressions, not the measurement.

benchmarks/idle_memory.py is the measurement (2,000 connections, fresh processes, nginx
beside it; 39.9 KiB per idle connection against nginx's 24.5 on 2026-12-01, down from
66). This runs it small: a regression of the size found before (OpenSSL's buffers kept
by every idle connection, 22 KiB) fails it, noise does not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "idle_memory.py"


def test_an_idle_tls_connection_costs_under_50_kib() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--connections", "400", "--rounds", "1", "--no-nginx",
         "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["mtlsproxy"] < 50, figures
