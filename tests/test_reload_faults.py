"""Reload under the operator's worst day, through a running proxy with real clients: a
deny list caught mid-rewrite, a 30-second client certificate towards TLS backends renewed
in place, a backend CA that rotates, a server chain cut after its leaf."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from proxy_env import read_request, serve_raw
from support import MTLSPROXY, IssueFn, Pair, fetch_metrics, metric_sum
from test_reload_live import FAST, rotatable, sha256_of

from mtlsproxy import pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.tls.context import build_server_context
from mtlsproxy.tls.engine import HandshakeError, TLSStream
from mtlsproxy.tls.store import Material


async def wait_for_material(env: Any, done: Any, timeout: float = 10) -> Material:
    """The first material swapped in (by the poll) for which ``done(material)`` holds."""
    with trio.fail_after(timeout):
        while not done(material := env.proxy.store.current()):
            await trio.sleep(0.02)
    return material


async def next_generation(env: Any) -> Material:
    """Wait for the poll to swap in what the files hold now."""
    generation = env.proxy.store.current().generation
    return await wait_for_material(env, lambda m: m.generation > generation)


async def test_a_deny_list_rewritten_in_place_never_lets_the_denied_in(
    make_env: Any, creds: Path
) -> None:
    """Threat: `echo ... > deny.txt` truncates first; a poll in the gap read an empty list
    and admitted the denied client (35 successful requests in 2 s were measured)."""
    env = await rotatable(make_env, creds)
    (creds / "deny.txt").write_text(f"sha256:{sha256_of(env.client)}\n")
    await wait_for_material(env, lambda m: len(m.credentials.deny) == 1)
    assert (await env.request("GET", "/")).status_code == 403
    with (creds / "deny.txt").open("w") as half_written:  # truncated, not yet rewritten
        half_written.write("# the new list, being written")
        half_written.flush()
        await next_generation(env)  # the poll read it
        statuses = [(await env.request("GET", "/")).status_code for _ in range(5)]
        assert statuses == [403] * 5
        half_written.write(f"\nsha256:{sha256_of(env.client)}\n")
    await wait_for_material(env, lambda m: m.pending is None)
    assert (await env.request("GET", "/")).status_code == 403


class KeepAliveTLSBackend:
    """An mTLS backend that keeps connections alive and answers with the serial of the
    client certificate each connection presented."""

    def __init__(self, ca: CertificateAuthority, server: Pair) -> None:
        self.connections = 0
        self.ctx = build_server_context(
            cert_chain=pem.load_certificates(server.crt.read_bytes(), server.crt),
            key=pem.load_private_key(server.key.read_bytes(), server.key),
            client_cas=[ca.root],
            alpn=None,
            session_id_context=b"backend",
        )

    async def handle(self, stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, self.ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=5)
        except HandshakeError:
            return
        self.connections += 1
        cert = tls.peer_certificate
        assert cert is not None
        body = f"{cert.serial_number:x}".encode()
        try:
            while await read_request(tls):  # type: ignore[arg-type]
                await tls.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
        except trio.BrokenResourceError:
            pass
        finally:
            await tls.aclose()


def _serial(pair: Pair) -> str:
    return f"{pem.load_certificates(pair.crt.read_bytes(), pair.crt)[0].serial_number:x}"


@pytest.fixture
def edge_identity(tmp_path: Path, ca: CertificateAuthority) -> tuple[Path, Path]:
    """The proxy's 30-second client certificate towards backends, in files it renews in."""
    folder = tmp_path / "edge"
    folder.mkdir()
    ca.issue(kind="client", name="mtlsproxy-edge", ttl=timedelta(seconds=30)).write(folder / "edge")
    shutil.copy(ca.folder / "ca.crt", folder / "backend-ca.crt")
    return folder / "edge", folder / "backend-ca.crt"


def _tls_route(port: int, prefix: Path, backend_ca: Path) -> str:
    return f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
tls = true
tls_cert = "{prefix}.crt"
tls_key = "{prefix}.key"
tls_ca = "{backend_ca}"
tls_server_name = "localhost"
"""


async def test_the_client_certificate_towards_backends_renews_in_place(
    make_env: Any,
    creds: Path,
    nursery: trio.Nursery,
    ca: CertificateAuthority,
    issue: IssueFn,
    edge_identity: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Threat (to availability): tls_cert/tls_key were loaded once at start, so a 24-hour
    certificate towards the backends lost every TLS backend a day later."""
    prefix, backend_ca = edge_identity
    backend = KeepAliveTLSBackend(ca, issue("server", "localhost", dns=["localhost"]))
    port = await serve_raw(nursery, backend.handle)
    env = await rotatable(
        make_env, creds, routes=_tls_route(port, prefix, backend_ca), backends=0,
        tls=f'{FAST}\nexpiry_warning = "1m"',
    )  # fmt: skip
    first = Pair(prefix.with_suffix(".crt"), prefix.with_suffix(".key"))
    old_serial = _serial(first)
    assert (await env.request("GET", "/")).text == old_serial
    assert (await env.request("GET", "/")).text == old_serial  # the pooled connection
    assert backend.connections == 1

    # /certs and the expiry metrics report the backend certificate like the others.
    _status, body = await env.admin("GET", "/certs")
    certs = msgspec.json.decode(body)
    assert [b["client"]["serial"] for b in certs["backends"]] == [old_serial]
    metrics = await trio.to_thread.run_sync(fetch_metrics, env.admin_port)
    assert metric_sum(metrics, "mtlsproxy_certificate_expiry_timestamp_seconds",
                      kind="backend_client", subject="CN=mtlsproxy-edge") > 0  # fmt: skip
    # ...and warns of its end (here inside the configured minute), from the proxy's start.
    assert "client certificate towards backends CN=mtlsproxy-edge expires in" in caplog.text

    renewed = ca.issue(kind="client", name="mtlsproxy-edge", ttl=timedelta(seconds=30))
    write_atomic(first.key, pem.private_key_pem(renewed.key), mode=0o600)  # key first
    write_atomic(first.crt, renewed.chain_pem())
    new_serial = f"{renewed.certificate.serial_number:x}"
    await next_generation(env)
    # The pooled connection made with the old certificate is retired, not reused.
    assert (await env.request("GET", "/")).text == new_serial
    assert backend.connections == 2
    _status, body = await env.admin("GET", "/certs")
    assert [b["client"]["serial"] for b in msgspec.json.decode(body)["backends"]] == [new_serial]


async def test_a_backend_ca_rotation_reaches_backend_verification(
    make_env: Any,
    creds: Path,
    nursery: trio.Nursery,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    issue: IssueFn,
    edge_identity: tuple[Path, Path],
) -> None:
    """Threat: tls_ca was read once, so a backend CA taken out of the bundle (compromised)
    kept being trusted for backend certificates until a restart."""
    prefix, backend_ca = edge_identity
    backend = KeepAliveTLSBackend(ca, issue("server", "localhost", dns=["localhost"]))
    port = await serve_raw(nursery, backend.handle)
    env = await rotatable(make_env, creds, routes=_tls_route(port, prefix, backend_ca), backends=0)
    assert (await env.request("GET", "/")).status_code == 200
    write_atomic(backend_ca, (other_ca.folder / "ca.crt").read_bytes())
    await next_generation(env)
    assert (await env.request("GET", "/")).status_code == 502  # the old CA: no longer trusted


def test_check_refuses_a_server_chain_cut_after_its_leaf(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    """`openssl x509 -in server.crt -out server.crt` keeps the leaf only: every client that
    trusts only the root would fail, so `check` (and `serve`, and a reload) refuse it."""
    from test_config import SAMPLE  # noqa: PLC0415

    leaf = subprocess.run(
        ["openssl", "x509", "-in", str(server_pair.crt)],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    (tmp_path / "server.crt").write_bytes(leaf)
    shutil.copy(server_pair.key, tmp_path / "server.key")
    shutil.copy(ca.folder / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "mtlsproxy.toml").write_text(SAMPLE)
    proc = subprocess.run(
        [*MTLSPROXY, "check", "--config", str(tmp_path / "mtlsproxy.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    assert "server.crt" in proc.stderr and "intermediate is missing" in proc.stderr
