"""The client helpers trust only the private CA, whatever the environment says.

Many hosts, images and CI runners set ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` to the system bundle. Here all four point at an
impostor CA, and a server with a certificate from that CA must still be refused by every
helper (and by the README's curl line), and stay refused after the attempt. The same
environment must not stop them reaching a genuine server of the private CA.
"""

from __future__ import annotations

import contextlib
import select
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import requests
import trio
from support import Pair

from mtlsproxy import client
from mtlsproxy.address import Address
from mtlsproxy.errors import CAError
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.pki.service import RenewalService, ServiceSettings

TIMEOUT = 10.0
README = Path(__file__).resolve().parent.parent / "README.md"


class ThreadServer:
    """A server on 127.0.0.1 in a thread, one connection at a time; ``handle`` serves one."""

    scheme = "http"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # how often the loop looks at _stop
        self.port: int = self.listener.getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT)
        self.listener.close()
        assert not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class TLSServer(ThreadServer):
    """An HTTPS server that counts what it got through.

    ``client_ca``: ask for a client certificate and require it to chain to that bundle,
    so a success also proves the helper presented its certificate.
    """

    scheme = "https"

    def __init__(self, pair: Pair, body: bytes, client_ca: Path | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pair.crt, pair.key)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(cafile=str(client_ca))
        self.body = body
        self.handshakes = 0
        self.served = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)  # the handshake and every read
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                self._answer(tls)
        except OSError:
            pass  # a client that refused us, or that we refused: what these tests expect

    def _answer(self, tls: ssl.SSLSocket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length and (chunk := tls.recv(65536)):
            body += chunk
        self.served += 1
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-pem-file\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(self.body), self.body)
        )


class ConnectProxy(ThreadServer):
    """An HTTP CONNECT proxy, one tunnel at a time; records the CONNECT targets."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._tunnel(conn)

    def _tunnel(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        assert method == "CONNECT"
        self.targets.append(target)
        host, _, port = target.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT) as up:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([conn, up], [], [], 0.1)
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        return
                    (up if side is conn else conn).sendall(data)


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("impostor") / "ca", name="impostor")


@pytest.fixture(scope="module")
def impostor_server_pair(
    impostor: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Pair:
    issued = impostor.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"])
    crt, key = issued.write(tmp_path_factory.mktemp("impostor-server") / "localhost")
    return Pair(crt, key)


@pytest.fixture
def bundle(ca: CertificateAuthority) -> Path:
    return ca.folder / "ca.crt"


@pytest.fixture
def hostile_env(
    monkeypatch: pytest.MonkeyPatch, impostor: CertificateAuthority, tmp_path: Path
) -> Path:
    """All four trust variables at the impostor CA; returns its bundle."""
    impostor_bundle = impostor.folder / "ca.crt"
    folder = tmp_path / "impostor-certs"
    folder.mkdir()
    # c_rehash-style name, so OpenSSL's directory lookup would find it
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(impostor_bundle)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    shutil.copy(impostor_bundle, folder / f"{subject_hash}.0")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, str(impostor_bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(folder))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return impostor_bundle


@pytest.fixture
def impostor_server(impostor_server_pair: Pair, hostile_env: Path) -> Iterator[TLSServer]:
    # It answers every path with the impostor's bundle: were it believed, refresh_bundle
    # would store it as our trust bundle.
    with TLSServer(impostor_server_pair, hostile_env.read_bytes()) as server:
        yield server
    assert server.handshakes == 0 and server.served == 0


@pytest.fixture
def genuine_server(server_pair: Pair, bundle: Path, hostile_env: Path) -> Iterator[TLSServer]:
    with TLSServer(server_pair, bundle.read_bytes(), client_ca=bundle) as server:
        yield server


def ssl_get(ctx: ssl.SSLContext, url: str) -> bytes:
    port = int(url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


def caused_by_verification(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if isinstance(seen, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True  # requests keeps urllib3's error in args, not as a cause
        seen = seen.__cause__ or seen.__context__
    return False


# --- the guard -------------------------------------------------------------------------------


def test_the_context_refuses_to_be_widened_or_weakened(
    client_pair: Pair, bundle: Path, impostor: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = client.ssl_context(client_pair.crt, client_pair.key, bundle)
    other = impostor.folder / "ca.crt"
    folder = tmp_path / "dir"
    folder.mkdir()
    shutil.copy(other, folder / "ca.crt")
    attempts: list[Any] = [
        ctx.load_default_certs,
        ctx.set_default_verify_paths,
        lambda: ctx.load_verify_locations(other),
        lambda: ctx.load_verify_locations(cafile=str(other)),
        lambda: ctx.load_verify_locations(capath=str(folder)),
        lambda: ctx.load_verify_locations(cadata=other.read_text()),
        lambda: ctx.load_verify_locations(bundle, str(folder)),  # its own, plus more
        lambda: setattr(ctx, "verify_mode", ssl.CERT_NONE),
        lambda: setattr(ctx, "verify_mode", ssl.CERT_OPTIONAL),
        lambda: setattr(ctx, "check_hostname", False),
    ]
    for attempt in attempts:
        with pytest.raises(client.TrustChangeRefused):
            attempt()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1  # still the private root alone
    # What urllib3 and http.client do to a context they are given: no error.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_verify_locations(bundle)
    assert len(ctx.get_ca_certs()) == 1


# --- an impostor, with the environment pointing at its CA ---------------------------------------


def test_ssl_context_refuses_an_impostor(
    client_pair: Pair, bundle: Path, impostor_server: TLSServer
) -> None:
    ctx = client.ssl_context(client_pair.crt, client_pair.key, bundle)
    for _ in range(2):  # and again: nothing was widened by the first attempt
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl_get(ctx, impostor_server.url)


def test_requests_session_refuses_an_impostor(
    client_pair: Pair, bundle: Path, impostor_server: TLSServer, hostile_env: Path
) -> None:
    with client.requests_session(client_pair.crt, client_pair.key, bundle) as session:
        ctx = session.ssl_context  # type: ignore[attr-defined]
        # The environment's bundle, a per-request bundle, verification turned off: none of
        # them changes whom the session trusts.
        for verify in (None, None, str(hostile_env), False):
            with pytest.raises(requests.exceptions.SSLError) as refused:
                session.get(impostor_server.url, timeout=TIMEOUT, verify=verify)
            assert caused_by_verification(refused.value), refused.value
            assert len(ctx.get_ca_certs()) == 1
            assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_httpx_client_refuses_an_impostor(
    client_pair: Pair, bundle: Path, impostor_server: TLSServer
) -> None:
    with client.httpx_client(client_pair.crt, client_pair.key, bundle, trust_env=True) as http:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError) as refused:
                http.get(impostor_server.url, timeout=TIMEOUT)
            assert caused_by_verification(refused.value), refused.value


def test_the_renewal_client_refuses_an_impostor_and_writes_nothing(
    ca: CertificateAuthority, bundle: Path, impostor_server: TLSServer, tmp_path: Path
) -> None:
    folder = tmp_path / "client"
    folder.mkdir()
    prefix = folder / "player"
    crt, key = ca.issue(kind="client", name="player").write(prefix)
    local = folder / "ca.crt"
    shutil.copy(bundle, local)
    before = {p: p.read_bytes() for p in (crt, key, local)}
    for attempt in (client.renew_once, client.refresh_bundle):
        # Not RetryLater: retrying cannot make an impostor genuine, and `client renew
        # --watch` would hide it behind "retrying" until the certificate ran out.
        with pytest.raises(CAError) as refused:
            attempt(impostor_server.url, local, prefix)
        assert caused_by_verification(refused.value), refused.value
    assert {p: p.read_bytes() for p in (crt, key, local)} == before
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "player.crt", "player.key"]


# --- positive controls: the same environment, a genuine server ----------------------------------


def test_every_helper_reaches_a_genuine_server(
    client_pair: Pair, bundle: Path, genuine_server: TLSServer, tmp_path: Path
) -> None:
    answer = bundle.read_bytes()
    ctx = client.ssl_context(client_pair.crt, client_pair.key, bundle)
    assert ssl_get(ctx, genuine_server.url).endswith(answer)
    with client.requests_session(client_pair.crt, client_pair.key, bundle) as session:
        assert session.get(genuine_server.url, timeout=TIMEOUT).content == answer
    with client.httpx_client(client_pair.crt, client_pair.key, bundle, trust_env=True) as http:
        assert http.get(genuine_server.url, timeout=TIMEOUT).content == answer
    local = tmp_path / "ca.crt"
    shutil.copy(bundle, local)
    prefix = tmp_path / "player"
    shutil.copy(client_pair.crt, prefix.with_suffix(".crt"))
    shutil.copy(client_pair.key, prefix.with_suffix(".key"))
    assert client.refresh_bundle(genuine_server.url, local, prefix) is False  # same bundle
    assert genuine_server.served == 4


async def test_renew_once_renews_at_the_genuine_service(
    nursery: trio.Nursery, hostile_env: Path, tmp_path: Path
) -> None:
    fresh = CertificateAuthority.init(tmp_path / "ca", name="trust")
    settings = ServiceSettings(folder=fresh.folder, listen=Address("127.0.0.1", 0),
                               min_interval=timedelta(0))  # fmt: skip
    bound = await nursery.start(RenewalService(settings).serve)
    prefix = tmp_path / "player"
    fresh.issue(kind="client", name="player", ttl=timedelta(hours=1)).write(prefix)
    with trio.fail_after(30):
        leaf = await trio.to_thread.run_sync(
            client.renew_once, f"https://127.0.0.1:{bound.port}", fresh.folder / "ca.crt", prefix
        )
    assert leaf.subject.rfc4514_string() == "CN=player"
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["requests", "httpx"])
def test_a_proxy_from_the_environment_is_still_used(
    kind: str,
    client_pair: Pair,
    bundle: Path,
    genuine_server: TLSServer,
    impostor_server: TLSServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Why the helpers keep trust_env: HTTPS_PROXY and friends still work, and a tunnel
    # through them is verified and authenticated like a direct connection.
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("https_proxy", proxy.url)
        opened: Any = (
            client.requests_session(client_pair.crt, client_pair.key, bundle)
            if kind == "requests"
            else client.httpx_client(client_pair.crt, client_pair.key, bundle, trust_env=True)
        )
        refused: tuple[type[Exception], ...] = (requests.exceptions.SSLError, httpx.ConnectError)
        with opened as http:
            assert http.get(genuine_server.url, timeout=TIMEOUT).content == bundle.read_bytes()
            with pytest.raises(refused) as raised:
                http.get(impostor_server.url, timeout=TIMEOUT)
            assert caused_by_verification(raised.value), raised.value
    assert proxy.targets == [
        f"127.0.0.1:{genuine_server.port}",
        f"127.0.0.1:{impostor_server.port}",
    ]
    assert genuine_server.served == 1


# --- the README's curl line ---------------------------------------------------------------------


def readme_curl(bundle: Path, pair: Pair, url: str) -> list[str]:
    """The curl command of the README's "Connecting clients", on these files and this URL."""
    section = README.read_text(encoding="utf-8").split("## Connecting clients", 1)[1]
    lines = section.replace("\\\n", " ").splitlines()  # join the continued lines
    line = next(x for x in lines if x.startswith("curl "))
    words = {"ca/ca.crt": str(bundle), "certs/player-1.crt": str(pair.crt),
             "certs/player-1.key": str(pair.key)}  # fmt: skip
    argv = [url if w.startswith("https://") else words.get(w, w) for w in shlex.split(line)]
    assert "--capath" in argv, line  # the strict form: no built-in CA folder besides --cacert
    return [argv[0], "-sS", "--max-time", str(TIMEOUT), *argv[1:]]


def run_curl(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT + 20, check=False)


def test_the_readme_curl_line_refuses_an_impostor(
    client_pair: Pair, bundle: Path, impostor_server: TLSServer
) -> None:
    refused = run_curl(readme_curl(bundle, client_pair, impostor_server.url + "/"))
    assert refused.returncode == 60, refused.stderr  # CURLE_PEER_FAILED_VERIFICATION


def test_the_readme_curl_line_reaches_a_genuine_server(
    client_pair: Pair, bundle: Path, genuine_server: TLSServer
) -> None:
    done = run_curl(readme_curl(bundle, client_pair, genuine_server.url + "/"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == bundle.read_bytes()
