"""CPU per keep-alive request of the HTTP relay alone: HttpConnection over memory streams.

No TLS, no sockets, no load generator: one trio process runs a client that sends a GET
and reads its answer, the proxy's ``HttpConnection`` (routing, policy, header rewriting,
both llhttp readers, the exchange core, the clocks, metrics, no access log), and a
backend that answers each request with a fixed 200. What is left is the Python the proxy
spends per request, beside the same loop with the proxy taken out (client and backend
talking directly: the cost of the harness itself). Median of ``--runs``.

    .venv/bin/python benchmarks/relay_micro.py [--requests 20000] [--runs 5] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtlsproxy.accesslog import AccessLog
from mtlsproxy.address import parse_address
from mtlsproxy.config import Listener, Route
from mtlsproxy.denylist import DenyList
from mtlsproxy.identity import Identity
from mtlsproxy.metrics import Metrics
from mtlsproxy.relay.routing import RoundRobin, RouteTable
from mtlsproxy.relay.routing import Route as TableRoute
from mtlsproxy.server.http import HttpConnection, RouteRuntime
from mtlsproxy.server.upstream import Target, UpstreamPool
from mtlsproxy.sessions import Session

REQUEST = (
    b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: micro/1\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip\r\nX-Request-Id: 1234\r\nCookie: a=b\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
NOW = datetime.now(UTC)
IDENTITY = Identity(
    subject="CN=micro",
    issuer="CN=micro CA",
    cn="micro",
    ous=(),
    dns=(),
    ips=(),
    uris=("spiffe://micro/client",),
    spiffe_id="spiffe://micro/client",
    serial="01",
    sha256="ab" * 32,
    not_before=NOW - timedelta(hours=1),
    not_after=NOW + timedelta(hours=23),
)


async def backend(stream: trio.abc.Stream) -> None:
    """Answers every request head (a request has no body here) with RESPONSE."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        _, buffer = buffer.split(b"\r\n\r\n", 1)
        await stream.send_all(RESPONSE)


async def client(stream: trio.abc.Stream, requests: int) -> None:
    for _ in range(requests):
        await stream.send_all(REQUEST)
        got = b""
        while not got.endswith(b"hello"):
            got += await stream.receive_some(65536)


async def one_run(requests: int, *, direct: bool) -> float:
    """CPU seconds per request."""
    async with trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        if direct:
            nursery.start_soon(backend, theirs)
        else:

            async def connect(target: Target) -> trio.abc.Stream:
                up, down = trio.testing.memory_stream_pair()
                nursery.start_soon(backend, down)
                return up

            address = parse_address("127.0.0.1:9")
            listener = Listener(listen=parse_address("127.0.0.1:0"), routes=[Route([address])])
            config = listener.routes[0]
            runtime = RouteRuntime(0, "api", config, RoundRobin([Target(address)]), None)
            connection = HttpConnection(
                theirs,
                session=Session("micro", "127.0.0.1:1", IDENTITY, "http", None),
                listener=listener,
                routes=RouteTable([TableRoute(0, runtime, path_prefix="/")]),
                pool=UpstreamPool(connect=connect),
                deny_list=DenyList,
                metrics=Metrics(),
                client_ip="127.0.0.1",
                access=AccessLog("off"),
            )
            nursery.start_soon(connection.run)
        await client(ours, 100)  # warm up
        started = time.process_time()
        await client(ours, requests)
        spent = time.process_time() - started
        nursery.cancel_scope.cancel()
    return spent / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="write a cProfile of one proxy run here")
    args = parser.parse_args()
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(trio.run, lambda: one_run(args.requests, direct=False))
        profile.dump_stats(args.profile)
    proxy = [trio.run(lambda: one_run(args.requests, direct=False)) for _ in range(args.runs)]
    harness = [trio.run(lambda: one_run(args.requests, direct=True)) for _ in range(args.runs)]
    p, h = statistics.median(proxy) * 1e6, statistics.median(harness) * 1e6
    print(f"proxy + harness: {p:.1f} µs CPU/request (median of {args.runs})")
    print(f"harness alone:   {h:.1f} µs CPU/request")
    print(f"the relay:       {p - h:.1f} µs CPU/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
