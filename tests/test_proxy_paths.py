"""Route rules cannot be bypassed by spelling the path another way (real proxy, real curl).

Threat: a player (OU players, admitted on `/`) asks for `//admin/secret`, `/%2Fadmin/x`,
`/admin;x/secret`... The proxy used to route those to the `/` route, and a backend that
reads paths leniently (merges slashes like nginx's `merge_slashes` and Python's
http.server path translation, decodes `%2F`, drops `;params` like Tomcat, ignores case
like Express) then served `/admin/secret`. The rule now: the path the proxy authorizes is
the path the backend acts on; what backends read differently is refused with 400.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import unquote

import pytest
from support import IssueFn, Pair

ADMIN_BODY = b"ADMIN SECRET"


class _Lenient(BaseHTTPRequestHandler):
    """Reads a path the most forgiving way any common backend does, all at once."""

    received: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        raw = self.path.partition("?")[0]
        self.received.append(raw)
        segments = [s.partition(";")[0] for s in unquote(unquote(raw)).split("/")]
        path = "/" + posixpath.normpath("/".join(segments)).lstrip("/").lower()
        body = ADMIN_BODY if path.startswith("/admin") else b"public"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lenient_backend() -> Iterator[tuple[int, list[str]]]:
    received: ClassVar[list[str]] = []
    handler = type("Handler", (_Lenient,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def ops_pair(issue: IssueFn) -> Pair:
    return issue("client", "ops", ous=["staff"])


def _routes(port: int) -> str:
    return f"""[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{port}"]
[[listeners.routes.allow]]
ou = "players"

[[listeners.routes]]
path_prefix = "/admin"
backends = ["127.0.0.1:{port}"]
[[listeners.routes.allow]]
cn = "ops"
"""


BYPASSES = [
    "//admin/secret",
    "///admin/x",
    "/%2Fadmin/x",
    "/%2fadmin/x",
    "/.//admin/x",
    "//%2Fadmin/x",
    "/admin;x/secret",
    "/;/admin/secret",
    "/ADMIN/secret",
    "/%61dmin/secret",
    "/%252Fadmin/x",
    "/x/..%2Fadmin/secret",
    "/%C0%AE%C0%AE/admin/secret",
]


async def test_no_spelling_of_admin_reaches_the_admin_backend_for_a_player(
    make_env, lenient_backend: tuple[int, list[str]]
) -> None:
    port, received = lenient_backend
    env = await make_env(routes=_routes(port), backends=0)
    for path in BYPASSES:
        done = await env.curl("--path-as-is", "-w", "\n%{http_code}", env.url + path)
        body, _, status = done.stdout.rpartition(b"\n")
        assert ADMIN_BODY not in body, path
        assert status in (b"400", b"403"), (path, status, body)
    assert all(not p.lower().lstrip("/").startswith("admin") for p in received), received
    # The control: the player does reach the public side, and what the backend receives
    # is the canonical path, not the client's spelling.
    done = await env.curl("--path-as-is", env.url + "//games//list")
    assert done.stdout == b"public"
    assert received[-1] == "/games/list"


async def test_ops_gets_the_canonical_path_forwarded(
    make_env, lenient_backend: tuple[int, list[str]], ops_pair: Pair
) -> None:
    port, received = lenient_backend
    env = await make_env(routes=_routes(port), backends=0)
    done = await env.curl("--path-as-is", env.url + "//admin//secret?q=%2F", pair=ops_pair)
    assert done.stdout == ADMIN_BODY
    assert received == ["/admin/secret"]
    done = await env.curl(
        "--path-as-is", "-w", "%{http_code}", env.url + "/admin;v=1/x", pair=ops_pair
    )
    assert done.stdout.endswith(b"400")  # refused for everyone: no backend agrees on ';'
