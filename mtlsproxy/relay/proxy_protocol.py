"""PROXY protocol version 2: how a TCP backend learns who connected, without TLS of its own.

Byte layout from HAProxy's specification (doc/proxy-protocol.txt, section 2.2):

    12 bytes  signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   0x21       version 2, command PROXY
     1 byte   family     0x11 TCP over IPv4, 0x21 TCP over IPv6
     2 bytes  length     of what follows (addresses + TLVs), big endian
    12 or 36  addresses  source address, destination address, source port, destination port
     then     TLVs       type (1 byte), length (2 bytes, big endian), value

The TLVs we send:

    0x01 PP2_TYPE_ALPN       the protocol the client and the proxy agreed on (e.g. "h2"), on a
                             listener with ``alpn``
    0x20 PP2_TYPE_SSL        client flags (1 byte: PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN when the
                             certificate was shown on this connection, PP2_CLIENT_CERT_SESS),
                             verify (4 bytes, 0: the certificate was verified), then sub-TLVs:
        0x21 PP2_SUBTYPE_SSL_VERSION   e.g. "TLSv1.3"
        0x22 PP2_SUBTYPE_SSL_CN        the subject CN, when there is one
    0xE0 (custom)            the SPIFFE id, when the certificate has one
    0xE1 (custom)            the certificate's fingerprint, "sha256:<hex>"

0xE0-0xEF is the range the specification leaves to applications (PP2_TYPE_MIN_CUSTOM to
PP2_TYPE_MAX_CUSTOM). Pure code: no I/O; ``parse`` is for tests and the demo backend.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21
FAMILY_TCP4, FAMILY_TCP6 = 0x11, 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_TYPE_SPIFFE_ID = 0xE0  # ours, in the custom range
PP2_TYPE_FINGERPRINT = 0xE1  # ours, in the custom range

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04


def tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("a TLV value is at most 65535 bytes")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(*, tls_version: str, cn: str | None, resumed: bool) -> bytes:
    flags = PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS
    if not resumed:
        flags |= PP2_CLIENT_CERT_CONN
    sub = tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.encode("ascii"))
    if cn is not None:
        sub += tlv(PP2_SUBTYPE_SSL_CN, cn.encode("utf-8"))
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", flags, 0) + sub)


def encode(source: tuple[str, int], destination: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """The v2 header for a TCP connection from ``source`` to ``destination``."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == 4 and dst.version == 4:
        family = FAMILY_TCP4
    else:  # mixed families travel as IPv6 (IPv4-mapped)
        family = FAMILY_TCP6
        src, dst = _as_v6(src), _as_v6(dst)
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body = addresses + tlvs
    return SIGNATURE + struct.pack("!BBH", VERSION_PROXY, family, len(body)) + body


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


@dataclass
class Header:
    source: tuple[str, int]
    destination: tuple[str, int]
    tlvs: dict[int, bytes] = field(default_factory=dict)
    ssl_flags: int = 0
    ssl_verify: int | None = None
    ssl_sub: dict[int, bytes] = field(default_factory=dict)


def parse(data: bytes) -> tuple[Header, bytes] | None:
    """(header, rest) once ``data`` holds a whole header; None while more is needed.

    Raises ValueError for anything that is not a v2 PROXY header for TCP.
    """
    if len(data) < 16:
        if not SIGNATURE.startswith(data[:12]):
            raise ValueError("not a PROXY protocol v2 header")
        return None
    if data[:12] != SIGNATURE:
        raise ValueError("not a PROXY protocol v2 header")
    version, family, length = struct.unpack("!BBH", data[12:16])
    if version != VERSION_PROXY or family not in (FAMILY_TCP4, FAMILY_TCP6):
        raise ValueError(f"unsupported PROXY v2 command/family {version:#x}/{family:#x}")
    if len(data) < 16 + length:
        return None
    body, rest = data[16 : 16 + length], data[16 + length :]
    size = 4 if family == FAMILY_TCP4 else 16
    if len(body) < 2 * size + 4:
        raise ValueError("PROXY v2 header too short for its addresses")
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    header = Header((str(src), sport), (str(dst), dport))
    header.tlvs = _tlvs(body[2 * size + 4 :])
    if PP2_TYPE_SSL in header.tlvs:
        value = header.tlvs[PP2_TYPE_SSL]
        header.ssl_flags, header.ssl_verify = struct.unpack("!BI", value[:5])
        header.ssl_sub = _tlvs(value[5:])
    return header, rest


def _tlvs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while data:
        if len(data) < 3:
            raise ValueError("truncated TLV")
        kind, length = struct.unpack("!BH", data[:3])
        if len(data) < 3 + length:
            raise ValueError("truncated TLV value")
        found[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return found
