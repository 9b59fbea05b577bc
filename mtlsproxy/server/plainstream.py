"""A plain TCP stream for backend connections: trio's SocketStream, leaner per call.

Why not ``trio.SocketStream`` itself: each of its calls runs two context managers (the
conflict detector, the error translation) and an async context manager around the
attempt (``_try_sync``); on a keep-alive request or a WebSocket message that was ~5 us
per send or receive, two of them per relayed message (``benchmarks/relay_micro.py``
and a socketpair ping-pong measured it). This class makes the same attempts on the same
non-blocking socket with plain flags, like ``tls.engine.TLSStream`` does.

The guarantees of a trio Stream stay: every call is a checkpoint (a cancel point before
anything is sent or taken, a schedule point after), two tasks sending (or receiving) at
once get ``BusyResourceError``, a closed stream ``ClosedResourceError``, a failed socket
``BrokenResourceError``. ``trio.testing.check_half_closeable_stream`` checks it
(``tests/test_plainstream.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress

import trio

from mtlsproxy.tls.engine import receive_size


class PlainStream(trio.abc.HalfCloseableStream):
    __slots__ = ("_closed", "_eof_sent", "_receiving", "_sending", "_sock")

    def __init__(self, transport: trio.SocketStream) -> None:
        self._sock = socket.socket(fileno=transport.socket.detach())
        self._sock.setblocking(False)
        self._sending = False
        self._receiving = False
        self._closed = False
        self._eof_sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("this stream was closed for sending")
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data).cast("B")
            waited = False
            sock = self._sock
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    waited = True
                    await self._wait(trio.lowlevel.wait_writable)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"backend socket: {exc}") from exc
                view = view[sent:]
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await self._wait(trio.lowlevel.wait_writable)
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self._sock
            waited = False
            while True:
                try:
                    data = sock.recv(size)
                    break
                except BlockingIOError:
                    pass  # parked below, outside the except: no exception kept alive
                except OSError as exc:
                    raise trio.BrokenResourceError(f"backend socket: {exc}") from exc
                waited = True
                await self._wait(trio.lowlevel.wait_readable)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await trio.lowlevel.checkpoint()
            if not self._eof_sent:
                self._eof_sent = True
                with suppress(OSError):  # not connected any more: nothing left to end
                    self._sock.shutdown(socket.SHUT_WR)
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wake any task parked on this fd (it gets ClosedResourceError) before the fd
            # number can be reused.
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("this stream was closed") from None
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
