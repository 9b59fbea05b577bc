import pytest

from mtlsproxy.denylist import DenyList, parse_deny_list
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
