"""The config model: the fixed sample (docs/interfaces.md) loads; every mistake names file, key path and reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtlsproxy import config
from mtlsproxy.address import Address
from mtlsproxy.errors import ConfigError

# Verbatim from docs/interfaces.md: tools and tests outside the repo rely on it.
SAMPLE = """\
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
# deny = "deny.txt"        # optional: lines "sha256:<hex>", "serial:<hex>", "uri:<uri>", "cn:<name>"

[admin]
listen = "127.0.0.1:9901"

[[listeners]]
listen = "127.0.0.1:8443"
mode = "http"

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:8080"]
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("server.crt", "server.key", "ca.crt", "deny.txt"):
        (tmp_path / name).write_text("placeholder: the model checks paths, `check` checks content")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "mtlsproxy.toml"
    path.write_text(text)
    return path


def test_the_sample_loads_with_documented_defaults(folder: Path) -> None:
    cfg = config.load(write(folder, SAMPLE))
    assert cfg.tls.cert == folder.resolve() / "server.crt"
    assert cfg.tls.deny is None and cfg.tls.min_version == "1.2"
    assert cfg.tls.handshake_timeout.seconds == 10
    assert cfg.admin.listen == Address("127.0.0.1", 9901)
    (listener,) = cfg.listeners
    assert listener.listen == Address("127.0.0.1", 8443) and listener.mode == "http"
    assert listener.max_header_size == 16384 and listener.max_body_size == 0
    (route,) = listener.routes
    assert route.path_prefix == "/" and route.backends == [Address("127.0.0.1", 8080)]
    assert route.allow is None and route.host is None and not route.tls


def test_relative_paths_resolve_against_the_config_folder(folder: Path, tmp_path: Path) -> None:
    (folder / "certs").mkdir()
    shutil.copy(folder / "ca.crt", folder / "certs" / "bundle.crt")
    text = SAMPLE.replace('client_ca = "ca.crt"', 'client_ca = "certs/bundle.crt"')
    cfg = config.load(write(folder, text))
    assert cfg.tls.client_ca == (folder / "certs" / "bundle.crt").resolve()


def test_everything_else_a_user_may_write(folder: Path) -> None:
    text = (
        SAMPLE.replace("# deny", "deny")
        + """
[[listeners.routes]]
host = "*.game.example"
path_prefix = "/match"
backends = ["127.0.0.1:9000", "[::1]:9001"]
tls = true
tls_cert = "server.crt"
tls_key = "server.key"
tls_server_name = "match.internal"
connect_timeout = "250ms"
read_timeout = "2m"
[[listeners.routes.allow]]
uri_prefix = "spiffe://game.example/player/"
ou = "players"
[[listeners.routes.allow]]
sha256 = "sha256:"""
        + "AB" * 32
        + """"

[[listeners]]
listen = "[::1]:7777"
mode = "tcp"
name = "game-tcp"
backends = ["127.0.0.1:7000"]
max_connections = 5000
idle_timeout = "5m"
allow = [{ cn = "player-1" }]
"""
    )
    cfg = config.load(write(folder, text))
    route = cfg.listeners[0].routes[1]
    assert route.connect_timeout.seconds == 0.25 and route.read_timeout.seconds == 120
    assert route.allow is not None and route.allow[0].ou == "players"
    tcp = cfg.listeners[1]
    assert tcp.label == "game-tcp" and tcp.allow is not None and tcp.allow[0].cn == "player-1"
    assert cfg.tls.deny == (folder / "deny.txt").resolve()


@pytest.mark.parametrize(
    ("change", "key_path", "reason"),
    [
        (('listen = "127.0.0.1:8443"', 'listn = "127.0.0.1:8443"'),
         "listeners[0].listn", "unknown key 'listn'; did you mean 'listen'?"),
        (('mode = "http"', 'mode = "udp"'), "listeners[0].mode", "'udp' is not one of"),
        (('backends = ["127.0.0.1:8080"]', 'backends = "127.0.0.1:8080"'),
         "listeners[0].routes[0].backends", "expected a list, got a string"),
        (('backends = ["127.0.0.1:8080"]', "backends = []"),
         "listeners[0].routes[0].backends", "at least 1"),
        (('backends = ["127.0.0.1:8080"]', 'backends = ["127.0.0.1"]'),
         "listeners[0].routes[0].backends[0]", "not host:port"),
        (('path_prefix = "/"', 'path_prefix = "api"'),
         "listeners[0].routes[0]", "must start with '/'"),
        (('client_ca = "ca.crt"', 'client_ca = "missing.crt"'), "tls.client_ca", "no such file"),
        (('cert = "server.crt"', "cert = 5"), "tls.cert", "expected a file path"),
        (("[tls]", '[tls]\nhandshake_timeout = "10 sec"'), "tls.handshake_timeout",
         "not a duration"),
        (("[tls]", "[tls]\nhandshake_timeout = 10"), "tls.handshake_timeout",
         "write a duration as a string"),
        (('mode = "http"', 'mode = "http"\nmax_header_size = "1TiB"'),
         "listeners[0].max_header_size", "not a size"),
        (('mode = "http"', "mode = \"http\"\nmax_connections = 0"),
         "listeners[0].max_connections", ">= 1"),
        (('listen = "127.0.0.1:9901"', 'listen = "127.0.0.1:8443"'), None,
         "already used by admin.listen"),
        (('key = "server.key"', ""), "tls.key", "required key is missing"),
        (('path_prefix = "/"', 'path_prefix = "/"\nallow = []'), "listeners[0].routes[0]",
         "allow = [] would admit no one"),
        (('path_prefix = "/"', 'path_prefix = "/"\nallow = [{}]'),
         "listeners[0].routes[0].allow[0]", "needs at least one of"),
        (('path_prefix = "/"', 'path_prefix = "/"\nallow = [{ sha256 = "abc" }]'),
         "listeners[0].routes[0].allow[0]", "64 hex digits"),
        (('mode = "http"', 'mode = "tcp"'), "listeners[0]", "takes backends"),
        # Errors name the values a key takes, and the lowercase key for a capitalised one.
        (("[tls]", 'workers = "4"\n[tls]'), "workers",
         'workers takes an integer from 1 to 256 or "auto"; write workers = 4, without quotes'),
        (("[tls]", "workers = 0\n[tls]"), "workers",
         'Expected `int` >= 1; workers takes an integer from 1 to 256 or "auto"'),
        (("[tls]", "workers = 2.5\n[tls]"), "workers",
         'workers takes an integer from 1 to 256 or "auto"'),
        (('mode = "http"', 'mode = "udp"'), "listeners[0].mode",
         '\'udp\' is not one of the allowed values; mode takes "http" or "tcp"'),
        (('path_prefix = "/"', 'path_prefix = "/"\nallow = [{ OU = "players" }]'),
         "listeners[0].routes[0].allow[0].OU",
         "unknown key 'OU'; did you mean 'ou'? (keys are lowercase)"),
        (('listen = "127.0.0.1:9901"', 'Listen = "127.0.0.1:9901"'), "admin.Listen",
         "did you mean 'listen'?"),
        (('path_prefix = "/"', 'path_prefix = "/"\nalpn = ["h2"]'),
         "listeners[0].routes[0].alpn", "unknown key 'alpn' here; it belongs to [[listeners]]"),
        (('backends = ["127.0.0.1:8080"]', 'backends = ["127.0.0.1:8080"]\nupstream_protocol = "h3"'),
         "listeners[0].routes[0].upstream_protocol",
         '\'h3\' is not one of the allowed values; upstream_protocol takes "h2" or "http/1.1"'),
        (('path_prefix = "/"', 'path_prefix = "/"\nwebsocket = true\nupstream_protocol = "h2"'),
         "listeners[0].routes[0]", 'websocket = true needs upstream_protocol = "http/1.1"'),
    ],
)  # fmt: skip
def test_mistakes_name_file_key_path_and_reason(
    folder: Path, change: tuple[str, str], key_path: str | None, reason: str
) -> None:
    assert change[0] in SAMPLE
    path = write(folder, SAMPLE.replace(*change))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    err = caught.value
    assert err.file == path
    assert err.key_path == key_path
    assert reason in err.reason
    assert str(err).startswith(f"{path}: ")


def test_not_toml(folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        config.load(write(folder, "[tls\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_no_listeners(folder: Path) -> None:
    text = SAMPLE.split("[[listeners]]", maxsplit=1)[0]
    with pytest.raises(ConfigError) as caught:
        config.load(write(folder, text))
    assert caught.value.key_path == "listeners"


# ---- identity_headers (issue 16 item 6) -------------------------------------------------


def test_identity_headers_default_to_xfcc_and_take_every_documented_value(folder: Path) -> None:
    cfg = config.load(write(folder, SAMPLE))
    assert cfg.listeners[0].routes[0].identity_headers == ("xfcc",)  # today's behaviour
    for written, loaded in (
        ('["xfcc", "client-cert", "client-cert-chain"]', config.IDENTITY_HEADERS),
        ('["client-cert"]', ("client-cert",)),
        ('["client-cert-chain", "client-cert"]', ("client-cert-chain", "client-cert")),
        ("[]", ()),  # no identity header at all
    ):
        text = SAMPLE.replace(
            'path_prefix = "/"', f'path_prefix = "/"\nidentity_headers = {written}'
        )
        route = config.load(write(folder, text)).listeners[0].routes[0]
        assert route.identity_headers == loaded


@pytest.mark.parametrize(
    ("written", "key_path", "reasons"),
    [
        ('["x-forwarded-client-cert"]', "listeners[0].routes[0]",
         ["identity_headers[0] = 'x-forwarded-client-cert' is not one of "
          "'xfcc', 'client-cert', 'client-cert-chain'"]),
        ('["xfcc", "Client_Cert"]', "listeners[0].routes[0]",
         ["identity_headers[1] = 'Client_Cert' is not one of", "did you mean 'client-cert'?"]),
        ('["client-cert", "client-cert"]', "listeners[0].routes[0]",
         ["lists 'client-cert' twice"]),
        ('["client-cert-chain"]', "listeners[0].routes[0]",
         ["'client-cert-chain' needs 'client-cert'"]),
        ('"xfcc"', "listeners[0].routes[0].identity_headers", ["expected a list, got a string"]),
    ],
)  # fmt: skip
def test_identity_header_mistakes_name_the_file_the_route_and_the_allowed_values(
    folder: Path, written: str, key_path: str, reasons: list[str]
) -> None:
    text = SAMPLE.replace('path_prefix = "/"', f'path_prefix = "/"\nidentity_headers = {written}')
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    err = caught.value
    assert (err.file, err.key_path) == (path, key_path)
    for reason in reasons:
        assert reason in err.reason
    assert str(err).startswith(f"{path}: {key_path}: ")


def test_a_misspelt_identity_headers_key_is_an_error(folder: Path) -> None:
    text = SAMPLE.replace('path_prefix = "/"', 'path_prefix = "/"\nidentity_header = ["xfcc"]')
    with pytest.raises(ConfigError) as caught:
        config.load(write(folder, text))
    assert "did you mean 'identity_headers'?" in caught.value.reason
