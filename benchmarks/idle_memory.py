"""Memory per idle mutual-TLS connection: mtlsproxy (and nginx, when it is installed).

    .venv/bin/python benchmarks/idle_memory.py [--connections 2000] [--rounds 3] [--no-nginx]

Starts the proxy (and nginx) on 127.0.0.1 with certificates from the project's own CA,
opens N client connections that complete the mTLS handshake and one request, then sit
idle, and reads the server's resident memory (VmRSS, every process of it) before and
after. The figure is the growth divided by N, the median over the rounds. The clients
run in this process (their memory is not counted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtlsproxy.pki import CertificateAuthority

HERE = Path(__file__).resolve().parent


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children, in KiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def open_idle(port: int, ctx: ssl.SSLContext, n: int) -> list[ssl.SSLSocket]:
    conns = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536)
        conns.append(tls)
    return conns


def measure(pid: int, port: int, ctx: ssl.SSLContext, n: int) -> float:
    # One connection first: lazily built state (contexts, caches) is not per connection.
    warm = open_idle(port, ctx, 10)
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = open_idle(port, ctx, n)
    time.sleep(1.0)
    after = rss_kib(pid)
    for c in conns + warm:
        c.close()
    return (after - before) / n


NGINX = """
worker_processes 1;
error_log {work}/logs/error.log;
pid {work}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {work}/server.crt;
    ssl_certificate_key {work}/server.key;
    ssl_client_certificate {work}/ca/ca.crt;
    ssl_verify_client on;
    location / {{
      proxy_pass http://127.0.0.1:{backend};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-nginx", action="store_true", help="measure mtlsproxy alone")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="idle-memory-"))
    ca = CertificateAuthority.init(work / "ca", name="bench")
    ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"]).write(
        work / "server"
    )
    ca.issue(kind="client", name="bench").write(work / "client")
    ctx = ssl.create_default_context(cafile=str(work / "ca" / "ca.crt"))
    ctx.load_cert_chain(work / "client.crt", work / "client.key")

    backend_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    (work / "mtlsproxy.toml").write_text(f"""
[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca/ca.crt"
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
access = "off"
[[listeners]]
listen = "127.0.0.1:{proxy_port}"
idle_timeout = "10m"
[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{backend_port}"]
""")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mtlsproxy",
                "demo-backend",
                "--http-port",
                str(backend_port),
                "--tcp-port",
                str(free_port()),
                "--ws-port",
                str(free_port()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    results: dict[str, list[float]] = {"mtlsproxy": [], "nginx": []}
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    nginx_port = free_port()
    if args.no_nginx:
        nginx = None
    if nginx:
        (work / "logs").mkdir()
        (work / "nginx.conf").write_text(
            NGINX.format(work=work, port=nginx_port, backend=backend_port)
        )
    servers = {
        "mtlsproxy": ([sys.executable, "-m", "mtlsproxy", "serve", "--config",
                       str(work / "mtlsproxy.toml")], proxy_port),
    }  # fmt: skip
    if nginx:
        servers["nginx"] = ([nginx, "-c", str(work / "nginx.conf"), "-p", str(work),
                             "-g", "daemon off;"], nginx_port)  # fmt: skip
    try:
        wait_port(backend_port)
        for _ in range(args.rounds):
            for name, (argv, port) in servers.items():
                # A fresh process each round: a process that held connections before
                # reuses the memory they freed, and would look cheaper than it is.
                server = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                try:
                    wait_port(port)
                    results[name].append(measure(server.pid, port, ctx, args.connections))
                finally:
                    server.terminate()
                    server.wait(timeout=20)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({k: statistics.median(v) for k, v in results.items() if v}))
        return 0
    for name, values in results.items():
        if values:
            print(
                f"{name}: {statistics.median(values):.1f} KiB per idle connection "
                f"(median of {len(values)}; rounds: {', '.join(f'{v:.1f}' for v in values)})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
