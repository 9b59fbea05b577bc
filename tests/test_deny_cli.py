"""`mtlsproxy deny add`: validated, atomic, explained; applied by a running proxy on SIGHUP."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import trio
from proxy_env import route, start_backend, write_config
from support import MTLSPROXY, IssueFn, Pair
from test_proxy_identity import leaf_sha256
from test_proxy_process import serve_process

from mtlsproxy.denylist import parse_deny_list
from mtlsproxy.pki import CertificateAuthority


def deny_add(config: Path, entry: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MTLSPROXY, "deny", "add", "--config", str(config), entry],
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
