"""The deny list: identities refused on every route, whatever the allow rules say.

One entry a line; ``#`` at the start of a line or after a space starts a comment:

    sha256:<hex>    the SHA-256 fingerprint of the leaf certificate's DER (``ca show`` prints it)
    serial:<hex>    the certificate's serial number
    uri:<uri>       a URI SAN, e.g. a SPIFFE id: every certificate naming it
    cn:<name>       a subject common name: every certificate naming it

A line that does not parse rejects the whole file, naming the line: a deny list that
half-loads would let through exactly the identity someone was trying to shut out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.errors import CredentialError

_HEX = re.compile(r"[0-9a-f]+")
# A comment starts a line or follows white space, so a '#' inside a value survives.
_COMMENT = re.compile(r"(?:^|\s)#")


class DenyList(msgspec.Struct, frozen=True):
    sha256: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()
    uris: frozenset[str] = frozenset()
    cns: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.sha256) + len(self.serials) + len(self.uris) + len(self.cns)

    def __or__(self, other: DenyList) -> DenyList:
        return DenyList(
            self.sha256 | other.sha256,
            self.serials | other.serials,
            self.uris | other.uris,
            self.cns | other.cns,
        )

    def removed_in(self, newer: DenyList) -> int:
        """How many of our entries ``newer`` no longer has (unbanned, or lost in a write)."""
        return (
            len(self.sha256 - newer.sha256)
            + len(self.serials - newer.serials)
            + len(self.uris - newer.uris)
            + len(self.cns - newer.cns)
        )


def parse_deny_list(text: str, source: Path | str) -> DenyList:
    sha256: set[str] = set()
    serials: set[int] = set()
    uris: set[str] = set()
    cns: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.split(raw, maxsplit=1)[0].strip()
        if not line:
            continue
        kind, sep, value = line.partition(":")
        kind, value = kind.strip().lower(), value.strip()
        if not sep or not value:
            raise CredentialError(source, f"line {lineno}: {raw.strip()!r} is not '<kind>:<value>'")
        if kind == "sha256":
            # Accept the colon-separated form openssl prints, in either case.
            digest = value.replace(":", "").lower()
            if len(digest) != 64 or not _HEX.fullmatch(digest):
                raise CredentialError(source, f"line {lineno}: sha256 takes 64 hex digits")
            sha256.add(digest)
        elif kind == "serial":
            digits = value.replace(":", "").lower().removeprefix("0x")
            if not _HEX.fullmatch(digits):
                raise CredentialError(source, f"line {lineno}: serial takes hex digits")
            serials.add(int(digits, 16))
        elif kind == "uri":
            uris.add(value)
        elif kind == "cn":
            cns.add(value)
        else:
            raise CredentialError(
                source, f"line {lineno}: unknown kind {kind!r}; use sha256, serial, uri or cn"
            )
    return DenyList(frozenset(sha256), frozenset(serials), frozenset(uris), frozenset(cns))


def describe_entry(entry: str) -> str:
    """What one deny line matches, in words."""
    kind, _, value = entry.partition(":")
    return {
        "sha256": "the one certificate with this fingerprint",
        "serial": "certificates with this serial number",
        "uri": f"every certificate naming the URI {value}",
        "cn": f"every certificate whose subject CN is {value!r}",
    }[kind]


@contextlib.contextmanager
def _editing(path: Path, timeout: float = 10.0) -> Iterator[tuple[Path, str]]:
    """One editor of a deny file at a time, from its read to its rename: ``deny add`` and
    ``deny remove`` run at once by two operators would each write the file they read, and
    one edit (perhaps a new deny) would be lost. An exclusive ``flock`` on the file's folder
    (the file itself is replaced by each edit). Yields the file to write (a symlink's
    target: the link stays a link) and its text, byte for byte (CRLF stays CRLF)."""
    target = path.resolve()
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CredentialError(
                        path,
                        f"another deny add or remove has been editing it for {timeout:.0f} s;"
                        " try again",
                    ) from None
                time.sleep(0.05)
        yield target, target.read_bytes().decode("utf-8")
    finally:
        os.close(fd)  # and with it the lock


def _write(target: Path, text: str) -> None:
    """Atomically, keeping the file's mode and owner (a ``sudo mtlsproxy deny add`` must
    not leave a root-owned file that the usual editor cannot change)."""
    st = target.stat()
    write_atomic(target, text.encode("utf-8"), mode=stat.S_IMODE(st.st_mode),
                 owner=(st.st_uid, st.st_gid))  # fmt: skip


def add_entry(path: Path, entry: str, comment: str = "") -> bool:
    """Append ``entry`` to the deny file atomically; False when it is there already.

    The new file is parsed as a whole before it is written, so a bad entry never
    reaches the file the proxy polls.
    """
    parse_deny_list(entry, "the new entry")  # names the entry, not the file, on error
    with _editing(path) as (target, text):
        current = parse_deny_list(text, path)
        if parse_deny_list(text + "\n" + entry, path) == current:
            return False
        newline = "\r\n" if text.endswith("\r\n") else "\n"
        line = entry + (f"  # {comment}" if comment else "")
        new_text = text + ("" if text.endswith("\n") or not text else newline) + line + newline
        parse_deny_list(new_text, path)
        _write(target, new_text)
    return True


def remove_entry(path: Path, entry: str) -> tuple[list[tuple[int, str]], DenyList]:
    """Remove every line of the deny file that denies exactly ``entry``, however it is
    spelt, writing the file atomically; returns the removed ``(line number, line)`` pairs
    and the list that is left. The mirror of ``add_entry``: the file is parsed as a whole,
    before and after, so a bad file is never rewritten; the other lines stay byte for
    byte."""
    target_list = parse_deny_list(entry, "the entry")  # names the entry, not the file
    with _editing(path) as (target, text):
        parse_deny_list(text, path)
        kept: list[str] = []
        removed: list[tuple[int, str]] = []
        # Numbered as parse_deny_list numbers them (its errors name these lines too).
        for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
            if len(target_list) and parse_deny_list(line, path) == target_list:
                removed.append((lineno, line.strip()))
            else:
                kept.append(line)
        new_text = "".join(kept)
        left = parse_deny_list(new_text, path)
        if removed:
            _write(target, new_text)
    return removed, left
