"""Diagnostic logs: human-readable text on a terminal, one JSON object per line otherwise.

``[log] format`` (or ``serve --log-format``) picks: ``text``, ``json``, or ``auto`` (text
when stderr is a terminal). JSON lines carry ``time``, ``level``, ``logger``, ``message``
and, in a worker process, ``worker`` and ``pid``; an exception adds ``exception``. The
access log is separate (``mtlsproxy.accesslog``).

Writing never blocks the caller (the trio event loop): a logging call formats its message
and puts the record on a bounded queue (``QUEUE_SIZE`` records); a ``QueueListener``
thread writes the queue to stderr. A stderr nobody reads (a full pipe, a stalled
collector) fills the queue; records beyond it are dropped and counted, and once there is
room again one warning says how many were lost. The listener starts in ``configure`` and
``shutdown`` (run at exit) writes what is still queued, waiting at most a few seconds for
a stalled stderr, then puts the direct handler back for anything logged later.
"""

from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from datetime import UTC, datetime

import msgspec

from mtlsproxy.workerenv import ENV_WORKER

QUEUE_SIZE = 10_000  # records; about 2 MB of typical lines
_EXIT_WAIT = 5.0  # seconds shutdown waits for a stalled stderr before giving up

log = logging.getLogger("mtlsproxy.logs")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None) -> None:
        super().__init__()
        self._worker = worker
        self._encode = msgspec.json.Encoder().encode

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            line["worker"] = int(self._worker)
            line["pid"] = record.process
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encode(line).decode()


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Puts records on a bounded queue without ever waiting. A full queue drops the record
    and counts it (``dropped``), and keeps dropping until the writer has emptied half the
    queue; then one warning naming how many were dropped marks the gap, and records flow
    again (no flood of such warnings while stderr crawls)."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0  # since configure
        self._unreported = 0
        self._resume_at = records.maxsize // 2

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is merged here, in the caller's thread: its arguments may change
        # after the call returns. The exception stays (formatted by the writer thread).
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # Handler.handle holds the handler's lock around emit: one enqueue at a time.
        if self._unreported:
            if self.queue.qsize() > self._resume_at or not self._put(self._dropped_note()):  # type: ignore[attr-defined]
                self._drop()
                return
            self._unreported = 0
        if not self._put(record):
            self._drop()

    def _put(self, record: logging.LogRecord) -> bool:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            return False
        return True

    def _drop(self) -> None:
        self.dropped += 1
        self._unreported += 1

    def _dropped_note(self) -> logging.LogRecord:
        note = log.makeRecord(
            log.name,
            logging.WARNING,
            __file__,
            0,
            "%d diagnostic log records dropped: stderr was not keeping up",
            (self._unreported,),
            None,
        )
        return self.prepare(note)


class _Listener(logging.handlers.QueueListener):
    def __init__(self, records: queue.Queue[logging.LogRecord | None], *handlers: logging.Handler):
        super().__init__(records, *handlers)
        self._records = records

    def stop_within(self, timeout: float) -> bool:
        """Write what is queued and stop the thread; False if stderr stayed stalled for
        ``timeout`` seconds (the daemon thread is then left behind)."""
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            self._records.put(None, timeout=timeout)  # QueueListener's sentinel
        except queue.Full:
            return False
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return False
        self._thread = None
        return True


_lock = threading.Lock()
_listener: _Listener | None = None
_queue_handler: DroppingQueueHandler | None = None
_stream_handler: logging.Handler | None = None
_atexit_registered = False


def configure(level: str, fmt: str = "auto") -> None:
    global _listener, _queue_handler, _stream_handler, _atexit_registered  # noqa: PLW0603
    worker = os.environ.get(ENV_WORKER)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = f"[worker {worker} pid %(process)d] " if worker is not None else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
        )
    shutdown()  # a second configure: the first one's lines are written first
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=QUEUE_SIZE)
    queued = DroppingQueueHandler(records)
    listener = _Listener(records, handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(queued)
    root.setLevel(level.upper())
    with _lock:
        _listener, _queue_handler, _stream_handler = listener, queued, handler
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
    listener.start()


def dropped() -> int:
    """Records dropped since ``configure`` because stderr did not keep up."""
    return _queue_handler.dropped if _queue_handler is not None else 0


def queued() -> int:
    """Records waiting for the writer thread."""
    return _queue_handler.queue.qsize() if _queue_handler is not None else 0  # type: ignore[attr-defined]


def shutdown(timeout: float = _EXIT_WAIT) -> None:
    """Write every queued record and stop the writer thread (at exit, and before a new
    ``configure``); later records go straight to stderr. Waits at most ``timeout`` seconds
    for a stalled stderr."""
    global _listener, _queue_handler  # noqa: PLW0603
    with _lock:
        listener, queued, handler = _listener, _queue_handler, _stream_handler
        _listener = _queue_handler = None
    if listener is None or queued is None or handler is None:
        return
    root = logging.getLogger()
    if queued in root.handlers:
        root.removeHandler(queued)
        root.addHandler(handler)  # nothing more is queued: what follows is written directly
    listener.stop_within(timeout)
