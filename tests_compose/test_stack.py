"""The docker-compose stack (deploy/), built and run for real, checked from the host.

Run by `make test-compose` (and `.ci/run` after `make test`). What it needs and does not
find it provides, and takes down again what it started:

- a Docker engine: Debian's `docker.io` and `docker-compose` are installed by the Makefile
  when missing; if no engine answers, `dockerd` is started here and stopped at the end (by
  PID);
- the base image (`python:3.11-slim`): pulled if a registry is reachable, else built from
  Debian with `debootstrap --variant=minbase bookworm` (python3 and its venv module) and
  imported under that name;
- the project's wheels, built on the host into deploy/wheels/ (the image installs from
  there with no package index).

Then: the stack comes up, a client certificate is issued by the stack's CA, and from the
host: an HTTP request whose identity the backend saw, a WebSocket message, a raw TCP
session, a client without a certificate refused, and a rotation of the server certificate
picked up by new handshakes while an open connection goes on. `docker-compose down -v`
at the end removes containers, volumes and the stack's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROJECT = "mtlsproxy-e2e"
BASE = "python:3.11-slim"
HTTPS_PORT, TCP_PORT = 28443, 28444  # not the quickstart's, not the benchmark's
ENV = dict(os.environ, MTLSPROXY_BIND="127.0.0.1", MTLSPROXY_HTTPS_PORT=str(HTTPS_PORT),
           MTLSPROXY_TCP_PORT=str(TCP_PORT), MTLSPROXY_BASE=BASE)  # fmt: skip


def sh(*args: str, timeout: float = 600, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV,
                          check=False, **kw)  # type: ignore[call-overload]  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done  # type: ignore[no-any-return]


def compose(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return sh("docker-compose", "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"), *args,
              timeout=timeout, check=check)  # fmt: skip


@pytest.fixture(scope="session")
def docker() -> Iterator[None]:
    if sh("docker", "info", check=False, timeout=30).returncode == 0:
        yield  # an engine runs already: use it, leave it
        return
    log = Path(tempfile.gettempdir()) / "mtlsproxy-e2e-dockerd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sh("docker", "info", check=False, timeout=30).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


@pytest.fixture(scope="session")
def base_image(docker: None) -> str:
    if sh("docker", "image", "inspect", BASE, check=False, timeout=30).returncode == 0:
        return BASE
    if sh("docker", "pull", BASE, check=False, timeout=60).returncode == 0:
        return BASE
    # No registry: Debian's own python3 (3.11 on bookworm) in a minimal root file system.
    with tempfile.TemporaryDirectory(prefix="mtlsproxy-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
           "bookworm", str(rootfs), "http://deb.debian.org/debian", timeout=900)  # fmt: skip
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            sh("docker", "import", "--change", 'CMD ["python3"]', "-", BASE, stdin=tar.stdout,
               timeout=600)  # fmt: skip
        assert tar.returncode == 0
    return BASE


@pytest.fixture(scope="session")
def stack(base_image: str) -> Iterator[None]:
    wheels = DEPLOY / "wheels"
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT),
       timeout=900)  # fmt: skip
    try:
        compose("up", "-d", "--build")
        deadline = time.monotonic() + 180
        while True:
            state = sh("docker", "inspect", "--format", "{{.State.Health.Status}}",
                       f"{PROJECT}_proxy_1", check=False).stdout.strip()  # fmt: skip
            if state == "healthy":
                break
            if time.monotonic() > deadline:
                logs = compose("logs", "--no-color", check=False).stdout[-5000:]
                raise AssertionError(f"the proxy is {state!r} after 180 s; logs:\n{logs}")
            time.sleep(1)
        yield
    finally:
        compose("down", "-v", "--rmi", "all", "--remove-orphans", check=False)
        for title in ("mtlsproxy-build", "mtlsproxy", "mtlsproxy-loadgen"):  # build leftovers
            sh("docker", "image", "prune", "-f", "--filter",
               f"label=org.opencontainers.image.title={title}", check=False)  # fmt: skip
        for wheel in wheels.glob("*.whl"):
            wheel.unlink()


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
