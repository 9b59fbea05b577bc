"""``X-Forwarded-Client-Cert``: the identity handed to HTTP and WebSocket backends.

The format is Envoy's, byte for byte where Envoy is specific, because backends already
parse it (Istio, Envoy's own ``%XFCC_VALUE()%``, many libraries):

    Hash=<sha256 hex>;Subject="<RFC 4514 subject>";URI=<uri>;...;DNS=<dns>;...

as built by Envoy's ``ConnectionManagerUtility::mutateXfccRequestHeader``
(source/common/http/conn_manager_utility.cc) with ``set_current_client_cert_details``
{subject, uri, dns}, and as described in docs/root/configuration/http/http_conn_man/
headers.rst ("x-forwarded-client-cert"):

- ``By=`` comes first and only when the proxy's own certificate has a URI SAN.
- ``Hash=`` is the lowercase hex SHA-256 of the leaf DER.
- ``Subject="..."`` is always double-quoted, even when empty, and written *verbatim*:
  Envoy puts OpenSSL's RFC 2253 text between the quotes with no second escaping layer.
  That is safe because RFC 4514 itself writes a ``"`` or ``\\`` inside a value as ``\\"``
  or ``\\\\``, so every quote inside the subject sits after an odd run of backslashes and
  a parser that honours backslash escapes finds the right closing quote.
- ``URI=`` once per URI SAN, in certificate order; a bare ``URI=`` when there is none
  (Envoy keeps the key "even if the URI is empty").
- ``DNS=`` once per DNS SAN; none when there is none.
- Other values are quoted when they hold ``,`` ``;`` ``=`` ``"`` or ``\\`` (the doc's
  rule; Envoy's generator never quotes them, but a URI that needed quoting would corrupt
  its header, so we follow the doc), with ``\\`` and ``"`` backslash-escaped, which is
  exactly what Envoy's parser (source/extensions/formatter/xfcc_value) undoes.

The proxy always *replaces* the header (Envoy's SANITIZE_SET): a client-supplied copy is
the client's claim about itself and is removed by ``headers.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mtlsproxy.identity import Identity

HEADER = b"x-forwarded-client-cert"

_NEEDS_QUOTES = re.compile(r'[,;="\\]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A quote preceded by an even run of backslashes (zero included) is not escaped.
_UNESCAPED_QUOTE = re.compile(r'(?<!\\)(?:\\\\)*"')


def format_xfcc(identity: Identity, *, by: str | None = None) -> str:
    """One XFCC element for ``identity``; raises ValueError if a value holds a control char."""
    parts: list[str] = []
    if by:
        parts.append(f"By={_value(by)}")
    parts.append(f"Hash={identity.sha256}")
    parts.append(f'Subject="{_subject(identity.subject)}"')
    if identity.uris:
        parts.extend(f"URI={_value(uri)}" for uri in identity.uris)
    else:
        parts.append("URI=")
    parts.extend(f"DNS={_value(dns)}" for dns in identity.dns)
    element = ";".join(parts)
    # Identity.from_certificate never produces one, but an Identity is a plain struct and
    # a CR/LF here would be header injection, so check at the last step, not the first.
    if _CONTROL.search(element):
        raise ValueError("XFCC value would contain a control character")
    return element


def _value(value: str) -> str:
    if not _NEEDS_QUOTES.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _subject(subject: str) -> str:
    # Verbatim when it is well-formed RFC 4514 text (always, for a subject read from a
    # certificate); otherwise escape it so the header still parses.
    if _UNESCAPED_QUOTE.search(subject) or _ends_in_escape(subject):
        return subject.replace("\\", "\\\\").replace('"', '\\"')
    return subject


def _ends_in_escape(text: str) -> bool:
    run = len(text) - len(text.rstrip("\\"))
    return run % 2 == 1


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One proxy's element; keys keep their spelling, lookups ignore case."""

    pairs: tuple[tuple[str, str], ...]

    def get_all(self, key: str) -> list[str]:
        wanted = key.lower()
        return [value for name, value in self.pairs if name.lower() == wanted]

    def get(self, key: str) -> str | None:
        values = self.get_all(key)
        return values[0] if values else None


def parse_xfcc(header: str) -> list[XfccElement]:
    """Parse an XFCC header into its elements, oldest (leftmost) first.

    Raises ValueError on an unmatched quote or a pair without ``=``. Quoted values are
    unescaped as Envoy's parser does (``\\\\`` and ``\\"``), except ``Subject``, which is
    returned as written between the quotes because Envoy writes it without escaping: that
    gives back the exact RFC 4514 string.
    """
    elements: list[XfccElement] = []
    for raw_element in _split_unquoted(header, ","):
        pairs: list[tuple[str, str]] = []
        for raw_pair in _split_unquoted(raw_element, ";"):
            if not raw_pair.strip():
                continue
            key, sep, value = raw_pair.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise ValueError(f"XFCC pair without a key: {raw_pair!r}")
            pairs.append((key, _unquote(value, verbatim=key.lower() == "subject")))
        elements.append(XfccElement(tuple(pairs)))
    return elements


def _split_unquoted(text: str, separator: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    in_quotes = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character never opens, closes or separates
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == separator and not in_quotes:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    if in_quotes:
        raise ValueError("XFCC header has an unmatched quote")
    pieces.append(text[start:])
    return pieces


def _unquote(value: str, *, verbatim: bool) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        return inner if verbatim else re.sub(r'\\([\\"])', r"\1", inner)
    return value
