"""`mtlsproxy deny add` and `deny remove`: validated, atomic, explained; applied by a running
proxy on SIGHUP or `mtlsproxy reload`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import trio
from proxy_env import route, start_backend, write_config
from support import MTLSPROXY, IssueFn, Pair, free_port
from test_proxy_identity import leaf_sha256
from test_proxy_process import serve_process

from mtlsproxy.denylist import parse_deny_list
from mtlsproxy.pki import CertificateAuthority


def deny_add(config: Path, entry: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTLSPROXY, "deny", "add", "--config", str(config), entry],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def deny_remove(config: Path, entry: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTLSPROXY, "deny", "remove", "--config", str(config), entry],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def reload(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTLSPROXY, "reload", "--config", str(config), "--timeout", "10s", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def setup(folder: Path, ca: CertificateAuthority, server: Pair, deny: bool = True) -> Path:
    shutil.copy(ca.folder / "ca.crt", folder / "ca.crt")
    (folder / "deny.txt").write_text("# stolen keys\n")
    tls = f'deny = "{folder / "deny.txt"}"\nreload_interval = "1h"' if deny else ""
    return write_config(
        folder, ca_bundle=folder / "ca.crt", server=server, routes=route([9]), tls=tls
    )


def test_adding_entries(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    added = deny_add(config, "cn:mallory")
    assert added.returncode == 0, added.stderr
    assert "denied cn:mallory: every certificate whose subject CN is 'mallory'" in added.stdout
    by_file = deny_add(config, str(client_pair.crt))
    assert by_file.returncode == 0, by_file.stderr
    digest = leaf_sha256(client_pair)
    assert (
        f"denied sha256:{digest}" in by_file.stdout and "CN=player-1,OU=players" in by_file.stdout
    )
    again = deny_add(config, f"sha256:{digest.upper()}")
    assert again.returncode == 0 and "already" in again.stdout
    text = (tmp_path / "deny.txt").read_text()
    assert text.startswith("# stolen keys\n")
    deny = parse_deny_list(text, "deny.txt")
    assert deny.cns == {"mallory"} and deny.sha256 == {digest}


def test_a_bad_entry_changes_nothing(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    before = (tmp_path / "deny.txt").read_bytes()
    for bad in ("sha256:xyz", "email:a@b", "no-such-file.crt"):
        proc = deny_add(config, bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("mtlsproxy: error:") and "Traceback" not in proc.stderr
    assert (tmp_path / "deny.txt").read_bytes() == before


def test_without_a_deny_file_it_says_how_to_add_one(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair, deny=False)
    proc = deny_add(config, "cn:mallory")
    assert proc.returncode == 2 and "tls.deny is not set" in proc.stderr


async def test_sighup_applies_it_to_a_running_proxy(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    issue: IssueFn,
) -> None:
    backend = await start_backend(nursery)
    config = setup(tmp_path, ca, server_pair)
    config.write_text(config.read_text().replace('"127.0.0.1:9"', f'"127.0.0.1:{backend}"'))
    thief = issue("client", "thief")
    curl = ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}",
            "--cacert", str(tmp_path / "ca.crt"), "--cert", str(thief.crt), "--key", str(thief.key)]  # fmt: skip
    async with serve_process(config) as (proc, port):
        url = f"https://localhost:{port}/"
        assert (await trio.run_process([*curl, url], capture_stdout=True)).stdout == b"200"
        added = await trio.to_thread.run_sync(deny_add, config, str(thief.crt))
        assert added.returncode == 0
        proc.send_signal(signal.SIGHUP)  # the poll is an hour away: only the signal applies it
        with trio.fail_after(10):
            while (
                await trio.run_process([*curl, url], capture_stdout=True, check=False)
            ).stdout != b"403":
                await trio.sleep(0.1)


def test_removing_entries_in_any_spelling(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    deny = tmp_path / "deny.txt"
    for entry in ("cn:mallory", str(client_pair.crt), "serial:0a", "uri:spiffe://g.example/p/7"):
        assert deny_add(config, entry).returncode == 0
    deny.chmod(0o640)
    before = deny.read_text()
    os.link(deny, tmp_path / "deny.before")  # holds the old inode: it cannot be reused
    digest = leaf_sha256(client_pair)
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    lifted = deny_remove(config, f"SHA256:{colons}")  # openssl's spelling of the same entry
    assert lifted.returncode == 0, lifted.stderr
    assert f"lifted sha256:{digest}: the one certificate with this fingerprint" in lifted.stdout
    assert "removed line 3: sha256:" in lifted.stdout and "CN=player-1" in lifted.stdout
    assert deny_remove(config, "serial:0x0A").returncode == 0
    text = deny.read_text()
    assert text.startswith("# stolen keys\ncn:mallory")  # the rest is kept as written
    kept = parse_deny_list(text, deny)
    assert kept.cns == {"mallory"} and kept.uris == {"spiffe://g.example/p/7"}
    assert not kept.sha256 and not kept.serials
    # Written atomically (a new file renamed over the old one, never rewritten in place),
    # with the file's mode kept.
    assert (tmp_path / "deny.before").read_text() == before
    assert deny.stat().st_ino != (tmp_path / "deny.before").stat().st_ino
    assert deny.stat().st_mode & 0o777 == 0o640


def test_removing_what_is_not_there_says_so_and_changes_nothing(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    assert deny_add(config, "cn:mallory").returncode == 0
    before = (tmp_path / "deny.txt").read_bytes()
    for entry in ("cn:Mallory", str(client_pair.crt)):  # CNs compare exactly, as the proxy does
        proc = deny_remove(config, entry)
        assert proc.returncode == 1, (entry, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(f"mtlsproxy: error: nothing in {tmp_path / 'deny.txt'}")
        assert "the file is unchanged (1 entry)" in proc.stderr and "Traceback" not in proc.stderr
    assert deny_remove(config, "email:x").returncode == 2  # not an entry at all
    assert (tmp_path / "deny.txt").read_bytes() == before


def test_removing_a_certificate_says_what_still_denies_it(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    assert deny_add(config, str(client_pair.crt)).returncode == 0
    assert deny_add(config, "uri:spiffe://game.example/player/1").returncode == 0
    proc = deny_remove(config, str(client_pair.crt))
    assert proc.returncode == 0, proc.stderr
    assert f"note: {client_pair.crt} is still denied by its uri" in proc.stdout


async def test_reload_applies_it_to_a_running_proxy(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    issue: IssueFn,
) -> None:
    backend = await start_backend(nursery)
    config = setup(tmp_path, ca, server_pair)
    admin = free_port()
    config.write_text(
        config.read_text()
        .replace('"127.0.0.1:9"', f'"127.0.0.1:{backend}"')
        .replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{admin}"', 1)  # [admin]
    )
    thief = issue("client", "thief")
    curl = ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}",
            "--cacert", str(tmp_path / "ca.crt"), "--cert", str(thief.crt), "--key", str(thief.key)]  # fmt: skip
    async with serve_process(config) as (_proc, port):
        url = f"https://localhost:{port}/"
        assert (await trio.run_process([*curl, url], capture_stdout=True)).stdout == b"200"
        added = await trio.to_thread.run_sync(deny_add, config, str(thief.crt))
        assert added.returncode == 0
        assert "reload --config" in added.stdout  # what it suggests is what we run now
        done = await trio.to_thread.run_sync(reload, config)
        assert done.returncode == 0, done.stderr
        assert f"reloaded: the proxy at 127.0.0.1:{admin} now serves generation 2" in done.stdout
        # The poll is an hour away: only the reload can have applied it.
        assert (await trio.run_process([*curl, url], capture_stdout=True)).stdout == b"403"
        again = await trio.to_thread.run_sync(reload, config)
        assert "nothing new" in again.stdout and again.returncode == 0
        (tmp_path / "deny.txt").write_text("sha256:not-hex\n")
        refused = await trio.to_thread.run_sync(reload, config)
        assert refused.returncode == 1
        assert "refused the files and keeps serving with what it had" in refused.stderr
        assert "deny.txt" in refused.stderr and "64 hex digits" in refused.stderr
        assert (await trio.run_process([*curl, url], capture_stdout=True)).stdout == b"403"


def test_reload_without_a_proxy_names_the_peer_and_the_file(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    proc = reload(config)
    assert proc.returncode == 2 and "admin.listen 127.0.0.1:0 has no fixed port" in proc.stderr
    admin = free_port()  # nothing listens there
    config.write_text(
        config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{admin}"', 1)
    )
    proc = reload(config)
    assert proc.returncode == 1, proc.stderr
    assert (
        f"cannot reach the proxy's admin listener at http://127.0.0.1:{admin} "
        f"(admin.listen in {config})" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


async def test_reload_over_an_mtls_admin_listener(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> None:
    config = setup(tmp_path, ca, server_pair)
    admin = free_port()
    config.write_text(
        config.read_text().replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{admin}"\nmtls = true', 1
        )
    )
    async with serve_process(config):
        without = await trio.to_thread.run_sync(reload, config)
        assert without.returncode == 2 and "pass --cert and --key" in without.stderr
        args = ("--cert", str(client_pair.crt), "--key", str(client_pair.key))
        done = await trio.to_thread.run_sync(reload, config, *args)
        assert done.returncode == 0, done.stderr
        assert f"reloaded: nothing new for the proxy at 127.0.0.1:{admin}" in done.stdout


def test_reload_over_mtls_refuses_an_admin_listener_the_ca_did_not_certify(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair,
    issue_other: IssueFn,
) -> None:  # fmt: skip
    """Something else on the admin port, with a certificate of another CA: the reload
    fails closed, and no request (nor the client's certificate) reaches it."""
    config = setup(tmp_path, ca, server_pair)
    impostor = issue_other("server", "localhost", dns=["localhost"], ips=["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(impostor.crt, impostor.key)
    seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.settimeout(20)
        port = listening.getsockname()[1]
        config.write_text(
            config.read_text().replace(
                'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"\nmtls = true', 1
            )
        )

        def serve_one() -> None:
            conn, _ = listening.accept()
            with (
                conn,
                contextlib.suppress(OSError),
                context.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.settimeout(10)
                seen.append(tls.recv(65536))

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        done = reload(config, "--cert", str(client_pair.crt), "--key", str(client_pair.key))
        thread.join(timeout=20)
    assert done.returncode == 1, done.stderr
    assert "its certificate does not verify against" in done.stderr
    assert seen in ([], [b""]), seen  # not one byte of a request
