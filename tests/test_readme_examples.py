"""README examples that run: the private CA's commands, then the "Connecting clients" curl,
openssl and Python examples against a real proxy on 127.0.0.1 (only the port differs)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import trio
from proxy_env import start_backend
from support import MTLSPROXY, free_port
from test_proxy_process import serve_process

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(section: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the README section titled ``section``."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", body, re.S)


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A README shell block, with `mtlsproxy` being the one under test."""
    define = f'mtlsproxy() {{ {shlex.join(MTLSPROXY)} "$@"; }}\n'
    return subprocess.run(
        ["sh", "-ec", define + script], cwd=cwd, capture_output=True, text=True,
        timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


async def test_the_ca_and_client_examples_run_as_written(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    made = await trio.to_thread.run_sync(shell, blocks("The private CA", "sh")[0], tmp_path)
    assert made.returncode == 0, made.stderr
    backend = await start_backend(nursery)
    port = free_port()
    (tmp_path / "mtlsproxy.toml").write_text(f"""
[tls]
cert = "certs/api.crt"
key = "certs/api.key"
client_ca = "ca/ca.crt"
[admin]
listen = "127.0.0.1:0"
[[listeners]]
listen = "127.0.0.1:{port}"
[[listeners.routes]]
backends = ["127.0.0.1:{backend}"]
""")
    (sh,) = blocks("Connecting clients", "sh")[:1]
    (python,) = blocks("Connecting clients", "python")[:1]
    assert "api.example" in sh and ":8443" in sh and "localhost:8443" in python
    async with serve_process(tmp_path / "mtlsproxy.toml"):
        # Each command alone, so a failure names it (curl and openssl both exit non-zero
        # when the name check or the handshake fails).
        for command in sh.replace("\\\n", " ").strip().splitlines():
            ran = await trio.to_thread.run_sync(
                shell, command.replace(":8443", f":{port}"), tmp_path
            )
            assert ran.returncode == 0, (command, ran.stdout[-2000:], ran.stderr[-2000:])
        code = python.replace(":8443", f":{port}")
        ran = await trio.run_process(
            [sys.executable, "-c", code], cwd=tmp_path, capture_stderr=True, check=False
        )
        assert ran.returncode == 0, ran.stderr.decode()
