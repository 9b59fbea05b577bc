"""Rotation under load: 50 swaps while 20 clients keep sending requests; none may fail.

Every rotation issues a new server certificate. The client CA bundle goes from the old
CA, to old + new, to the new CA alone, as a CA rotation does. Clients hold a certificate
from each CA and use the one the proxy trusts: the old one until the bundle holds both,
the new one from then on (a real client switches when it renews). Half the clients keep
one connection alive across swaps; the other half open a new connection for every
request, so handshakes keep meeting fresh material. A failed request is any exception or
any status but 200.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import requests
import trio
from support import Pair

from mtlsproxy.atomicfile import write_atomic
from mtlsproxy.pki import CertificateAuthority

ROTATIONS = 50
CLIENTS = 20


async def test_fifty_rotations_under_load_drop_nothing(
    make_env: Any, tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    old, new = ca, other_ca
    creds = tmp_path / "creds"
    creds.mkdir()
    first = old.issue(kind="server", name="localhost")
    first.write(creds / "server")
    old_root, new_root = (old.folder / "ca.crt").read_bytes(), (new.folder / "ca.crt").read_bytes()
    write_atomic(creds / "ca.crt", old_root)
    verify = tmp_path / "clients-trust.crt"  # clients trust both roots for the server
    verify.write_bytes(old_root + new_root)
    client_certs = {
        "old": old.issue(kind="client", name="player").write(tmp_path / "player-old"),
        "new": new.issue(kind="client", name="player").write(tmp_path / "player-new"),
    }
    env = await make_env(
        server=Pair(creds / "server.crt", creds / "server.key"),
        bundle=creds / "ca.crt",
        tls='reload_interval = "100ms"',
    )

    use = {"cert": "old"}
    stop = threading.Event()
    failures: list[str] = []
    counts = [0] * CLIENTS

    def worker(n: int) -> None:
        session = requests.Session() if n % 2 == 0 else None
        while not stop.is_set():
            crt, key = client_certs[use["cert"]]
            try:
                call = session.get if session is not None else requests.get
                # verify/cert per call: REQUESTS_CA_BUNDLE would override Session.verify
                response = call(
                    env.url + f"/c{n}", verify=str(verify), cert=(str(crt), str(key)), timeout=20
                )
                if response.status_code != 200:
                    failures.append(f"client {n}: {response.status_code} {response.text[:80]}")
            except requests.RequestException as exc:
                failures.append(f"client {n}: {exc!r}"[:300])
            counts[n] += 1
        if session is not None:
            session.close()

    async def rotate() -> None:
        for i in range(1, ROTATIONS + 1):
            issuer = old if i <= ROTATIONS // 3 else new
            issued = issuer.issue(kind="server", name="localhost")
            # Key first, then certificate, as a naive renewal script would: a poll may
            # see the mismatched middle state, which must never be swapped in.
            write_atomic(creds / "server.key", issued.key_pem())
            await trio.sleep(0.01)
            write_atomic(creds / "server.crt", issued.chain_pem())
            if i == ROTATIONS // 3:
                write_atomic(creds / "ca.crt", old_root + new_root)
            if i == 2 * ROTATIONS // 3:
                write_atomic(creds / "ca.crt", new_root)
            result = env.proxy.reload("admin")
            assert result.result in ("swapped", "unchanged"), result
            if i == ROTATIONS // 3:
                use["cert"] = "new"  # the proxy trusts both now: clients move to the new CA
            await trio.sleep(0.15)

    async with trio.open_nursery() as nursery:
        for n in range(CLIENTS):
            nursery.start_soon(trio.to_thread.run_sync, worker, n)
        with trio.fail_after(120):
            await rotate()
        stop.set()

    assert env.proxy.store.current().generation >= ROTATIONS
    assert failures == []
    assert sum(counts) > 4 * CLIENTS and all(counts)
    print(f"{sum(counts)} requests from {CLIENTS} clients across {ROTATIONS} rotations, 0 failed")


def test_key_pem_and_chain_pem_round_trip(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue(kind="server", name="localhost")
    crt, key = issued.write(tmp_path / "x")
    assert crt.read_bytes() == issued.chain_pem()
    assert key.read_bytes() == issued.key_pem()
    shutil.rmtree(tmp_path)
