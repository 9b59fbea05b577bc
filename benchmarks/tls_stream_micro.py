"""CPU per round trip of TLSStream: send_all + receive_some ping-pong, one trio process.

Two TLSStreams over loopback (client and server in one trio run), one task each side: the
client sends ``--size`` bytes, the server echoes them, the client reads them back. Reports
CPU µs per round trip (process time over the loop / round trips), the median of
``--runs`` runs, beside raw pyOpenSSL doing the same exchange on blocking sockets (the
floor: what OpenSSL and the kernel cost without any trio or Python stream logic).

    .venv/bin/python benchmarks/tls_stream_micro.py [--rounds 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.tls.context import build_client_context, build_server_context
from mtlsproxy.tls.engine import TLSStream


def contexts() -> tuple[SSL.Context, SSL.Context]:
    folder = Path(tempfile.mkdtemp(prefix="tls-micro-"))
    ca = CertificateAuthority.init(folder / "ca", name="micro")
    server = ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"])
    client = ca.issue(kind="client", name="micro-client")
    sctx = build_server_context(
        cert_chain=[server.certificate, *server.chain],
        key=server.key,
        client_cas=[ca.root],
        session_id_context=b"micro",
    )
    cctx = build_client_context(
        server_cas=[ca.root], cert_chain=[client.certificate, *client.chain], key=client.key
    )
    return sctx, cctx


async def tls_run(sctx: SSL.Context, cctx: SSL.Context, rounds: int, size: int) -> float:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    payload = b"x" * size
    result = 0.0

    async def server_side() -> None:
        stream = await listeners[0].accept()
        tls = TLSStream(stream, sctx, server_side=True)
        await tls.do_handshake()
        while data := await tls.receive_some(65536):
            await tls.send_all(data)
        await tls.aclose()

    async def client_side() -> None:
        nonlocal result
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = TLSStream(stream, cctx, server_side=False, server_hostname="localhost")
        await tls.do_handshake()
        for _ in range(200):  # warm-up
            await tls.send_all(payload)
            await tls.receive_some(65536)
        started = time.process_time()
        for _ in range(rounds):
            await tls.send_all(payload)
            got = 0
            while got < size:
                got += len(await tls.receive_some(65536))
        result = (time.process_time() - started) / rounds * 1e6
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        nursery.start_soon(client_side)
    for listener in listeners:
        await listener.aclose()
    return result


def raw_run(sctx: SSL.Context, cctx: SSL.Context, rounds: int, size: int) -> float:
    """The same ping-pong on raw pyOpenSSL, blocking sockets, server in a thread."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    payload = b"x" * size

    def serve() -> None:
        sock, _ = lsock.accept()
        conn = SSL.Connection(sctx, sock)
        conn.set_accept_state()
        conn.do_handshake()
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            pass
        sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    sock = socket.create_connection(("127.0.0.1", port))
    conn = SSL.Connection(cctx, sock)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    conn.do_handshake()
    for _ in range(200):
        conn.sendall(payload)
        conn.recv(65536)
    # process_time covers both threads: the server's share is in it, as in tls_run.
    started = time.process_time()
    for _ in range(rounds):
        conn.sendall(payload)
        got = 0
        while got < size:
            got += len(conn.recv(65536))
    result = (time.process_time() - started) / rounds * 1e6
    conn.shutdown()
    sock.close()
    thread.join()
    lsock.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--no-raw", action="store_true")
    args = parser.parse_args()
    sctx, cctx = contexts()
    tls = [trio.run(tls_run, sctx, cctx, args.rounds, args.size) for _ in range(args.runs)]
    print(
        f"TLSStream ping-pong ({args.size} B): median {statistics.median(tls):.1f} µs CPU "
        f"per round trip (runs: {', '.join(f'{x:.1f}' for x in tls)})"
    )
    if not args.no_raw:
        raw = [raw_run(sctx, cctx, args.rounds, args.size) for _ in range(args.runs)]
        print(
            f"raw pyOpenSSL ping-pong: median {statistics.median(raw):.1f} µs CPU per round "
            f"trip (runs: {', '.join(f'{x:.1f}' for x in raw)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
