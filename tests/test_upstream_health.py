"""The upstream pool's passive health and idle reaping (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket

import pytest
import trio
from proxy_env import read_request, route, serve_raw

from mtlsproxy.address import Address
from mtlsproxy.server import upstream
from mtlsproxy.server.upstream import Target, UpstreamPool, _Health


def test_failures_in_one_window_count_once() -> None:
    """Twenty requests that fail together in one outage are one failure: the back-off
    doubles per probe window, not per request."""
    health = _Health()
    for _ in range(20):
        health.failed(100.0)
    assert (health.down_until, health.backoff) == (101.0, 2.0)
    health.failed(100.5)  # still inside that window
    assert (health.down_until, health.backoff) == (101.0, 2.0)
    health.failed(101.0)  # the next probe failed too
    assert (health.down_until, health.backoff) == (103.0, 4.0)
    for when in (110.0, 120.0, 130.0, 140.0):
        health.failed(when)
    assert health.backoff == 10.0  # capped


async def test_a_route_with_every_backend_marked_down_still_tries_one() -> None:
    pool = UpstreamPool()
    a, b, c = (Target(Address("127.0.0.1", p)) for p in (1, 2, 3))
    now = trio.current_time()
    pool._health[a].failed(now)
    assert pool.eligible([a, b, c]) == [b, c]
    pool._health[b].failed(now + 0.5)
    pool._health[c].failed(now + 0.2)
    assert pool.eligible([a, b, c]) == [a]  # every one down: the mark that ends first
    assert pool.eligible([]) == []


async def test_idle_backend_connections_are_reaped(
    make_env, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: after a burst, pooled connections stayed open indefinitely (in CLOSE-WAIT
    once the backend timed them out); now they close after IDLE_SECONDS."""
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.4)
    opened, closed = 0, 0
    all_closed = trio.Event()
    arrived = 0
    release = trio.Event()

    async def keep_alive(stream: trio.SocketStream) -> None:
        nonlocal opened, closed, arrived
        opened += 1
        try:
            while await read_request(stream):
                arrived += 1
                if arrived == 3:
                    release.set()
                await release.wait()  # hold all three so that three connections open
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except trio.BrokenResourceError:
            pass
        closed += 1
        if closed == opened:
            all_closed.set()

    port = await serve_raw(nursery, keep_alive)
    env = await make_env(routes=route([port]), backends=0)
    async with trio.open_nursery() as burst:
        for _ in range(3):
            burst.start_soon(env.request, "GET", "/")
    assert opened == 3
    with trio.fail_after(5):  # IDLE_SECONDS and one reaper tick, with room for a slow CI
        await all_closed.wait()


class _SlowToClose(trio.abc.Stream):
    """An upstream stream whose close takes until ``release`` is set."""

    def __init__(self, release: trio.Event) -> None:
        self.release = release

    async def aclose(self) -> None:
        await self.release.wait()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def wait_send_all_might_not_block(self) -> None:
        raise NotImplementedError

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise NotImplementedError


async def test_the_reaper_survives_a_backend_first_used_while_it_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding: reap() awaited inside its loop over the pool's dict, and acquire()
    adds a key the first time a backend is used: 'dictionary changed size during
    iteration' took the whole proxy down."""
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.1)
    pool = UpstreamPool()
    release = trio.Event()
    with socket.socket() as sock:
        stale = upstream.Upstream(
            Target(Address("127.0.0.1", 1)), _SlowToClose(release), sock.fileno()
        )
        stale.idle_since = trio.current_time() - 1
        pool._idle[stale.backend].append(stale)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.reap)
            with trio.fail_after(5):
                while pool._idle[stale.backend]:  # the reaper took it and is closing it
                    await trio.sleep(0.01)
            pool._idle[Target(Address("127.0.0.1", 2))]  # what acquire() does for a new one
            release.set()
            await trio.sleep(0.2)  # another reaper round: it must still be running
            nursery.cancel_scope.cancel()
