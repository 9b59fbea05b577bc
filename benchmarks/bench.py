"""`make bench`: mtlsproxy and nginx side by side on this machine, in one run, with the floor.

Method (benchmarks/README.md says why):

- Same certificates (made by the project's CA), same backend (a plain-HTTP nginx that
  answers 200), same TLS versions and ticket setting (TLS 1.3, OpenSSL's default of two
  session tickets, resumption on), one worker each unless stated.
- The system under test runs on core 0; the load generator (benchmarks/loadgen, C on
  libssl) and the backend on core 1. Server CPU per operation comes from /proc (user +
  system time of every process of the system under test) over the measured window.
- The floor (benchmarks/bare_relay.py: a bare mTLS relay on trio and mtlsproxy's own
  TLSStream, no product around it) runs as a third system in the full, resumed and
  keep-alive scenarios (not in h2: it speaks HTTP/1.1 only), pinned and measured as
  mtlsproxy is: mtlsproxy/floor says how far the proxy is from what its stack allows.
  `--no-floor` leaves it out.
- HTTP/2 (the h2 and h2_p99 scenarios): nginx's second server block, the same settings with
  `listen ... ssl http2`, against mtlsproxy's http listener, which offers h2 by default;
  both relay to the same HTTP/1.1 backend.
- Systems are interleaved (nginx, mtlsproxy, floor, nginx, mtlsproxy, floor, ...) for
  every scenario and round, so a noisy neighbour hits all alike. Reported: the median and
  min-max of each, the ratios to nginx (and mtlsproxy/floor) of every round and their
  medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mtlsproxy.pki import CertificateAuthority

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen" / "loadgen"
WSECHO = HERE / "loadgen" / "wsecho"
SERVER_CORE, LOAD_CORE = "0", "1"
BACKEND_PORT, NGINX_PORT, PROXY_PORT, PROXY2_PORT = 18080, 18443, 18444, 18445
FLOOR_PORT = 18446
NGINX_H2_PORT = 18447  # nginx's `listen ... ssl http2` server (mtlsproxy offers h2 on its port)
FLOOR = "floor"  # the system name of benchmarks/bare_relay.py in results
WS_BACKEND_PORT = 18082
ADMIN_PORT, ADMIN2_PORT = 18901, 18902
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    unit: str
    metric: str  # key in loadgen's JSON
    args: tuple[str, ...]
    higher_is_better: bool = True
    floor: bool = False  # the bare relay runs it too (it relays plain requests, no more)
    h2: bool = False  # against the systems' HTTP/2 ports (System.h2_port)


SCENARIOS = (
    Scenario("full", "full mTLS handshakes/s (new connection, one request)", "conn/s", "rate",
             ("--mode", "full", "--concurrency", "32"), floor=True),
    Scenario("resumed", "resumed handshakes/s", "conn/s", "rate",
             ("--mode", "resumed", "--concurrency", "32"), floor=True),
    Scenario("latency_p50", "handshake+request latency p50 at 200 conn/s", "ms", "p50",
             ("--mode", "latency", "--rate", "200"), higher_is_better=False),
    Scenario("latency_p99", "handshake+request latency p99 at 200 conn/s", "ms", "p99",
             ("--mode", "latency", "--rate", "200"), higher_is_better=False),
    Scenario("keepalive", "keep-alive requests/s (32 connections)", "req/s", "rate",
             ("--mode", "keepalive", "--concurrency", "32"), floor=True),
    Scenario("keepalive_p99", "keep-alive request latency p99", "ms", "p99",
             ("--mode", "keepalive", "--concurrency", "32"), higher_is_better=False, floor=True),
    Scenario("h2", "HTTP/2 requests/s (32 connections, one stream at a time)", "req/s", "rate",
             ("--mode", "h2", "--concurrency", "32"), h2=True),
    Scenario("h2_p99", "HTTP/2 request latency p99", "ms", "p99",
             ("--mode", "h2", "--concurrency", "32"), higher_is_better=False, h2=True),
    Scenario("upload", "1 MiB upload throughput (4 connections)", "MiB/s", "mib_per_s",
             ("--mode", "upload", "--concurrency", "4", "--body-size", str(2**20), "--path", "/upload")),
    Scenario("websocket", "WebSocket messages/s (32 connections, 64-byte echo)", "msg/s", "rate",
             ("--mode", "websocket", "--concurrency", "32", "--path", "/ws")),
    Scenario("websocket_p99", "WebSocket message round trip p99", "ms", "p99",
             ("--mode", "websocket", "--concurrency", "32", "--path", "/ws"), higher_is_better=False),
)  # fmt: skip


@dataclass
class System:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)
    h2_port: int = 0  # where it speaks HTTP/2 (ALPN h2), if not on `port`

    def port_for(self, scenario: Scenario) -> int:
        return self.h2_port if scenario.h2 and self.h2_port else self.port


@dataclass
class Run:
    scenario: str
    system: str
    round: int
    value: float
    ops: int
    errors: int
    seconds: float
    server_cpu_us_per_op: float
    client_cpu_fraction: float
    raw: dict[str, object]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workers2", action="store_true", help="also measure workers = 2")
    parser.add_argument(
        "--no-floor", action="store_true", help="leave out the floor (benchmarks/bare_relay.py)"
    )
    parser.add_argument(
        "--floor-mode",
        choices=("min", "httptools", "h11"),
        default="httptools",
        help="how the floor frames HTTP (bare_relay.py --mode; default %(default)s)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="redo table and plot from latest.json"
    )
    args = parser.parse_args()
    if args.replot:
        document = json.loads((args.out / "latest.json").read_text())
        text = markdown(
            document["summary"], document["rotation"], document["machine"], document["date"]
        )
        (args.out / "latest.md").write_text(text)
        plot(document["summary"], args.out / "latest.png")
        return 0
    if not LOADGEN.exists() or not WSECHO.exists():
        sys.exit("loadgen is not built: run `make bench` (it builds benchmarks/loadgen)")
    floor_scenarios = [s for s in SCENARIOS if s.floor and (not args.only or s.name in args.only)]
    if args.no_floor or not floor_scenarios:
        args.floor_mode = None  # not started, and not named in the results
    floor_mode = args.floor_mode
    if floor_mode == "httptools" and importlib.util.find_spec("httptools") is None:
        sys.exit("the floor needs httptools: pip install -e '.[bench]' (or --floor-mode h11)")
    with tempfile.TemporaryDirectory(prefix="mtlsproxy-bench-") as tmp:
        work = Path(tmp)
        certs = make_certificates(work)
        with running(work, certs, args.workers2, floor_mode) as systems:
            runs = measure(systems, certs, args)
            rotation = rotation_row(systems, certs, work, args.duration)
    write_results(runs, rotation, args)
    return 0


# ---- set-up --------------------------------------------------------------------------


def make_certificates(work: Path) -> dict[str, Path]:
    ca = CertificateAuthority.init(work / "ca", name="bench")
    ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"]).write(
        work / "server"
    )
    ca.issue(kind="client", name="bench-client").write(work / "client")
    return {
        "ca": work / "ca" / "ca.crt",
        "server_crt": work / "server.crt",
        "server_key": work / "server.key",
        "client_crt": work / "client.crt",
        "client_key": work / "client.key",
        "ca_dir": work / "ca",
    }


NGINX_BACKEND = """
worker_processes 1;
pid {work}/backend.pid;
error_log {work}/backend-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/backend-tmp;
    server {{
        listen 127.0.0.1:{backend};
        keepalive_requests 10000000;
        client_max_body_size 0;
        location / {{ return 200 "ok\\n"; }}
        # Uploads: read the whole body first (request buffering, as an application
        # would), then answer. A bare `return` answers before the body is read, which
        # tests early-answer handling rather than throughput.
        location /upload {{
            client_body_buffer_size 2m;
            proxy_pass http://127.0.0.1:{backend_sink};
        }}
    }}
    server {{
        listen 127.0.0.1:{backend_sink};
        keepalive_requests 10000000;
        client_max_body_size 0;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

NGINX_MTLS = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-proxy-tmp;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
{server}
    }}
    # The h2 scenario: the same server with HTTP/2 (ALPN h2, then http/1.1), as mtlsproxy's
    # http listener offers by default.
    server {{
        listen 127.0.0.1:{h2_port} ssl http2;
{server}
    }}
}}
"""

# The body of both of NGINX_MTLS's servers (formatted first, then put in as {server}).
NGINX_SERVER = """
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        keepalive_requests 10000000;
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-Client-Cert "Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location /ws {{
            proxy_pass http://127.0.0.1:{ws_backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Forwarded-Client-Cert "Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
            proxy_read_timeout 60s;
        }}
"""

PROXY_CONFIG = """
workers = {workers}
[tls]
cert = "{server_crt}"
key = "{server_key}"
client_ca = "{ca}"

[admin]
listen = "127.0.0.1:{admin}"

[log]
access = "off"  # as nginx's access_log off

[[listeners]]
listen = "127.0.0.1:{port}"
mode = "http"

[[listeners.routes]]
path_prefix = "/ws"
backends = ["127.0.0.1:{ws_backend}"]
websocket = true

[[listeners.routes]]
path_prefix = "/"
backends = ["127.0.0.1:{backend}"]
"""


@contextmanager
def running(
    work: Path, certs: dict[str, Path], workers2: bool, floor_mode: str | None
) -> Iterator[list[System]]:
    procs: list[subprocess.Popen[bytes]] = []
    fill = {k: str(v) for k, v in certs.items()} | {
        "work": str(work),
        "backend": BACKEND_PORT,
        "backend_sink": BACKEND_PORT + 1,
        "ws_backend": WS_BACKEND_PORT,
    }
    for d in ("backend-tmp", "nginx-tmp", "nginx-proxy-tmp"):
        (work / d).mkdir()
    try:
        (work / "backend.conf").write_text(NGINX_BACKEND.format(**fill))
        procs.append(
            _spawn(LOAD_CORE, ["nginx", "-c", str(work / "backend.conf"), "-g", "daemon off;"])
        )
        procs.append(_spawn(LOAD_CORE, [str(WSECHO), str(WS_BACKEND_PORT)]))
        server = NGINX_SERVER.format(**fill).strip("\n")
        (work / "nginx.conf").write_text(
            NGINX_MTLS.format(port=NGINX_PORT, h2_port=NGINX_H2_PORT, server=server, **fill)
        )
        nginx = _spawn(SERVER_CORE, ["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
        procs.append(nginx)
        systems = [System("nginx", NGINX_PORT, [nginx.pid], h2_port=NGINX_H2_PORT)]
        variants = [("mtlsproxy", PROXY_PORT, ADMIN_PORT, 1)]
        if workers2:
            variants.append(("mtlsproxy-2w", PROXY2_PORT, ADMIN2_PORT, 2))
        for name, port, admin, workers in variants:
            config = work / f"{name}.toml"
            config.write_text(PROXY_CONFIG.format(port=port, admin=admin, workers=workers, **fill))
            cores = SERVER_CORE if workers == 1 else f"{SERVER_CORE},{LOAD_CORE}"
            proc = _spawn(cores, [sys.executable, "-m", "mtlsproxy", "serve", "--config", str(config),
                                  "--log-level", "warning"])  # fmt: skip
            procs.append(proc)
            systems.append(System(name, port, [proc.pid]))
        if floor_mode is not None:  # on the proxy's core, to the same backend
            proc = _spawn(SERVER_CORE, [
                sys.executable, str(HERE / "bare_relay.py"), "--mode", floor_mode,
                "--listen", f"127.0.0.1:{FLOOR_PORT}", "--upstream", f"127.0.0.1:{BACKEND_PORT}",
                "--cert", fill["server_crt"], "--key", fill["server_key"], "--client-ca", fill["ca"],
            ])  # fmt: skip
            procs.append(proc)
            systems.append(System(FLOOR, FLOOR_PORT, [proc.pid]))
        for system in systems:
            _wait_port(system.port)
        _wait_port(NGINX_H2_PORT)
        _wait_port(BACKEND_PORT)
        _wait_port(WS_BACKEND_PORT)
        yield systems
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _spawn(cores: str, command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", cores, *command], stdout=subprocess.DEVNULL)


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
        else:
            return
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after 30 s")


# ---- measuring -----------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process and every process below it, in clock ticks."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pending += [int(c) for c in children]
    return total


def loadgen(
    system: System,
    certs: dict[str, Path],
    args: tuple[str, ...],
    duration: float,
    port: int | None = None,
) -> dict[str, object]:
    command = [
        "taskset", "-c", LOAD_CORE, str(LOADGEN),
        "--connect", f"127.0.0.1:{port or system.port}", "--sni", "localhost",
        "--ca", str(certs["ca"]), "--cert", str(certs["client_crt"]), "--key", str(certs["client_key"]),
        "--duration", str(duration), "--warmup", "1", *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"loadgen failed against {system.name}: {done.stderr.strip()}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def measure(systems: list[System], certs: dict[str, Path], args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    done_args: dict[tuple[tuple[str, ...], str, int], tuple[dict[str, object], float]] = {}
    for scenario in scenarios:
        for round_ in range(1, args.rounds + 1):
            for system in systems:
                if system.name == FLOOR and not scenario.floor:
                    continue
                key = (scenario.args, system.name, round_)
                if key not in done_args:  # p50 and p99 rows share one loadgen run
                    before = sum(cpu_ticks(p) for p in system.pids)
                    result = loadgen(
                        system, certs, scenario.args, args.duration, system.port_for(scenario)
                    )
                    after = sum(cpu_ticks(p) for p in system.pids)
                    done_args[key] = (result, (after - before) / TICKS)
                result, server_cpu = done_args[key]
                runs.append(_run(scenario, system, round_, result, server_cpu))
                print(f"{scenario.name:14} round {round_} {system.name:13} {runs[-1].value:10.1f} "
                      f"{scenario.unit:7} errors={runs[-1].errors}", flush=True)  # fmt: skip
    return runs


def _run(
    scenario: Scenario, system: System, round_: int, result: dict[str, object], cpu: float
) -> Run:
    ops = int(result["ops"])  # type: ignore[call-overload]
    seconds = float(result["seconds"])  # type: ignore[arg-type]
    if scenario.metric in ("p50", "p99"):
        latencies: dict[str, float] = result["latency_us"]  # type: ignore[assignment]
        value = latencies[scenario.metric] / 1000
    else:
        value = float(result[scenario.metric])  # type: ignore[arg-type]
    # Server CPU over the warm-up too: loadgen's window excludes it, so scale by the
    # share of the run that was measured (warm-up is 1 s).
    measured_share = seconds / (seconds + 1.0)
    return Run(
        scenario=scenario.name,
        system=system.name,
        round=round_,
        value=value,
        ops=ops,
        errors=int(result["errors"]),  # type: ignore[call-overload]
        seconds=seconds,
        server_cpu_us_per_op=cpu * measured_share / ops * 1e6 if ops else 0.0,
        client_cpu_fraction=float(result.get("client_cpu_s", 0.0)) / seconds if seconds else 0.0,  # type: ignore[arg-type]
        raw=result,
    )


def rotation_row(
    systems: list[System], certs: dict[str, Path], work: Path, duration: float
) -> dict[str, object]:
    """Keep-alive load and full handshakes during 50 reloads, against the same without."""
    proxy = next(s for s in systems if s.name == "mtlsproxy")
    ca = CertificateAuthority.load(certs["ca_dir"])
    stop = threading.Event()
    reloads = {"swapped": 0, "unchanged": 0, "failed": 0}

    def rotate() -> None:
        while not stop.is_set() and reloads["swapped"] + reloads["unchanged"] < 50:
            issued = ca.issue(kind="server", name="localhost", dns=["localhost"], ips=["127.0.0.1"])
            issued.write(work / "server")
            request = urllib.request.Request(f"http://127.0.0.1:{ADMIN_PORT}/reload", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
                    outcome = json.load(answer)["result"]  # "unchanged": the poll was first
            except OSError:
                outcome = "failed"
            reloads[outcome] = reloads.get(outcome, 0) + 1
            time.sleep(duration / 80)

    row: dict[str, object] = {}
    for mode in ("keepalive", "full"):
        scenario = next(s for s in SCENARIOS if s.name == mode)
        baseline = loadgen(proxy, certs, scenario.args, duration)
        reloads.update(swapped=0, unchanged=0, failed=0)
        stop.clear()
        rotator = threading.Thread(target=rotate)
        rotator.start()
        during = loadgen(proxy, certs, scenario.args, duration * 2)  # room for all 50
        stop.set()
        rotator.join(timeout=30)
        row[mode] = {
            "rate_without": baseline["rate"],
            "rate_during": during["rate"],
            "errors_during": during["errors"],
            "reloads": dict(reloads),
        }
        print(f"rotation {mode}: {during['rate']:.0f}/s during {reloads} reloads "
              f"vs {baseline['rate']:.0f}/s without; errors {during['errors']}")  # fmt: skip
    return row


# ---- reporting -----------------------------------------------------------------------


def write_results(runs: list[Run], rotation: dict[str, object], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    machine = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": os.uname().release,
        "nginx": subprocess.run(
            ["nginx", "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "floor_mode": args.floor_mode,
    }
    summary = summarize(runs)
    document = {"date": stamp, "machine": machine, "summary": summary, "rotation": rotation,
                "runs": [asdict(r) for r in runs]}  # fmt: skip
    (args.out / "latest.json").write_text(json.dumps(document, indent=2, default=str))
    (args.out / "latest.md").write_text(markdown(summary, rotation, machine, stamp))
    plot(summary, args.out / "latest.png")
    print((args.out / "latest.md").read_text())


def system_order(name: str) -> tuple[bool, bool, str]:
    """nginx first, the floor last, mtlsproxy and its variants between."""
    return (name == FLOOR, name != "nginx", name)


def summarize(runs: list[Run]) -> list[dict[str, object]]:
    """Per scenario: each system's figures, then the ratios of every round and their median:
    each system to nginx, and mtlsproxy to the floor (how far from the stack's limit)."""
    rows = []
    for scenario in SCENARIOS:
        mine = [r for r in runs if r.scenario == scenario.name]
        if not mine:
            continue
        row: dict[str, object] = {
            "scenario": scenario.name,
            "title": scenario.title,
            "unit": scenario.unit,
        }
        systems = sorted({r.system for r in mine}, key=system_order)
        for system in systems:
            values = [r.value for r in mine if r.system == system]
            cpu = [r.server_cpu_us_per_op for r in mine if r.system == system]
            row[system] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "cpu_us_per_op": statistics.median(cpu),
                "errors": sum(r.errors for r in mine if r.system == system),
                "client_cpu_fraction": statistics.median(
                    r.client_cpu_fraction for r in mine if r.system == system
                ),
            }
        pairs = [(system, "nginx") for system in systems if system != "nginx"]
        if FLOOR in systems and "mtlsproxy" in systems:
            pairs.append(("mtlsproxy", FLOOR))
        for system, base_system in pairs:
            ratios = []
            for round_ in sorted({r.round for r in mine}):
                base = next(r.value for r in mine if r.system == base_system and r.round == round_)
                value = next(r.value for r in mine if r.system == system and r.round == round_)
                ratios.append(value / base if base else 0.0)
            row[f"{system}/{base_system}"] = {
                "per_round": ratios,
                "median": statistics.median(ratios),
            }
        rows.append(row)
    return rows


def markdown(
    summary: list[dict[str, object]],
    rotation: dict[str, object],
    machine: dict[str, object],
    stamp: str,
) -> str:
    # Columns over all rows: the floor runs in some scenarios only ("-" in the others).
    keys = list(dict.fromkeys(k for row in summary for k in row))
    figures = [k for k in keys if all(isinstance(row.get(k, {}), dict) for row in summary)]
    systems = sorted((k for k in figures if "/" not in k), key=system_order)
    ratios = [k for k in figures if "/" in k]
    ratios.sort(key=lambda k: (not k.endswith("/nginx"), system_order(k.split("/")[0])))
    floor_mode = machine.get("floor_mode")
    floor_note = (
        f" floor = benchmarks/bare_relay.py --mode {floor_mode}, the same stack with nothing "
        "of the product (full, resumed and keep-alive rows only)."
        if floor_mode
        else ""
    )
    lines = [
        f"# mtlsproxy vs nginx, {stamp}",
        "",
        f"{machine['cpus']} cores ({machine['cpu_model']}), {machine['nginx']}; "
        f"{machine['rounds']} interleaved rounds of {machine['duration_s']} s; server on core 0, "
        "load generator and backend on core 1. Median (min-max); a ratio column: its median "
        f"(the ratio of every round).{floor_note}",
        "",
        "| metric | "
        + " | ".join(systems + ratios)
        + " | server CPU µs/op ("
        + ", ".join(systems)
        + ") |",
        "|---|" + "---|" * (len(systems) + len(ratios)) + "---|",
    ]
    for row in summary:
        cells = []
        for system in systems:
            s: dict[str, float] | None = row.get(system)  # type: ignore[assignment]
            cells.append(
                "-"
                if s is None
                else f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"
                + (f", {int(s['errors'])} errors" if s["errors"] else "")
            )
        for key in ratios:
            r: dict[str, object] | None = row.get(key)  # type: ignore[assignment]
            cells.append(
                "-"
                if r is None
                else f"{r['median']:.2f} ("
                + ", ".join(f"{x:.2f}" for x in r["per_round"])  # type: ignore[attr-defined]
                + ")"
            )
        cpu = ", ".join(
            f"{row[s]['cpu_us_per_op']:.0f}" if s in row else "-"  # type: ignore[index]
            for s in systems
        )
        lines.append(f"| {row['title']} ({row['unit']}) | " + " | ".join(cells) + f" | {cpu} |")
    lines += [
        "",
        "Rotation under load (mtlsproxy, 50 reloads with a new server certificate each):",
        "",
    ]
    for mode, data in rotation.items():
        d: dict[str, object] = data  # type: ignore[assignment]
        lines.append(f"- {mode}: {d['rate_during']:.0f}/s during the reloads vs {d['rate_without']:.0f}/s without; "
                     f"failed requests: {d['errors_during']}; reloads {d['reloads']}")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_keys = sorted(
        {k for row in summary for k in row if k.endswith("/nginx")},
        key=lambda k: system_order(k.split("/")[0]),
    )
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(ratio_keys))
    for i, key in enumerate(ratio_keys):
        xs, ys, lo, hi = [], [], [], []
        for j, row in enumerate(summary):
            data = row.get(key)
            if not isinstance(data, dict):
                continue
            per_round = data["per_round"]
            xs.append(j + i * width)
            ys.append(data["median"])
            lo.append(data["median"] - min(per_round))
            hi.append(max(per_round) - data["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=key)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # ratios from 0.04 to 25 on one chart
    ax.set_xticks([j + width * (len(ratio_keys) - 1) / 2 for j in range(len(summary))])
    ax.set_xticklabels([str(row["scenario"]) for row in summary], rotation=20)
    ax.set_ylabel("ratio to nginx, log scale (median, min-max over rounds)")
    ax.set_title("each system / nginx (above 1: more throughput, or more latency for latency rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
