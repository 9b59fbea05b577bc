"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The proxy polls certificate files that the CA tooling (or cron, or Kubernetes) rewrites.
We write to a temporary file in the same folder (a rename is only atomic within one file
system), fsync it, set its mode *before* it gets its name (a key is never world-readable,
not even for a moment), rename it over the target, then fsync the folder so the rename
itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(
    path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None
) -> None:
    """``owner``: (uid, gid) to keep, where this process may give the file away (root);
    elsewhere the file is this process's, as any file it writes."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(tmp.fileno(), *owner)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp_name).unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stat_signature(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    """(inode, size, mtime) of each file: changes when a file is replaced or rewritten, for
    readers that poll without reading (raises OSError for a missing file)."""
    signature = []
    for path in paths:
        st = path.stat()
        signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)
