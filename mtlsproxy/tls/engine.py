"""TLS as a trio Stream: pyOpenSSL in socket mode.

Theory of operation
===================

trio's own ``SSLStream`` drives the stdlib ``ssl`` module through memory BIOs: Python
shuttles every ciphertext byte between OpenSSL and the socket. We let OpenSSL own the
socket instead ("socket mode", docs/tls-engine.md has the measurement): the
``SSL.Connection`` reads and writes the file descriptor itself, and we only call it
non-blockingly and, when it answers WantRead/WantWrite, park the task with
``trio.lowlevel.wait_readable``/``wait_writable`` and call it again. Every public
operation is that one loop (``_io``) around one OpenSSL call.

Taking the socket: ``trio.SocketStream.socket`` is a trio socket wrapping a stdlib one.
We ``detach()`` its file descriptor and build our own ``socket.socket`` on it, so the
TLSStream is the one owner of the fd and nothing else can close it under OpenSSL (a
``dup`` would leave two owners, and the private ``_sock`` attribute is not API). The
SocketStream passed in is spent afterwards; read addresses from ``peer_address``.

Waiting: trio allows one task per fd and direction in ``wait_readable``. A receiving task
can be parked on readability when a sending task gets WantRead (TLS may need to read to
write), so the second task *piggybacks*: it waits for the first one's wake-up and then
retries its own call (``_Parker``). OpenSSL may hold decrypted bytes already
(``Connection.pending()``); we never wait before trying, so those are returned at once.

Errors are translated in one place (``_failure``): resets, protocol errors and failed
writes become ``trio.BrokenResourceError``; use after ``aclose`` becomes
``trio.ClosedResourceError``. A failed handshake raises ``HandshakeError`` whose
``reason`` says why (``no_cert``, ``unknown_ca``, ``expired``, ``bad_cert``,
``bad_signature``, ``timeout``, ``protocol_error``); for ``bad_signature`` its detail
also names the certificate the peer presented without holding its key (*claimed*, not
verified). Before raising, the alert OpenSSL wrote is given time to reach the
peer: ``shutdown(SHUT_WR)`` and a short drain. A TLS 1.3 client considers its handshake
done before it learns our verdict and may already be writing; closing at once would answer
those bytes with RST, and the client's next write fails with EPIPE/"connection reset"
before it ever reads the "certificate required" alert waiting in its buffer.

EOF: ``receive_some`` returns ``b""`` on close_notify *and* on a bare TCP EOF. Most
clients (curl, browsers, HTTP/1.1 stacks) close without close_notify; truncation is caught
one layer up where it matters (h11 knows when a body is short). ``eof_was_clean`` tells
the two apart for logs. OpenSSL 3+ treats a bare EOF as a fatal error, and a fatal error
removes the connection's session from the server's cache: every client that leaves the
usual way would pay a full handshake next time. So before OpenSSL reads the socket,
``_recv`` peeks at it (one byte, ``MSG_PEEK``: about 0.4 us, against the two reads per
record OpenSSL does anyway); at a bare EOF it lets OpenSSL take the EOF as the end
(``OP_IGNORE_UNEXPECTED_EOF``, on this connection only, so any record OpenSSL still holds
is delivered first) and remembers that it was not clean. The close then sends our
close_notify, and a connection marked shut down keeps its session when it is freed.

Half-close: ``send_eof`` sends close_notify and keeps reading, which TLS 1.3 defines and
OpenSSL supports in both 1.2 and 1.3 (tested). A cancelled ``send_all`` leaves an OpenSSL
write half done, which cannot be resumed with other data, so the stream becomes broken
(as in trio's SSLStream).
"""

from __future__ import annotations

import hashlib
import operator
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeVar

import trio
from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtlsproxy.errors import MtlsProxyError
from mtlsproxy.identity import rfc4514
from mtlsproxy.tls.context import HandshakeFailure, classify_failure, expect_host, verify_result

__all__ = ["HandshakeError", "HandshakeFailure", "TLSStream"]

T = TypeVar("T")


class HandshakeError(MtlsProxyError):
    """The TLS handshake failed; ``reason`` is the category for logs and metrics.

    ``claimed``: for ``bad_signature``, ``sha256:<hex>`` of the certificate the peer
    presented without proving it holds its key (also named in ``detail``). Unverified by
    definition: the certificate may be anyone's, copied.
    """

    status = 400

    def __init__(self, reason: HandshakeFailure, detail: str, claimed: str | None = None) -> None:
        self.reason: HandshakeFailure = reason
        self.detail = detail
        self.claimed = claimed
        super().__init__(f"TLS handshake failed ({reason}): {detail}")


_DEFAULT_RECEIVE = 65536

# The stream's state, one int of these bits (``TLSStream._state``) instead of a flag each:
# the usual check ("handshake done, nothing else happened") is one compare per call.
_HANDSHAKEN = 1  # do_handshake() succeeded
_EOF_SENT = 2  # send_eof() sent our close_notify
_BROKEN = 4  # a failure (or a cancelled send): only aclose() is left
_CLOSED = 8  # aclose(), or the socket closed after a failed handshake
_PEER_EOF = 16  # the read side saw the socket at a bare EOF before OpenSSL read it
# What each operation needs to be exactly _HANDSHAKEN to take the fast path.
_USABLE = _HANDSHAKEN | _BROKEN | _CLOSED
_SENDABLE = _USABLE | _EOF_SENT


class _Parker:
    """Waits for one fd direction; concurrent callers share the one trio allows.

    ``TLSStream._io`` does the first caller's wait itself (``parked``, ``release``): one
    coroutine frame less for every idle connection parked on a read.
    """

    __slots__ = ("_event", "parked", "wait_fd")

    def __init__(self, wait_fd: Callable[[socket.socket], Awaitable[None]]) -> None:
        self.wait_fd = wait_fd
        self.parked = False
        # Made only when a second task comes along: an idle connection has one waiter.
        self._event: trio.Event | None = None

    async def wait(self, sock: socket.socket) -> None:
        if self.parked:
            await self.join()
            return
        self.parked = True
        try:
            await self.wait_fd(sock)
        finally:
            self.release()

    async def join(self) -> None:
        """Someone is parked already: wake with them (then the caller retries)."""
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def release(self) -> None:
        self.parked = False
        event, self._event = self._event, None
        if event is not None:
            event.set()


# The peek's one byte lands here and is never read: one buffer for every connection.
_PEEK = bytearray(1)


class TLSStream(trio.abc.HalfCloseableStream):
    """A trio Stream over a TCP socket, encrypted by an ``OpenSSL.SSL.Connection``.

    Call ``do_handshake()`` first. ``server_hostname`` (client side) sets SNI and makes
    OpenSSL check the certificate's names against it (DNS name or IP address).
    """

    # One per connection: no per-instance dict (trio's stream ABCs have slots too).
    __slots__ = (
        "_close_timeout", "_conn", "_deferred", "_drain_timeout", "_eof_received",
        "_peer_sha256", "_readable", "_receiving", "_sending", "_sock", "_state", "_writable",
    )  # fmt: skip

    def __init__(
        self,
        transport: trio.SocketStream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        drain_timeout: float = 1.0,
        close_timeout: float = 1.0,
    ) -> None:
        self._sock = socket.socket(fileno=transport.socket.detach())
        self._sock.setblocking(False)
        self._conn = SSL.Connection(context, self._sock)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if server_hostname is not None:
                expect_host(self._conn, server_hostname)
        self._drain_timeout = drain_timeout
        self._close_timeout = close_timeout
        self._readable = _Parker(trio.lowlevel.wait_readable)
        self._writable = _Parker(trio.lowlevel.wait_writable)
        self._state = 0
        # Of the verified leaf, computed at the handshake; the leaf itself stays in
        # OpenSSL's session and is decoded only when asked for (identities are cached by
        # this fingerprint, so mostly never), and not kept here: memory per connection.
        self._peer_sha256: str | None = None
        # The conflict detector, as trio's (two senders would interleave records, two
        # receivers would split one stream's bytes arbitrarily; both are caller bugs), but
        # plain flags set and cleared in place: no context manager per call.
        self._receiving = False
        self._sending = False
        self._eof_received: bool | None = None  # None: no EOF yet; else: was it clean?
        # What ended a batch of records (_more) after data: the next receive raises it.
        self._deferred: SSL.Error | OSError | None = None

    # ---- the one loop --------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        """The handshake's and the shutdown's loop; ``send_all`` and ``receive_some`` have
        their own copy of it, written out (a coroutine frame less on every call)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        try:
            while True:
                # The wait is outside the except clauses on purpose: awaiting inside one
                # keeps the exception and its traceback alive for as long as an idle
                # connection is parked (measured: most of a KiB per idle connection).
                try:
                    return fn(*args)
                except SSL.WantReadError:
                    parker = self._readable
                except SSL.WantWriteError:
                    parker = self._writable
                waited = True
                await self._park(parker)
        finally:
            if not waited:
                # trio's contract: every async operation is a schedule point. One, after the
                # call, as trio's own socket methods do it (and only when the call did not
                # wait: a wait was one already).
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _park(self, parker: _Parker) -> None:
        # _Parker.wait, with the parker's first wait done here.
        if parker.parked:
            await parker.join()
            return
        parker.parked = True
        try:
            await parker.wait_fd(self._sock)
        finally:
            parker.release()

    def _failure(self, exc: BaseException) -> trio.BrokenResourceError | trio.ClosedResourceError:
        """The one translation of an OpenSSL or socket error into trio's."""
        self._state |= _BROKEN
        if self._state & _CLOSED:
            return trio.ClosedResourceError("the TLS stream was closed")
        return trio.BrokenResourceError(f"TLS connection failed: {exc!r}")

    def _check_usable(self) -> None:
        state = self._state
        if state & _CLOSED:
            raise trio.ClosedResourceError("the TLS stream was closed")
        if state & _BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")
        if not state & _HANDSHAKEN:
            raise RuntimeError("call do_handshake() before using the stream")

    def _check_sendable(self) -> None:
        if self._state & (_EOF_SENT | _CLOSED) == _EOF_SENT:
            raise trio.ClosedResourceError("send_eof() was called; cannot send")
        self._check_usable()

    # ---- handshake -----------------------------------------------------------------

    async def do_handshake(self, *, timeout: float = 10.0) -> None:
        """Run the handshake within ``timeout`` seconds or raise ``HandshakeError``.

        On failure the socket is closed (after the alert had its chance to leave).
        """
        if self._state & _HANDSHAKEN:
            await trio.lowlevel.checkpoint()
            return
        if self._state & (_CLOSED | _BROKEN):
            self._check_usable()
        try:
            with trio.move_on_after(timeout) as scope:
                await self._io(self._conn.do_handshake)
        except (SSL.Error, OSError) as exc:
            self._state |= _BROKEN
            reason, detail = classify_failure(exc, verify_result(self._conn))
            claimed = None
            if reason == "bad_signature":
                claimed, detail = self._claimed_identity(detail)
            await self._close_after_alert()
            raise HandshakeError(reason, detail, claimed) from exc
        except BaseException:
            # Cancelled from outside, or aclose() from another task: no alert to deliver.
            self._state |= _BROKEN
            self._close_socket()
            raise
        if scope.cancelled_caught:
            self._state |= _BROKEN
            self._close_socket()
            raise HandshakeError("timeout", f"no complete handshake within {timeout:g} s")
        self._state |= _HANDSHAKEN
        # Every connection needs it (identity, logs), so decode it once, here.
        peer = self._conn.get_peer_certificate()
        self._peer_sha256 = None if peer is None else _sha256_hex(peer)

    def _claimed_identity(self, detail: str) -> tuple[str | None, str]:
        # The chain verified, so OpenSSL kept the leaf on the session; the key's proof
        # failed, so it is only who the peer *claims* to be. Named for the operator (whose
        # certificate is being replayed?), never trusted: it is not an Identity.
        presented = self._conn.get_peer_certificate()
        if presented is None:
            return None, detail
        cert = presented.to_cryptography()
        claimed = f"sha256:{_sha256_hex(presented)}"
        return claimed, (
            f"{detail}; claimed identity, not verified (no proof of the key): "
            f"subject {rfc4514(cert.subject)}, {claimed}"
        )

    async def _close_after_alert(self) -> None:
        # Socket mode: OpenSSL has already written the alert into the kernel's send buffer.
        # FIN after it, then read until the peer closes (it does, once it reads the alert)
        # so that no unread input is left to turn our close into a RST.
        try:
            self._sock.shutdown(socket.SHUT_WR)
            with trio.move_on_after(self._drain_timeout):
                while True:
                    try:
                        if not self._sock.recv(65536):
                            break
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self._sock)
        except OSError:
            pass  # the peer is gone already; nothing left to protect
        finally:
            self._close_socket()

    # ---- what the handshake established --------------------------------------------

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The verified leaf, decoded on first use (identity caches skip it entirely)."""
        peer = self._conn.get_peer_certificate() if self._state & _HANDSHAKEN else None
        return None if peer is None else peer.to_cryptography()

    @property
    def peer_sha256(self) -> str | None:
        """SHA-256 of the leaf's DER, lowercase hex, computed by OpenSSL without decoding."""
        return self._peer_sha256

    @property
    def verified_root_sha256(self) -> str | None:
        """SHA-256 of the trust anchor the chain was verified to (None when resumed)."""
        chain = self._conn.get_verified_chain()
        if not chain:
            return None
        return _sha256_hex(chain[-1])

    @property
    def verified_chain(self) -> list[x509.Certificate] | None:
        """Leaf to trust anchor as verified in *this* handshake.

        None on a resumed session: OpenSSL does not keep the verified chain in the session,
        only the leaf (``peer_certificate``), which was verified when the session began.
        """
        return self._conn.get_verified_chain(as_cryptography=True)

    @property
    def alpn_protocol(self) -> bytes | None:
        return self._conn.get_alpn_proto_negotiated() or None

    @property
    def tls_version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        return self._conn.get_cipher_name()

    @property
    def group(self) -> str | None:
        """The key exchange group of this connection, as OpenSSL names it
        (``X25519MLKEM768``, ``x25519``, ``secp256r1``...)."""
        name = _lib.SSL_get0_group_name(self._conn._ssl)  # not in pyOpenSSL; see _ssl below
        return None if name == _ffi.NULL else _ffi.string(name).decode("ascii")

    @property
    def session_reused(self) -> bool:
        # Not exposed by pyOpenSSL; the bindings have it, on the SSL* kept in ``_ssl``.
        return bool(_lib.SSL_session_reused(self._conn._ssl))

    @property
    def eof_was_clean(self) -> bool | None:
        """After ``receive_some`` returned b"": did the peer send close_notify?"""
        return self._eof_received

    @property
    def peer_address(self) -> tuple[Any, ...]:
        address: tuple[Any, ...] = self._sock.getpeername()
        return address

    @property
    def local_address(self) -> tuple[Any, ...]:
        address: tuple[Any, ...] = self._sock.getsockname()
        return address

    # ---- the Stream ----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._state & _SENDABLE != _HANDSHAKEN:
                self._check_sendable()
            view = memoryview(data).cast("B")
            size = len(view)
            if not size:
                await trio.lowlevel.checkpoint()
                return
            # _io, written out for the whole send: one checkpoint per send_all, not one per
            # partial write (as trio's SocketStream.send_all).
            await trio.lowlevel.checkpoint_if_cancelled()
            send = self._conn.send
            sent = 0
            waited = False
            try:
                while True:
                    try:
                        # Partial writes are on (pyOpenSSL sets ENABLE_PARTIAL_WRITE): a
                        # retry after WantWrite passes the same remaining bytes again.
                        sent += send(view[sent:] if sent else view)
                        if sent >= size:
                            break
                        continue
                    except SSL.WantWriteError:
                        parker = self._writable
                    except SSL.WantReadError:
                        parker = self._readable
                    waited = True
                    await self._park(parker)
            except trio.Cancelled:
                self._state |= _BROKEN  # a half-written record cannot be abandoned
                raise
            except (SSL.Error, OSError) as exc:  # (aclose() from another task: as it is)
                raise self._failure(exc) from exc
            finally:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_usable()
            try:
                await self._writable.wait(self._sock)
            except (SSL.Error, OSError) as exc:
                raise self._failure(exc) from exc
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._state & _USABLE != _HANDSHAKEN:
                self._check_usable()
            if self._eof_received is not None:
                await trio.lowlevel.checkpoint()
                return b""
            # _io, written out: an idle keep-alive connection sits here, and every frame of
            # its await chain (and every context manager) is memory.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            try:
                while True:
                    try:
                        return self._recv(max_bytes)
                    # BlockingIOError: the peek found nothing yet, OpenSSL was not asked.
                    except (BlockingIOError, SSL.WantReadError):
                        parker = self._readable
                    except SSL.WantWriteError:
                        parker = self._writable
                    waited = True
                    # _park, inlined: one frame less per parked idle connection.
                    if parker.parked:
                        await parker.join()
                        continue
                    parker.parked = True
                    try:
                        await parker.wait_fd(self._sock)
                    finally:
                        parker.release()
            except (SSL.Error, OSError) as exc:  # (aclose() from another task: as it is)
                self._end_of_input(exc)
            finally:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            return b""
        finally:
            self._receiving = False

    def _end_of_input(self, exc: SSL.Error | OSError) -> None:
        """The end of the stream (``receive_some`` returns b"") or a failure (raised)."""
        if isinstance(exc, SSL.ZeroReturnError):
            self._eof_received = not self._state & _PEER_EOF
        # pyOpenSSL reports "EOF without close_notify" as (-1, 'Unexpected EOF') on every
        # OpenSSL version; a real errno (ECONNRESET...) is a failure.
        elif isinstance(exc, SSL.SysCallError) and exc.args[0] == -1:
            self._eof_received = False
        else:
            raise self._failure(exc) from exc

    def _recv(self, max_bytes: int) -> bytes:
        """``Connection.recv``, but a bare EOF is no fatal error (the module docstring says
        why). ``pending()`` counts decrypted bytes only, so an EOF in the middle of a
        record (a truncated one) is taken the same way: the stream ends, not clean.

        Raises ``BlockingIOError`` when the socket has nothing to read: cheaper than letting
        OpenSSL find out (no SSL_read, no error queue, no second exception)."""
        conn = self._conn
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            raise deferred
        if not self._state & _PEER_EOF:
            if _lib.SSL_pending(conn._ssl) or self._sock.recv_into(_PEEK, 1, socket.MSG_PEEK):
                data: bytes = conn.recv(max_bytes)
                if len(data) == _MAX_RECORD < max_bytes:  # a stream of full records
                    return self._more(data, max_bytes)
                return data
            self._state |= _PEER_EOF
            _lib.SSL_set_options(conn._ssl, SSL.OP_IGNORE_UNEXPECTED_EOF)
        shut = conn.get_shutdown()
        try:
            return conn.recv(max_bytes)  # records OpenSSL holds, then ZeroReturnError
        except SSL.ZeroReturnError:
            # OpenSSL *sets* the state to "received" at the EOF, forgetting a close_notify
            # we sent (send_eof); without "sent", freeing the connection drops its session.
            conn.set_shutdown(shut | SSL.RECEIVED_SHUTDOWN)
            raise

    def _more(self, first: bytes, max_bytes: int) -> bytes:
        """``first`` was a full record: take the records already here too, up to
        ``max_bytes``, so a body in flight is relayed in 64 KiB, not 16 KiB, pieces (a
        quarter of the sends upstream and of the trips through the event loop). Stops at
        anything but data: nothing more yet, a bare EOF (left in the socket), or what
        OpenSSL raised (a close_notify it has consumed, an error), which is kept for the
        next call to raise, after this data is delivered."""
        conn, sock = self._conn, self._sock
        parts, got = [first], len(first)
        while got < max_bytes:
            try:
                if not (_lib.SSL_pending(conn._ssl) or sock.recv_into(_PEEK, 1, socket.MSG_PEEK)):
                    break  # a bare EOF: the next call's peek finds it again
                more: bytes = conn.recv(max_bytes - got)
            except (BlockingIOError, SSL.WantReadError, SSL.WantWriteError):
                break
            except (SSL.Error, OSError) as exc:
                self._deferred = exc
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_usable()
            if self._state & _EOF_SENT:
                await trio.lowlevel.checkpoint()
                return
            try:
                # SSL_shutdown queues close_notify; a retry after WantWrite only flushes it,
                # it does not start waiting for the peer's close_notify (ssl3_shutdown).
                await self._io(self._conn.shutdown)
            except (SSL.Error, OSError) as exc:
                raise self._failure(exc) from exc
            self._state |= _EOF_SENT
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Send close_notify (best effort, ``close_timeout``), then close. Idempotent."""
        if self._state & _CLOSED:
            await trio.lowlevel.checkpoint()
            return
        self._state |= _CLOSED
        try:
            if self._state & (_HANDSHAKEN | _BROKEN | _EOF_SENT) == _HANDSHAKEN:
                # The peer may be gone already; then closing is all that is left to do.
                with (
                    trio.move_on_after(self._close_timeout),
                    suppress(SSL.Error, OSError, trio.ClosedResourceError),
                ):
                    await self._io(self._conn.shutdown)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        self._state |= _CLOSED
        if self._sock.fileno() == -1:
            return
        # Discard input that already arrived (typically the peer's close_notify) without
        # waiting: closing with unread bytes makes the kernel send RST, which can destroy
        # our last response still in flight to the peer.
        try:
            for _ in range(16):  # bounded: a peer that keeps sending gets its RST
                if not self._sock.recv(65536):
                    break
        except OSError:
            pass
        # Wake any task parked on this fd (it gets ClosedResourceError) before the fd
        # number can be reused.
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


def receive_size(max_bytes: int | None) -> int:
    if max_bytes is None:
        return _DEFAULT_RECEIVE
    # TypeError for 1.5 now: the peek may wait for the socket before OpenSSL sees it.
    if operator.index(max_bytes) < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


_SHA256 = _lib.EVP_get_digestbyname(b"sha256")
_MAX_RECORD = 16384  # the most plaintext one TLS record carries


def _sha256_hex(cert: Any) -> str:
    # pyOpenSSL's X509.digest() formats its colon-separated hex in Python; X509_digest
    # hashes the DER in C (measured: 3.2 us, against 5.6 for dump_certificate + hashlib,
    # on every connection, resumed ones included).
    digest = _ffi.new("unsigned char[32]")
    size = _ffi.new("unsigned int *")
    if not _lib.X509_digest(cert._x509, _SHA256, digest, size):  # out of memory only
        return hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)).hexdigest()
    found: bytes = _ffi.buffer(digest, size[0])[:]
    return found.hex()
