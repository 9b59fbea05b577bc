"""Per-connection set-up cost of the proxy: resumed (or full) handshakes through a listener.

The proxy runs in this process (one trio loop, pinned to one core) with one listener and
the access log off; a plain-HTTP nginx answers behind it and benchmarks/loadgen drives it
from another core (``--mode resumed``: each slot resumes its previous session, so the TLS
work is small and the Python set-up per connection shows). Reports connections/s and this
process's CPU µs per connection (getrusage over loadgen's window), median of ``--runs``;
``--profile FILE`` writes a cProfile of one more run instead.

    .venv/bin/python benchmarks/conn_setup.py [--mode resumed] [--runs 5] [--mode-listener tcp]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from mtlsproxy import config  # noqa: E402
from mtlsproxy.pki import CertificateAuthority  # noqa: E402
from mtlsproxy.server.proxy import Proxy  # noqa: E402

LOADGEN = HERE / "loadgen" / "loadgen"

# The same nginx backend as make bench's (its "/" answers "ok" at once).
from bench import NGINX_BACKEND  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    work: Path, args: argparse.Namespace, backend: int, profile: cProfile.Profile | None
) -> list[tuple[float, float]]:
    listener = (
        f'mode = "tcp"\nbackends = ["127.0.0.1:{backend}"]'
        if args.listener == "tcp"
        else f'mode = "http"\n[[listeners.routes]]\npath_prefix = "/"\nbackends = ["127.0.0.1:{backend}"]'
    )
    path = work / "proxy.toml"
    path.write_text(f"""
[tls]
cert = "{work}/server.crt"
key = "{work}/server.key"
client_ca = "{work}/ca/ca.crt"

[admin]
listen = "127.0.0.1:0"

[log]
access = "off"

[[listeners]]
listen = "127.0.0.1:0"
{listener}
""")
    proxy = Proxy(config.load(path), str(path))
    results = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(proxy.run)
        port = bound[0].address.port
        command = [
            "taskset", "-c", args.load_core, str(LOADGEN),
            "--connect", f"127.0.0.1:{port}", "--sni", "localhost",
            "--ca", str(work / "ca" / "ca.crt"), "--cert", str(work / "client.crt"),
            "--key", str(work / "client.key"), "--mode", args.mode,
            "--concurrency", str(args.concurrency), "--duration", str(args.duration),
            "--warmup", "0",
        ]  # fmt: skip
        if args.mode == "upload":  # as make bench's upload row: 1 MiB bodies
            command += ["--body-size", str(2**20), "--path", "/upload"]
        runs = 1 if profile else args.runs
        for _ in range(runs + 1):  # the first is a warm-up
            started = cpu()
            if profile:
                profile.enable()
            done = await trio.run_process(command, capture_stdout=True, check=True)
            if profile:
                profile.disable()
            used = cpu() - started
            out = json.loads(done.stdout)
            assert not out["errors"], out
            results.append((out["rate"], used / out["ops"] * 1e6))
        nursery.cancel_scope.cancel()
    return results[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode", default="resumed", choices=["resumed", "full", "keepalive", "upload"]
    )
    parser.add_argument("--listener", default="http", choices=["http", "tcp"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--core", default="0")
    parser.add_argument("--load-core", default="1")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    if not LOADGEN.exists():
        sys.exit("loadgen is not built: make -C benchmarks/loadgen")
    os.sched_setaffinity(0, {int(args.core)})
    with tempfile.TemporaryDirectory(prefix="conn-setup-") as tmp:
        work = Path(tmp)
        ca = CertificateAuthority.init(work / "ca", name="bench")
        ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"]).write(
            work / "server"
        )
        ca.issue(kind="client", name="bench-client").write(work / "client")
        (work / "backend-tmp").mkdir()
        backend = free_port()
        (work / "backend.conf").write_text(
            NGINX_BACKEND.format(work=work, backend=backend, backend_sink=free_port())
        )
        nginx = subprocess.Popen(
            ["taskset", "-c", args.load_core, "nginx", "-c", str(work / "backend.conf"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", backend), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            profile = cProfile.Profile() if args.profile else None
            results = trio.run(measure, work, args, backend, profile)
        finally:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(timeout=10)
    if profile and args.profile:
        profile.dump_stats(str(args.profile))
    rates = [r for r, _ in results]
    cpus = [c for _, c in results]
    print(
        f"{args.mode} via {args.listener} listener: median {statistics.median(rates):,.0f} "
        f"conn/s, {statistics.median(cpus):,.0f} µs proxy CPU per connection "
        f"(runs: {', '.join(f'{r:,.0f}/s {c:,.0f} µs' for r, c in results)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
