"""Certificates from the project's CA work with real TLS stacks, and strangers are refused.

The server is the stdlib ``ssl`` module (the proxy's own engine is tested elsewhere): this
proves the *certificates* are right, independent of our TLS code.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import requests
from support import IssueFn, Pair

from mtlsproxy.pki import CertificateAuthority


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        body = f"hello {subject.get('commonName', '?')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # refused handshakes are expected here


@pytest.fixture(scope="module")
def https_url(ca: CertificateAuthority, server_pair: Pair) -> Iterator[str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.folder / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(server_pair.crt, server_pair.key)
    server = _Server(("127.0.0.1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def curl(url: str, ca: CertificateAuthority, pair: Pair | None) -> subprocess.CompletedProcess[str]:
    cmd = ["curl", "-sS", "--max-time", "10", "--cacert", str(ca.folder / "ca.crt"), url]
    if pair:
        cmd += ["--cert", str(pair.crt), "--key", str(pair.key)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def test_curl_with_a_client_certificate(
    https_url: str, ca: CertificateAuthority, client_pair: Pair
) -> None:
    proc = curl(https_url, ca, client_pair)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello player-1\n"


def test_requests_and_httpx(https_url: str, ca: CertificateAuthority, client_pair: Pair) -> None:
    bundle = str(ca.folder / "ca.crt")
    cert = (str(client_pair.crt), str(client_pair.key))
    assert requests.get(https_url, verify=bundle, cert=cert, timeout=10).text == "hello player-1\n"
    ctx = ssl.create_default_context(cafile=bundle)
    ctx.load_cert_chain(*cert)
    with httpx.Client(verify=ctx, timeout=10) as client:
        assert client.get(https_url).text == "hello player-1\n"


def test_openssl_s_client(https_url: str, ca: CertificateAuthority, client_pair: Pair) -> None:
    port = https_url.rsplit(":", 1)[1].strip("/")
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(ca.folder / "ca.crt"), "-cert", str(client_pair.crt),
         # -cert sends the leaf alone; -cert_chain adds the intermediate from the same file.
         "-cert_chain", str(client_pair.crt),
         "-key", str(client_pair.key), "-verify_return_error", "-quiet"],
        input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "hello player-1" in proc.stdout, proc.stderr


@pytest.mark.parametrize("who", ["stranger", "expired", "server-eku", "nobody"])
def test_refused_clients(
    https_url: str, ca: CertificateAuthority, issue: IssueFn, issue_other: IssueFn, who: str
) -> None:
    pair = {
        "stranger": lambda: issue_other("client", "mallory"),
        "expired": lambda: issue("client", "old", now=datetime.now(UTC) - timedelta(days=2)),
        "server-eku": lambda: issue("server", "not-a-client"),
        "nobody": lambda: None,
    }[who]()
    proc = curl(https_url, ca, pair)
    assert proc.returncode != 0
    assert "hello" not in proc.stdout


def test_server_certificate_is_checked_by_clients(
    https_url: str, other_ca: CertificateAuthority, client_pair: Pair
) -> None:
    # A client that trusts another CA must refuse our server: trust is one CA, both ways.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(
            https_url,
            verify=str(other_ca.folder / "ca.crt"),
            cert=(str(client_pair.crt), str(client_pair.key)),
            timeout=10,
        )


def test_stdlib_client_handshake_reports_the_peer(
    https_url: str, ca: CertificateAuthority, client_pair: Pair
) -> None:
    port = int(https_url.rsplit(":", 1)[1].strip("/"))
    ctx = ssl.create_default_context(cafile=str(ca.folder / "ca.crt"))
    ctx.load_cert_chain(client_pair.crt, client_pair.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        peer = tls.getpeercert()
        assert peer is not None
        assert ("DNS", "localhost") in peer["subjectAltName"]


def test_same_files_as_the_cli_writes(tmp_path: Path, ca: CertificateAuthority) -> None:
    # The ssl module reads what `ca issue` writes: leaf + chain in one file, PKCS#8 key.
    crt, key = ca.issue(kind="client", name="file-check").write(tmp_path / "x")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.load_cert_chain(crt, key)
