"""The docker-compose stack (deploy/), built and run for real, checked from the host.

Run by `make test-compose` (and `.ci/run` after `make test`). The engine, the base image
and the wheels come from conftest.py, which takes down again what it started. The host
ports are free ones, or `MTLSPROXY_HTTPS_PORT` / `MTLSPROXY_TCP_PORT` when set.

Then: the stack comes up, a client certificate is issued by the stack's CA, and from the
host: an HTTP request whose identity the backend saw, a WebSocket message, a raw TCP
session, a client without a certificate refused, and a rotation of the server certificate
picked up by new handshakes while an open connection goes on. `docker-compose down -v`
at the end removes containers, volumes and the stack's images.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from compose_support import DEPLOY, ENV, HTTPS_PORT, PROJECT, TCP_PORT, compose, sh, useful_line
from websockets.sync.client import connect as ws_connect


@pytest.fixture(scope="session")
def stack(base_image: str, wheels: Path) -> Iterator[None]:
    ENV["MTLSPROXY_BASE"] = base_image  # every compose command builds from it
    try:
        compose("build", "--force-rm")  # a failed build leaves no container behind
        compose("up", "-d")
        deadline = time.monotonic() + 180
        while True:
            state = sh("docker", "inspect", "--format", "{{.State.Health.Status}}",
                       f"{PROJECT}_proxy_1", check=False).stdout.strip()  # fmt: skip
            if state == "healthy":
                break
            if time.monotonic() > deadline:
                logs = compose("logs", "--no-color", "--tail", "20", check=False).stdout
                raise AssertionError(
                    f"the proxy is {state!r} after 180 s: {useful_line(logs)}\n{logs[-3000:]}"
                )
            time.sleep(1)
        yield
    finally:
        compose("down", "-v", "--rmi", "all", "--remove-orphans", check=False)


@pytest.fixture(scope="session")
def tester(stack: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tester")
    compose("exec", "-T", "ca", "mtlsproxy", "ca", "issue", "--dir", "/var/lib/mtlsproxy/ca",
            "--kind", "client", "--name", "e2e-tester", "--uri", "spiffe://game.example/e2e",
            "--out", "/tmp/tester")  # fmt: skip
    files = {"crt": "/tmp/tester.crt", "key": "/tmp/tester.key",
             "ca": "/var/lib/mtlsproxy/ca/ca.crt"}  # fmt: skip
    paths = {}
    for name, inside in files.items():
        path = folder / f"tester.{name}"
        path.write_text(compose("exec", "-T", "ca", "cat", inside).stdout)
        paths[name] = path
    paths["key"].chmod(0o600)
    compose("exec", "-T", "ca", "rm", "/tmp/tester.key")
    return paths


def leaf_sha256(path: Path) -> str:
    pem_text = path.read_text()
    first = pem_text.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


def context(tester: dict[str, Path], with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tester["ca"]))
    if with_cert:
        ctx.load_cert_chain(tester["crt"], tester["key"])
    return ctx


def test_http_request_carries_the_verified_identity(tester: dict[str, Path]) -> None:
    answer = requests.get(f"https://localhost:{HTTPS_PORT}/hello", verify=str(tester["ca"]),
                          cert=(str(tester["crt"]), str(tester["key"])), timeout=20)  # fmt: skip
    assert answer.status_code == 200, answer.text
    (xfcc,) = answer.json()["headers"]["x-forwarded-client-cert"]
    assert f"Hash={leaf_sha256(tester['crt'])}" in xfcc
    assert "URI=spiffe://game.example/e2e" in xfcc


def test_the_readme_walkthrough_runs_as_printed(stack: None, tmp_path: Path) -> None:
    """deploy/walkthrough.sh holds deploy/README.md's commands (tests/test_deploy.py keeps
    the two in step): run on the stack, as a user would, in a folder of their own."""
    env = dict(ENV, COMPOSE_PROJECT_NAME=PROJECT, WALKTHROUGH_DIR=str(tmp_path))
    done = sh(str(DEPLOY / "walkthrough.sh"), env=env, timeout=600)
    out = done.stdout
    assert '"x-forwarded-client-cert"' in out and "URI=spiffe://game.example/player/1" in out
    assert "refused, as it should be" in out
    greeting, echo = out.split("== raw TCP")[1].splitlines()[1:3]
    assert json.loads(greeting)["cn"] == "player-1" and echo == "hello over tcp"
    assert "renewed player-1.crt" in out and "after renewal: HTTP 200" in out
    # the files were copied byte for byte (no terminal: no CRLF, not empty)
    for name in ("player-1.crt", "player-1.key", "ca.crt"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"-----BEGIN") and b"\r\n" not in data, name
    assert (tmp_path / "player-1.key").stat().st_mode & 0o077 == 0


def test_curl_with_and_without_a_client_certificate(tester: dict[str, Path]) -> None:
    base = ["curl", "-sS", "--max-time", "20", "--cacert", str(tester["ca"])]
    ok = sh(*base, "--cert", str(tester["crt"]), "--key", str(tester["key"]),
            f"https://localhost:{HTTPS_PORT}/", check=False)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["path"] == "/"
    refused = sh(*base, f"https://localhost:{HTTPS_PORT}/", check=False)
    assert refused.returncode != 0  # no certificate: the handshake fails
    assert "alert" in refused.stderr or "certificate" in refused.stderr.lower()


def test_websocket_message(tester: dict[str, Path]) -> None:
    with ws_connect(f"wss://localhost:{HTTPS_PORT}/ws", ssl=context(tester),
                    open_timeout=20, close_timeout=5) as ws:  # fmt: skip
        hello = json.loads(ws.recv(timeout=20))
        assert (
            f"Hash={leaf_sha256(tester['crt'])}" in hello["headers"]["x-forwarded-client-cert"][0]
        )
        ws.send("ping from the host")
        assert ws.recv(timeout=20) == "ping from the host"


def test_raw_tcp_session_with_the_identity_in_proxy_protocol(tester: dict[str, Path]) -> None:
    with (
        socket.create_connection(("127.0.0.1", TCP_PORT), timeout=20) as raw,
        context(tester).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        data = b""
        while b"\n" not in data:
            data += tls.recv(65536)
        greeting = json.loads(data.split(b"\n", 1)[0])
        assert greeting["proxy_protocol"] == "v2" and greeting["cn"] == "e2e-tester"
        tls.sendall(b"echo me\n")
        echoed = data.split(b"\n", 1)[1]
        while not echoed.endswith(b"echo me\n"):
            echoed += tls.recv(65536)


def test_a_server_certificate_rotation_is_picked_up_without_dropping_a_connection(
    tester: dict[str, Path],
) -> None:
    def served_fingerprint() -> str:
        with (
            socket.create_connection(("127.0.0.1", HTTPS_PORT), timeout=20) as raw,
            context(tester).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest()

    def get(tls: ssl.SSLSocket, path: str) -> bytes:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        while len(body) < length:
            body += tls.recv(65536)
        return head.split(b"\r\n")[0]

    before = served_fingerprint()
    raw = socket.create_connection(("127.0.0.1", HTTPS_PORT), timeout=20)
    held = context(tester).wrap_socket(raw, server_hostname="localhost")
    try:
        assert get(held, "/before").startswith(b"HTTP/1.1 200")
        compose("exec", "-T", "renew-server", "mtlsproxy", "ca", "renew", "--dir",
                "/var/lib/mtlsproxy/ca", "--cert", "/var/lib/mtlsproxy/certs/server",
                "--force")  # fmt: skip
        deadline = time.monotonic() + 30
        while (after := served_fingerprint()) == before:
            assert time.monotonic() < deadline, "the proxy never served the renewed certificate"
            time.sleep(0.5)
        assert after != before
        assert get(held, "/after").startswith(b"HTTP/1.1 200")  # the old connection lives on
    finally:
        held.close()


def test_the_proxy_never_holds_the_ca_key(stack: None) -> None:
    mounts = sh("docker", "inspect", "--format", "{{json .Mounts}}", f"{PROJECT}_proxy_1").stdout
    assert "/var/lib/mtlsproxy/ca" not in mounts
    whoami = compose("exec", "-T", "proxy", "id", "-u").stdout.strip()
    assert whoami == "10001"


def test_docker_tools_are_the_ones_expected() -> None:
    assert shutil.which("docker-compose"), "docker-compose missing: make test-compose installs it"


def test_the_loadgen_profile_runs_the_benchmark_against_the_stack(stack: None) -> None:
    done = compose("--profile", "loadgen", "run", "--rm", "-e", "DURATION=2", "loadgen",
                   timeout=900)  # fmt: skip
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in results] == ["full", "resumed", "keepalive"], done.stdout
    for result in results:
        assert result["ops"] > 0 and result["errors"] == 0, result


def test_a_client_renews_at_the_stacks_renewal_service(stack: None) -> None:
    script = (
        "set -e; mtlsproxy ca issue --dir /var/lib/mtlsproxy/ca --kind client --name renewer "
        "--ttl 1h --out /tmp/renewer >/dev/null; cp /var/lib/mtlsproxy/ca/ca.crt /tmp/trust.crt; "
        "mtlsproxy client renew --url https://ca:9443 --ca /tmp/trust.crt --cert /tmp/renewer; "
        "rm /tmp/renewer.key /tmp/renewer.key.prev"
    )
    done = compose("exec", "-T", "ca", "sh", "-c", script)
    assert "renewed /tmp/renewer.crt at https://ca:9443" in done.stdout


def test_a_ca_rotation_reaches_the_proxys_bundle_and_old_clients_still_get_in(
    tester: dict[str, Path],
) -> None:
    compose("exec", "-T", "ca", "mtlsproxy", "ca", "rotate", "--dir", "/var/lib/mtlsproxy/ca",
            "--grace", "1h")  # fmt: skip
    count = "print(open('/var/lib/mtlsproxy/certs/ca.crt').read().count('BEGIN CERTIFICATE'))"
    deadline = time.monotonic() + 30
    while compose("exec", "-T", "proxy", "python3", "-c", count).stdout.strip() != "2":
        assert time.monotonic() < deadline, "renew-server never copied the rotated bundle"
        time.sleep(1)
    answer = requests.get(f"https://localhost:{HTTPS_PORT}/", verify=str(tester["ca"]),
                          cert=(str(tester["crt"]), str(tester["key"])), timeout=20)  # fmt: skip
    assert answer.status_code == 200  # a certificate of the old root, still trusted
