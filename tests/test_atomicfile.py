import stat
import threading
from pathlib import Path

from mtlsproxy.atomicfile import write_atomic


def test_mode_is_set_and_no_temporary_is_left(tmp_path: Path) -> None:
    target = tmp_path / "x.key"
    write_atomic(target, b"secret", mode=0o600)
    write_atomic(target, b"secret2", mode=0o600)
    assert target.read_bytes() == b"secret2"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.key"]


def test_a_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "bundle.crt"
    versions = [bytes([65 + i]) * 200_000 for i in range(4)]
    write_atomic(target, versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(60):
            write_atomic(target, versions[n % 4])
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen <= set(versions)
