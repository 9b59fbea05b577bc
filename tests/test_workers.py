"""workers = 2: two processes share the port; the supervisor restarts, forwards, drains."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from proxy_env import route, start_backend, write_config
from support import MTLSPROXY, IssueFn, Pair, fetch_metrics, free_port, metric_sum
from test_proxy_identity import leaf_sha256

from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.server import workers
from mtlsproxy.server.workers import cgroup_cpu_quota, usable_cpus


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_two_workers(
    nursery: trio.Nursery,
    tmp_path: Path,
    ca: CertificateAuthority,
    server_pair: Pair,
    issue: IssueFn,
) -> None:
    backend = await start_backend(nursery)
    port, admin = free_port(), free_port()
    shutil.copy(ca.folder / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "deny.txt").write_text("")
    config = write_config(
        tmp_path, ca_bundle=tmp_path / "ca.crt", server=server_pair, routes=route([backend]),
        tls=f'deny = "{tmp_path / "deny.txt"}"\nreload_interval = "1h"', top="workers = 2",
    )  # fmt: skip
    text = config.read_text().replace('"127.0.0.1:0"\nmode', f'"127.0.0.1:{port}"\nmode')
    config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{admin}"'))
    client = issue("client", "worker-test")
    curl = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
            "--cacert", str(tmp_path / "ca.crt"), "--cert", str(client.crt), "--key", str(client.key),
            f"https://localhost:{port}/"]  # fmt: skip

    answered: list[bytes] = []

    async def statuses(n: int) -> list[bytes]:
        got = [
            (await trio.run_process(curl, capture_stdout=True, check=False)).stdout
            for _ in range(n)
        ]
        answered.extend(got)
        return got

    def requests_2xx() -> float:
        return metric_sum(fetch_metrics(admin), "mtlsproxy_requests_total", code="2xx")

    with subprocess.Popen([*MTLSPROXY, "serve", "--config", str(config)],
                          stderr=subprocess.DEVNULL) as supervisor:  # fmt: skip
        try:
            with trio.fail_after(30):
                while len(children(supervisor.pid)) < 2 or await statuses(1) != [b"200"]:
                    await trio.sleep(0.2)
            assert await statuses(20) == [b"200"] * 20
            # Every worker's requests, added up (the kernel spreads the 20+ connections):
            # worker 0 alone would show about half.
            assert await trio.to_thread.run_sync(requests_2xx) == answered.count(b"200")
            first = children(supervisor.pid)
            os.kill(first[0], signal.SIGKILL)
            with trio.fail_after(20):  # restarted after a 1 s back-off
                while len(set(children(supervisor.pid)) - {first[0]}) < 2:
                    await trio.sleep(0.2)
            assert await statuses(4) == [b"200"] * 4

            (tmp_path / "deny.txt").write_text(f"sha256:{leaf_sha256(client)}\n")
            supervisor.send_signal(signal.SIGHUP)  # forwarded: every worker reloads now
            with trio.fail_after(10):
                while await statuses(1) != [b"403"]:
                    await trio.sleep(0.2)
            assert await statuses(8) == [b"403"] * 8  # whichever worker takes it

            supervisor.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: supervisor.wait(timeout=20)) == 0
        finally:
            if supervisor.poll() is None:
                supervisor.kill()


def test_workers_need_fixed_ports(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair
) -> None:
    config = write_config(tmp_path, ca_bundle=ca.folder / "ca.crt", server=server_pair,
                          routes=route([9]), top="workers = 2")  # fmt: skip
    proc = subprocess.run([*MTLSPROXY, "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 2 and "fixed port" in proc.stderr


@pytest.mark.parametrize(
    ("value", "ok"), [("1", True), ('"auto"', True), ("0", False), ('"many"', False)]
)
def test_workers_values(
    tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, value: str, ok: bool
) -> None:
    config = write_config(tmp_path, ca_bundle=ca.folder / "ca.crt", server=server_pair,
                          routes=route([9]), top=f"workers = {value}")  # fmt: skip
    config.write_text(config.read_text().replace('"127.0.0.1:0"\nmode', '"127.0.0.1:18999"\nmode'))
    proc = subprocess.run([*MTLSPROXY, "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert (proc.returncode == 0) is ok, proc.stderr


# ---- workers = "auto": the CPUs a container or pod may use, not the node's -------------


def _cgroup_v1(root: Path, quota: int, period: int = 100000, path: str = "") -> None:
    folder = root / "cpu,cpuacct" / path.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [(200000, 100000, 2.0), (150000, 100000, 1.5), (50000, 100000, 0.5), (-1, 100000, None)],
)
def test_a_v1_cpu_quota_is_read_in_cpus(
    tmp_path: Path, quota: int, period: int, expected: float | None
) -> None:
    _cgroup_v1(tmp_path, quota, period)
    assert cgroup_cpu_quota(tmp_path, "4:cpu,cpuacct:/\n0::/\n") == expected


def test_a_v1_quota_is_found_under_the_hosts_path_or_at_the_containers_root(tmp_path: Path) -> None:
    _cgroup_v1(tmp_path, -1)  # the root: no quota
    _cgroup_v1(tmp_path, 300000, path="/kubepods/pod1")  # the pod's own cgroup
    _cgroup_v1(tmp_path, 200000, path="/kubepods/pod1/ctr")  # tighter, below it
    assert cgroup_cpu_quota(tmp_path, "3:cpu,cpuacct:/kubepods/pod1/ctr\n") == 2.0
    # Inside a container the mount is its own cgroup while /proc/self/cgroup names the
    # host's path: the quota at the mount's root counts.
    inside = tmp_path / "inside"
    _cgroup_v1(inside, 100000)
    assert cgroup_cpu_quota(inside, "3:cpu,cpuacct:/docker/0123abcd\n") == 1.0


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000", None), ("250000 100000", 2.5)])
def test_a_v2_cpu_max_is_read_in_cpus(tmp_path: Path, cpu_max: str, expected: float | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cgroup_cpu_quota(tmp_path, "0::/\n") == expected
    (tmp_path / "system.slice").mkdir()
    (tmp_path / "system.slice" / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_quota(tmp_path, "0::/system.slice\n") == 1.0  # the tighter level


def test_auto_workers_follow_the_quota_rounded_down_never_zero(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path, "0::/\n") == cores  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path, "0::/\n") == 1
    (tmp_path / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU
    assert usable_cpus(tmp_path, "0::/\n") == 1
    (tmp_path / "cpu.max").write_text("6400000 100000\n")  # 64 CPUs: the mask caps it
    assert usable_cpus(tmp_path, "0::/\n") == cores


def test_the_workers_metrics_folder_survives_a_read_only_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))  # as TMPDIR, unusable
    folder = Path(workers._metrics_folder(2))
    try:
        assert folder.parent == Path("/dev/shm") and folder.is_dir()
    finally:
        folder.rmdir()


def test_a_parents_tighter_quota_wins_over_the_containers(tmp_path: Path) -> None:
    """A pod limit (parent cgroup) of 1 CPU over a container cgroup allowed 4."""
    _cgroup_v1(tmp_path, 100000, path="/kubepods/pod1")
    _cgroup_v1(tmp_path, 400000, path="/kubepods/pod1/ctr")
    assert cgroup_cpu_quota(tmp_path, "3:cpu,cpuacct:/kubepods/pod1/ctr\n") == 1.0
    (tmp_path / "v2" / "pod").mkdir(parents=True)
    (tmp_path / "v2" / "cpu.max").write_text("100000 100000\n")
    (tmp_path / "v2" / "pod" / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "v2", "0::/pod\n") == 1.0
