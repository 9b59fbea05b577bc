import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from support import MTLSPROXY

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
    """`make run` as a user meets it: printed commands work; Ctrl-C stops everything."""
    with subprocess.Popen(
        [*MTLSPROXY, "quickstart", "--dir", "qs"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            lines = []
            deadline = time.monotonic() + 60
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, "quickstart exited early: " + proc.stderr.read() if proc.stderr else ""
                lines.append(line)
                if "Ctrl-C stops" in line:
                    break
            text = "".join(lines)
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
            assert "requests.get(" in text
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
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
