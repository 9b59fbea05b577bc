import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import MTLSPROXY

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


def test_cli_quickstart_prints_commands_that_name_real_files(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*MTLSPROXY, "quickstart", "--dir", "qs"], cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "curl --cacert qs/ca/ca.crt --cert qs/client.crt --key qs/client.key" in proc.stdout
    verify = next(line for line in proc.stdout.splitlines() if "openssl verify" in line)
    done = subprocess.run(
        verify.split(), cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0 and "OK" in done.stdout
