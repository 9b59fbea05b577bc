"""The Docker engine and the base image the end-to-end tests build on, and what they leave.

- A Docker engine: Debian's `docker.io` and `docker-compose` are installed by the Makefile
  when missing; if no engine answers, `dockerd` is started here and stopped at the end (by
  PID).
- The base image: `MTLSPROXY_BASE` when set (yours: used, never removed); else the official
  `python:3.11-slim` when it is there or can be pulled; else one built from Debian with
  `debootstrap --variant=minbase bookworm` (python3 and its venv module), imported as
  `mtlsproxy-e2e-base:bookworm`, never under the official name. What this run pulled or
  built is removed at the end, with the images it built from the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from compose_support import DEPLOY, ROOT, sh

OFFICIAL = "python:3.11-slim"
BUILT = "mtlsproxy-e2e-base:bookworm"
# Labels of the images this suite builds; what carries them is pruned at the end.
TITLES = ("mtlsproxy-build", "mtlsproxy", "mtlsproxy-loadgen", "mtlsproxy-e2e-base")


@pytest.fixture(scope="session")
def docker() -> Iterator[None]:
    if sh("docker", "info", check=False, timeout=30).returncode == 0:
        yield  # an engine runs already: use it, leave it
        return
    log = Path(tempfile.gettempdir()) / "mtlsproxy-e2e-dockerd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sh("docker", "info", check=False, timeout=30).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


def _is_official(image: str) -> bool:
    """An earlier version of this suite imported its debootstrapped image as
    python:3.11-slim; the official image sets PYTHON_VERSION, that one does not."""
    env = sh("docker", "image", "inspect", "--format", "{{json .Config.Env}}", image,
             check=False, timeout=30)  # fmt: skip
    return env.returncode == 0 and "PYTHON_VERSION=" in env.stdout


@pytest.fixture(scope="session")
def base_image(docker: None) -> Iterator[str]:
    if given := os.environ.get("MTLSPROXY_BASE"):
        yield given
        return
    made = False
    present = sh("docker", "image", "inspect", OFFICIAL, check=False, timeout=30).returncode == 0
    if present and not _is_official(OFFICIAL):
        sh("docker", "image", "rm", OFFICIAL, check=False, timeout=60)  # our old mislabel
    if _is_official(OFFICIAL):
        base = OFFICIAL
    elif sh("docker", "pull", OFFICIAL, check=False, timeout=60).returncode == 0:
        base, made = OFFICIAL, True
    else:
        base, made = BUILT, sh("docker", "image", "inspect", BUILT, check=False).returncode != 0
        if made:
            _debootstrap(BUILT)
    try:
        yield base
    finally:
        for title in TITLES:
            sh("docker", "image", "prune", "-f", "--filter",
               f"label=org.opencontainers.image.title={title}", check=False)  # fmt: skip
        if made:
            sh("docker", "image", "rm", base, check=False, timeout=120)


def _debootstrap(tag: str) -> None:
    """No registry: Debian's own python3 (3.11 on bookworm) in a minimal root file system."""
    with tempfile.TemporaryDirectory(prefix="mtlsproxy-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
           "bookworm", str(rootfs), "http://deb.debian.org/debian", timeout=900)  # fmt: skip
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            sh("docker", "import", "--change", 'CMD ["python3"]', "--change",
               "LABEL org.opencontainers.image.title=mtlsproxy-e2e-base", "-", tag,
               stdin=tar.stdout, timeout=600)  # fmt: skip
        assert tar.returncode == 0


@pytest.fixture(scope="session")
def wheels() -> Iterator[Path]:
    """The locked dependencies' wheels and the project's, fetched and built on the host as
    deploy/Dockerfile says: the image installs from them offline, hashes checked."""
    folder = DEPLOY / "wheels"
    yours = set(folder.iterdir())  # files a user put there for an offline build stay
    locks = ROOT / "requirements"
    sh(sys.executable, "-m", "pip", "download", "--quiet", "--require-hashes",
       "-r", str(locks / "build.txt"), "-r", str(locks / "run.txt"), "-d", str(folder),
       timeout=900)  # fmt: skip
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder),
       str(ROOT), timeout=900)  # fmt: skip
    try:
        yield folder
    finally:
        for added in set(folder.iterdir()) - yours:
            added.unlink()


@pytest.fixture(scope="session")
def image(base_image: str, wheels: Path) -> Iterator[str]:
    """The project's image, built for the session under a tag of its own (never one that a
    user may have built: that is not ours to remove)."""
    tag = f"mtlsproxy-e2e:{os.getpid()}"
    sh("docker", "build", "--quiet", "--force-rm", "--build-arg", f"BASE={base_image}", "-f",
       str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT), timeout=900)  # fmt: skip
    try:
        yield tag
    finally:
        sh("docker", "image", "rm", tag, check=False, timeout=120)
