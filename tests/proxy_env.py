"""A running proxy for tests: real TLS on 127.0.0.1, the demo backend behind it, real clients.

The proxy and backends run in the test's own trio loop (ports chosen by the kernel);
blocking clients (curl, openssl, requests, httpx) run in a subprocess or a thread, so
what they see is exactly what a user's client would see.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import msgspec
import requests
import trio
from support import Pair

from mtlsproxy import config, demo_backend
from mtlsproxy.server.proxy import Proxy

CLIENT_TIMEOUT = 20


@dataclass
class Env:
    proxy: Proxy
    port: int
    ca_bundle: Path
    client: Pair
    folder: Path
    backend_ports: list[int] = field(default_factory=list)
    admin_port: int = 0

    async def admin(self, method: str, path: str) -> tuple[int, bytes]:
        def call() -> requests.Response:
            return requests.request(method, f"http://127.0.0.1:{self.admin_port}{path}", timeout=10)

        response = await trio.to_thread.run_sync(call)
        return response.status_code, response.content

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def curl(
        self, *args: str, pair: Pair | bool | None = True
    ) -> subprocess.CompletedProcess[bytes]:
        """curl with our CA; ``pair`` True: the default client cert, None/False: none."""
        cmd = ["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), "--cacert", str(self.ca_bundle)]
        chosen = self.client if pair is True else pair or None
        if chosen is not None:
            cmd += ["--cert", str(chosen.crt), "--key", str(chosen.key)]
        return await trio.run_process(
            [*cmd, *args], capture_stdout=True, capture_stderr=True, check=False
        )

    async def get_json(self, path: str = "/", pair: Pair | None = None, **kwargs: Any) -> Any:
        response = await self.request("GET", path, pair=pair, **kwargs)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()

    async def request(
        self, method: str, path: str, pair: Pair | None = None, **kwargs: Any
    ) -> requests.Response:
        chosen = pair or self.client
        kwargs.setdefault("timeout", CLIENT_TIMEOUT)

        def call() -> requests.Response:
            return requests.request(
                method,
                self.url + path,
                verify=str(self.ca_bundle),
                cert=(str(chosen.crt), str(chosen.key)),
                **kwargs,
            )

        return await trio.to_thread.run_sync(call)

    async def raw(
        self, data: bytes, pair: Pair | None = None, *, read_until_close: bool = True
    ) -> bytes:
        """Send raw bytes over mTLS and return everything the proxy answers until it closes."""
        chosen = pair or self.client
        return await trio.to_thread.run_sync(
            raw_exchange, self.port, data, self.ca_bundle, chosen, read_until_close
        )


def raw_exchange(
    port: int, data: bytes, ca_bundle: Path, pair: Pair, read_until_close: bool = True
) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca_bundle))
    ctx.load_cert_chain(pair.crt, pair.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(data)
        chunks = []
        while True:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def write_config(
    folder: Path,
    *,
    ca_bundle: Path,
    server: Pair,
    routes: str,
    listener: str = "",
    tls: str = "",
    top: str = "",
) -> Path:
    text = f"""{top}
[tls]
cert = "{server.crt}"
key = "{server.key}"
client_ca = "{ca_bundle}"
{tls}

[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"
mode = "http"
{listener}

{routes}
"""
    path = folder / "mtlsproxy.toml"
    path.write_text(text)
    return path


def route(backends: list[int], extra: str = "", path_prefix: str = "/") -> str:
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in backends)
    return f"""[[listeners.routes]]
path_prefix = "{path_prefix}"
backends = [{listed}]
{extra}
"""


async def start_backend(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(demo_backend.serve, "127.0.0.1", 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start_proxy(nursery: trio.Nursery, config_path: Path) -> tuple[Proxy, int, int]:
    """Returns the proxy, its first listener's port and its admin port."""
    proxy = Proxy(config.load(config_path), str(config_path))
    bound = await nursery.start(proxy.run)
    admin = next(b for b in bound if b.listener == "admin")
    return proxy, bound[0].address.port, admin.address.port


async def serve_raw(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """A hand-written backend for cases the demo backend does not misbehave in."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_request(stream: trio.SocketStream) -> bytes:
    """Read one request head (and nothing more) from a hand-written backend's stream."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def decode(body: bytes) -> Any:
    return msgspec.json.decode(body)


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    informational: list[int]


def parse_responses(
    raw: bytes, methods: list[str] | None = None, *, eof: bool = True
) -> list[Answer]:
    """Split what the proxy answered into responses, with h11 as the client-side parser.

    ``eof=False`` parses a prefix: an incomplete last response is left out.
    """
    answers: list[Answer] = []
    methods = list(methods or ["GET"] * 16)
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    if eof:
        conn.receive_data(b"")
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        info: list[int] = []
        current: Answer | None = None
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                info.append(event.status_code)
            elif isinstance(event, h11.Response):
                headers: dict[str, list[str]] = {}
                for k, v in event.headers:
                    headers.setdefault(k.decode(), []).append(v.decode("latin-1"))
                current = Answer(event.status_code, headers, b"", info)
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                answers.append(current)
                break
            else:  # ConnectionClosed or NEED_DATA: no more responses
                return answers
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return answers
        conn.start_next_cycle()
    return answers
