"""The proxy's configuration: frozen msgspec Structs read from TOML, checked once at start.

A misspelt key, a wrong type, a bad duration or a missing file fails here, with the file,
the key path (``listeners[0].routes[1].backends``) and what is wrong, never on the first
connection and never as a traceback. Relative paths resolve against the config file's
folder, so a config and its certificates can move together.

The documented meaning and default of every key lives in README.md ("Configuration");
keep the two in step: the key names are public surface.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mtlsproxy.address import Address, parse_address
from mtlsproxy.errors import ConfigError
from mtlsproxy.kexgroups import DEFAULT_GROUPS, check_groups
from mtlsproxy.units import parse_duration, parse_size


class Duration:
    """A length of time as the config writes it (``"5s"``, ``"250ms"``), in ``.seconds``."""

    __slots__ = ("seconds", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.seconds = parse_duration(text).total_seconds()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Duration) and self.seconds == other.seconds

    def __hash__(self) -> int:
        return hash(self.seconds)

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"


class ByteSize(int):
    """A byte count written as ``16KiB``, ``1GiB`` or a plain integer."""


class LogTarget(str):
    """Where a log goes: ``"stdout"``, ``"stderr"``, ``"off"``, or a file (appended to; its
    folder must exist). A file is stored as an absolute path."""

    STREAMS = ("stdout", "stderr", "off")


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class AllowRule(Struct, frozen=True):
    """Every field given must match (AND); a route admits when any of its rules matches (OR)."""

    cn: str | None = None
    ou: str | None = None
    dns: str | None = None
    uri: str | None = None
    uri_prefix: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not any(getattr(self, f) for f in self.__struct_fields__):
            raise ValueError(
                "an allow rule needs at least one of cn, ou, dns, uri, uri_prefix, sha256"
            )
        if self.sha256 is not None:
            digest = self.sha256.lower().removeprefix("sha256:").replace(":", "")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("sha256 takes 64 hex digits (as `mtlsproxy ca show` prints)")


def _check_allow(allow: list[AllowRule] | None) -> None:
    if allow is not None and not allow:
        raise ValueError(
            "allow = [] would admit no one; remove the key to admit every client "
            "certificate the CA issued, or add rules"
        )


# The identity headers a route may forward (README "What the backend receives"): Envoy's
# X-Forwarded-Client-Cert, and RFC 9440's Client-Cert and Client-Cert-Chain.
IDENTITY_HEADERS = ("xfcc", "client-cert", "client-cert-chain")


def _check_alpn(protocols: tuple[str, ...], mode: str) -> None:
    if not protocols:
        raise ValueError('alpn is a list of protocol names, e.g. ["h2"]; leave it out for none')
    for name in protocols:
        if not 1 <= len(name) <= 255 or not all(0x21 <= ord(c) <= 0x7E for c in name):
            raise ValueError(f"alpn {name!r}: a protocol name is 1 to 255 printable ASCII bytes")
    if len(set(protocols)) != len(protocols):
        raise ValueError(f"alpn lists a protocol twice: {list(protocols)}")
    if mode == "http" and not set(protocols) <= set(HTTP_PROTOCOLS):
        raise ValueError(
            f"alpn = {list(protocols)}: an http listener serves {list(HTTP_PROTOCOLS)}"
            " (any of them, in the order of preference); other protocols pass through a"
            " tcp listener"
        )


def _check_identity_headers(chosen: tuple[str, ...]) -> None:
    allowed = ", ".join(repr(h) for h in IDENTITY_HEADERS)
    for i, value in enumerate(chosen):
        if value not in IDENTITY_HEADERS:
            hint = difflib.get_close_matches(value, IDENTITY_HEADERS, n=1)
            raise ValueError(
                f"identity_headers[{i}] = {value!r} is not one of {allowed}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        if value in chosen[:i]:
            raise ValueError(f"identity_headers lists {value!r} twice")
    if "client-cert-chain" in chosen and "client-cert" not in chosen:
        raise ValueError(
            "identity_headers: 'client-cert-chain' needs 'client-cert' too "
            "(RFC 9440 never sends the chain without the certificate)"
        )


class Route(Struct, frozen=True):
    backends: Annotated[list[Address], Meta(min_length=1)]
    path_prefix: str = "/"
    host: str | None = None
    name: str | None = None  # in logs and metrics; default "<host or *><path_prefix>"
    # None (the key absent): every client holding a certificate from client_ca.
    allow: list[AllowRule] | None = None
    # The backend side of mTLS: connect to the backends over TLS, verify them against
    # tls_ca (default: tls.client_ca, the same private CA) and present tls_cert/tls_key.
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None  # default: the backend's host
    # WebSocket upgrades pass to the backends of this route (else Upgrade is dropped).
    websocket: bool = False
    websocket_max_message: ByteSize = ByteSize(1024 * 1024)  # 0: no limit
    websocket_idle_timeout: Duration = Duration("5m")
    # "v2": each backend connection starts with a PROXY v2 header naming the client. It
    # describes one client, so such a route never shares a connection: no pooling.
    proxy_protocol: Literal["v2"] | None = None
    connect_timeout: Duration = Duration("5s")
    read_timeout: Duration = Duration("60s")
    # Who the client is, as the backends are told: any of IDENTITY_HEADERS; [] for none.
    # Whatever a client sends under these names is removed on every route regardless.
    identity_headers: tuple[str, ...] = ("xfcc",)
    # How requests go to the backends: HTTP/1.1, or HTTP/2 ("h2": cleartext with prior
    # knowledge, or over TLS with ALPN h2 when tls = true), which gRPC backends need.
    upstream_protocol: Literal["http/1.1", "h2"] = "http/1.1"

    def __post_init__(self) -> None:
        if not self.path_prefix.startswith("/"):
            raise ValueError(f"path_prefix {self.path_prefix!r} must start with '/'")
        _check_allow(self.allow)
        _check_identity_headers(self.identity_headers)
        if any(b.port == 0 for b in self.backends):
            raise ValueError("a backend needs a real port, not 0")
        tls_files = (self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
        if not self.tls and any(f is not None for f in tls_files):
            raise ValueError("tls_ca, tls_cert, tls_key and tls_server_name need tls = true")
        if self.tls and (self.tls_cert is None or self.tls_key is None):
            raise ValueError(
                "tls = true needs tls_cert and tls_key: the proxy's own client certificate"
            )
        if self.websocket and self.upstream_protocol == "h2":
            raise ValueError('websocket = true needs upstream_protocol = "http/1.1"')


# What an http listener serves, and offers by default (server preference: h2 first).
HTTP_PROTOCOLS = ("h2", "http/1.1")
HTTP_ALPN = tuple(p.encode("ascii") for p in HTTP_PROTOCOLS)
H1_ALPN = (b"http/1.1",)  # what speaks HTTP/1.1 only (the admin listener)


class Listener(Struct, frozen=True):
    listen: Address
    mode: Literal["http", "tcp"] = "http"
    name: str | None = None
    routes: list[Route] = []
    # mode = "tcp": where the bytes go, who may send them, and whether the backend is
    # first told who connected (PROXY protocol v2, with the identity in TLVs).
    backends: list[Address] = []
    allow: list[AllowRule] | None = None
    proxy_protocol: Literal["v2"] | None = None
    connect_timeout: Duration = Duration("5s")
    max_connections: Annotated[int, Meta(ge=1)] = 10_000
    header_timeout: Duration = Duration("10s")
    idle_timeout: Duration = Duration("60s")
    max_header_size: ByteSize = ByteSize(16 * 1024)
    max_body_size: ByteSize = ByteSize(0)  # 0: no limit (bodies stream, never buffer)
    # ALPN, in server preference order. http: any of "h2" and "http/1.1" (default both,
    # h2 first; a client without ALPN speaks HTTP/1.1); tcp: none by default, or the
    # protocols the bytes are passed through as (["h2"] lets a gRPC client in, with an
    # h2c backend behind).
    alpn: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.alpn is not None:
            _check_alpn(self.alpn, self.mode)
        if self.mode == "http":
            if not self.routes:
                raise ValueError("an http listener needs at least one [[listeners.routes]]")
            if self.backends or self.allow is not None or self.proxy_protocol is not None:
                raise ValueError(
                    "backends, allow and proxy_protocol go on routes for an http listener"
                    if self.proxy_protocol is None
                    else "proxy_protocol is for tcp listeners"
                )
        else:
            if self.routes:
                raise ValueError("a tcp listener takes backends (and allow), not routes")
            if not self.backends:
                raise ValueError("a tcp listener needs backends")
            _check_allow(self.allow)
        if not 1024 <= self.max_header_size <= 1024 * 1024:
            raise ValueError("max_header_size must be between 1KiB and 1MiB")

    @property
    def label(self) -> str:
        return self.name or str(self.listen)

    @property
    def alpn_protocols(self) -> tuple[bytes, ...] | None:
        """What the TLS handshake offers to select, None: no ALPN at all."""
        if self.mode == "http" and self.alpn is None:
            return HTTP_ALPN
        return None if self.alpn is None else tuple(p.encode("ascii") for p in self.alpn)


class TLS(Struct, frozen=True):
    cert: Path
    key: Path
    client_ca: Path
    deny: Path | None = None
    # The CA bundle this server's clients verify it against, for the proof that
    # ``cert`` holds a whole chain up to it. Unset: client_ca (one private PKI).
    server_ca: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    # Key exchange groups, most preferred first; default Mozilla's intermediate profile.
    # Each must be a group the OpenSSL in use knows: a typo fails here, not in handshakes.
    groups: Annotated[tuple[str, ...], Meta(min_length=1)] = DEFAULT_GROUPS
    handshake_timeout: Duration = Duration("10s")
    reload_interval: Duration = Duration("2s")
    # How often live sessions are checked for expiry, the deny list and a removed CA
    # (and at once after every reload).
    enforce_interval: Duration = Duration("1s")
    # A condemned session (expired, denied, CA removed) may finish the response in flight
    # for this long; then it is cut.
    enforce_grace: Duration = Duration("10s")
    # The server certificate or a CA of the bundle this close to its end is logged as a
    # warning (and flagged in metrics). Unset: a quarter of each certificate's lifetime,
    # at most 30 days (6 hours for a 24-hour certificate renewed at two thirds).
    expiry_warning: Duration | None = None

    def __post_init__(self) -> None:
        check_groups(self.groups)  # ValueError: "groups[1] = 'x' is not a key exchange..."


class Admin(Struct, frozen=True):
    listen: Address = Address("127.0.0.1", 9901)
    # mTLS on the admin listener: the proxy's own server certificate, and a client
    # certificate from tls.client_ca (that passes the deny list and ``allow``) required.
    mtls: bool = False
    allow: list[AllowRule] | None = None
    # Plain HTTP on a non-loopback address: anyone who reaches it can reload and read
    # /certs. Only for networks where that is acceptable; said loudly at start.
    insecure_remote: bool = False

    def __post_init__(self) -> None:
        _check_allow(self.allow)
        if self.allow is not None and not self.mtls:
            raise ValueError("allow rules need mtls = true (plain HTTP has no identity)")
        if self.mtls and self.insecure_remote:
            raise ValueError("choose mtls = true or insecure_remote = true, not both")
        if not self.listen.is_loopback and not (self.mtls or self.insecure_remote):
            raise ValueError(
                f"{self.listen} is not a loopback address: set mtls = true to require a "
                "client certificate on the admin listener, or insecure_remote = true to "
                "serve it in plain HTTP anyway"
            )


class Log(Struct, frozen=True):
    # Diagnostic logs (stderr): "text" for people, "json" for collectors; "auto" is text
    # on a terminal and JSON otherwise.
    format: Literal["auto", "text", "json"] = "auto"
    # One JSON line per HTTP request, WebSocket session and TCP session.
    access: LogTarget = LogTarget("stdout")


class Config(Struct, frozen=True):
    tls: TLS
    listeners: Annotated[list[Listener], Meta(min_length=1)]
    admin: Admin = Admin()
    log: Log = Log()
    # On SIGTERM/SIGINT: how long in-flight requests may take to finish before exit.
    drain_timeout: Duration = Duration("30s")
    # Processes sharing each listening port (SO_REUSEPORT); "auto": one per core.
    workers: Annotated[int, Meta(ge=1, le=256)] | Literal["auto"] = 1

    def __post_init__(self) -> None:
        if self.workers != 1 and any(lst.listen.port == 0 for lst in self.listeners):
            raise ValueError("workers share a listening port: give every listener a fixed port")
        seen = {self.admin.listen: "admin.listen"}
        for i, listener in enumerate(self.listeners):
            if listener.listen.port == 0:
                continue  # any free port: never a clash
            if listener.listen in seen:
                raise ValueError(
                    f"listeners[{i}].listen {listener.listen} is already used by "
                    f"{seen[listener.listen]}"
                )
            seen[listener.listen] = f"listeners[{i}].listen"


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc.reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from exc
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Config:
    """Convert decoded TOML into a Config; ``path`` names the file and anchors relative paths."""
    # Absolute, but never resolved: following symlinks would pin us to the version
    # directory a Kubernetes Secret or ConfigMap mount points at *now* (``..data`` ->
    # ``..2026_11_28_...``), and the next rotation would go unseen.
    base = Path(os.path.abspath(path)).parent  # noqa: PTH100 - resolve() follows links
    try:
        return msgspec.convert(raw, Config, dec_hook=_decoder(base))
    except msgspec.ValidationError as exc:
        key_path, reason = _explain(str(exc))
        raise ConfigError(path, key_path, reason) from None


def _log_target(base: Path, value: object) -> LogTarget:
    if not isinstance(value, str) or not value:
        raise TypeError('expected "stdout", "stderr", "off" or a file path')
    if value in LogTarget.STREAMS:
        return LogTarget(value)
    target = Path(os.path.abspath(base / value))  # noqa: PTH100 - see parse()
    if not target.parent.is_dir():
        raise ValueError(f"no such folder for the log file: {target.parent}")
    if target.is_dir():
        raise ValueError(f"{target} is a folder, not a file")
    return LogTarget(str(target))


def _decoder(base: Path) -> Any:
    def decode(tp: type, value: Any) -> Any:
        if tp is Path:
            if not isinstance(value, str) or not value:
                raise TypeError("expected a file path (a non-empty string)")
            resolved = Path(os.path.abspath(base / value))  # noqa: PTH100 - see parse()
            if not resolved.is_file():
                raise ValueError(f"no such file: {resolved}")
            return resolved
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        if tp is Duration:
            if not isinstance(value, str):
                raise TypeError(f"write a duration as a string with a unit, e.g. '{value}s'")
            return Duration(value)
        if tp is ByteSize:
            return ByteSize(parse_size(value))
        if tp is LogTarget:
            return _log_target(base, value)
        if tp is Address:
            if not isinstance(value, str):
                raise TypeError("write an address as a string, e.g. '127.0.0.1:8443'")
            return parse_address(value)
        raise NotImplementedError(tp)

    return decode


_AT = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.S)
_TYPE_WORDS = {
    "array": "a list",
    "object": "a table",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "null": "nothing",
}
_TABLES = (AllowRule, Route, Listener, TLS, Admin, Log, Config)
_TABLE_NAMES = {
    "AllowRule": "allow rules",
    "Route": "[[listeners.routes]]",
    "Listener": "[[listeners]]",
    "TLS": "[tls]",
    "Admin": "[admin]",
    "Log": "[log]",
    "Config": "the top level",
}
_ALL_KEYS = sorted({f for s in _TABLES for f in s.__struct_fields__})


def _explain(message: str) -> tuple[str | None, str]:
    """Turn msgspec's ``<reason> - at `$.a[0].b``` into a key path and plain words."""
    match = _AT.match(message)
    key_path, reason = (match[2] or None, match[1]) if match else (None, message)
    if unknown := re.fullmatch(r"Object contains unknown field `(.+)`", reason):
        key = unknown[1]
        if key != key.lower() and key.lower() in _keys_of(_field_type(key_path)):
            # `OU = "ops"`: TOML keys are case-sensitive, and every key here is lowercase.
            reason = f"unknown key {key!r}; did you mean {key.lower()!r}? (keys are lowercase)"
        elif owners := [s.__name__ for s in _TABLES if key in s.__struct_fields__]:
            # A real key in the wrong table (`alpn` on a route): say where it goes.
            places = " or ".join(_TABLE_NAMES[o] for o in owners)
            reason = f"unknown key {key!r} here; it belongs to {places}"
        else:
            hint = difflib.get_close_matches(key, _ALL_KEYS, n=1)
            reason = f"unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        key_path = f"{key_path}.{key}" if key_path else key
    elif missing := re.fullmatch(r"Object missing required field `(.+)`", reason):
        key = missing[1]
        reason = "required key is missing"
        key_path = f"{key_path}.{key}" if key_path else key
    elif wrong := re.fullmatch(r"Expected `(.+)`, got `(.+)`", reason):
        expected = " or ".join(_TYPE_WORDS.get(t, t) for t in wrong[1].split(" | "))
        reason = f"expected {expected}, got {_TYPE_WORDS.get(wrong[2], wrong[2])}"
        reason += _takes(key_path)
    elif length := re.fullmatch(r"Expected `(\w+)` of length >= (\d+)", reason):
        reason = f"must hold at least {length[2]} item(s)"
    elif enum := re.fullmatch(r"Invalid enum value (.+)", reason):
        reason = f"{enum[1]} is not one of the allowed values" + _takes(key_path)
        value = enum[1].strip("'\"")
        if value.isdigit() and "an integer" in _takes(key_path):  # workers = "4"
            reason += f"; write {_key_name(key_path)} = {value}, without quotes"
    elif re.fullmatch(r"Expected `int` [<>]=? -?\d+", reason) and " or " in _takes(key_path):
        reason += _takes(key_path)  # workers = 0: the bound alone hides "auto"
    return key_path, reason


def _takes(key_path: str | None) -> str:
    """``; workers takes an integer from 1 to 256 or "auto"``, or "" when not known."""
    allowed = _describe(_field_type(key_path))
    return f"; {_key_name(key_path)} takes {allowed}" if key_path and allowed else ""


def _key_name(key_path: str | None) -> str:
    return re.sub(r"\[\d+\]", "", key_path or "").rpartition(".")[2]


def _field_type(key_path: str | None) -> Any:
    """The msgspec type info of the key at ``key_path`` (``listeners[0].mode``), or None."""
    tp: Any = msgspec.inspect.type_info(Config)
    for name in re.sub(r"\[\d+\]", "", key_path).split(".") if key_path else []:
        tp = _inner(tp)
        if not isinstance(tp, msgspec.inspect.StructType):
            return None
        tp = next((f.type for f in tp.fields if f.encode_name == name), None)
    return tp


def _inner(tp: Any) -> Any:
    """What a list or an optional value holds: the table a key path walks into."""
    while True:
        if isinstance(tp, msgspec.inspect.UnionType):
            kinds = [t for t in tp.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(kinds) != 1:
                return tp
            tp = kinds[0]
        elif isinstance(tp, msgspec.inspect.ListType | msgspec.inspect.VarTupleType):
            tp = tp.item_type
        else:
            return tp


def _keys_of(tp: Any) -> list[str]:
    table = _inner(tp)
    if isinstance(table, msgspec.inspect.StructType):
        return [f.encode_name for f in table.fields]
    return _ALL_KEYS


def _describe(tp: Any) -> str | None:
    """The values a key takes, in words, when its type says more than "a string"."""
    inspect = msgspec.inspect
    if isinstance(tp, inspect.LiteralType):
        return " or ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in tp.values)
    if isinstance(tp, inspect.IntType):
        low = tp.ge if tp.gt is None else tp.gt + 1
        high = tp.le if tp.lt is None else tp.lt - 1
        if low is not None and high is not None:
            return f"an integer from {low} to {high}"
        if low is not None or high is not None:
            return f"an integer >= {low}" if high is None else f"an integer <= {high}"
        return None
    if isinstance(tp, inspect.UnionType):
        parts = [_describe(t) for t in tp.types if not isinstance(t, inspect.NoneType)]
        return " or ".join(p for p in parts if p) if all(parts) else None
    return None
