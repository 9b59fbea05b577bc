"""The request path rule: the path the proxy authorizes is the path the backend acts on.

Theory of operation. A route rule (``/admin`` needs ``cn = "ops"``) is only as strong as
the agreement between the proxy and the backend on what a path *is*. Backends disagree
with each other: Python's http.server, nginx (``merge_slashes``) and most frameworks read
``//admin`` as ``/admin``; some decode ``%2F`` into a separator and some do not; Tomcat,
Jetty and Spring drop ``;params`` from a segment (``/admin;x/`` is ``/admin/`` to them);
old decoders read the overlong UTF-8 ``%C0%AE`` as ``.``; a backend behind another
decoding layer reads ``%252F`` as ``%2F`` and then as ``/``. So the proxy does two things,
in one function used by routing and by forwarding alike:

1. **Canonicalize what has one meaning everywhere, and forward the canonical form.**
   Escapes of RFC 3986 unreserved characters are decoded and other escapes upper-cased
   (§6.2.2: equivalent URIs), and runs of ``/`` are merged into one. The backend then
   receives exactly the path that was routed and authorized.
2. **Refuse what backends read differently** with 400, before any route is chosen:
   dot-segments (plain or escaped), ``%2F`` and ``%5C`` (an escaped separator), ``%25``
   (an escaped ``%``, i.e. a second decoding), ``;`` and ``%3B`` (path parameters),
   backslash, control characters and NUL (raw or escaped), escapes that do not decode to
   UTF-8, paths not in Unicode NFC, and non-ASCII characters that other case or
   compatibility forms turn into ASCII (the Kelvin sign is a ``K``).
   Refusing beats guessing: no normalization we picked could match every backend.

Prefixes are then compared without regard to ASCII case (``relay.routing``): Express,
ASP.NET and any backend on a case-insensitive file system serve ``/ADMIN`` as ``/admin``.

The query is never touched: it is the backend's to parse, and routes do not match on it.
Envoy's edge guidance (``normalize_path``, ``merge_slashes``,
``path_with_escaped_slashes_action: REJECT_REQUEST``) and Spring Security's
StrictHttpFirewall (which refuses ``;``, ``%2F``, ``%25`` and ``//``) draw the same line.
"""

from __future__ import annotations

import re
import unicodedata

from mtlsproxy.relay.errors import BadRequest

# The common case, checked in one step: only pchar characters other than "%" and ";",
# no empty segment. Such a path is canonical unless it has a dot-segment.
_PLAIN = re.compile(rb"(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]+)+/?|/")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_SLASHES = re.compile(rb"//+")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Escapes refused outright: separators, a second decoding, path parameters (a decoding
# layer in front of Tomcat turns %3B into ';'), NUL and control characters.
_REFUSED_ESCAPES = {
    0x2F: "%2F (an escaped '/')",
    0x5C: "%5C (an escaped '\\')",
    0x25: "%25 (an escaped '%', decoded twice by some)",
    0x3B: "%3B (an escaped ';', a path parameter to some)",
}
# What the request line admits at all (framing's regex): visible ASCII, no space.
_NOT_VISIBLE = re.compile(rb"[^\x21-\x7e]")


def canonical_target(target: bytes) -> bytes:
    """The target to route by and to forward, or ``BadRequest`` for an ambiguous spelling.

    ``*`` (the target of ``OPTIONS *``) is returned as it is; everything else must be an
    origin-form target (``/path?query``).
    """
    if target == b"*":
        return target
    if not target.startswith(b"/"):
        raise BadRequest("only origin-form request targets are accepted")
    path, question, query = target.partition(b"?")
    if b"#" in target:
        raise BadRequest("fragment in request target")
    return canonical_path(path) + question + query


def canonical_path(path: bytes) -> bytes:
    """The canonical form of a path (no query); see the module comment for the rule."""
    if _PLAIN.fullmatch(path):
        _check_segments(path)
        return path
    if b";" in path:
        raise BadRequest("';' in path: path parameters are read differently by backends")
    if b"\\" in path:
        raise BadRequest("backslash in path")
    if _NOT_VISIBLE.search(path):
        raise BadRequest("character not allowed in a path")
    if _BAD_ESCAPE.search(path):
        raise BadRequest("malformed percent-encoding in path")
    path = _ESCAPE.sub(_decode_escape, path)
    _check_utf8(path)
    path = _SLASHES.sub(b"/", path)
    _check_segments(path)
    return path


def _decode_escape(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    if byte in _REFUSED_ESCAPES:
        raise BadRequest(f"{_REFUSED_ESCAPES[byte]} in path: backends read it differently")
    if byte < 0x20 or byte == 0x7F:
        raise BadRequest("escaped control character in path")
    if byte in _UNRESERVED:
        return bytes((byte,))
    return b"%" + match.group(1).upper()


def _check_utf8(path: bytes) -> None:
    # After decoding only unreserved escapes the path is ASCII plus %XX of other bytes;
    # the bytes those stand for must be UTF-8. Overlong forms (%C0%AE for ".") and lone
    # continuation bytes are what lenient decoders turn into separators or dots.
    if b"%" not in path:
        return
    decoded = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), path)
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("percent-encoded bytes in path are not UTF-8") from None
    # Two more ways to spell a path another way: a backend that compares without case
    # (Java's equalsIgnoreCase, a /i regex) reads "adm\u0130n" (dotted capital I) and
    # "\u212aey" (Kelvin sign) as "admin" and "key"; one on a normalizing file system
    # reads "cafe\u0301" as "caf\u00e9". So a non-ASCII character whose case forms or
    # compatibility form hold ASCII is refused, and so is a path not in Unicode NFC.
    if unicodedata.normalize("NFC", text) != text:
        raise BadRequest("path is not in Unicode normalization form C")
    for char in {c for c in text if c > "\x7f"}:
        forms = char.lower() + char.upper() + char.casefold() + unicodedata.normalize("NFKC", char)
        if any(f < "\x80" for f in forms):
            raise BadRequest("a non-ASCII character in the path reads as ASCII in other forms")


def _check_segments(path: bytes) -> None:
    if b"." not in path:
        return
    if any(segment in (b".", b"..") for segment in path.split(b"/")):
        raise BadRequest("dot-segment in path")
