import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import MTLSPROXY, free_port, run

from mtlsproxy import pem, quickstart
from mtlsproxy.check import check_config


def test_prepare_makes_a_working_set_and_keeps_it(tmp_path: Path) -> None:
    files = quickstart.prepare(tmp_path / "qs")
    assert "ok" in check_config(files.config)
    ca_before = (files.ca_dir / "ca.crt").read_bytes()
    client_before = files.crt(files.client).read_bytes()
    quickstart.prepare(tmp_path / "qs")
    assert (files.ca_dir / "ca.crt").read_bytes() == ca_before
    assert files.crt(files.client).read_bytes() == client_before


def test_prepare_reissues_leaves_near_expiry(tmp_path: Path) -> None:
    files = quickstart.prepare(tmp_path / "qs")
    before = files.crt(files.server).read_bytes()
    later = datetime.now(UTC) + timedelta(hours=23, minutes=30)
    quickstart.prepare(tmp_path / "qs", now=later)
    assert files.crt(files.server).read_bytes() != before
    leaf = pem.load_certificates(files.crt(files.server).read_bytes(), "s")[0]
    assert leaf.not_valid_after_utc > datetime.now(UTC) + timedelta(hours=23)


def test_quickstart_serves_until_ctrl_c(tmp_path: Path) -> None:
    """`make run` as a user meets it: printed commands work; Ctrl-C stops everything
    (``quickstart_running`` sends it and requires a clean exit)."""
    with quickstart_running(tmp_path) as (_, text):
        lines = text.splitlines(keepends=True)
        with_cert = next(x for x in lines if "curl --cacert" in x and "--cert" in x).split()
        assert with_cert[:2] == ["curl", "--cacert"]
        done = subprocess.run(
            [*with_cert, "-sS", "--max-time", "20"], cwd=tmp_path,
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert "Hash=" in seen["headers"]["x-forwarded-client-cert"][0]
        without = next(x for x in lines if "curl --cacert" in x and "--cert " not in x).split()
        refused = subprocess.run(
            [*without, "-sS", "--max-time", "20"], cwd=tmp_path,
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert "certificate required" in refused.stderr
        assert "urllib.request" in text and "load_cert_chain" in text
        # The raw TCP command, as printed (joined over its continuation line).
        tcp_line = next(i for i, x in enumerate(lines) if "openssl s_client" in x)
        tcp = (lines[tcp_line].rstrip(" \\\n") + " " + lines[tcp_line + 1]).split()
        # -quiet implies -ign_eof: end at our stdin's EOF, sent once the echo is back.
        with subprocess.Popen(
            [*tcp, "-no_ign_eof"], cwd=tmp_path, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        ) as client:  # fmt: skip
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("over tcp\n")
            client.stdin.flush()
            time.sleep(2)
            client.stdin.close()
            tcp_out = client.stdout.read()
            client.wait(timeout=30)
        assert '"proxy_protocol":"v2"' in tcp_out and "over tcp" in tcp_out
        # The WebSocket snippet, as printed.
        start = text.index("WebSocket (the echo")
        snippet = text[start:].split("\n", 1)[1]
        snippet = snippet[: snippet.index('trio.run(main)"') + len('trio.run(main)"')].strip()
        exe, _, code = snippet.partition(' -c "')
        ws = subprocess.run(
            [exe, "-c", code[:-1]], cwd=tmp_path, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert "x-forwarded-client-cert" in ws.stdout and "hello" in ws.stdout, ws.stderr


# ---- commands that work as printed, from a fresh shell; ports that follow the config ----


def fresh_shell(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a printed command line as a user pasting it into a new terminal would: through
    a shell, without this virtualenv's bin on PATH."""
    venv_bin = Path(sys.executable).parent
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(path)
    assert shutil.which("mtlsproxy", path=env["PATH"]) is None  # a bare name would not do
    return subprocess.run(
        ["sh", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@contextmanager
def quickstart_running(cwd: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`mtlsproxy quickstart --dir qs ARGS` until everything is printed; Ctrl-C after."""
    with subprocess.Popen(
        [*MTLSPROXY, "quickstart", "--dir", "qs", *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            lines = []
            deadline = time.monotonic() + 60
            assert proc.stdout is not None and proc.stderr is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, "quickstart exited early: " + proc.stderr.read()
                lines.append(line)
                if "Ctrl-C stops" in line:
                    break
            yield proc, "".join(lines)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def printed(text: str, *words: str) -> list[str]:
    """The printed command lines holding every one of ``words``."""
    return [x.strip() for x in text.splitlines() if all(w in x for w in words)]


def curl_status(line: str, cwd: Path) -> str:
    done = subprocess.run(
        [*line.split(), "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}"],
        cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout


def test_printed_commands_run_from_a_fresh_shell_on_the_ports_asked_for(tmp_path: Path) -> None:
    https, tcp, admin = free_port(), free_port(), free_port()
    ports = ["--port", str(https), "--tcp-port", str(tcp), "--admin-port", str(admin)]
    with quickstart_running(tmp_path, *ports, "--backend-port", "0") as (_, text):
        assert f"https://localhost:{https}/hello" in text and f"127.0.0.1:{tcp} ->" in text
        assert f"curl http://127.0.0.1:{admin}/certs" in text
        assert "8443" not in text and "9901" not in text
        (with_cert,) = printed(text, "curl --cacert", "--key")
        assert curl_status(with_cert, tmp_path) == "200"
        # the Python example runs on what `make run` installs: the standard library
        (python,) = printed(text, "urllib.request", "load_cert_chain")
        answered = fresh_shell(python, tmp_path)
        assert answered.returncode == 0, answered.stderr
        assert "'x-forwarded-client-cert': ['Hash=" in answered.stdout
        (deny,) = printed(text, " deny add --config ")
        (reload,) = printed(text, " reload --config ")
        assert not deny.startswith("mtlsproxy ") and not reload.startswith("mtlsproxy ")
        added = fresh_shell(deny, tmp_path)
        assert added.returncode == 0 and "denied sha256:" in added.stdout, added.stderr
        reloaded = fresh_shell(reload, tmp_path)
        assert reloaded.returncode == 0, reloaded.stderr
        assert f"reloaded: the proxy at 127.0.0.1:{admin} now serves" in reloaded.stdout
        assert curl_status(with_cert, tmp_path) == "403"  # applied by the reload, at once


def test_a_run_after_deny_add_warns_and_its_undo_works(tmp_path: Path) -> None:
    """The config is kept, so printed addresses follow the file as it is (here edited by
    hand), and a deny list that refuses the demo client is said, with the way back."""
    ports = quickstart.Ports(*(free_port() for _ in range(6)))
    files = quickstart.prepare(tmp_path / "qs", ports=ports)
    edited = free_port()
    text = files.config.read_text()
    assert text.count(f'"127.0.0.1:{ports.https}"') == 1
    text = text.replace(f'"127.0.0.1:{ports.https}"', f'"127.0.0.1:{edited}"')
    files.config.write_text(text.replace("[tls]", '[tls]\nreload_interval = "200ms"'))
    config = str(files.config)
    for entry in ("cn:demo-player", str(files.crt(files.client))):
        assert run("deny", "add", "--config", config, entry).returncode == 0
    with quickstart_running(tmp_path) as (_, out):
        assert f"https://localhost:{edited}/hello" in out
        warning = out[out.index("warning: the demo client") :]
        assert "qs/deny.txt line 3: cn:demo-player" in warning
        assert "qs/deny.txt line 4: sha256:" in warning
        undo = printed(warning, "undo: ", " deny remove --config ")
        assert len(undo) == 2
        (with_cert,) = printed(out, "curl --cacert", "--key")
        assert curl_status(with_cert, tmp_path) == "403"
        for line in undo:
            lifted = fresh_shell(line.removeprefix("undo: "), tmp_path)
            assert lifted.returncode == 0 and "lifted " in lifted.stdout, lifted.stderr
        # A removal waits for a stable file: two polls of 200 ms.
        deadline = time.monotonic() + 20
        while (status := curl_status(with_cert, tmp_path)) != "200":
            assert time.monotonic() < deadline, status
    with quickstart_running(tmp_path) as (_, out):
        assert "warning" not in out


def test_port_options_do_not_silently_differ_from_a_kept_config(tmp_path: Path) -> None:
    files = quickstart.prepare(tmp_path / "qs", ports=quickstart.Ports(https=free_port()))
    port = free_port()
    proc = run("quickstart", "--dir", tmp_path / "qs", "--port", port, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{files.config} is kept from an earlier run" in proc.stderr
    assert f"--port {port}, but listeners[0].listen is 127.0.0.1:" in proc.stderr
    assert "delete it" in proc.stderr and "Traceback" not in proc.stderr


def test_a_taken_port_of_a_kept_config_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        files = quickstart.prepare(tmp_path / "qs", ports=quickstart.Ports(admin=port))
        proc = run("quickstart", "--dir", tmp_path / "qs", ok=False)
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{port} (admin.listen in {files.config}) is in use" in proc.stderr


def test_a_taken_default_port_falls_back_to_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = [free_port() for _ in range(5)]
        defaults = quickstart.Ports(busy, *free)
        chosen, notes = quickstart.choose_ports({}, defaults)
    assert chosen.https != busy and chosen.https not in free
    assert (chosen.tcp, chosen.admin, chosen.http_backend) == tuple(free[:3])
    assert notes == [
        f"port {busy} is in use: the HTTPS listener gets {chosen.https} instead "
        "(written to the config; --port picks another)"
    ]
    asked, _ = quickstart.choose_ports(quickstart.requested_ports(https=busy), defaults)
    assert asked.https == busy  # asked for: used as given (the bind says if it is taken)
    anywhere, notes = quickstart.choose_ports(quickstart.requested_ports(backend=0), defaults)
    three = {anywhere.http_backend, anywhere.tcp_backend, anywhere.ws_backend}
    assert len(three) == 3 and not three & set(free) and not notes


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_taken_default_moves_near_it_not_into_the_ephemeral_range() -> None:
    """A fallback port is written to the kept config: one from the ephemeral range would
    be taken by some outgoing connection now and then, and the next run would fail."""
    base = next(p for p in range(20000, 30000, 7) if _bindable(p) and _bindable(p + 100))
    others = [p for p in range(30001, 31000, 11) if _bindable(p)][:5]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        taken.listen()
        chosen, notes = quickstart.choose_ports({}, quickstart.Ports(base, *others))
    assert chosen.https == base + 100
    assert notes == [
        f"port {base} is in use: the HTTPS listener gets {base + 100} instead "
        "(written to the config; --port picks another)"
    ]


def test_printed_commands_name_the_running_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "repo" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "mtlsproxy").write_text("#!/bin/sh\n")
    (venv / "mtlsproxy").chmod(0o755)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(sys, "argv", [".venv/bin/mtlsproxy", "quickstart"])  # as `make run`
    assert quickstart.invocation() == ".venv/bin/mtlsproxy"
    monkeypatch.setenv("PATH", str(venv))  # an activated venv: found on PATH
    monkeypatch.setattr(sys, "argv", ["mtlsproxy", "quickstart"])
    assert quickstart.invocation() == ".venv/bin/mtlsproxy"
    monkeypatch.chdir(tmp_path)
    assert quickstart.invocation() == "repo/.venv/bin/mtlsproxy"
    monkeypatch.setattr(sys, "argv", [str(Path(quickstart.__file__).parent / "__main__.py")])
    assert quickstart.invocation().endswith(" -m mtlsproxy")
    assert quickstart.invocation().split()[0] in (sys.executable, os.path.relpath(sys.executable))
