"""The access log: one JSON line per HTTP request, WebSocket session and TCP session.

Field names are public surface (README, "Access log"): log pipelines parse them. A record
names the client by its verified identity (CN, SPIFFE id, the leaf's SHA-256) and never
holds a key or a whole certificate. The request path is logged without its query string,
where applications put tokens.

Writes happen in a thread behind a bounded queue, so a slow reader of the log never
stalls traffic; what does not fit is dropped and counted. A log that cannot be written
(disk full, a closed pipe) is reported once on the diagnostic log: serving traffic matters
more than logging it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec

from mtlsproxy.identity import Identity

if TYPE_CHECKING:
    from mtlsproxy.sessions import Session

log = logging.getLogger("mtlsproxy.access")

_MAX_PATH = 1024


class AccessRecord(msgspec.Struct, kw_only=True):
    time: str
    kind: str  # "http", "websocket", "tcp"
    listener: str
    client: str  # address:port of the peer
    fingerprint: str  # sha256:<hex> of the client's leaf certificate
    cn: str | None = None
    spiffe_id: str | None = None
    resumed: bool = False
    route: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None  # HTTP status (101 for a WebSocket session)
    bytes_in: int = 0  # body or payload bytes from the client
    bytes_out: int = 0  # body or payload bytes to the client
    duration_ms: float = 0.0
    upstream: str | None = None  # the backend that served it
    end: str | None = None  # how a WebSocket or TCP session ended
    alpn: str | None = None  # the protocol agreed in the handshake (tcp listeners with alpn)
    # Every field is always present: null means not known, or not applicable to the kind.


def record(
    kind: str,
    *,
    listener: str,
    client: str,
    identity: Identity,
    resumed: bool,
    duration: float,
    **fields: object,
) -> AccessRecord:
    return AccessRecord(
        time=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        kind=kind,
        listener=listener,
        client=client,
        fingerprint=identity.fingerprint,
        cn=identity.cn,
        spiffe_id=identity.spiffe_id,
        resumed=resumed,
        duration_ms=round(duration * 1000, 3),
        **fields,  # type: ignore[arg-type]
    )


def path_of(target: bytes) -> str:
    """The request target without its query string, decoded for a log line."""
    path = target.split(b"?", 1)[0][:_MAX_PATH]
    return path.decode("ascii", "replace")


class AccessLog:
    """Writes records to ``target``: "stdout", "stderr", "off" or a file path (appended).

    ``write`` never blocks the event loop: it queues the encoded line for a writer thread
    (started on first use). A log reader that stops reading (a full pipe, a stalled
    collector) fills the queue; lines beyond ``capacity`` are dropped and counted
    (``dropped``, and the ``on_drop`` callback) instead of stalling traffic. ``reopen``
    starts a new file after a log rotation moved the old one (SIGHUP calls it).
    """

    def __init__(
        self,
        target: str,
        *,
        capacity: int = 10_000,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._out: IO[bytes] | None = None
        self.enabled = target != "off"
        if self.enabled:
            self._out = self._open()
        self._encoder = msgspec.json.Encoder()
        self._queue: queue.Queue[bytes | object] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._on_drop = on_drop
        self.dropped = 0
        self._failed = False

    def _open(self) -> IO[bytes]:
        if self._target in ("stdout", "stderr"):
            return (sys.stdout if self._target == "stdout" else sys.stderr).buffer
        return Path(self._target).open("ab")

    def write(self, entry: AccessRecord) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(self._encoder.encode(entry) + b"\n")
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()

    def write_session(self, kind: str, session: Session, duration: float, **fields: object) -> None:
        """One line about ``session`` (its listener, peer and identity), built only when
        the log is on."""
        if self.enabled:
            self.write(
                record(
                    kind,
                    listener=session.listener,
                    client=session.peer,
                    identity=session.identity,
                    resumed=session.resumed,
                    duration=duration,
                    **fields,
                )
            )

    def reopen(self) -> None:
        if self.enabled and self._target not in ("stdout", "stderr"):
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_REOPEN)

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (waiting at most ``timeout``), then close the file."""
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None
        if self._out is not None and self._target not in ("stdout", "stderr"):
            self._out.close()
        self._out = None
        self.enabled = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while isinstance(item, bytes):
                batch.append(item)
                if len(batch) >= 512:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
                    break
            if batch:
                self._emit(b"".join(batch))
            if item is _STOP:
                return
            if item is _REOPEN:
                self._reopen_now()

    def _emit(self, data: bytes) -> None:
        try:
            assert self._out is not None
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError, AssertionError) as exc:  # ValueError: stream closed
            if not self._failed:
                log.error("access log: cannot write (%s); records are dropped", exc)  # noqa: TRY400
            self._failed = True
        else:
            self._failed = False

    def _reopen_now(self) -> None:
        try:
            fresh = self._open()
        except OSError as exc:
            log.error("access log: cannot reopen %s (%s); still writing the old file",  # noqa: TRY400
                      self._target, exc)  # fmt: skip
            return
        old, self._out = self._out, fresh
        if old is not None:
            old.close()
        log.info("access log: reopened %s", self._target)


_STOP, _REOPEN = object(), object()
