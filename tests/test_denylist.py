import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest

from mtlsproxy.denylist import DenyList, add_entry, parse_deny_list, remove_entry
from mtlsproxy.errors import CredentialError

DIGEST = "ab" * 32


def test_every_kind_parses_and_normalizes() -> None:
    text = f"""
    # stolen on 2026-11-27
    sha256:{DIGEST.upper()}
    sha256:{":".join(["cd"] * 32)}   # openssl's colon form
    serial:0x00FF
    serial:0a:0b
    uri:spiffe://game.example/player/7#frag-is-kept
    cn: mallory
    """
    deny = parse_deny_list(text, "deny.txt")
    assert deny.sha256 == {DIGEST, "cd" * 32}
    assert deny.serials == {0xFF, 0x0A0B}
    assert deny.uris == {"spiffe://game.example/player/7#frag-is-kept"}
    assert deny.cns == {"mallory"}
    assert len(deny) == 6


def test_empty_file_is_an_empty_list() -> None:
    assert parse_deny_list("# nothing yet\n\n", "deny.txt") == DenyList()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sha256:abcd", "64 hex digits"),
        ("sha256:" + "zz" * 32, "64 hex digits"),
        ("serial:xyz", "hex digits"),
        ("email:a@b", "unknown kind 'email'"),
        ("justtext", "is not '<kind>:<value>'"),
        ("cn:", "is not '<kind>:<value>'"),
    ],
)
def test_a_bad_line_rejects_the_whole_file(line: str, message: str) -> None:
    text = f"cn:ok\n{line}\n"
    with pytest.raises(CredentialError, match=rf"deny\.txt: line 2: .*{message}"):
        parse_deny_list(text, "deny.txt")


# ---- editing the file: deny add / deny remove ------------------------------------------


def test_an_edit_waits_for_another_editor_and_loses_nothing(tmp_path: Path) -> None:
    """Two operators at once: the second edit waits for the first one's rename, then reads
    the file it left; without the lock it would write back what it read before, and the
    first one's new deny would be gone."""
    deny = tmp_path / "deny.txt"
    deny.write_text("cn:first\n")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(folder, fcntl.LOCK_EX)  # as another `deny add` between its read and rename
    adder = threading.Thread(target=add_entry, args=(deny, "cn:second"))
    try:
        adder.start()
        adder.join(timeout=0.5)
        assert adder.is_alive(), "the edit did not wait for the other editor"
        deny.write_text("cn:first\ncn:other-operator\n")  # the other editor's rename
    finally:
        os.close(folder)  # releases its lock
    adder.join(timeout=10)
    assert not adder.is_alive()
    assert deny.read_text() == "cn:first\ncn:other-operator\ncn:second\n"


def test_removing_keeps_every_other_byte(tmp_path: Path) -> None:
    deny = tmp_path / "deny.txt"
    deny.write_bytes(b"# written on Windows\r\ncn:gone\r\nuri:spiffe://g.example/k\r\n")
    removed, left = remove_entry(deny, "cn:gone")
    assert removed == [(2, "cn:gone")]
    assert deny.read_bytes() == b"# written on Windows\r\nuri:spiffe://g.example/k\r\n"
    assert left.uris == frozenset({"spiffe://g.example/k"})
    assert add_entry(deny, "cn:new")
    assert deny.read_bytes().endswith(b"spiffe://g.example/k\r\ncn:new\r\n")  # CRLF kept


def test_an_edit_keeps_a_symlink_and_the_files_owner(tmp_path: Path) -> None:
    real = tmp_path / "etc" / "deny.txt"
    real.parent.mkdir()
    real.write_text("cn:a\n")
    real.chmod(0o640)
    link = tmp_path / "deny.txt"
    link.symlink_to(real)
    if os.geteuid() == 0:
        os.chown(real, 12345, 12346)
    assert add_entry(link, "cn:b")
    assert link.is_symlink() and real.read_text() == "cn:a\ncn:b\n"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert (real.stat().st_uid, real.stat().st_gid) == (12345, 12346)
    assert remove_entry(link, "cn:a")[0] == [(1, "cn:a")]
    assert link.is_symlink() and real.read_text() == "cn:b\n"
