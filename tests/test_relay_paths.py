"""The path rule (relay.paths): what is routed is what is forwarded; ambiguity is a 400.

Threat: a route `/admin` with a strict allow rule beside a broad `/` route. Any spelling
of `/admin` that the proxy routes to `/` but a backend serves as `/admin` is a bypass:
slash merging (`//admin`), escaped separators (`/%2Fadmin`), dot-segments (`/.//admin`),
path parameters (`/admin;x/`), double decoding (`%252F`), overlong UTF-8 (`%C0%AE`).
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.relay.errors import BadRequest
from mtlsproxy.relay.paths import canonical_target


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        (b"/", b"/"),
        (b"*", b"*"),
        (b"/a/b/", b"/a/b/"),
        (b"//admin/secret", b"/admin/secret"),
        (b"///admin/x", b"/admin/x"),
        (b"/a//b///c//", b"/a/b/c/"),
        (b"/%61dmin", b"/admin"),
        (b"/a%7e", b"/a~"),
        (b"/a%2bb", b"/a%2Bb"),
        (b"/caf%c3%a9", b"/caf%C3%A9"),
        (b"/a?q=%2F&x=//y;z", b"/a?q=%2F&x=//y;z"),  # the query is the backend's
        (b"//a?b", b"/a?b"),
        (b"/a.b/.c/..d", b"/a.b/.c/..d"),  # dots inside a segment are fine
        (b"/{id}|[x]", b"/{id}|[x]"),  # unusual but unambiguous characters pass
    ],
)
def test_canonical_form_is_what_goes_upstream(target: bytes, canonical: bytes) -> None:
    assert canonical_target(target) == canonical


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/%2Fadmin/x", "%2F"),
        (b"/%2fadmin/x", "%2F"),
        (b"//%2Fadmin/x", "%2F"),
        (b"/admin%5Cx", "%5C"),
        (b"/%252Fadmin", "%25"),
        (b"/.//admin/x", "dot-segment"),
        (b"/./admin", "dot-segment"),
        (b"/a/../admin", "dot-segment"),
        (b"/a/%2e%2E/admin", "dot-segment"),
        (b"/a/.%2e", "dot-segment"),
        (b"/a//..//admin", "dot-segment"),
        (b"/admin;x/secret", "path parameters"),
        (b"/a\\..\\admin", "backslash"),
        (b"/a%00b", "control character"),
        (b"/a%0d%0aSet-Cookie:x", "control character"),
        (b"/a%7F", "control character"),
        (b"/%C0%AE%C0%AE/admin", "not UTF-8"),
        (b"/%ff", "not UTF-8"),
        (b"/a%zz", "percent-encoding"),
        (b"/a%2", "percent-encoding"),
        (b"/a#frag", "fragment"),
        (b"http://api.example/", "origin-form"),
        (b"api.example:443", "origin-form"),
    ],
)
def test_ambiguous_spellings_are_refused(target: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        canonical_target(target)


_SEGMENT = st.text(alphabet="aA./%;2Fef5Cc0", min_size=0, max_size=6)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_a_decoding_merging_backend_sees_the_routed_path(segments: list[str]) -> None:
    """For any accepted target, a backend that percent-decodes, merges slashes and
    resolves dot-segments (the most lenient reading) acts on the same path as the one the
    proxy routed and forwarded: canonicalizing is idempotent, and decoding it adds no
    separator and removes no segment."""
    target = ("/" + "/".join(segments)).encode()
    try:
        canonical = canonical_target(target)
    except BadRequest:
        return
    assert canonical_target(canonical) == canonical
    lenient = posixpath.normpath(unquote_to_bytes(canonical).decode("utf-8"))
    strict = unquote_to_bytes(canonical).decode("utf-8")
    assert lenient.split("/")[1:] == strict.rstrip("/").split("/")[1:] or strict == "/"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/admin%3Bx/secret", "%3B"),  # a decoding layer in front of Tomcat makes it ';'
        (b"/%E2%84%AAey", "form C|as ASCII"),  # KELVIN SIGN: 'k' to equalsIgnoreCase, /i
        (b"/adm%C4%B0n/x", "reads as ASCII"),  # dotted capital I lowercases to 'i'
        (b"/adm%C4%B1n/x", "reads as ASCII"),  # dotless i uppercases to 'I'
        (b"/%EF%AC%81le", "reads as ASCII"),  # the 'fi' ligature is 'fi' in NFKC
        (b"/cafe%CC%81", "normalization form C"),  # a normalizing file system: caf\u00e9
    ],
)
def test_unicode_and_parameter_spellings_are_refused(target: bytes, reason: str) -> None:
    """Review findings: these reached the `/` route while a backend that compares without
    case, normalizes or decodes once more serves them as a narrower route's path."""
    with pytest.raises(BadRequest, match=reason):
        canonical_target(target)


def test_plain_non_ascii_paths_still_pass() -> None:
    assert canonical_target(b"/caf%c3%a9/%E6%97%A5%E6%9C%AC") == b"/caf%C3%A9/%E6%97%A5%E6%9C%AC"
