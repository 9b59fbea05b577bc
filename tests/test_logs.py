"""Diagnostic logging never waits for stderr: a bounded queue and a writer thread."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from mtlsproxy import logs

log = logging.getLogger("mtlsproxy.test")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    getattr(logs, "shutdown", lambda: None)()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class Drain(threading.Thread):
    """Reads a pipe to its end (the reader stderr did not have)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.data = b""
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.data += chunk
        os.close(self.fd)


def test_a_stalled_stderr_never_blocks_a_logging_call(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    read_fd, write_fd = os.pipe()
    stderr = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 - nobody reads: it fills
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(logs, "QUEUE_SIZE", 500, raising=False)
    logs.configure("info", "json")
    count = 5000  # ~1.6 MB: far more than the pipe (64 KiB) and the queue hold

    def spam() -> None:
        for i in range(count):
            log.warning("line %d %s", i, "x" * 300)

    caller = threading.Thread(target=spam, daemon=True)  # the event loop's thread
    caller.start()
    caller.join(10)
    returned = not caller.is_alive()
    drain = Drain(read_fd)  # from here on stderr is read again
    try:
        assert returned, "log.warning() waited for a stderr nobody reads"
        dropped = logs.dropped()
        assert 0 < dropped < count
        deadline = time.monotonic() + 10
        while logs.queued() and time.monotonic() < deadline:
            time.sleep(0.01)
        log.warning("after the stall")  # room again: the drop count is said first
    finally:
        getattr(logs, "shutdown", lambda: None)()
        caller.join(10)
        stderr.close()
        drain.join(10)
    lines = [json.loads(line) for line in drain.data.decode().splitlines()]
    written = [x for x in lines if x["message"].startswith("line ")]
    assert len(written) + dropped == count
    notes = [x for x in lines if x["logger"] == "mtlsproxy.logs"]
    assert notes and all(x["level"] == "warning" for x in notes)
    said = [int(x["message"].split()[0]) for x in notes]  # "N diagnostic log records dropped"
    assert sum(said) == dropped  # every drop is told, in one line per gap
    assert len(notes) < 10  # not one line per freed slot while stderr crawls
    assert lines[-2] is notes[-1] and lines[-1]["message"] == "after the stall"


def test_every_queued_line_is_written_at_exit() -> None:
    code = """if True:
        import logging
        from mtlsproxy import logs
        logs.configure("info", "json")
        log = logging.getLogger("mtlsproxy.test")
        for i in range(3000):
            log.info("line %d", i)
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("boom")
        raise SystemExit(3)  # the process ends at once: atexit must write the queue
    """
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 3, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.decode().splitlines()]
    assert [x["message"] for x in lines[:-1]] == [f"line {i}" for i in range(3000)]
    assert lines[-1]["message"] == "boom"
    assert "ZeroDivisionError" in lines[-1]["exception"]  # still its own field


def test_exit_does_not_hang_on_a_stderr_that_stays_stalled(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    read_fd, write_fd = os.pipe()
    stderr = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(logs, "QUEUE_SIZE", 100)
    logs.configure("info", "json")
    for i in range(2000):
        log.warning("line %d %s", i, "x" * 300)
    started = time.monotonic()
    listener = logs._listener
    assert listener is not None
    try:
        logs.shutdown(timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        # Read the pipe again whatever happened above: a writer thread left blocked on
        # it holds its handler's lock, and logging.shutdown() at interpreter exit would
        # wait for that lock for ever (seen once: a failed run that never ended).
        drain = Drain(read_fd)
        log.warning("written directly")  # after shutdown: straight to stderr
        # The writer left behind finishes its queue into the drained pipe before the pipe
        # is closed: else it writes to a closed file and a later test gets the traceback.
        if listener._thread is not None:
            listener._thread.join(10)
        stderr.close()
        drain.join(10)
