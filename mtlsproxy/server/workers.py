"""``workers = N``: N proxy processes sharing each listening port, and their supervisor.

Each worker is an ordinary ``mtlsproxy serve`` process with its own trio loop; its
listening sockets carry SO_REUSEPORT, so the kernel spreads new connections across the
workers. Every worker polls the credential files and enforces on its own sessions, so
reload and enforcement need no coordination: the files are the shared truth. Worker 0
also serves the admin listener; a ``POST /reload`` there reloads worker 0 and asks the
supervisor (SIGHUP) to make every worker reload at once.

The supervisor holds no TLS material and no sockets. It forwards SIGHUP, SIGTERM and
SIGINT to every worker, restarts a worker that died (with a back-off, so a worker that
crashes at start does not spin), and exits when every worker has exited after a
SIGTERM/SIGINT, with the worst exit status.

Metrics: the supervisor gives the workers a private folder for prometheus_client's
multi-process mode, so worker 0's ``/metrics`` adds up every worker's numbers; a dead
worker's live gauges (open connections) are dropped when it is reaped, its counters stay.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from mtlsproxy.errors import UsageError
from mtlsproxy.workerenv import ENV_SUPERVISOR, ENV_WORKER

log = logging.getLogger("mtlsproxy.workers")

_BACKOFF_MIN, _BACKOFF_MAX = 1.0, 30.0
_HEALTHY_AFTER = 60.0  # a worker that lived this long resets the back-off


def resolve(workers: int | str) -> int:
    """``workers = N`` as a count; ``"auto"`` is the CPUs this process may use."""
    return usable_cpus() if workers == "auto" else int(workers)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: str | None = None) -> int:
    """The CPUs the scheduler lets this process use: its affinity mask, capped by a cgroup
    CPU quota (a container's ``--cpus``, a Kubernetes ``limits.cpu``), rounded down.

    ``os.cpu_count()`` counts the node's cores, so on a big node a pod limited to 2 CPUs
    would start one worker per core and outgrow its memory limit. A quota of 1.5 CPUs
    gives 1 worker (never 0): a worker per whole CPU, as Go's automaxprocs does.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    count = cores or 1
    if quota is not None:
        count = min(count, int(quota))
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: Path, self_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents, in CPUs, or None.

    cgroup v2: ``cpu.max`` ("max 100000" or "<quota> <period>"); cgroup v1: the ``cpu``
    controller's ``cpu.cfs_quota_us`` (-1 for none) over ``cpu.cfs_period_us``. Inside a
    container the cgroup file system is usually the container's own cgroup, mounted as
    the root, while ``/proc/self/cgroup`` may still name the host's path: both are tried.
    """
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    limits: list[float] = []
    for line in self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            folders = [cgroup_root / "unified", cgroup_root]
            limits += _walk(folders, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            folders = [cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"]
            limits += _walk(folders, path, _v1_quota)
    return min(limits) if limits else None


def _walk(mounts: list[Path], path: str, quota_of: Callable[[Path], float | None]) -> list[float]:
    found: list[float] = []
    parts = [p for p in path.split("/") if p]
    for mount in dict.fromkeys(mounts):
        for depth in range(len(parts), -1, -1):
            quota = quota_of(mount.joinpath(*parts[:depth]))
            if quota is not None:
                found.append(quota)
    return found


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def worker_index() -> int | None:
    value = os.environ.get(ENV_WORKER)
    return int(value) if value is not None else None


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    backoff: float = _BACKOFF_MIN
    restart_at: float | None = None


def supervise(count: int, config_path: Path, log_level: str, log_format: str | None = None) -> int:
    metrics_dir = _metrics_folder(count)
    try:
        return _supervise(count, config_path, log_level, log_format, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_folder(count: int) -> str:
    """The workers' metrics files (prometheus_client's multi-process mode): in the temporary
    folder (``TMPDIR``, else /tmp), else in /dev/shm, the tmpfs that containers and pods
    keep writable under a read-only root file system. Small files, read by /metrics."""
    try:
        return tempfile.mkdtemp(prefix="mtlsproxy-metrics-")
    except OSError as exc:
        first = exc
    try:
        return tempfile.mkdtemp(prefix="mtlsproxy-metrics-", dir="/dev/shm")
    except OSError:
        raise UsageError(
            f"workers = {count} needs a writable folder for the workers' metrics, and there is"
            f" none ({first}; /dev/shm too): set TMPDIR to a writable folder, or mount one at"
            " /tmp (in Kubernetes, an emptyDir)"
        ) from first


def _supervise(
    count: int, config_path: Path, log_level: str, log_format: str | None, metrics_dir: str
) -> int:
    stopping = False
    reload_requested = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping, reload_requested
        if signum == signal.SIGHUP:
            reload_requested = True
        else:
            stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            **{ENV_WORKER: str(index), ENV_SUPERVISOR: str(os.getpid())},
            PROMETHEUS_MULTIPROC_DIR=metrics_dir,
        )
        command = [sys.executable, "-m", "mtlsproxy", "serve", "--config", str(config_path),
                   "--log-level", log_level]  # fmt: skip
        if log_format is not None:
            command += ["--log-format", log_format]
        # A process group of its own: a terminal's Ctrl-C or systemd's SIGTERM to the
        # unit reaches the workers only through us, once, so they drain instead of
        # taking the forwarded copy as a second "stop now".
        # SIGHUP starts out ignored (an ignored disposition survives exec): a reload
        # forwarded while the worker is still importing must not kill it; it reads the
        # files at start anyway, and its own receiver takes SIGHUP over once it serves.
        return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command,
            env=env,
            process_group=0,
            preexec_fn=_ignore_sighup,  # noqa: PLW1509 - the supervisor runs no threads
        )

    workers = [_Worker(i, spawn(i), time.monotonic()) for i in range(count)]
    log.info("supervising %d workers: %s", count, ", ".join(str(w.proc.pid) for w in workers))
    forwarded_stop = False
    while True:
        if stopping and not forwarded_stop:
            forwarded_stop = True
            _signal_all(workers, signal.SIGTERM)
        if reload_requested:
            reload_requested = False
            _signal_all(workers, signal.SIGHUP)
        now = time.monotonic()
        for worker in workers:
            code = worker.proc.poll()
            if code is not None and worker.restart_at is None and not stopping:
                multiprocess.mark_process_dead(worker.proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                lived = now - worker.started
                worker.backoff = _BACKOFF_MIN if lived > _HEALTHY_AFTER else worker.backoff
                log.error(
                    "worker %d (pid %d) exited with %s after %.0f s; restarting in %.0f s",
                    worker.index, worker.proc.pid, code, lived, worker.backoff,
                )  # fmt: skip
                worker.restart_at = now + worker.backoff
                worker.backoff = min(worker.backoff * 2, _BACKOFF_MAX)
            if worker.restart_at is not None and now >= worker.restart_at and not stopping:
                worker.proc = spawn(worker.index)
                worker.started, worker.restart_at = now, None
        if stopping and all(w.proc.poll() is not None for w in workers):
            # The exit status of the shutdown itself: a worker killed by a signal (a
            # negative code) is a failure too, except by the SIGTERM we forwarded (one
            # still starting up dies of it before its handler exists: it stopped as
            # asked); crashes restarted earlier do not count.
            codes = [w.proc.returncode for w in workers]
            failed = [c for c in codes if c not in (0, -signal.SIGTERM)]
            return max((1 if c < 0 else c) for c in failed) if failed else 0
        time.sleep(0.1)


def _signal_all(workers: list[_Worker], signum: int) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signum)


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def prepare_worker() -> None:
    """First thing in a worker: survive an early SIGHUP, and die with the supervisor.

    SIGHUP is ignored until the proxy's own receiver takes it over (a reload forwarded
    while a worker starts must not kill it: it reads the files at start anyway), and on
    Linux the kernel sends SIGTERM if the supervisor dies, so no orphan keeps serving.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor still forwards SIGTERM
    supervisor = os.environ.get(ENV_SUPERVISOR)
    if supervisor is not None and os.getppid() != int(supervisor):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took


def ask_supervisor_to_reload() -> None:
    """From worker 0's admin reload: make every worker reload now. Only the supervisor
    recorded at start is signalled, never whoever adopted an orphan."""
    supervisor = os.environ.get(ENV_SUPERVISOR)
    if worker_index() is None or supervisor is None or os.getppid() != int(supervisor):
        return
    try:
        os.kill(int(supervisor), signal.SIGHUP)
    except OSError as exc:
        log.warning("cannot ask the supervisor to reload the other workers: %s", exc)
