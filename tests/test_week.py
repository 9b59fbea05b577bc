"""The simulated week: a week of daily rotations, compressed into five minutes.

60-second certificates stand in for 24-hour ones. Running for the whole time:

- the proxy, following the CA bundle and its server certificate on disk;
- the renewal service (``ca serve``);
- ``ca renew --watch`` for the proxy's server certificate;
- two clients, each with ``client renew --watch`` (a new key and certificate at about 2/3
  of every lifetime, the trust bundle refreshed from ``GET /ca``) and a request loop on
  ``mtlsproxy.client.requests_session`` (20 requests/s each);
- one CA rotation a third of the way in (``ca rotate --grace 20s``), and ``ca retire`` as
  soon as no certificate of the old root can still be valid.

Passes when not one request failed, and no certificate was ever presented after its end:
every request's client certificate (the backend sees its hash in X-Forwarded-Client-Cert)
is looked up in the CA's audit log and its ``not_after`` compared with the time of the
request; the proxy refused no handshake as expired and closed no session for expiry or
a removed CA; the server certificate (verified by the clients) never failed them either.

``MTLSPROXY_WEEK_SECONDS`` shortens or lengthens the run (default 300). The figures are
printed at the end (``pytest -s tests/test_week.py``) and written to ``week.json`` in the
test's folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from proxy_env import route, start_backend, start_proxy, write_config
from support import MTLSPROXY, Pair, fetch_metrics, metric_sum

from mtlsproxy import client
from mtlsproxy.address import Address
from mtlsproxy.pki import CertificateAuthority
from mtlsproxy.pki.lifecycle import read_audit
from mtlsproxy.pki.service import RenewalService, ServiceSettings

SECONDS = float(os.environ.get("MTLSPROXY_WEEK_SECONDS", "300"))
TTL = timedelta(seconds=60)


class RequestLoop(threading.Thread):
    """GET / at a steady pace; records (time, client certificate hash) or the failure."""

    def __init__(self, name: str, url: str, pair: Pair, trust: Path) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.pair, self.trust = url, pair, trust
        self.stop = threading.Event()
        self.seen: list[tuple[float, str]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        session = client.requests_session(self.pair.crt, self.pair.key, self.trust)
        while not self.stop.is_set():
            sent = time.time()
            try:
                answer = session.get(self.url, timeout=10)
                if answer.status_code != 200:
                    self.failures.append(f"{sent:.3f} status {answer.status_code}: {answer.text}")
                else:
                    xfcc = answer.json()["headers"]["x-forwarded-client-cert"][0]
                    self.seen.append((sent, xfcc.split(";", 1)[0].removeprefix("Hash=")))
            except Exception as exc:  # every kind of failure counts
                self.failures.append(f"{sent:.3f} {exc!r}")
            self.stop.wait(0.05)
        session.close()


@pytest.mark.timeout(SECONDS + 240)
async def test_a_compressed_week_of_rotations_fails_no_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", name="week")
    bundle = ca.folder / "ca.crt"
    server = Pair(*ca.issue(kind="server", name="localhost", dns=["localhost"],
                            ips=["127.0.0.1"], ttl=TTL).write(tmp_path / "server"))  # fmt: skip
    clients = {}
    for name in ("player-1", "player-2"):
        pair = Pair(*ca.issue(kind="client", name=name, ttl=TTL).write(tmp_path / name))
        trust = tmp_path / f"{name}-trust.crt"
        trust.write_bytes(bundle.read_bytes())
        clients[name] = (pair, trust)

    settings = ServiceSettings(folder=ca.folder, listen=Address("127.0.0.1", 0), ttl=TTL,
                               min_interval=timedelta(seconds=5))  # fmt: skip
    service_address = await nursery.start(RenewalService(settings).serve)
    service_url = f"https://localhost:{service_address.port}"
    backend = await start_backend(nursery)
    config = write_config(
        tmp_path, ca_bundle=bundle, server=server, routes=route([backend]),
        tls='reload_interval = "500ms"\nenforce_interval = "500ms"',
        top='[log]\naccess = "off"\n',
    )  # fmt: skip
    proxy, port, admin_port = await start_proxy(nursery, config)

    logs = tmp_path / "logs"
    logs.mkdir()
    commands = {
        "server": [*MTLSPROXY, "ca", "renew", "--dir", str(ca.folder), "--cert",
                   str(tmp_path / "server"), "--watch"],
        **{name: [*MTLSPROXY, "client", "renew", "--url", service_url, "--ca", str(trust),
                  "--cert", str(tmp_path / name), "--watch"]
           for name, (_, trust) in clients.items()},
    }  # fmt: skip
    renewers = []
    for name, command in commands.items():
        with (logs / f"renew-{name}.log").open("w") as log:  # the child keeps its own copy
            renewers.append(subprocess.Popen(command, stderr=log))
    loops = [
        RequestLoop(name, f"https://localhost:{port}/", pair, trust)
        for name, (pair, trust) in clients.items()
    ]
    for loop in loops:
        loop.start()

    started = time.monotonic()
    rotated_at = retired_at = None
    try:
        await trio.sleep(SECONDS / 3)
        rotation = await trio.run_process(
            [*MTLSPROXY, "ca", "rotate", "--dir", str(ca.folder), "--grace", "20s"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert rotation.returncode == 0, rotation.stderr
        rotated_at = time.monotonic() - started
        while (left := SECONDS - (time.monotonic() - started)) > 0:
            await trio.sleep(min(5, left))
            if retired_at is None:
                retire = await trio.run_process(
                    [*MTLSPROXY, "ca", "retire", "--dir", str(ca.folder)],
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
                if retire.returncode == 0:
                    retired_at = time.monotonic() - started
    finally:
        for loop in loops:
            loop.stop.set()
        for renewer in renewers:
            renewer.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(lambda: [r.wait(timeout=15) for r in renewers])
        await trio.to_thread.run_sync(lambda: [loop.join(timeout=15) for loop in loops])

    audit = read_audit(ca.folder)
    assert audit is not None
    not_after = {r.fingerprint.removeprefix("sha256:"): datetime.fromisoformat(r.not_after)
                 for r in audit}  # fmt: skip
    late = [
        (loop.name, sent, digest)
        for loop in loops
        for sent, digest in loop.seen
        if digest not in not_after or datetime.fromtimestamp(sent, UTC) >= not_after[digest]
    ]
    m = await trio.to_thread.run_sync(fetch_metrics, admin_port)
    renewals = {name: sum(1 for r in audit if r.by == "renewal service"
                          and r.subject == f"CN={name}") for name in clients}  # fmt: skip
    server_renewals = sum(1 for r in audit if r.by == "ca renew")
    figures = {
        "seconds": round(time.monotonic() - started, 1),
        "requests": {loop.name: len(loop.seen) for loop in loops},
        "failed": {loop.name: len(loop.failures) for loop in loops},
        "client_renewals": renewals,
        "server_renewals": server_renewals,
        "distinct_client_certificates_seen": len({d for loop in loops for _, d in loop.seen}),
        "rotated_at_s": rotated_at,
        "retired_at_s": retired_at,
        "expired_at_use": len(late),
        "proxy_reloads_swapped": metric_sum(m, "mtlsproxy_reloads_total", result="swapped"),
        "handshakes_ok": metric_sum(m, "mtlsproxy_handshakes_total", result="ok"),
        "handshakes_refused": metric_sum(m, "mtlsproxy_handshakes_total")
        - metric_sum(m, "mtlsproxy_handshakes_total", result="ok"),
        "sessions_closed": {
            r: metric_sum(m, "mtlsproxy_sessions_closed_total", reason=r)
            for r in ("expired", "denied", "ca_removed")
        },
    }
    (tmp_path / "week.json").write_text(json.dumps(figures, indent=2))
    print("\nsimulated week:", json.dumps(figures, indent=2))
    for loop in loops:
        assert loop.failures == [], (loop.name, loop.failures[:5], figures)
    assert late == [], late[:5]
    assert retired_at is not None, "the old root was never retired"
    assert figures["handshakes_refused"] == 0, figures
    assert figures["sessions_closed"] == {"expired": 0, "denied": 0, "ca_removed": 0}
    for name, count in renewals.items():
        assert count >= SECONDS / 60, (name, count)  # renewed well within every lifetime
    assert server_renewals >= SECONDS / 60
    assert all(n > SECONDS * 10 for n in figures["requests"].values())  # ~20/s each
    # The proxy ends on a server certificate from the new root.
    served = CertificateAuthority.load(ca.folder)
    assert proxy.store.current().credentials.cert_chain[1].issuer == served.root.subject
