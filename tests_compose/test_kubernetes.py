"""deploy/k8s/, run the way the manifests say, with Docker standing in for the kubelet.

No cluster here, so each container runs as its pod spec says: the manifest's image,
command and arguments, user and group, read-only root, dropped capabilities, CPU and
memory limits, and its volumes at their mount paths. Secrets and ConfigMaps are folders
laid out as the kubelet lays them out (files behind a `..data` symlink, swapped
atomically on update, with the Secret's mode and the pod's fsGroup), emptyDirs are
folders or tmpfs mounts. The API server is one endpoint on the host's loopback that does
what the job's one call asks (a PATCH of a Secret's data) to those folders; the job's
publish container reaches it through the host's network, with a service account mounted
where a pod has it.

The cycle: the operator's first steps (a CA, its Secret), the renewal CronJob issues the
server certificate, the proxy Deployment serves with it behind a backend named as in the
config, and a second run of the CronJob is picked up by the running proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_support import DEPLOY, sh, useful_line

from mtlsproxy.pki import CertificateAuthority

NETWORK = "mtlsproxy-e2e-k8s"
UID = 10001


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ("mtlsproxy.yaml", "renew-server.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


class Volume:
    """A Secret or ConfigMap as the kubelet mounts it: ``name -> ..data/name``, with
    ``..data`` a symlink to a timestamped folder, replaced in one rename on update."""

    def __init__(self, folder: Path, mode: int) -> None:
        self.folder, self.mode, self.version = folder, mode, 0
        folder.mkdir(parents=True)

    def write(self, files: dict[str, bytes]) -> None:
        self.version += 1
        data = self.folder / f"..2026_{self.version:04d}"
        data.mkdir(mode=0o755)
        for name, content in files.items():
            (data / name).write_bytes(content)
            os.chown(data / name, 0, UID)  # root-owned, group fsGroup
            (data / name).chmod(self.mode)
            if not (self.folder / name).is_symlink():
                (self.folder / name).symlink_to(f"..data/{name}")
        link = self.folder / "..data_tmp"
        link.symlink_to(data.name)
        link.rename(self.folder / "..data")


class SecretApi:
    """The API server's PATCH of a Secret (JSON merge patch of ``data``), applied to the
    folders standing in for the Secrets, over TLS with a certificate of ``pair``."""

    def __init__(self, secrets: dict[str, Volume], crt: Path, key: Path, token: str) -> None:
        self.calls: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = self.path.rsplit("/", 1)[-1]
                api.calls.append(self.path)
                ok = self.headers["Authorization"] == f"Bearer {token}" and name in secrets
                if ok:
                    volume = secrets[name]
                    current = {f.name: f.read_bytes() for f in volume.folder.iterdir()
                               if not f.name.startswith("..")}  # fmt: skip
                    current.update({k: base64.b64decode(v) for k, v in body["data"].items()})
                    volume.write(current)
                reply = json.dumps({"metadata": {"resourceVersion": "1"}} if ok else {}).encode()
                self.send_response(200 if ok else 403)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(crt, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def docker_args(spec: dict[str, Any], pod: dict[str, Any], host: dict[str, Path]) -> list[str]:
    """`docker run` options for a container of a pod spec: user, securityContext, limits,
    env and volumes (host: volume name -> the folder standing in for it)."""
    security = pod.get("securityContext", {})
    args = [
        "--user",
        f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}",
    ]
    if "fsGroup" in security:
        args += ["--group-add", str(security["fsGroup"])]
    context = spec.get("securityContext", {})
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    args += [f"--cap-drop={cap}" for cap in context.get("capabilities", {}).get("drop", [])]
    limits = spec.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        args += ["--cpus", str(limits["cpu"])]
    if "memory" in limits:
        args += ["--memory", limits["memory"].replace("Mi", "m")]
    for env in spec.get("env", []):
        args += ["-e", f"{env['name']}={env['value']}"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in spec["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume and mount["name"] not in host:
            args += ["--tmpfs", f"{mount['mountPath']}:mode=1777"]
        else:
            suffix = ":ro" if mount.get("readOnly") else ""
            args += ["-v", f"{host[mount['name']]}:{mount['mountPath']}{suffix}"]
    if "command" in spec:
        args += ["--entrypoint", spec["command"][0]]
    return args


def command_of(spec: dict[str, Any]) -> list[str]:
    return [*spec.get("command", [])[1:], *spec.get("args", [])]


@pytest.fixture
def cluster(image: str) -> Iterator[list[str]]:
    """A network for the pods, and whatever containers the test starts (removed after)."""
    sh("docker", "network", "rm", NETWORK, check=False)
    sh("docker", "network", "create", NETWORK)
    started: list[str] = []
    try:
        yield started
    finally:
        for name in started:
            sh("docker", "rm", "-f", name, check=False)
        sh("docker", "network", "rm", NETWORK, check=False)


def served_fingerprint(port: int, ca: Path, client: Path, server_name: str) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(client.with_suffix(".crt"), client.with_suffix(".key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(
            f"GET /k8s HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert "Hash=" in json.loads(body)["headers"]["x-forwarded-client-cert"][0]
        return hashlib.sha256(der).hexdigest()


def test_the_kubernetes_example_runs_as_its_manifests_say(
    image: str, cluster: list[str], tmp_path: Path
) -> None:
    docs = manifests()
    deployment = docs[("Deployment", "mtlsproxy")]["spec"]["template"]["spec"]
    job = docs[("CronJob", "mtlsproxy-renew-server")]["spec"]["jobTemplate"]["spec"]["template"]
    job = job["spec"]
    (issue,) = job["initContainers"]
    (publish,) = job["containers"]
    (proxy,) = deployment["containers"]
    # one image, under your registry's name; here the one built for the test runs
    assert proxy["image"] == issue["image"] == publish["image"]
    assert proxy["image"].endswith("/mtlsproxy:0.1.0")

    # The operator, once (deploy/README.md, "Kubernetes"): a CA; its issuing half as the
    # mtlsproxy-ca Secret, the root key kept back.
    ca = CertificateAuthority.init(tmp_path / "operator-ca", name="k8s-e2e")
    job_volumes = {v["name"]: v for v in job["volumes"]}
    ca_secret = Volume(tmp_path / "secret-ca", job_volumes["ca"]["secret"]["defaultMode"])
    ca_secret.write({n: (ca.folder / n).read_bytes() for n in ("ca.crt", "issuer.crt", "issuer.key", "root.crt")})  # fmt: skip
    work = tmp_path / "job-work"
    work.mkdir()
    os.chown(work, UID, UID)

    proxy_volumes = {v["name"]: v for v in deployment["volumes"]}
    tls = Volume(tmp_path / "secret-tls", proxy_volumes["tls"]["secret"]["defaultMode"])
    client_ca = Volume(
        tmp_path / "secret-client-ca", proxy_volumes["ca"]["secret"].get("defaultMode", 0o644)
    )
    config = Volume(tmp_path / "configmap-config", 0o644)
    deny = Volume(tmp_path / "configmap-deny", 0o644)
    for volume, name in ((config, "mtlsproxy-config"), (deny, "mtlsproxy-deny")):
        volume.write({k: v.encode() for k, v in docs[("ConfigMap", name)]["data"].items()})

    # The cluster: an API server and the job's service account, as a pod has it mounted.
    cluster_ca = CertificateAuthority.init(tmp_path / "cluster-ca", name="k8s-e2e-cluster")
    cluster_ca.issue(kind="server", name="kubernetes", ips=["127.0.0.1"]).write(
        tmp_path / "apiserver"
    )
    account = Volume(tmp_path / "serviceaccount", 0o644)
    account.write({"token": b"e2e-token", "namespace": b"mtlsproxy-ca",
                   "ca.crt": (cluster_ca.folder / "ca.crt").read_bytes()})  # fmt: skip
    tls.write({"tls.crt": b"", "tls.key": b""})  # created once by hand, empty until the job
    client_ca.write({"ca.crt": b""})
    api = SecretApi({"mtlsproxy-server-tls": tls, "mtlsproxy-client-ca": client_ca},
                    tmp_path / "apiserver.crt", tmp_path / "apiserver.key", "e2e-token")  # fmt: skip

    def run_the_cronjob() -> None:
        shutil.rmtree(work / "ca", ignore_errors=True)
        shutil.rmtree(work / "out", ignore_errors=True)
        done = sh("docker", "run", "--rm", "--network", NETWORK,
                  *docker_args(issue, job, {"ca": ca_secret.folder, "work": work}),
                  image, *command_of(issue))  # fmt: skip
        assert "issued a server certificate" in done.stdout, done.stdout
        published = sh("docker", "run", "--rm", "--network", "host",
                       "-e", "KUBERNETES_SERVICE_HOST=127.0.0.1", "-e", f"KUBERNETES_SERVICE_PORT={api.port}",
                       "-v", f"{account.folder}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                       *docker_args(publish, job, {"work": work}), image, *command_of(publish))  # fmt: skip
        assert published.stdout.count("published ") == 2, published.stdout + published.stderr

    run_the_cronjob()
    assert len(api.calls) == 2
    assert b"ENCRYPTED" not in (work / "out" / "tls.key").read_bytes()

    # The backend the config names (game-api:8080), and the Deployment's pod.
    sh("docker", "run", "-d", "--name", "mtlsproxy-e2e-game-api", "--network", NETWORK,
       "--network-alias", "game-api", "--user", str(UID), image, "demo-backend", "--host", "0.0.0.0")  # fmt: skip
    cluster.append("mtlsproxy-e2e-game-api")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = {"config": config.folder, "tls": tls.folder, "ca": client_ca.folder, "deny": deny.folder}
    sh("docker", "run", "-d", "--name", "mtlsproxy-e2e-pod", "--network", NETWORK,
       "-p", f"127.0.0.1:{port}:8443", *docker_args(proxy, deployment, host),
       image, *command_of(proxy))  # fmt: skip
    cluster.append("mtlsproxy-e2e-pod")

    probe_path = proxy["readinessProbe"]["httpGet"]["path"]
    ready = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901{probe_path}', timeout=2)"
    deadline = time.monotonic() + 90
    while sh("docker", "exec", "mtlsproxy-e2e-pod", "python3", "-c", ready, check=False).returncode:
        if time.monotonic() > deadline:
            logs = sh("docker", "logs", "--tail", "30", "mtlsproxy-e2e-pod", check=False)
            raise AssertionError(f"the pod is not ready after 90 s: {useful_line(logs.stderr)}\n{logs.stderr[-3000:]}")  # fmt: skip
        time.sleep(1)

    # workers = "auto" under limits.cpu, with a read-only root: the supervisor started
    # (its metrics folder in the /tmp emptyDir) with one worker per CPU of the limit.
    logs = sh("docker", "logs", "mtlsproxy-e2e-pod").stderr
    cpus = int(float(proxy["resources"]["limits"]["cpu"]))
    expected = min(cpus, len(os.sched_getaffinity(0)))
    if expected > 1:
        assert f"supervising {expected} workers" in logs, logs[-2000:]
    # and the quota, not the node, decides: one CPU allowed, one worker
    one = sh("docker", "run", "--rm", "--cpus", "1", "--entrypoint", "python3", image, "-c",
             "from mtlsproxy.server.workers import usable_cpus; print(usable_cpus())")  # fmt: skip
    assert one.stdout.strip() == "1"

    # A client of the same CA, through the pod, under the name the job certified.
    server_name = next(e["value"] for e in issue["env"] if e["name"] == "SERVER_NAME")
    ca.issue(kind="client", name="k8s-player").write(tmp_path / "player")
    trust = client_ca.folder / "ca.crt"  # the bundle the job published
    before = served_fingerprint(port, trust, tmp_path / "player", server_name)

    # The next run of the CronJob: the kubelet swaps the Secret; the pod serves the new one.
    run_the_cronjob()
    deadline = time.monotonic() + 60
    while (after := served_fingerprint(port, trust, tmp_path / "player", server_name)) == before:
        assert time.monotonic() < deadline, "the pod never served the renewed certificate"
        time.sleep(1)
    assert after != before
    assert "Traceback" not in sh("docker", "logs", "mtlsproxy-e2e-pod").stderr
