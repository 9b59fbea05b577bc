"""`ca publish-secret`, the renewal CronJob's last step, against an API endpoint over real TLS.

The endpoint stands in for the Kubernetes API server's one call that the job makes
(PATCH of a Secret, JSON merge patch): it records what arrives and answers as the API
server does (the Secret, or a Status with a message).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support import IssueFn, Pair, run

from mtlsproxy.pki import CertificateAuthority

TOKEN = "job-token-123"


class FakeApi:
    def __init__(self, pair: Pair) -> None:
        self.requests: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, str]] = {"default/mtlsproxy-server-tls": {"old": "eA=="}}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                api.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                parts = self.path.split("/")  # /api/v1/namespaces/NS/secrets/NAME
                key = f"{parts[4]}/{parts[6]}"
                if self.headers["Authorization"] != f"Bearer {TOKEN}":
                    self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                elif key not in api.secrets:
                    self._answer(
                        404, {"kind": "Status", "message": f'secrets "{parts[6]}" not found'}
                    )
                else:
                    api.secrets[key].update(json.loads(body)["data"])
                    self._answer(200, {"metadata": {"name": parts[6], "resourceVersion": "42"},
                                       "data": api.secrets[key]})  # fmt: skip

            def _answer(self, status: int, reply: dict[str, Any]) -> None:
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.crt, pair.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def api(issue: IssueFn) -> Iterator[FakeApi]:
    fake = FakeApi(issue("server", "kubernetes", ips=["127.0.0.1"]))
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def publish(api: FakeApi, ca_file: Path, tmp_path: Path, *args: str) -> Any:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return run("ca", "publish-secret", "--api", api.url, "--api-ca", ca_file,
               "--token-file", token, "--namespace", "default", *args, ok=False)  # fmt: skip


def test_the_job_patches_exactly_the_files_into_the_secret(
    api: FakeApi, ca: CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnew\n")
    (tmp_path / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nkey\n")
    done = publish(api, ca.folder / "ca.crt", tmp_path, "mtlsproxy-server-tls",
                   f"tls.crt={tmp_path / 'tls.crt'}", f"tls.key={tmp_path / 'tls.key'}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "published tls.crt, tls.key to secret default/mtlsproxy-server-tls (version 42)"
        in done.stdout
    )
    (request,) = api.requests
    assert request["path"] == "/api/v1/namespaces/default/secrets/mtlsproxy-server-tls"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert request["headers"]["Content-Type"] == "application/merge-patch+json"
    data = json.loads(request["body"])["data"]
    assert set(data) == {"tls.crt", "tls.key"}  # a merge patch: the other keys stay
    assert base64.b64decode(data["tls.crt"]) == (tmp_path / "tls.crt").read_bytes()
    assert api.secrets["default/mtlsproxy-server-tls"]["old"] == "eA=="
    assert TOKEN not in done.stdout + done.stderr  # the token is never printed


def test_a_missing_secret_says_to_create_it(
    api: FakeApi, ca: CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_text("x")
    done = publish(api, ca.folder / "ca.crt", tmp_path, "absent", f"ca.crt={tmp_path / 'ca.crt'}")
    assert done.returncode == 1
    assert "secret default/absent at https://127.0.0.1:" in done.stderr
    assert "it does not exist: create it once by hand" in done.stderr
    assert 'secrets "absent" not found' in done.stderr and "Traceback" not in done.stderr


def test_an_api_server_of_another_ca_gets_nothing(
    api: FakeApi, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Only the service account's CA is trusted for the API server, never the system's
    store nor an unverified connection: the token and the key never leave."""
    (tmp_path / "tls.key").write_text("secret key")
    done = publish(api, other_ca.folder / "ca.crt", tmp_path, "mtlsproxy-server-tls",
                   f"tls.key={tmp_path / 'tls.key'}")  # fmt: skip
    assert done.returncode == 1
    assert "the API server's certificate does not verify against" in done.stderr
    assert api.requests == []


def test_outside_a_pod_it_asks_for_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "f").write_text("x")
    done = run("ca", "publish-secret", "s", f"k={tmp_path / 'f'}", ok=False)
    assert (
        done.returncode == 2 and "not in a Kubernetes pod" in done.stderr and "--api" in done.stderr
    )
    bad = run("ca", "publish-secret", "s", "no-equals-sign", ok=False)
    assert bad.returncode == 2 and "give KEY=FILE" in bad.stderr
