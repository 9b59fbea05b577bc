"""The credential store with real files: prove before swap, keep the old material on failure."""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from proxy_env import route, write_config
from support import IssueFn, Pair

from mtlsproxy import config, pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.tls.store import CredentialStore


@pytest.fixture
def files(tmp_path: Path, ca: CertificateAuthority, server_pair: Pair) -> Path:
    """A config whose credential files live in tmp_path, ready to be rotated."""
    shutil.copy(server_pair.crt, tmp_path / "server.crt")
    shutil.copy(server_pair.key, tmp_path / "server.key")
    shutil.copy(ca.folder / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "deny.txt").write_text("# nobody yet\n")
    server = Pair(tmp_path / "server.crt", tmp_path / "server.key")
    write_config(
        tmp_path, ca_bundle=tmp_path / "ca.crt", server=server, routes=route([9]),
        tls=f'deny = "{tmp_path / "deny.txt"}"',
    )  # fmt: skip
    return tmp_path


def store_for(folder: Path) -> CredentialStore:
    return CredentialStore(config.load(folder / "mtlsproxy.toml").tls)


def replace(target: Path, source: Path) -> None:
    write_atomic(target, source.read_bytes())


def test_unchanged_content_is_not_a_swap(files: Path) -> None:
    store = store_for(files)
    assert store.reload("poll").result == "unchanged"
    os.utime(files / "server.crt")  # a new mtime alone changes nothing
    assert store.reload("poll").result == "unchanged"
    assert store.current().generation == 1


def test_a_new_server_certificate_swaps_and_counts_a_generation(
    files: Path, issue: IssueFn
) -> None:
    store = store_for(files)
    old = store.current()
    fresh = issue("server", "localhost")
    replace(files / "server.key", fresh.key)
    # The middle state: new key, old certificate. Never swapped in.
    middle = store.reload("poll")
    assert middle.result == "failed" and "not the key of" in (middle.error or "")
    assert store.current() is old
    replace(files / "server.crt", fresh.crt)
    done = store.reload("poll")
    assert done.result == "swapped" and done.generation == 2
    assert store.current().credentials.leaf == pem.load_certificates(fresh.crt.read_bytes(), "f")[0]
    assert store.last_result.result == "swapped"


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("ca.crt", "truncated", "truncated"),
        ("ca.crt", "garbage", "no PEM block"),
        ("ca.crt", "a key", "not a CERTIFICATE"),
        ("server.crt", "garbage", "no PEM block"),
        ("server.key", "garbage", "no PEM block"),
        ("deny.txt", "bad line", "line 1"),
        ("server.crt", "expired", "expired"),
        ("ca.crt", "deleted", "no such file"),
    ],
)
def test_broken_material_is_refused_and_the_old_kept(
    files: Path, ca: CertificateAuthority, issue: IssueFn, file: str, content: str, message: str
) -> None:
    store = store_for(files)
    old = store.current()
    target = files / file
    if content == "truncated":
        whole = target.read_bytes() + (ca.folder / "issuer.crt").read_bytes()
        target.write_bytes(whole[:-120])
    elif content == "garbage":
        target.write_bytes(b"\x00\x01 not pem at all\n")
    elif content == "a key":
        target.write_bytes(target.read_bytes() + (files / "server.key").read_bytes())
    elif content == "bad line":
        target.write_text("sha256:not-hex\n")
    elif content == "expired":
        old_pair = issue("server", "localhost", now=datetime.now(UTC) - timedelta(days=3))
        replace(files / "server.key", old_pair.key)
        replace(target, old_pair.crt)
    elif content == "deleted":
        target.unlink()
    result = store.reload("admin")
    assert result.result == "failed"
    assert message in (result.error or "")
    assert file in (result.error or "") or file == "server.key"  # names the file
    assert store.current() is old
    assert store.last_result == result


def test_a_failing_poll_is_logged_once(files: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = store_for(files)
    (files / "ca.crt").write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR, logger="mtlsproxy.reload"):
        for _ in range(5):
            assert store.reload("poll").result == "failed"
    assert len(caplog.records) == 1
    assert "ca.crt" in caplog.records[0].getMessage()
    assert "still serving generation 1" in caplog.records[0].getMessage()


def test_in_place_rewrite_is_picked_up(files: Path, issue: IssueFn) -> None:
    store = store_for(files)
    thief = issue("client", "thief")
    with (files / "deny.txt").open("a") as f:  # not atomic: the poll reads what is there
        f.write(f"cn:thief  # {thief.crt.name}\n")
    assert store.reload("poll").result == "swapped"
    assert store.current().credentials.deny.cns == {"thief"}


def test_kubernetes_style_symlink_swap(
    tmp_path: Path, ca: CertificateAuthority, issue: IssueFn
) -> None:
    """A Secret volume: files are links through ``..data``, swapped by one rename."""
    first, second = issue("server", "localhost"), issue("server", "localhost")
    mount = tmp_path / "secret"
    mount.mkdir()

    def publish(name: str, pair: Pair) -> None:
        version = mount / name
        version.mkdir()
        shutil.copy(pair.crt, version / "tls.crt")
        shutil.copy(pair.key, version / "tls.key")
        shutil.copy(ca.folder / "ca.crt", version / "ca.crt")
        (mount / "..data_tmp").symlink_to(name)
        (mount / "..data_tmp").replace(mount / "..data")

    publish("..2026_11_28_a", first)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (mount / name).symlink_to(f"..data/{name}")
    write_config(
        tmp_path, ca_bundle=mount / "ca.crt", server=Pair(mount / "tls.crt", mount / "tls.key"),
        routes=route([9]),
    )  # fmt: skip
    store = store_for(tmp_path)
    publish("..2026_11_28_b", second)
    assert store.reload("poll").result == "swapped"
    leaf = store.current().credentials.leaf
    assert leaf == pem.load_certificates(second.crt.read_bytes(), "f")[0]


def test_anchors_are_remembered_and_bounded(files: Path) -> None:
    store = store_for(files)
    store.remember_anchor("leaf", "sha256:root")
    assert store.anchor_of("leaf") == "sha256:root"
    assert store.anchor_of("other") is None
