"""`mtlsproxy check`: exit 0 with a summary, or exit 2 with one line naming file and reason."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import MTLSPROXY, IssueFn, Pair
from test_config import SAMPLE

from mtlsproxy.pki import CertificateAuthority


@pytest.fixture
def setup(tmp_path: Path, ca: CertificateAuthority, server_pair: Pair) -> Path:
    shutil.copy(server_pair.crt, tmp_path / "server.crt")
    shutil.copy(server_pair.key, tmp_path / "server.key")
    shutil.copy(ca.folder / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "mtlsproxy.toml").write_text(SAMPLE)
    return tmp_path


def check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTLSPROXY, "check", "--config", str(folder / "mtlsproxy.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def assert_refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("mtlsproxy: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def test_sample_config_passes(setup: Path) -> None:
    proc = check(setup)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "CN=localhost" in proc.stdout
    assert "127.0.0.1:8443 http, 1 route(s)" in proc.stdout


def test_key_of_another_certificate(setup: Path, issue: IssueFn) -> None:
    other = issue("server", "other")
    shutil.copy(other.key, setup / "server.key")
    assert_refused(check(setup), "server.key", "not the key of")


def test_truncated_bundle(setup: Path, ca: CertificateAuthority) -> None:
    whole = (ca.folder / "ca.crt").read_bytes() + (ca.folder / "issuer.crt").read_bytes()
    (setup / "ca.crt").write_bytes(whole[:-150])
    assert_refused(check(setup), "ca.crt", "truncated")


def test_bundle_with_a_leaf(setup: Path, client_pair: Pair) -> None:
    shutil.copy(client_pair.crt, setup / "ca.crt")
    assert_refused(check(setup), "ca.crt", "not a CA certificate")


def test_expired_server_certificate(setup: Path, issue: IssueFn) -> None:
    old = issue("server", "localhost", now=datetime.now(UTC) - timedelta(days=3))
    shutil.copy(old.crt, setup / "server.crt")
    shutil.copy(old.key, setup / "server.key")
    assert_refused(check(setup), "server.crt", "expired")


def test_client_certificate_as_server_certificate(setup: Path, client_pair: Pair) -> None:
    shutil.copy(client_pair.crt, setup / "server.crt")
    shutil.copy(client_pair.key, setup / "server.key")
    assert_refused(check(setup), "server.crt", "not for servers")


def test_chain_out_of_order(setup: Path, server_pair: Pair, other_ca: CertificateAuthority) -> None:
    leaf = server_pair.crt.read_bytes().split(b"-----END CERTIFICATE-----")[0]
    wrong_chain = (
        leaf + b"-----END CERTIFICATE-----\n" + (other_ca.folder / "issuer.crt").read_bytes()
    )
    (setup / "server.crt").write_bytes(wrong_chain)
    assert_refused(check(setup), "server.crt", "certificate 1 is not issued by certificate 2")


def test_bad_deny_list(setup: Path) -> None:
    config = setup / "mtlsproxy.toml"
    config.write_text(SAMPLE.replace("# deny", "deny"))
    (setup / "deny.txt").write_text("sha256:nothex\n")
    assert_refused(check(setup), "deny.txt", "line 1")


def test_config_error_is_one_line(setup: Path) -> None:
    (setup / "mtlsproxy.toml").write_text(SAMPLE.replace("mode", "mdoe"))
    assert_refused(check(setup), "listeners[0].mdoe", "did you mean 'mode'")


def test_missing_config(tmp_path: Path) -> None:
    assert_refused(check(tmp_path), "mtlsproxy.toml", "no such file")


def test_routes_serve_would_refuse_are_refused(setup: Path) -> None:
    """`check` used to pass two routes with the same host and path_prefix, which `serve`
    refuses at start: check now builds the route tables too."""
    config = setup / "mtlsproxy.toml"
    config.write_text(
        config.read_text()
        + '\n[[listeners.routes]]\npath_prefix = "/"\nbackends = ["127.0.0.1:8081"]\n'
    )
    assert_refused(check(setup), "listeners[0].routes[1]", "same host and path_prefix")


def test_an_intermediate_only_client_ca_is_warned_about(
    setup: Path, ca: CertificateAuthority
) -> None:
    """A client_ca holding the issuing CA alone refuses every client (OpenSSL verifies up
    to a self-signed root): legal, and almost surely a mistake, so check says so."""
    shutil.copy(ca.folder / "issuer.crt", setup / "ca.crt")
    text = (setup / "mtlsproxy.toml").read_text()
    (setup / "mtlsproxy.toml").write_text(
        text.replace('client_ca = "ca.crt"', 'client_ca = "ca.crt"\nserver_ca = "root.crt"')
    )
    shutil.copy(ca.folder / "ca.crt", setup / "root.crt")
    proc = check(setup)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stdout and "holds no root CA" in proc.stdout
