"""The private CA: what `ca init`, `ca issue` and `ca show` write, checked with real OpenSSL."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import IssueFn, Pair, run

from mtlsproxy import pem
from mtlsproxy.errors import CAError
from mtlsproxy.pki import CertificateAuthority


def openssl_verify(bundle: Path, leaf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # The chain file holds leaf + intermediate; give openssl the intermediate as untrusted.
    certs = pem.load_certificates(leaf.read_bytes(), leaf)
    inter = leaf.with_suffix(".inter.pem")
    inter.write_bytes(b"".join(pem.certificate_pem(c) for c in certs[1:]))
    only_leaf = leaf.with_suffix(".leaf.pem")
    only_leaf.write_bytes(pem.certificate_pem(certs[0]))
    return subprocess.run(
        ["openssl", "verify", "-CAfile", bundle, "-untrusted", inter, *extra, only_leaf],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "ca"
    proc = run("ca", "init", "--dir", folder)
    assert "trust bundle" in proc.stdout
    return folder


def load(path: Path) -> list[x509.Certificate]:
    return pem.load_certificates(path.read_bytes(), path)


T = TypeVar("T", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


# --- ca init -------------------------------------------------------------------------------


def test_init_lays_out_a_root_and_an_issuer(cli_ca: Path) -> None:
    assert stat.S_IMODE(cli_ca.stat().st_mode) == 0o700
    for name in ("root.key", "issuer.key"):
        assert stat.S_IMODE((cli_ca / name).stat().st_mode) == 0o600
    (root,) = load(cli_ca / "ca.crt")
    assert load(cli_ca / "root.crt") == [root]
    (issuer,) = load(cli_ca / "issuer.crt")
    now = datetime.now(UTC)

    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert ext(root, x509.BasicConstraints).value.ca
    assert ext(root, x509.BasicConstraints).critical
    assert timedelta(days=3640) < root.not_valid_after_utc - now <= timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)

    issuer.verify_directly_issued_by(root)
    assert ext(issuer, x509.BasicConstraints).value.path_length == 0
    assert ext(issuer, x509.KeyUsage).value.key_cert_sign
    assert timedelta(days=364) < issuer.not_valid_after_utc - now <= timedelta(days=365)
    aki = ext(issuer, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ext(root, x509.SubjectKeyIdentifier).value.digest


def test_init_refuses_to_overwrite_without_force(cli_ca: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    run("ca", "init", "--dir", folder)
    before = (folder / "ca.crt").read_bytes()
    proc = run("ca", "init", "--dir", folder, ok=False)
    assert proc.returncode == 1
    assert "already holds a CA" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (folder / "ca.crt").read_bytes() == before
    run("ca", "init", "--dir", folder, "--force")
    assert (folder / "ca.crt").read_bytes() != before


def test_init_refuses_an_issuer_outliving_its_root(tmp_path: Path) -> None:
    proc = run("ca", "init", "--dir", tmp_path / "ca", "--root-ttl", "30d", ok=False)
    assert proc.returncode == 1 and "must not exceed the root's" in proc.stderr
    run("ca", "init", "--dir", tmp_path / "ca", "--root-ttl", "30d", "--issuer-ttl", "7d")


# --- ca issue ------------------------------------------------------------------------------


def test_issue_server_defaults(cli_ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "certs" / "api"
    run("ca", "issue", "--dir", cli_ca, "--kind", "server", "--name", "api.example", "--out", out)
    crt, key = tmp_path / "certs" / "api.crt", tmp_path / "certs" / "api.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf, inter = load(crt)
    assert inter == load(cli_ca / "issuer.crt")[0]
    assert pem.key_matches(pem.load_private_key(key.read_bytes(), key), leaf)

    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.example"
    sans = ext(leaf, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example"]
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ski = ext(inter, x509.SubjectKeyIdentifier).value.digest
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert ext(leaf, x509.SubjectKeyIdentifier).value.digest
    assert 0 < leaf.serial_number < 2**128
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(hours=23, minutes=58) < lifetime <= timedelta(hours=24)

    assert openssl_verify(cli_ca / "ca.crt", crt, "-purpose", "sslserver").returncode == 0
    assert openssl_verify(cli_ca / "ca.crt", crt, "-purpose", "sslclient").returncode != 0


def test_issue_client_with_every_kind_of_name(cli_ca: Path, tmp_path: Path) -> None:
    run(
        "ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "player-1",
        "--ou", "players", "--ou", "eu", "--dns", "p1.game.example", "--ip", "10.0.0.7",
        "--ip", "::1", "--uri", "spiffe://game.example/player/1", "--out", tmp_path / "p1",
    )  # fmt: skip
    leaf = load(tmp_path / "p1.crt")[0]
    ous = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert ous == ["players", "eu"]
    sans = ext(leaf, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["p1.game.example"]  # no automatic DNS:NAME
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://game.example/player/1"
    ]
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    proc = openssl_verify(cli_ca / "ca.crt", tmp_path / "p1.crt", "-purpose", "sslclient")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_certificate_from_another_ca_does_not_verify(
    cli_ca: Path, other_ca: CertificateAuthority, issue_other: IssueFn
) -> None:
    stranger = issue_other("client", "mallory")
    proc = openssl_verify(cli_ca / "ca.crt", stranger.crt)
    assert proc.returncode != 0
    assert "unable to get local issuer certificate" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [("ed25519", ed25519.Ed25519PublicKey), ("rsa-2048", rsa.RSAPublicKey)],
)
def test_key_types(cli_ca: Path, tmp_path: Path, key_type: str, key_class: type) -> None:
    out = tmp_path / key_type
    run("ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "k", "--key-type", key_type,
        "--out", out)  # fmt: skip
    leaf = load(tmp_path / f"{key_type}.crt")[0]
    assert isinstance(leaf.public_key(), key_class)
    assert openssl_verify(cli_ca / "ca.crt", tmp_path / f"{key_type}.crt").returncode == 0


def test_an_ed25519_ca_signs_verifiable_leaves(tmp_path: Path) -> None:
    run("ca", "init", "--dir", tmp_path / "ca", "--key-type", "ed25519")
    run("ca", "issue", "--dir", tmp_path / "ca", "--kind", "server", "--name", "localhost",
        "--out", tmp_path / "s")  # fmt: skip
    assert openssl_verify(tmp_path / "ca" / "ca.crt", tmp_path / "s.crt").returncode == 0


def test_ttl_bounds(cli_ca: Path, tmp_path: Path) -> None:
    run("ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "short", "--ttl", "90s",
        "--out", tmp_path / "short")  # fmt: skip
    leaf = load(tmp_path / "short.crt")[0]
    remaining = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(seconds=80) < remaining <= timedelta(seconds=90)

    long = run("ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "x", "--ttl", "400d",
               "--out", tmp_path / "long", ok=False)  # fmt: skip
    assert long.returncode == 1 and "would outlive the issuing CA" in long.stderr
    assert not (tmp_path / "long.crt").exists()

    zero = run("ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "x", "--ttl", "0s",
               "--out", tmp_path / "zero", ok=False)  # fmt: skip
    assert zero.returncode == 1 and "must be positive" in zero.stderr

    bad = run("ca", "issue", "--dir", cli_ca, "--kind", "client", "--name", "x", "--ttl", "1y",
              "--out", tmp_path / "bad", ok=False)  # fmt: skip
    assert bad.returncode == 2 and "not a duration" in bad.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--dns", "not a name"), ("--dns", "-lead.example"), ("--ip", "10.0.0.300"),
     ("--uri", "no-scheme"), ("--uri", "spiffe://Game.Example/p"), ("--uri", "spiffe://g.example/a//b"),
     ("--uri", "spiffe://g.example:80/p")],
)  # fmt: skip
def test_bad_names_are_refused_at_issue_time(
    ca: CertificateAuthority, flag: str, value: str
) -> None:
    kwargs = {"--dns": "dns", "--ip": "ips", "--uri": "uris"}[flag]
    with pytest.raises(CAError, match=flag):
        ca.issue(kind="client", name="x", **{kwargs: [value]})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uri", "why"),
    [("spiffe:///p", "no trust domain"), ("spiffe://Game.Example/p", "must be lowercase ('game.example')"),
     ("spiffe://g.example:80/p", "may not have a port"), ("spiffe://u@g.example/p", "user info"),
     ("spiffe://g.example/p?x=1", "query"), ("spiffe://g.example/p#f", "fragment"),
     ("spiffe://g.example/a//b", "empty segment"), ("spiffe://g.example/p/", "empty segment"),
     ("spiffe://g.example/a/../b", "'.' or '..'")],
)  # fmt: skip
def test_an_invalid_spiffe_id_says_which_rule_it_breaks(
    ca: CertificateAuthority, uri: str, why: str
) -> None:
    with pytest.raises(CAError, match="is not a valid SPIFFE ID: ") as refused:
        ca.issue(kind="client", name="x", uris=[uri])
    assert why in str(refused.value)


def test_wildcard_dns_is_allowed(ca: CertificateAuthority) -> None:
    leaf = ca.issue(kind="server", name="api", dns=["*.api.example"]).certificate
    assert ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "*.api.example"
    ]


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    proc = run("ca", "issue", "--dir", tmp_path, "--kind", "client", "--name", "x",
               "--out", tmp_path / "x", ok=False)  # fmt: skip
    assert proc.returncode == 1
    assert "no CA here" in proc.stderr and "mtlsproxy ca init" in proc.stderr


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {ca.issue(kind="client", name="s").certificate.serial_number for _ in range(8)}
    assert len(serials) == 8
    assert max(s.bit_length() for s in serials) > 120  # 128 random bits, not a counter


# --- ca show -------------------------------------------------------------------------------


def test_show_prints_what_an_operator_needs(client_pair: Pair) -> None:
    out = run("ca", "show", client_pair.crt).stdout
    leaf = load(client_pair.crt)[0]
    digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert f"fingerprint: sha256:{digest}" in out
    assert "subject:     CN=player-1,OU=players" in out
    assert "URI:spiffe://game.example/player/1" in out
    assert f"serial:      {leaf.serial_number:x}" in out
    assert "certificate 2 of 2" in out  # the chain is described too
    assert "left)" in out

    first = json.loads(run("ca", "show", "--json", client_pair.crt).stdout.splitlines()[0])
    assert first["fingerprint"] == f"sha256:{digest}"
    assert first["usage"] == ["clientAuth"]


def test_show_says_expired(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = datetime.now(UTC) - timedelta(days=2)
    ca.issue(kind="client", name="old", now=old).write(tmp_path / "old")
    assert "EXPIRED 1d" in run("ca", "show", tmp_path / "old.crt").stdout


def test_show_refuses_a_truncated_file(client_pair: Pair, tmp_path: Path) -> None:
    cut = tmp_path / "cut.crt"
    cut.write_bytes(client_pair.crt.read_bytes()[:-100])
    proc = run("ca", "show", cut, ok=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr
