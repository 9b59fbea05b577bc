"""Attacks on the handshake that must be refused, and told apart, by a real proxy.

Every certificate here is made on purpose to be wrong in one way: signed by the test CA's
real issuing key where the attack needs a genuine signature (a CA certificate handed to a
"client"), or by a rogue key behind copied names. The clients are real TLS stacks on
127.0.0.1: curl, openssl s_client, the stdlib ``ssl`` module, and tlslite-ng, a pure
Python TLS implementation that (unlike OpenSSL) will send a certificate with a key that
is not its own. Each test's docstring names the threat.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import subprocess
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import requests
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from proxy_env import CLIENT_TIMEOUT, Env, start_proxy
from support import Pair

from mtlsproxy import config, pem
from mtlsproxy.address import Address
from mtlsproxy.errors import ConfigError
from mtlsproxy.identity import Identity, IdentityError
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.pki.service import Refused, RenewalService, ServiceSettings
from mtlsproxy.tls import context as tls_context
from mtlsproxy.tls.context import build_client_context, build_server_context
from mtlsproxy.tls.engine import TLSStream

with warnings.catch_warnings():
    # tlslite-ng's package imports its asyncore integration (deprecated since Python 3.6,
    # a DeprecationWarning on 3.11, which this suite makes an error); we use none of it.
    warnings.simplefilter("ignore", DeprecationWarning)
    from tlslite import HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey
    from tlslite.errors import TLSError

LISTENER = "127.0.0.1:0"  # the label of make_env's listener
NOW = dt.datetime.now(dt.UTC)


# ---- forged certificates ------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: pem.PublicKey,
    signing_key: pem.PrivateKey,
    *,
    ca: bool,
    path_length: int | None = None,
    client: bool = True,
    aki_of: x509.Certificate | None = None,
) -> x509.Certificate:
    """A certificate as the attack needs it. No AKID unless ``aki_of``: a forger copying
    names has no reason to add the one field that would give the other key away."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        # digitalSignature: what OpenSSL's sslclient purpose wants of a client leaf.
        .add_extension(_usage(sign=client, cert_sign=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if aki_of is not None:
        ski = aki_of.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _write(folder: Path, stem: str, chain: list[x509.Certificate], key: Any) -> Pair:
    crt, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(b"".join(pem.certificate_pem(c) for c in chain))
    key_path.write_bytes(pem.private_key_pem(key))
    return Pair(crt, key_path)


def ca_leaf(ca: CertificateAuthority, folder: Path, name: str = "sub-ca") -> Pair:
    """CA:TRUE without a path length, keyCertSign and clientAuth, signed by the real issuing
    CA: everything a client certificate needs, plus the power to sign more of them."""
    key = _key()
    cert = _cert(_cn(name), ca.issuer.subject, key.public_key(), ca.issuer_key,
                 ca=True, aki_of=ca.issuer)  # fmt: skip
    return _write(folder, name, [cert, ca.issuer], key)


def leaf_sha256(pair: Pair) -> str:
    cert = pem.load_certificates(pair.crt.read_bytes(), pair.crt)[0]
    return cert.fingerprint(hashes.SHA256()).hex()


async def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Wait for the proxy's side of a refusal (it logs after the client has gone)."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


def refused(env: Env, reason: str) -> float:
    return env.proxy.metrics.sample(
        "mtlsproxy_handshakes_total", {"listener": LISTENER, "result": reason, "resumed": "false"}
    )


def listener_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtlsproxy.listener"]


# ---- A: a CA certificate is no client identity --------------------------------------


def test_identity_refuses_a_ca_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    """Threat: a CA certificate admitted as a client could sign further "clients"."""
    pair = ca_leaf(ca, tmp_path)
    cert = pem.load_certificates(pair.crt.read_bytes(), pair.crt)[0]
    with pytest.raises(IdentityError, match="CA") as info:
        Identity.from_certificate(cert)
    assert info.value.reason == "ca_cert"
    assert leaf_sha256(pair) in str(info.value)  # which certificate, for the log


async def test_a_ca_certificate_gets_no_backend_and_is_counted_as_ca_cert(
    make_env: Any, ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Threat: a certificate with CA:TRUE, keyCertSign and clientAuth, issued by the real
    issuing CA (a mis-issuance, or a sub-CA meant for something else), is a valid chain
    and passes OpenSSL's sslclient purpose. Admitted, its holder could mint "clients" of
    their choosing wherever a CA without a path length sits above it. It must reach no
    backend, and the refusal must say why: ``ca_cert``, not a generic ``bad_cert``."""
    env = await make_env()
    sub_ca = ca_leaf(ca, tmp_path)
    caplog.set_level(logging.INFO, logger="mtlsproxy.listener")
    proc = await env.curl("-i", env.url + "/", pair=sub_ca)
    assert proc.returncode != 0, proc.stdout  # closed after the handshake: no answer
    assert b"HTTP/" not in proc.stdout and b"x-forwarded-client-cert" not in proc.stdout
    await until(lambda: refused(env, "ca_cert") == 1, "the ca_cert refusal")
    assert refused(env, "bad_cert") == 0
    (line,) = [x for x in listener_lines(caplog) if "ca_cert" in x]
    assert "refused 127.0.0.1:" in line and f"sha256:{leaf_sha256(sub_ca)}" in line, line
    assert (await env.curl(env.url + "/")).returncode == 0  # ordinary clients still pass


async def test_the_mtls_admin_refuses_a_ca_certificate(
    nursery: trio.Nursery, ca: CertificateAuthority, server_pair: Pair, tmp_path: Path
) -> None:
    """Threat: the same CA certificate used on the admin listener (mtls, no allow rules:
    any client of the CA may read /certs and reload). It is refused by the same check."""
    path = tmp_path / "admin.toml"
    path.write_text(f"""
[tls]
cert = "{server_pair.crt}"
key = "{server_pair.key}"
client_ca = "{ca.folder / "ca.crt"}"

[admin]
listen = "127.0.0.1:0"
mtls = true

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:9"]
""")
    _, _, admin_port = await start_proxy(nursery, path)
    sub_ca = ca_leaf(ca, tmp_path)

    def get() -> requests.Response:
        return requests.get(
            f"https://localhost:{admin_port}/certs",
            verify=str(ca.folder / "ca.crt"),
            cert=(str(sub_ca.crt), str(sub_ca.key)),
            timeout=CLIENT_TIMEOUT,
        )

    answer = await trio.to_thread.run_sync(get)
    assert answer.status_code == 403, answer.text
    assert "CA" in answer.text and "client_cas" not in answer.text


def test_the_renewal_service_refuses_to_renew_a_ca_certificate(tmp_path: Path) -> None:
    """Threat: a CA certificate traded at the renewal service for a fresh client leaf."""
    fresh = CertificateAuthority.init(tmp_path / "ca", name="renew")
    sub_ca = pem.load_certificates(ca_leaf(fresh, tmp_path).crt.read_bytes(), "sub-ca")[0]
    key = _key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_cn("sub-ca"))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    service = RenewalService(ServiceSettings(folder=fresh.folder, listen=Address("127.0.0.1", 0)))
    with pytest.raises(Refused) as info:
        service.renew(sub_ca, csr)
    assert info.value.status == 403 and "CA" in info.value.reason
    assert service.issued == 0


# ---- B1: a certificate without its key ----------------------------------------------


def _tlslite_get(port: int, pair: Pair, key_pem: str, version: tuple[int, int]) -> bytes | str:
    """One GET through tlslite-ng presenting ``pair``'s chain and signing with ``key_pem``.
    Returns the answer's bytes, or the TLS error's text."""
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = version
    # tlslite-ng compresses its Certificate message (RFC 8879) even when the server did not
    # offer it, which OpenSSL rightly calls an unexpected message; send it plain.
    settings.certificate_compression_send = []
    chain = X509CertChain()
    chain.parsePemList(pair.crt.read_text())
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        conn = TLSConnection(sock)
        try:
            conn.handshakeClientCert(
                chain, parsePEMKey(key_pem, private=True), settings=settings,
                serverName="localhost", alpn=[bytearray(b"http/1.1")],
            )  # fmt: skip
            conn.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.read():
                answer += bytes(chunk)
            return answer
        except (TLSError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("version", [(3, 3), (3, 4)], ids=["tls1.2", "tls1.3"])
async def test_a_certificate_without_its_key_is_a_bad_signature(
    make_env: Any, client_pair: Pair, caplog: pytest.LogCaptureFixture, version: tuple[int, int]
) -> None:
    """Threat: someone holding another client's certificate (it is not secret: it is sent
    in clear in TLS 1.2, logged, backed up) but not its key tries to pass as that client.
    The chain verifies; the CertificateVerify signature cannot. That is an impersonation
    attempt, and must be counted apart from the port scans in ``protocol_error``, with the
    identity it claimed in the log, labelled as not verified."""
    env = await make_env()
    caplog.set_level(logging.INFO, logger="mtlsproxy.listener")
    own_key = client_pair.key.read_text()
    # The control: the same client with its own key is served (tlslite-ng can do mTLS).
    answer = await trio.to_thread.run_sync(_tlslite_get, env.port, client_pair, own_key, version)
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200"), answer

    other_key = pem.private_key_pem(_key()).decode()
    got = await trio.to_thread.run_sync(_tlslite_get, env.port, client_pair, other_key, version)
    assert isinstance(got, str) and "decrypt_error" in got, got  # an alert, no response
    await until(lambda: refused(env, "bad_signature") == 1, "the bad_signature refusal")
    assert refused(env, "protocol_error") == 0
    (line,) = [x for x in listener_lines(caplog) if "bad_signature" in x]
    assert "claimed" in line and "not verified" in line, line
    assert f"sha256:{leaf_sha256(client_pair)}" in line and "CN=player-1" in line, line


# ---- B2: a rogue CA that copies our names -------------------------------------------


def _rogue_chain(ca: CertificateAuthority, at: str) -> tuple[list[x509.Certificate], Any]:
    """A client chain whose names lead to our CA and whose keys do not.

    ``intermediate``: a rogue root and issuing CA with the real ones' subjects, no AKID
    anywhere; the client sends leaf + rogue issuing CA, and OpenSSL checks the rogue's
    signature against the real root's key (depth 1). ``leaf``: a leaf naming the real
    issuing CA as its issuer, sent with the real (public) issuing CA certificate; the
    leaf's own signature fails (depth 0)."""
    key = _key()
    rogue_key = _key()
    if at == "intermediate":
        rogue_issuer = _cert(ca.issuer.subject, ca.root.subject, rogue_key.public_key(),
                             _key(), ca=True, path_length=0, client=False)  # fmt: skip
        leaf = _cert(_cn("mallory"), ca.issuer.subject, key.public_key(), rogue_key, ca=False)
        return [leaf, rogue_issuer], key
    leaf = _cert(_cn("mallory"), ca.issuer.subject, key.public_key(), rogue_key, ca=False)
    return [leaf, ca.issuer], key


@pytest.mark.parametrize("at", ["intermediate", "leaf"])
async def test_a_rogue_ca_that_copies_our_names_is_unknown_ca(
    make_env: Any, ca: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    at: str,
) -> None:  # fmt: skip
    """Threat: a CA someone else runs, with the same subject names as ours (names are
    public: they are in every chain we send) and no AKID to give it away. OpenSSL finds our
    CA by name and the signature fails (X509_V_ERR 7). For the operator that is a
    certificate from another CA: ``unknown_ca``, as documented, not ``bad_cert``."""
    env = await make_env()
    caplog.set_level(logging.INFO, logger="mtlsproxy.listener")
    chain, key = _rogue_chain(ca, at)
    rogue = _write(tmp_path, f"rogue-{at}", chain, key)
    proc = await env.curl("-i", env.url + "/", pair=rogue)
    assert proc.returncode != 0 and b"HTTP/" not in proc.stdout, proc.stdout
    assert b"alert" in proc.stderr, proc.stderr  # refused in the handshake
    await until(lambda: refused(env, "unknown_ca") == 1, "the unknown_ca refusal")
    assert refused(env, "bad_cert") == 0
    (line,) = [x for x in listener_lines(caplog) if "unknown_ca" in x]
    assert "X509_V_ERR 7" in line, line


# ---- C1: key exchange groups --------------------------------------------------------


def _s_client(env: Env, *extra: str) -> list[str]:
    return [
        "openssl", "s_client", "-connect", f"127.0.0.1:{env.port}", "-servername", "localhost",
        "-CAfile", str(env.ca_bundle), "-verify_return_error", "-ign_eof",
        "-cert", str(env.client.crt), "-cert_chain", str(env.client.crt),
        "-key", str(env.client.key), *extra,
    ]  # fmt: skip


async def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLIENT_TIMEOUT):
        return await trio.run_process(
            argv, stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip


@pytest.mark.parametrize("groups", ["secp521r1", "X448", "ffdhe2048"])
async def test_groups_outside_the_profile_are_refused(make_env: Any, groups: str) -> None:
    """Threat: every group beyond Mozilla's intermediate profile is more code a client may
    pick and more CPU per handshake it can make us spend (secp521r1 and X448 cost several
    times X25519; ffdhe2048 is slower still, and weaker). A client offering only those
    must find no common group. TLS 1.3: in TLS 1.2 the same list also names the curves of
    ECDSA certificates, so a client without P-256 was refused there before this change."""
    env = await make_env()
    proc = await _run(_s_client(env, "-tls1_3", "-groups", groups))
    assert b"HTTP/1.1" not in proc.stdout
    assert b"handshake failure" in proc.stderr, proc.stderr
    await until(lambda: refused(env, "protocol_error") == 1, "the refusal")


@pytest.mark.parametrize(
    ("groups", "version", "shown"),
    [("X25519", "-tls1_3", b"X25519"), ("P-256", "-tls1_3", b"ECDH, prime256v1"),
     ("P-384", "-tls1_3", b"ECDH, secp384r1"), ("X25519:P-256", "-tls1_2", b"X25519"),
     ("P-256", "-tls1_2", b"ECDH, prime256v1")],
)  # fmt: skip
async def test_profile_groups_are_accepted(
    make_env: Any, groups: str, version: str, shown: bytes
) -> None:
    """The groups of the profile work, in TLS 1.3 and 1.2 (where a P-256 server certificate
    needs P-256 among the client's groups, so 1.2 is tried with it offered)."""
    env = await make_env()
    proc = await _run(_s_client(env, version, "-groups", groups))
    assert b"HTTP/1.1 200" in proc.stdout, proc.stderr
    assert b"Server Temp Key: " + shown in proc.stdout, [
        x for x in proc.stdout.splitlines() if b"Temp" in x
    ]


async def _engine_group(env: Env, groups: list[str]) -> str | None:
    ctx = build_client_context(
        server_cas=pem.load_certificates(env.ca_bundle.read_bytes(), env.ca_bundle),
        cert_chain=pem.load_certificates(env.client.crt.read_bytes(), env.client.crt),
        key=pem.load_private_key(env.client.key.read_bytes(), env.client.key),
        groups=groups,
    )
    with trio.fail_after(CLIENT_TIMEOUT):
        tls = TLSStream(await trio.open_tcp_stream("127.0.0.1", env.port), ctx,
                        server_side=False, server_hostname="localhost")  # fmt: skip
        await tls.do_handshake()
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await tls.receive_some():
            answer += chunk
        await tls.aclose()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return tls.group


async def test_hybrid_ml_kem_is_the_first_choice(make_env: Any) -> None:
    """Harvest now, decrypt later: a client that can do X25519MLKEM768 gets it, even when
    it also offers X25519. The client here is our own engine, on the OpenSSL of the
    cryptography wheel (the system openssl may predate ML-KEM)."""
    env = await make_env()
    assert await _engine_group(env, list(tls_context.DEFAULT_GROUPS)) == "X25519MLKEM768"
    assert await _engine_group(env, ["X25519MLKEM768"]) == "X25519MLKEM768"
    group = await _engine_group(env, ["X25519"])
    assert group is not None and group.lower() == "x25519"  # OpenSSL spells it x25519 here


async def test_tls_groups_from_the_config_apply(make_env: Any) -> None:
    """An operator who narrows ``tls.groups`` gets exactly that list."""
    env = await make_env(tls='groups = ["secp384r1"]')
    refused_x25519 = await _run(_s_client(env, "-tls1_3", "-groups", "X25519"))
    assert b"HTTP/1.1" not in refused_x25519.stdout
    accepted = await _run(_s_client(env, "-tls1_3", "-groups", "P-384"))
    assert b"HTTP/1.1 200" in accepted.stdout, accepted.stderr


def _config_with(tmp_path: Path, ca: CertificateAuthority, server: Pair, groups: str) -> Path:
    path = tmp_path / "groups.toml"
    path.write_text(f"""
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca.folder / "ca.crt"}"
groups = {groups}

[[listeners]]
listen = "127.0.0.1:0"
mode = "tcp"
backends = ["127.0.0.1:9"]
""")
    return path


@pytest.mark.parametrize(
    ("groups", "named"),
    [('["X25519", "brainpoolP999"]', "'brainpoolP999'"), ('["X25519:X448"]', "'X25519:X448'"),
     ("[]", "at least 1"), ('["?X448"]', "'?X448'")],
)  # fmt: skip
def test_a_bad_group_is_refused_at_load(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, groups: str, named: str
) -> None:
    """A typo in ``tls.groups`` stops the proxy at start, naming the key and the group,
    instead of OpenSSL silently skipping it or every handshake failing."""
    with pytest.raises(ConfigError) as info:
        config.load(_config_with(tmp_path, ca, server_pair, groups))
    message = str(info.value)
    assert "tls" in message and "groups" in message and named in message, message


def test_the_default_groups_are_mozillas_intermediate_profile(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    cfg = config.load(_config_with(tmp_path, ca, server_pair, '["X25519", "P-256"]'))
    assert cfg.tls.groups == ("X25519", "P-256")
    assert tls_context.DEFAULT_GROUPS == ("X25519MLKEM768", "X25519", "prime256v1", "secp384r1")
    with pytest.raises(ValueError, match="'nope'"):
        build_server_context(
            cert_chain=[ca.issuer], key=ca.issuer_key, client_cas=[ca.root],
            session_id_context=b"x", groups=["X25519", "nope"],
        )  # fmt: skip


async def test_the_backend_side_keeps_to_its_groups(
    nursery: trio.Nursery, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    """Towards backends the proxy is the client: it offers only its groups, so a backend
    that accepts only secp521r1 is refused rather than negotiated down to."""
    server_chain = pem.load_certificates(server_pair.crt.read_bytes(), server_pair.crt)
    server_key = pem.load_private_key(server_pair.key.read_bytes(), server_pair.key)
    chain = pem.load_certificates(client_pair.crt.read_bytes(), client_pair.crt)
    key = pem.load_private_key(client_pair.key.read_bytes(), client_pair.key)
    results: list[str] = []

    async def backend(stream: trio.SocketStream) -> None:
        ctx = build_server_context(cert_chain=server_chain, key=server_key,
                                   client_cas=[ca.root], session_id_context=b"b",
                                   groups=["secp521r1"])  # fmt: skip
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=5)
            results.append("ok")
        except Exception as exc:
            results.append(type(exc).__name__)

    listeners = await nursery.start(partial(trio.serve_tcp, backend, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    ctx = build_client_context(server_cas=[ca.root], cert_chain=chain, key=key)
    with trio.fail_after(CLIENT_TIMEOUT):
        tls = TLSStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                        server_side=False, server_hostname="localhost")  # fmt: skip
        with pytest.raises(Exception, match="handshake failed"):
            await tls.do_handshake()
        while not results:
            await trio.sleep(0.01)
    assert results == ["HandshakeError"]


# ---- C2: TLS 1.2 session-id resumption after a client leaves without close_notify ---


def _request_and_leave(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool, int]:
    """One request (read to the end of its response), then close the socket *without* close_notify (no unwrap), as curl,
    browsers and most HTTP client libraries do once they have read the response."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    try:
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/again", headers=[("host", "localhost")])
        tls.sendall(client.send(request) + client.send(h11.EndOfMessage()))  # keep-alive
        status, event = 0, None
        while not isinstance(event, h11.EndOfMessage):
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(tls.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.ConnectionClosed):
                break
        return tls.session, bool(tls.session_reused), status
    finally:
        tls.close()  # SSLSocket.close() sends no close_notify; only unwrap() does


async def test_tls12_session_id_resumption_survives_a_client_without_close_notify(
    make_env: Any, client_pair: Pair
) -> None:
    """Threat to availability, not secrecy: OpenSSL 3+ treats an EOF without close_notify
    as a fatal error and drops that session from its cache, so every client that leaves
    the usual way pays a full handshake (certificate verification and all) next time."""
    env = await make_env()
    ctx = ssl.create_default_context(cafile=str(env.ca_bundle))
    ctx.load_cert_chain(client_pair.crt, client_pair.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET  # session ids: the server's cache, not a ticket

    session, reused, status = await trio.to_thread.run_sync(_request_and_leave, env.port, ctx, None)
    assert not reused and status == 200
    # The proxy has seen the EOF once its connection count is back to zero.
    gauge = {"listener": LISTENER}
    await until(
        lambda: env.proxy.metrics.sample("mtlsproxy_active_connections", gauge) == 0, "the close"
    )
    _, reused, status = await trio.to_thread.run_sync(_request_and_leave, env.port, ctx, session)
    assert status == 200
    assert reused
    labels = {"listener": LISTENER, "result": "ok", "resumed": "true"}
    assert env.proxy.metrics.sample("mtlsproxy_handshakes_total", labels) == 1


def _records_then_fin(port: int, ctx: ssl.SSLContext, how: str) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    for part in (b"one ", b"two ", b"three"):
        tls.sendall(part)  # one TLS record each
    if how == "close_notify":
        tls.unwrap().close()
        return
    tls.shutdown(socket.SHUT_WR)
    while tls.recv(4096):
        pass
    tls.close()


@pytest.mark.parametrize(("how", "clean"), [("close_notify", True), ("eof", False)])
async def test_every_record_before_the_eof_is_delivered(
    ca: CertificateAuthority, server_pair: Pair, client_pair: Pair, how: str, clean: bool
) -> None:
    """Guard for the EOF handling: records already received are delivered before b"",
    and ``eof_was_clean`` still tells close_notify from a bare EOF."""
    ctx = build_server_context(
        cert_chain=pem.load_certificates(server_pair.crt.read_bytes(), server_pair.crt),
        key=pem.load_private_key(server_pair.key.read_bytes(), server_pair.key),
        client_cas=[ca.root], session_id_context=b"t",
    )  # fmt: skip
    seen: list[tuple[bytes, bool | None]] = []
    done = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=5)
            await trio.sleep(0.3)  # let everything, FIN included, arrive before reading
            data = b""
            while chunk := await tls.receive_some(3):
                data += chunk
            seen.append((data, tls.eof_was_clean))
            await tls.aclose()
        finally:
            done.set()

    client = ssl.create_default_context(cafile=str(ca.folder / "ca.crt"))
    client.load_cert_chain(client_pair.crt, client_pair.key)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        await trio.to_thread.run_sync(_records_then_fin, port, client, how)
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert seen == [(b"one two three", clean)]


def _half_close_client(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    tls.sendall(b"ping")
    assert tls.recv(4) == b"ping"
    found = tls.session, bool(tls.session_reused)  # before shutdown() drops the SSL object
    tls.shutdown(socket.SHUT_WR)  # a bare FIN: no close_notify from us
    while tls.recv(4096):  # until the server closes (its close_notify, read raw)
        pass
    tls.close()
    return found


async def test_a_session_survives_our_close_notify_then_a_bare_eof(
    ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    """The order of a lingering close: we send close_notify first (``send_eof``), then
    read until the client goes, which it does without close_notify. OpenSSL records that
    EOF by *setting* the shutdown state to "received", which forgets the "sent" and makes
    freeing the connection drop its session; the engine puts "sent" back. (A guard for
    the engine's EOF handling: the old fatal-EOF path happened to keep this session.)"""
    ctx = build_server_context(
        cert_chain=pem.load_certificates(server_pair.crt.read_bytes(), server_pair.crt),
        key=pem.load_private_key(server_pair.key.read_bytes(), server_pair.key),
        client_cas=[ca.root], session_id_context=b"t",
    )  # fmt: skip
    ended = trio.Semaphore(0)

    async def handler(stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake(timeout=5)
            await tls.send_all(await tls.receive_some())
            await tls.send_eof()
            while await tls.receive_some():
                pass
            assert tls.eof_was_clean is False
            await tls.aclose()
        finally:
            ended.release()

    client = ssl.create_default_context(cafile=str(ca.folder / "ca.crt"))
    client.load_cert_chain(client_pair.crt, client_pair.key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.options |= ssl.OP_NO_TICKET
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        session, _ = await trio.to_thread.run_sync(_half_close_client, port, client, None)
        with trio.fail_after(10):
            await ended.acquire()  # the first connection is closed and freed
        _, reused = await trio.to_thread.run_sync(_half_close_client, port, client, session)
        with trio.fail_after(10):
            await ended.acquire()
        nursery.cancel_scope.cancel()
    assert reused
