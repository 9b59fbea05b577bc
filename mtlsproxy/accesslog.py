"""The access log: one JSON line per HTTP request, WebSocket session and TCP session.

Field names are public surface (README, "Access log"): log pipelines parse them. A record
names the client by its verified identity (CN, SPIFFE id, the leaf's SHA-256) and never
holds a key or a whole certificate. The request path is logged without its query string,
where applications put tokens.

Writes are synchronous and line-buffered: one ``write`` per record, small and bounded,
like nginx's. A log that cannot be written (disk full, a closed pipe) is reported once on
the diagnostic log and then skipped: serving traffic matters more than logging it.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

from mtlsproxy.identity import Identity

log = logging.getLogger("mtlsproxy.access")

_MAX_PATH = 1024


class AccessRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
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
    """Writes records to ``target``: "stdout", "stderr", "off" or a file path (appended)."""

    def __init__(self, target: str) -> None:
        self._out: IO[bytes] | None
        self._owned = False
        if target == "off":
            self._out = None
        elif target in ("stdout", "stderr"):
            self._out = (sys.stdout if target == "stdout" else sys.stderr).buffer
        else:
            self._out = Path(target).open("ab")  # noqa: SIM115 - held for the proxy's lifetime
            self._owned = True
        self._encoder = msgspec.json.Encoder()
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def write(self, entry: AccessRecord) -> None:
        if self._out is None:
            return
        try:
            self._out.write(self._encoder.encode(entry) + b"\n")
            self._out.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            if not self._failed:
                log.error("access log: cannot write (%s); records are dropped", exc)  # noqa: TRY400
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        if self._owned and self._out is not None:
            self._out.close()
        self._out = None
