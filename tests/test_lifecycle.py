"""Certificate lifecycle: ca renew, the renewal service and client renew, the client
helpers, CA rotation and retirement. Real files, real TLS, the real service."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proxy_env import CLIENT_TIMEOUT, route, start_backend, start_proxy, write_config
from support import MTLSPROXY, Pair, free_port, run

from mtlsproxy import client, pem
from mtlsproxy.address import Address
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.pki.lifecycle import (
    LeafIdentity,
    RetryLater,
    keep_renewed,
    read_audit,
    renewal_due,
)
from mtlsproxy.pki.service import RenewalService, ServiceSettings


def load(path: Path) -> x509.Certificate:
    return pem.load_certificates(path.read_bytes(), path)[0]


@pytest.fixture
def fresh_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", name="life")


def issue(ca: CertificateAuthority, prefix: Path, kind: str = "client", **kw: Any) -> Pair:
    crt, key = ca.issue(kind=kind, **kw).write(prefix)  # type: ignore[arg-type]
    return Pair(crt, key)


async def start_service(
    nursery: trio.Nursery, ca: CertificateAuthority, **kw: Any
) -> tuple[RenewalService, str]:
    settings = ServiceSettings(folder=ca.folder, listen=Address("127.0.0.1", 0), **kw)
    service = RenewalService(settings)
    bound = await nursery.start(service.serve)
    return service, f"https://localhost:{bound.port}"


def post_renew(url: str, pair: Pair, ca: Path, body: bytes) -> requests.Response:
    return requests.post(
        f"{url}/renew", data=body, cert=(str(pair.crt), str(pair.key)), verify=str(ca),
        timeout=CLIENT_TIMEOUT,
    )  # fmt: skip


def csr_for(name: str, **kw: Any) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if kw.get("dns"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in kw["dns"]]), critical=False
        )
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- ca renew --------------------------------------------------------------------------


def test_ca_renew_keeps_the_identity_and_waits_until_due(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    pair = issue(fresh_ca, tmp_path / "srv", "server", name="api", dns=["api.internal"],
                 ips=["127.0.0.1"], ous=["edge"], ttl=timedelta(hours=2))  # fmt: skip
    before = load(pair.crt)
    not_due = run("ca", "renew", "--dir", fresh_ca.folder, "--cert", tmp_path / "srv")
    assert "not due" in not_due.stdout and load(pair.crt) == before
    run("ca", "renew", "--dir", fresh_ca.folder, "--cert", tmp_path / "srv.crt", "--force")
    after = load(pair.crt)
    assert after.serial_number != before.serial_number
    assert LeafIdentity.of(after) == LeafIdentity.of(before)  # kind, CN, OUs, SANs, TTL
    assert after.public_key() != before.public_key()  # a new key every time
    assert pem.key_matches(pem.load_private_key(pair.key.read_bytes(), pair.key), after)
    assert pair.key.stat().st_mode & 0o777 == 0o600
    records = read_audit(fresh_ca.folder)
    assert records is not None and records[-1].by == "ca renew"
    assert records[-1].serial == format(after.serial_number, "x")


def test_renewal_time_is_two_thirds_with_jitter(fresh_ca: CertificateAuthority) -> None:
    leaf = fresh_ca.issue(kind="client", name="x", ttl=timedelta(hours=24)).certificate
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    shares = [(renewal_due(leaf) - start) / (end - start) for _ in range(200)]
    assert all(0.61 <= s <= 0.72 for s in shares)
    assert max(shares) - min(shares) > 0.05  # jittered, not one instant for a whole fleet


async def test_ca_renew_watch_renews_a_short_certificate_and_the_proxy_follows(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = issue(fresh_ca, tmp_path / "srv", "server", name="localhost", dns=["localhost"],
                   ips=["127.0.0.1"], ttl=timedelta(seconds=15))  # fmt: skip
    player = issue(fresh_ca, tmp_path / "p", name="player")
    backend = await start_backend(nursery)
    path = write_config(tmp_path, ca_bundle=fresh_ca.folder / "ca.crt", server=server,
                        routes=route([backend]), tls='reload_interval = "200ms"')  # fmt: skip
    _, port, _ = await start_proxy(nursery, path)
    first = load(server.crt)
    watcher = subprocess.Popen(
        [*MTLSPROXY, "ca", "renew", "--dir", str(fresh_ca.folder), "--cert",
         str(tmp_path / "srv"), "--watch"], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with trio.fail_after(30):  # due at ~2/3 of a 16.5 s window
            while load(server.crt).serial_number == first.serial_number:
                await trio.sleep(0.2)
        renewed = load(server.crt)
        assert renewed.not_valid_after_utc > first.not_valid_after_utc

        def fingerprint() -> str:
            ctx = client.ssl_context(player.crt, player.key, fresh_ca.folder / "ca.crt")
            with (
                socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()

        want = renewed.fingerprint(hashes.SHA256()).hex()
        with trio.fail_after(10):  # the proxy's poll picks the new pair up
            while await trio.to_thread.run_sync(fingerprint) != want:
                await trio.sleep(0.2)
    finally:
        watcher.send_signal(signal.SIGTERM)
        # In a thread: the trio loop must go on serving (the renewal service, the proxy)
        # while the watcher finishes a request in flight and exits.
        _, err = await trio.to_thread.run_sync(lambda: watcher.communicate(timeout=30))
    assert "renewed, valid until" in err


# --- the renewal service ------------------------------------------------------------------


async def test_the_service_copies_the_presented_identity_never_the_csrs(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    service, url = await start_service(nursery, fresh_ca, ttl=timedelta(minutes=5),
                                       min_interval=timedelta(0))  # fmt: skip
    player = issue(fresh_ca, tmp_path / "p", name="player-9", ous=["eu"],
                   uris=["spiffe://game/player/9"], ttl=timedelta(hours=1))  # fmt: skip
    key, csr = csr_for("admin", dns=["admin.internal"])  # asks for another identity
    bundle = fresh_ca.folder / "ca.crt"
    answer = await trio.to_thread.run_sync(post_renew, url, player, bundle, csr)
    assert answer.status_code == 200, answer.text
    chain = pem.load_certificates(answer.content, "answer")
    leaf = chain[0]
    assert leaf.subject == load(player.crt).subject  # CN=player-9, OU=eu
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://game/player/9"]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert leaf.public_key() == key.public_key()  # the CSR's key, not a new one
    life = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=4) < life <= timedelta(minutes=5)  # the CA's policy, not the old TTL
    assert chain[1] == fresh_ca.issuer
    records = read_audit(fresh_ca.folder)
    assert records is not None
    mine = [r for r in records if r.by == "renewal service"]
    assert len(mine) == 1 and mine[0].subject == "CN=player-9,OU=eu"
    assert mine[0].requester == "sha256:" + load(player.crt).fingerprint(hashes.SHA256()).hex()
    assert mine[0].not_after == leaf.not_valid_after_utc.isoformat(timespec="seconds")
    assert "PRIVATE" not in (fresh_ca.folder / "audit.log").read_text()
    assert service.issued == 1


async def test_the_service_refuses_with_a_status_and_a_reason(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_text("cn:cheater\n")
    _, url = await start_service(nursery, fresh_ca, deny=deny,
                                 min_interval=timedelta(minutes=10))  # fmt: skip
    bundle = fresh_ca.folder / "ca.crt"
    _, csr = csr_for("x")
    expired = issue(fresh_ca, tmp_path / "old", name="late", ttl=timedelta(hours=1),
                    now=datetime.now(UTC) - timedelta(hours=2))  # fmt: skip
    cheater = issue(fresh_ca, tmp_path / "cheat", name="cheater")
    player = issue(fresh_ca, tmp_path / "p", name="player")

    def call(pair: Pair, body: bytes = csr) -> requests.Response:
        return post_renew(url, pair, bundle, body)

    answer = await trio.to_thread.run_sync(call, expired)
    assert answer.status_code == 403 and "expired" in answer.text
    answer = await trio.to_thread.run_sync(call, cheater)
    assert answer.status_code == 403 and "deny list" in answer.text
    answer = await trio.to_thread.run_sync(call, player, b"not a csr")
    assert answer.status_code == 400 and "certificate signing request" in answer.text
    assert (await trio.to_thread.run_sync(call, player)).status_code == 200
    again = await trio.to_thread.run_sync(call, player)
    assert again.status_code == 429 and int(again.headers["retry-after"]) > 500
    assert "renewed less than" in again.text

    def no_cert() -> requests.Response:
        return requests.post(f"{url}/renew", data=csr, verify=str(bundle), timeout=10)

    with pytest.raises(requests.exceptions.RequestException):
        await trio.to_thread.run_sync(no_cert)


async def test_client_renew_writes_the_pair_and_retries_while_the_service_is_down(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    player = issue(fresh_ca, tmp_path / "p", name="player", ttl=timedelta(seconds=20))
    trust = tmp_path / "trust.crt"
    trust.write_bytes((fresh_ca.folder / "ca.crt").read_bytes())
    port = free_port()
    first = load(player.crt)
    watcher = subprocess.Popen(
        [*MTLSPROXY, "client", "renew", "--url", f"https://localhost:{port}", "--ca", str(trust),
         "--cert", str(tmp_path / "p"), "--watch"], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        due = renewal_due(first) - datetime.now(UTC)
        await trio.sleep(due.total_seconds() + 2.5)  # due, and failing: nobody listens
        assert load(player.crt) == first
        settings = ServiceSettings(folder=fresh_ca.folder, listen=Address("127.0.0.1", port),
                                   ttl=timedelta(seconds=20), min_interval=timedelta(0))  # fmt: skip
        await nursery.start(RenewalService(settings).serve)
        with trio.fail_after(20):
            while load(player.crt) == first:
                await trio.sleep(0.2)
    finally:
        watcher.send_signal(signal.SIGTERM)
        # In a thread: the trio loop must go on serving (the renewal service, the proxy)
        # while the watcher finishes a request in flight and exits.
        _, err = await trio.to_thread.run_sync(lambda: watcher.communicate(timeout=30))
    fresh = load(player.crt)
    assert fresh.subject == first.subject and fresh.not_valid_after_utc > first.not_valid_after_utc
    assert pem.key_matches(pem.load_private_key(player.key.read_bytes(), player.key), fresh)
    assert "retrying in" in err and "renewed, valid until" in err


def test_client_renew_says_why_when_refused(fresh_ca: CertificateAuthority, tmp_path: Path) -> None:
    player = issue(fresh_ca, tmp_path / "p", name="player")
    down = run("client", "renew", "--url", f"https://localhost:{free_port()}", "--ca",
               fresh_ca.folder / "ca.crt", "--cert", tmp_path / "p", ok=False)  # fmt: skip
    assert down.returncode != 0 and "no renewal this time" in down.stderr
    assert load(player.crt)  # untouched


# --- the client helpers --------------------------------------------------------------------


async def test_helpers_trust_only_the_private_ca_and_follow_a_renewal(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = issue(fresh_ca, tmp_path / "srv", "server", name="localhost", dns=["localhost"],
                   ips=["127.0.0.1"])  # fmt: skip
    player = issue(fresh_ca, tmp_path / "p", name="player")
    backend = await start_backend(nursery)
    path = write_config(tmp_path, ca_bundle=fresh_ca.folder / "ca.crt", server=server,
                        routes=route([backend]))  # fmt: skip
    _, port, _ = await start_proxy(nursery, path)
    url = f"https://localhost:{port}/"
    bundle = fresh_ca.folder / "ca.crt"
    session = client.requests_session(player.crt, player.key, bundle)
    http = client.httpx_client(player.crt, player.key, bundle)

    def seen_hashes() -> tuple[str, str, str]:
        def xfcc(body: Any) -> str:
            value: str = body["headers"]["x-forwarded-client-cert"][0]
            return value.split(";", maxsplit=1)[0]

        ctx = client.ssl_context(player.crt, player.key, bundle)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        raw_hash = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"][
            "x-forwarded-client-cert"][0].split(";")[0]  # fmt: skip
        return (xfcc(session.get(url, timeout=CLIENT_TIMEOUT).json()),
                xfcc(http.get(url, timeout=CLIENT_TIMEOUT).json()), raw_hash)  # fmt: skip

    def hash_of(pair: Pair) -> str:
        return "Hash=" + load(pair.crt).fingerprint(hashes.SHA256()).hex()

    assert await trio.to_thread.run_sync(seen_hashes) == (hash_of(player),) * 3
    issue(fresh_ca, tmp_path / "p", name="player")  # a renewal, written in place
    # Another user of the context (a new connection in another thread) loads it first:
    # the session must still drop its pooled connection with the old certificate.
    session.ssl_context.refresh()  # type: ignore[attr-defined]
    # new connections (httpx's pooled one is closed first, as a server would do it)
    http.close()
    http = client.httpx_client(player.crt, player.key, bundle)
    assert await trio.to_thread.run_sync(seen_hashes) == (hash_of(player),) * 3

    public = requests.Session()  # the system trust store does not know our CA

    def public_fails() -> None:
        with pytest.raises(requests.exceptions.SSLError):
            public.get(url, timeout=CLIENT_TIMEOUT)

    await trio.to_thread.run_sync(public_fails)
    ctx = client.ssl_context(player.crt, player.key, bundle)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1  # the private root, nothing else
    http.close()


def test_a_half_written_renewal_is_skipped_until_whole(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    player = issue(fresh_ca, tmp_path / "p", name="player")
    ctx = client.ssl_context(player.crt, player.key, fresh_ca.folder / "ca.crt")
    other = fresh_ca.issue(kind="client", name="player")
    assert other.key is not None
    player.key.write_bytes(pem.private_key_pem(other.key))  # the key is new, the cert not yet
    assert ctx.refresh() is False and ctx.generation == 0
    player.crt.write_bytes(other.chain_pem())
    assert ctx.refresh() is True and ctx.generation == 1


# --- rotation and retirement -------------------------------------------------------------


def test_rotate_publishes_both_roots_and_switches_after_the_grace(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    old_root = fresh_ca.root
    out = run("ca", "rotate", "--dir", fresh_ca.folder, "--grace", "1h")
    assert "holds both roots" in out.stdout
    bundle = pem.load_certificates((fresh_ca.folder / "ca.crt").read_bytes(), "bundle")
    assert len(bundle) == 2 and bundle[1] == old_root and bundle[0] != old_root
    during = CertificateAuthority.load(fresh_ca.folder)
    assert during.root == old_root  # still signing with the previous issuer
    later = CertificateAuthority.load(fresh_ca.folder, now=datetime.now(UTC) + timedelta(hours=2))
    assert later.root == bundle[0]
    assert list((fresh_ca.folder / "previous").glob("*/root.key")) == []  # old root key gone
    again = run("ca", "rotate", "--dir", fresh_ca.folder, ok=False)
    assert again.returncode != 0 and "grace period" in again.stderr


def test_retire_waits_for_the_last_certificate_of_the_old_root(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    fresh_ca.issue(kind="client", name="last-of-the-old", ttl=timedelta(hours=3))
    run("ca", "rotate", "--dir", fresh_ca.folder, "--grace", "0s")
    early = run("ca", "retire", "--dir", fresh_ca.folder, ok=False)
    assert early.returncode != 0 and "--force" in early.stderr
    until = datetime.now(UTC) + timedelta(hours=3)
    assert f"{until:%Y-%m-%d %H}" in early.stderr  # says until when
    assert len(pem.load_certificates((fresh_ca.folder / "ca.crt").read_bytes(), "b")) == 2
    forced = run("ca", "retire", "--dir", fresh_ca.folder, "--force")
    assert "retired" in forced.stdout
    bundle = pem.load_certificates((fresh_ca.folder / "ca.crt").read_bytes(), "bundle")
    assert bundle == [CertificateAuthority.load(fresh_ca.folder).root]
    assert list((fresh_ca.folder / "retired").glob("*/issuer.key")) == []


async def test_a_proxy_following_the_bundle_closes_sessions_of_a_retired_root(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    player = issue(fresh_ca, tmp_path / "p", name="player")  # from the root to be retired
    run("ca", "rotate", "--dir", fresh_ca.folder, "--grace", "0s")
    server = issue(CertificateAuthority.load(fresh_ca.folder), tmp_path / "srv", "server",
                   name="localhost", dns=["localhost"], ips=["127.0.0.1"])  # fmt: skip
    backend = await start_backend(nursery)
    path = write_config(tmp_path, ca_bundle=fresh_ca.folder / "ca.crt", server=server,
                        routes=route([backend]),
                        tls='reload_interval = "200ms"\nenforce_interval = "200ms"')  # fmt: skip
    _, port, _ = await start_proxy(nursery, path)
    ctx = ssl.create_default_context(cafile=str(fresh_ca.folder / "ca.crt"))
    ctx.load_cert_chain(player.crt, player.key)

    def open_session() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        return tls

    live = await trio.to_thread.run_sync(open_session)  # an old-root client, accepted
    run("ca", "retire", "--dir", fresh_ca.folder, "--force")

    def closed() -> bool:
        live.settimeout(10)
        try:
            while live.recv(65536):  # the rest of the response, then the close
                pass
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError):
            pass
        return True

    assert await trio.to_thread.run_sync(closed)
    live.close()


# --- regressions from a review ----------------------------------------------------------


async def test_an_exotic_csr_is_refused_and_the_service_lives_on(
    nursery: trio.Nursery, fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    _, url = await start_service(nursery, fresh_ca, min_interval=timedelta(0))
    player = issue(fresh_ca, tmp_path / "p", name="player")
    sm2_key = tmp_path / "sm2.key"
    made = subprocess.run(["openssl", "genpkey", "-algorithm", "SM2", "-out", str(sm2_key)],
                          capture_output=True, check=False)  # fmt: skip
    if made.returncode != 0:
        pytest.skip("this OpenSSL cannot make SM2 keys")
    sm2_csr = subprocess.run(
        ["openssl", "req", "-new", "-key", str(sm2_key), "-subj", "/CN=x", "-sm3"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    bundle = fresh_ca.folder / "ca.crt"
    answer = await trio.to_thread.run_sync(post_renew, url, player, bundle, sm2_csr)
    assert answer.status_code == 400
    _, good = csr_for("x")
    assert (await trio.to_thread.run_sync(post_renew, url, player, bundle, good)).status_code == 200


def test_a_rate_limit_longer_than_a_lifetime_is_capped(fresh_ca: CertificateAuthority) -> None:
    settings = ServiceSettings(folder=fresh_ca.folder, listen=Address("127.0.0.1", 0),
                               ttl=timedelta(seconds=60), min_interval=timedelta(minutes=1))  # fmt: skip
    assert RenewalService(settings).settings.min_interval == timedelta(seconds=15)


def test_the_renewal_loop_waits_as_long_as_the_service_asks(
    fresh_ca: CertificateAuthority,
) -> None:
    cert = fresh_ca.issue(kind="client", name="x", ttl=timedelta(hours=1),
                          now=datetime.now(UTC) - timedelta(minutes=50)).certificate  # fmt: skip
    pauses: list[float] = []
    attempts = iter([RetryLater("429", retry_after=7), RetryLater("down"), None])

    done: list[bool] = []

    def renew() -> x509.Certificate:
        outcome = next(attempts)
        if outcome is not None:
            raise outcome
        done.append(True)
        return cert

    keep_renewed(lambda: cert, renew, what="x", sleep=pauses.append,
                 stop=lambda: bool(done) or len(pauses) > 10)  # fmt: skip
    assert done and pauses[:2] == [7, 2]  # Retry-After first, then the back-off doubling


def test_retire_without_a_complete_audit_log_waits_for_the_old_issuer(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    fresh_ca.issue(kind="client", name="long", ttl=timedelta(days=30))
    (fresh_ca.folder / "audit.log").unlink()  # a CA from before the audit log, or a lost one
    run("ca", "rotate", "--dir", fresh_ca.folder, "--grace", "0")
    fresh_ca_new = CertificateAuthority.load(fresh_ca.folder)
    fresh_ca_new.issue(kind="client", name="new")
    early = run("ca", "retire", "--dir", fresh_ca.folder, ok=False)
    assert early.returncode != 0
    assert f"{fresh_ca.issuer.not_valid_after_utc:%Y-%m-%d}" in early.stderr  # the issuer's end


def test_an_interrupted_renewal_does_not_lock_the_client_out(
    fresh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            _, url = await start_service(nursery, fresh_ca, min_interval=timedelta(0))
            prefix = tmp_path / "p"
            issue(fresh_ca, prefix, name="player")
            await trio.to_thread.run_sync(
                client.renew_once, url, fresh_ca.folder / "ca.crt", prefix
            )
            # Crash between the two writes of the next renewal: the key kept as .prev,
            # a new key written, the certificate not yet.
            (tmp_path / "p.key.prev").write_bytes((tmp_path / "p.key").read_bytes())
            other = fresh_ca.issue(kind="client", name="whatever")
            assert other.key is not None
            (tmp_path / "p.key").write_bytes(pem.private_key_pem(other.key))
            renewed = await trio.to_thread.run_sync(
                client.renew_once, url, fresh_ca.folder / "ca.crt", prefix
            )
            assert renewed.subject.rfc4514_string() == "CN=player"
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def test_ca_renew_says_what_is_wrong_with_its_arguments(tmp_path: Path) -> None:
    missing = run("ca", "renew", "--dir", tmp_path / "nope", "--cert", tmp_path / "x", "--watch",
                  ok=False)  # fmt: skip
    assert missing.returncode != 0 and "no CA here" in missing.stderr
    assert "Traceback" not in missing.stderr
