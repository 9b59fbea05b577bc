"""Diagnostic logs: human-readable text on a terminal, one JSON object per line otherwise.

``[log] format`` (or ``serve --log-format``) picks: ``text``, ``json``, or ``auto`` (text
when stderr is a terminal). JSON lines carry ``time``, ``level``, ``logger``, ``message``
and, in a worker process, ``worker`` and ``pid``; an exception adds ``exception``. The
access log is separate (``mtlsproxy.accesslog``).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import msgspec

from mtlsproxy.server.workers import ENV_WORKER


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


def configure(level: str, fmt: str = "auto") -> None:
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
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
