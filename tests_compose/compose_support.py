"""What the end-to-end tests share: the commands they run, the host ports, the base image.

A command that fails raises with its one useful line (the last that says error, else the
last line) and the name of a file holding its whole output: a failed image build is not
printed in full once per test that needed it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROJECT = "mtlsproxy-e2e"
LOGS = Path(tempfile.mkdtemp(prefix="mtlsproxy-e2e-logs-"))


def _port(variable: str) -> int:
    """The host port from the environment, else one that is free now."""
    if value := os.environ.get(variable):
        return int(value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


HTTPS_PORT = _port("MTLSPROXY_HTTPS_PORT")
TCP_PORT = _port("MTLSPROXY_TCP_PORT")
ENV = dict(os.environ, MTLSPROXY_BIND="127.0.0.1", MTLSPROXY_HTTPS_PORT=str(HTTPS_PORT),
           MTLSPROXY_TCP_PORT=str(TCP_PORT))  # fmt: skip

_ERROR = re.compile(r"error|failed|denied|not found|no such|cannot", re.IGNORECASE)


def useful_line(output: str) -> str:
    """The line of a long output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR.search(line)]
    return (errors or lines or ["(no output)"])[-1][:500]


def sh(*args: str, timeout: float = 600, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = kw.pop("env", ENV)
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False, **kw)  # type: ignore[call-overload]  # fmt: skip
    if check and done.returncode != 0:
        log = Path(tempfile.mkstemp(dir=LOGS, prefix=f"{Path(args[0]).name}-", suffix=".log")[1])
        log.write_text(f"$ {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        raise AssertionError(
            f"{' '.join(args[:6])}{' ...' if len(args) > 6 else ''} failed ({done.returncode}):"
            f" {useful_line(done.stderr + chr(10) + done.stdout)} (whole output: {log})"
        )
    return done  # type: ignore[no-any-return]


def compose(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return sh("docker-compose", "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"), *args,
              timeout=timeout, check=check)  # fmt: skip
