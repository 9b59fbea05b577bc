"""PlainStream (backend connections) keeps every guarantee of a trio HalfCloseableStream."""

from __future__ import annotations

import socket

import trio
import trio.testing

from mtlsproxy.server.plainstream import PlainStream


def _pair() -> tuple[PlainStream, PlainStream]:
    a, b = socket.socketpair()
    return (
        PlainStream(trio.SocketStream(trio.socket.from_stdlib_socket(a))),
        PlainStream(trio.SocketStream(trio.socket.from_stdlib_socket(b))),
    )


async def _maker() -> tuple[PlainStream, PlainStream]:
    return _pair()


async def test_plainstream_is_a_trio_half_closeable_stream() -> None:
    """trio's own conformance checks: conflicts, cancellation, closing, EOF, EPIPE."""
    await trio.testing.check_half_closeable_stream(_maker, None)


async def test_a_large_send_goes_through_whole_while_the_peer_reads_slowly() -> None:
    a, b = _pair()
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
    got = bytearray()

    async def read() -> None:
        while len(got) < len(payload):
            got.extend(await b.receive_some(4096))
            await trio.sleep(0)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await a.send_all(payload)
    assert bytes(got) == payload
    await a.aclose()
    await b.aclose()
