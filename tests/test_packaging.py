"""What a user installs: the locks agree with pyproject.toml, carry hashes, and keep test tools
out of `make run`; the license, the type marker and the docs that code cites are in the repo."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def locked(name: str) -> dict[str, tuple[str, list[str]]]:
    """requirements/<name>: package -> (version, hashes)."""
    text = (ROOT / "requirements" / name).read_text()
    found: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            found[canonicalize_name(match[1])] = (match[2], hashes)
    return found


def wanted(*extras: str) -> list[Requirement]:
    specs = list(PROJECT["dependencies"])
    for extra in extras:
        specs += PROJECT["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


@pytest.mark.parametrize(
    ("lock", "extras"), [("run.txt", ("demo",)), ("test.txt", ("demo", "client", "test"))]
)
def test_each_lock_pins_what_pyproject_asks_for_with_hashes(
    lock: str, extras: tuple[str, ...]
) -> None:
    pins = locked(lock)
    for requirement in wanted(*extras):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements/{lock} lacks {name}: run `make lock`"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock} pins {name}=={version}, pyproject.toml asks {requirement}: run `make lock`"
        )
    assert all(hashes for _, hashes in pins.values()), "every pin carries its hashes"
    (setuptools,) = locked("build.txt").items()  # the build backend, pinned too
    assert setuptools[0] == "setuptools" and setuptools[1][1]


def test_make_run_installs_no_linters_or_test_tools() -> None:
    pins = locked("run.txt")
    for tool in ("ruff", "mypy", "import-linter", "pytest", "hypothesis", "requests", "httpx"):
        assert tool not in pins, tool
    makefile = (ROOT / "Makefile").read_text()
    run_rule = makefile.split("$(RUN_STAMP):")[1].split("\n\n")[0]
    assert "requirements/run.txt" in run_rule and "--require-hashes" in run_rule
    assert "test" not in run_rule.replace("requirements/run.txt", "")
    dockerfile = " ".join((ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ").split())
    for lock in ("build.txt", "run.txt"):
        assert re.search(
            rf"--require-hashes (--no-build-isolation )?-r /src/requirements/{lock}", dockerfile
        )
    assert "--no-build-isolation" in run_rule  # the build backend is the locked one


def test_the_proxy_needs_no_websocket_library_and_pyopenssl_is_bounded() -> None:
    runtime = {canonicalize_name(r.name): r for r in wanted()}
    assert "trio-websocket" not in runtime  # only the demo backend uses it: the demo extra
    # tls/ uses pyOpenSSL's private bindings (docs/tls-engine.md): an upper bound
    assert any(spec.operator == "<" for spec in runtime["pyopenssl"].specifier)


def test_the_demo_backend_says_what_to_install_without_its_extra() -> None:
    script = (
        "import sys; sys.modules['trio_websocket'] = None\n"
        "from mtlsproxy.cli import main\n"
        "sys.exit(main(['demo-backend', '--http-port', sys.argv[1], '--tcp-port', sys.argv[2],"
        " '--ws-port', sys.argv[3]]))\n"
    )
    ports = [str(free_port()) for _ in range(3)]
    done = subprocess.run([sys.executable, "-c", script, *ports], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "pip install 'mtlsproxy[demo]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_license_and_type_marker_ship_with_the_package() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in license_text
    assert "Version 2.0" in license_text and PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "mtlsproxy" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in package_data["package-data"]["mtlsproxy"]


def test_nothing_cites_a_document_that_a_clone_does_not_have() -> None:
    """Code, docs and READMEs cite docs/ and files of the repository, not notes kept beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()  # fmt: skip
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ".txt", ""}:
            continue
        if path.name == "test_packaging.py" or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert "DESIGN.md" not in text and "../shared/" not in text, name
    for cited in re.findall(r"docs/[a-z\-]+\.md", (ROOT / "README.md").read_text()):
        assert (ROOT / cited).is_file(), cited
