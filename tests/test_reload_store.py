"""The credential store with real files: prove before swap, keep the old material on failure."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from proxy_env import route, write_config
from support import IssueFn, Pair

from mtlsproxy import config, pem
from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.errors import CredentialError
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.tls.backend import all_backend_files
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


# ---- removals wait for a stable file -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked_store(folder: Path) -> tuple[CredentialStore, FakeClock]:
    clock = FakeClock()
    return CredentialStore(config.load(folder / "mtlsproxy.toml").tls, clock=clock), clock


def test_a_truncated_deny_list_is_never_fail_open(
    files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Threat: `echo sha256:... > deny.txt` truncates before it writes; a poll in between
    read an empty list and let every denied client in (35 requests in 2 s measured)."""
    (files / "deny.txt").write_text("cn:thief\ncn:cheater\n")
    store, clock = clocked_store(files)
    assert store.current().credentials.deny.cns == {"thief", "cheater"}
    (files / "deny.txt").write_text("")  # the truncation, caught by a poll
    with caplog.at_level(logging.WARNING, logger="mtlsproxy.reload"):
        assert store.reload("poll").result == "swapped"
    assert store.current().credentials.deny.cns == {"thief", "cheater"}  # still in force
    assert store.current().pending is not None
    assert "2 entries disappeared" in caplog.text
    (files / "deny.txt").write_text("cn:thief\n")  # the writer finishes: one entry removed
    clock.now += 60  # however long: the content changed, so the wait starts again
    store.reload("poll")
    assert store.current().credentials.deny.cns == {"thief", "cheater"}
    clock.now += 1  # under reload_interval (2 s) since that content was first read
    assert store.reload("poll").result == "unchanged"
    assert store.current().credentials.deny.cns == {"thief", "cheater"}
    clock.now += 1
    assert store.reload("poll").result == "swapped"  # stable for a poll: now in force
    assert store.current().credentials.deny.cns == {"thief"}
    assert store.current().pending is None


def test_additions_take_effect_at_once_and_an_empty_list_is_loud(
    files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = clocked_store(files)
    (files / "deny.txt").write_text("cn:thief\n")
    assert store.reload("poll").result == "swapped"
    assert store.current().credentials.deny.cns == {"thief"}  # no waiting to refuse more
    assert store.current().pending is None
    (files / "deny.txt").write_text("# cleared on purpose\n")
    store.reload("poll")
    clock.now += 2
    with caplog.at_level(logging.WARNING, logger="mtlsproxy.reload"):
        assert store.reload("poll").result == "swapped"
    assert len(store.current().credentials.deny) == 0
    empty = [r for r in caplog.records if "EMPTY" in r.getMessage()]
    assert empty and empty[0].levelno == logging.ERROR


def test_a_shrinking_ca_bundle_waits_too(
    files: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    """Threat (to availability): a bundle of two CAs cut after the first by a write in
    progress would refuse every client of the second and make the enforcer cut their
    live sessions."""
    both = (ca.folder / "ca.crt").read_bytes() + (other_ca.folder / "ca.crt").read_bytes()
    (files / "ca.crt").write_bytes(both)
    store, clock = clocked_store(files)
    other_root = f"sha256:{other_ca.root.fingerprint(hashes.SHA256()).hex()}"
    assert other_root in store.current().root_fingerprints
    shutil.copy(ca.folder / "ca.crt", files / "ca.crt")  # the second CA is gone
    store.reload("poll")
    assert other_root in store.current().root_fingerprints  # held
    clock.now += 2
    store.reload("poll")
    assert other_root not in store.current().root_fingerprints


# ---- a server chain must be whole ----------------------------------------------------


def test_a_server_chain_cut_after_its_leaf_is_refused(files: Path) -> None:
    """Threat (to availability): `openssl x509 -in f -out f` keeps only the leaf; clients
    that trust only the root then fail every handshake, and it used to be swapped in."""
    store = store_for(files)
    old = store.current()
    leaf = pem.load_certificates((files / "server.crt").read_bytes(), "f")[0]
    (files / "server.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result = store.reload("poll")
    assert result.result == "failed"
    assert "intermediate is missing" in (result.error or "")
    assert "server.crt" in (result.error or "")
    assert store.current() is old


def test_a_server_certificate_of_another_pki_needs_server_ca(
    files: Path, other_ca: CertificateAuthority
) -> None:
    foreign = other_ca.issue(kind="server", name="localhost", dns=["localhost"])
    foreign.write(files / "server")
    with pytest.raises(CredentialError, match=r"set tls\.server_ca"):
        store_for(files)
    text = (files / "mtlsproxy.toml").read_text()
    text = text.replace("[tls]\n", f'[tls]\nserver_ca = "{other_ca.folder / "ca.crt"}"\n')
    (files / "mtlsproxy.toml").write_text(text)
    assert store_for(files).current().credentials.leaf == foreign.certificate


def test_a_poll_out_of_file_descriptors_is_not_a_failed_reload(
    files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection flood at `ulimit -n` made every poll fail to open the files: six
    "reload failed" error lines that would page someone, for files that were fine."""
    store = store_for(files)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with caplog.at_level(logging.WARNING, logger="mtlsproxy.reload"):
            results = [store.reload("poll").result for _ in range(6)]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert results == ["unchanged"] * 6
    assert store.last_result.result != "failed"
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # said once, not an error
    assert store.reload("poll").result == "unchanged"  # and back to normal


@pytest.mark.parametrize("between", ["half-written", "deleted"])
def test_a_failed_read_in_between_restarts_the_wait(files: Path, between: str) -> None:
    """Review finding: the deny file rewritten with `>` again and again; a poll saw it
    empty (held), the next one half-written (a failed reload), the next one empty again
    (the next rewrite's truncation), and the empty list took effect: "stayed the same"
    was never shown."""
    (files / "deny.txt").write_text("cn:thief\n")
    store, clock = clocked_store(files)
    (files / "deny.txt").write_text("")
    store.reload("poll")
    clock.now += 2
    if between == "half-written":
        (files / "deny.txt").write_text("sha256:ab")
    else:
        (files / "deny.txt").unlink()
    assert store.reload("poll").result == "failed"
    clock.now += 2
    (files / "deny.txt").write_text("")
    store.reload("poll")
    assert store.current().credentials.deny.cns == {"thief"}  # still held: the wait restarts
    clock.now += 2
    store.reload("poll")
    assert store.current().credentials.deny.cns == frozenset()  # stable for a poll now


def test_a_swap_keeps_the_backend_contexts_of_unchanged_files(files: Path, issue: IssueFn) -> None:
    """Review finding: every swap (a deny entry added) built new backend contexts, and the
    pool retires connections made with a replaced context: every pooled backend TLS
    connection was reconnected for nothing."""
    edge = issue("client", "edge")
    text = (files / "mtlsproxy.toml").read_text()
    tls_route = (
        f'[[listeners.routes]]\npath_prefix = "/b"\nbackends = ["127.0.0.1:9"]\ntls = true\n'
        f'tls_cert = "{edge.crt}"\ntls_key = "{edge.key}"\n'
    )
    (files / "mtlsproxy.toml").write_text(text + "\n" + tls_route)
    cfg = config.load(files / "mtlsproxy.toml")
    store = CredentialStore(cfg.tls, backends=all_backend_files(cfg))
    (backend_files,) = store.current().backends
    before = store.current().backend_context(backend_files)
    (files / "deny.txt").write_text("cn:thief\n")
    assert store.reload("poll").result == "swapped"
    assert store.current().backend_context(backend_files) is before
    renewed = issue("client", "edge")
    replace(edge.key, renewed.key)
    replace(edge.crt, renewed.crt)
    assert store.reload("poll").result == "swapped"
    assert store.current().backend_context(backend_files) is not before


def test_removing_the_server_certificates_own_ca_is_not_blocked_but_warned(
    files: Path,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Taking a compromised CA out must never wait for the server certificate's renewal
    (the chain proof accepts the anchor the chain in force reached), but the operator is
    told that clients trusting only the new bundle will refuse the server."""
    store, clock = clocked_store(files)
    write_atomic(files / "ca.crt", (other_ca.folder / "ca.crt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="mtlsproxy.reload"):
        assert store.reload("poll").result == "swapped"  # held
        clock.now += 2
        assert store.reload("poll").result == "swapped"  # in force
    assert store.current().credentials.client_cas == (other_ca.root,)
    assert "which is no longer in tls.client_ca" in caplog.text
