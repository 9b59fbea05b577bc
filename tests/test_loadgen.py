"""Smoke test for the C load generator (benchmarks/loadgen) against the in-process proxy.

The binary is built into a temporary folder with the same flags as benchmarks/loadgen/Makefile;
the test is skipped when there is no C compiler or no OpenSSL headers (Debian: libssl-dev).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from proxy_env import Env

SOURCES = Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen"


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH, so loadgen cannot be built")
    probe = subprocess.run(
        [cc, "-E", "-x", "c", "-"],
        input=b"#include <openssl/ssl.h>\n",
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("OpenSSL headers missing (Debian: apt-get install libssl-dev)")
    binary = tmp_path_factory.mktemp(name) / name
    build = subprocess.run(
        [
            cc,
            "-O2",
            "-Wall",
            "-Wextra",
            *flags,
            "-o",
            str(binary),
            str(SOURCES / f"{name}.c"),
            "-lssl",
            "-lcrypto",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    return binary


@pytest.fixture(scope="session")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "loadgen")


@pytest.fixture(scope="session")
def wsecho(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "wsecho", "-pthread")


async def run_loadgen(
    binary: Path, env: Env, *args: str, ca: Path | None = None
) -> tuple[dict[str, Any], str]:
    cmd = [
        str(binary),
        "--connect",
        f"127.0.0.1:{env.port}",
        "--sni",
        "localhost",
        "--ca",
        str(ca or env.ca_bundle),
        "--cert",
        str(env.client.crt),
        "--key",
        str(env.client.key),
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        *args,
    ]
    with trio.fail_after(60):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    return json.loads(result.stdout), stderr


@pytest.mark.parametrize("mode", ["full", "keepalive"])
async def test_loadgen_drives_the_proxy(loadgen: Path, make_env: Any, mode: str) -> None:
    env = await make_env()
    report, stderr = await run_loadgen(loadgen, env, "--mode", mode)
    assert report["mode"] == mode
    assert report["ops"] > 0, (report, stderr)
    assert report["errors"] == 0, (report, stderr)
    assert report["latency_us"]["p50"] > 0
    assert report["client_cpu_s"] >= 0
    if mode == "full":
        assert report["handshakes"] > 0


async def test_loadgen_drives_websocket_messages_through_the_proxy(
    loadgen: Path, wsecho: Path, make_env: Any, nursery: trio.Nursery
) -> None:
    with socket.socket() as probe:  # a free port for the echo backend
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    echo = subprocess.Popen([str(wsecho), str(port)])
    try:
        with trio.fail_after(10):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.05)
        env = await make_env(
            routes=f'[[listeners.routes]]\npath_prefix = "/"\nbackends = ["127.0.0.1:{port}"]\n'
            "websocket = true\n",
            backends=0,
        )
        report, stderr = await run_loadgen(loadgen, env, "--mode", "websocket", "--path", "/ws")
    finally:
        echo.kill()
        echo.wait()
    assert report["mode"] == "websocket"
    assert report["ops"] > 0, (report, stderr)
    assert report["errors"] == 0, (report, stderr)
    # every op is one 66-byte echo back (the window's edges cut an op or two)
    assert report["bytes_received"] >= 66 * (report["ops"] - 4)


async def test_loadgen_counts_an_untrusted_server_as_errors(
    loadgen: Path, make_env: Any, other_ca: Any
) -> None:
    env = await make_env()
    report, stderr = await run_loadgen(
        loadgen, env, "--mode", "full", "--duration", "0.5", ca=other_ca.folder / "ca.crt"
    )
    assert report["ops"] == 0
    assert report["errors"] > 0
    assert "certificate verify failed" in stderr


def test_loadgen_rejects_bad_arguments(loadgen: Path) -> None:
    result = subprocess.run(
        [str(loadgen), "--mode", "sideways"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "--mode" in result.stderr
