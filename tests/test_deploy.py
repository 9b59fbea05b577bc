"""deploy/: the compose file, the stack's proxy config and the Kubernetes example, read the
way their tools would read them (the stack itself runs in tests_compose/)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsproxy import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load_with_files(text: str, tmp_path: Path, prefix: str) -> config.Config:
    """Parse a config whose files live under ``prefix`` (a container path), after creating
    empty stand-ins for them under tmp_path."""
    local = text.replace(prefix, f"{tmp_path}/")
    for path in re.findall(rf'"({re.escape(str(tmp_path))}/[^"]+)"', local):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
    return config.parse(tomllib.loads(local), tmp_path / "mtlsproxy.toml")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def test_the_stack_has_its_services_and_publishes_only_the_proxy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"ca-init", "ca", "renew-server", "proxy", "backend", "loadgen"}
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"proxy"}
    assert services["loadgen"]["profiles"] == ["loadgen"]


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    proxy = services["proxy"]["depends_on"]
    assert proxy["ca-init"]["condition"] == "service_completed_successfully"
    assert proxy["backend"]["condition"] == "service_healthy"
    assert services["loadgen"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    for name in ("ca", "backend"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile


def test_only_the_ca_services_mount_the_ca_key(compose: dict[str, Any]) -> None:
    mounting = {
        name
        for name, s in compose["services"].items()
        if any(str(v).startswith("ca:") for v in s.get("volumes", []))
    }
    assert mounting == {"ca-init", "ca", "renew-server"}
    assert all(v.endswith(":ro") for v in compose["services"]["proxy"]["volumes"])


def test_the_image_runs_unprivileged_with_no_credentials() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile
    assert "ARG BASE=python:3.11-slim" in dockerfile
    assert not re.search(r"COPY .*\.(key|crt)\b", dockerfile)


def test_the_stack_proxy_config_loads(tmp_path: Path) -> None:
    cfg = load_with_files((DEPLOY / "proxy.toml").read_text(), tmp_path, "/var/lib/mtlsproxy/")
    assert [lst.listen.port for lst in cfg.listeners] == [8443, 8444]
    assert cfg.admin.listen.is_loopback


def test_the_kubernetes_example(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "mtlsproxy.yaml").read_text()))
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployment = by_kind[("Deployment", "mtlsproxy")]
    service = by_kind[("Service", "mtlsproxy")]
    config_map = by_kind[("ConfigMap", "mtlsproxy-config")]
    cfg = load_with_files(config_map["data"]["mtlsproxy.toml"], tmp_path, "/etc/mtlsproxy/")
    assert cfg.workers == "auto"

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["https"] == cfg.listeners[0].listen.port
    assert ports["admin"] == cfg.admin.listen.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
    # Secrets mounted read-only at the paths the config reads; no CA key anywhere.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    written = {name for name, m in mounts.items() if not m.get("readOnly")}
    assert written == {"tmp"} and "emptyDir" in volumes["tmp"]  # the workers' metrics
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # workers = "auto" follows the CPU limit, which must be there; the image is pinned
    assert float(container["resources"]["limits"]["cpu"]) >= 1
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    assert str(cfg.tls.cert).endswith("tls/tls.crt") and mounts["tls"]["mountPath"].endswith("/tls")
    text = (DEPLOY / "k8s" / "mtlsproxy.yaml").read_text()
    assert "issuer.key" not in text and "root.key" not in text
    # the Service passes TCP through to the pods' https port
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == "https" and svc_port["protocol"] == "TCP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # drains before the kubelet's SIGKILL
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_timeout.seconds


def test_the_admin_port_is_fenced_in_the_kubernetes_example() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "mtlsproxy.yaml").read_text()))
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    admin_rules = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 9901]
    assert admin_rules and all(r.get("from") for r in admin_rules)  # never open to all


def test_the_kubernetes_renewer_keeps_the_mounted_secrets_fresh_without_the_root_key() -> None:
    proxy_docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "mtlsproxy.yaml").read_text()))
    deployment = next(d for d in proxy_docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"mtlsproxy-server-tls", "mtlsproxy-client-ca"}

    text = (DEPLOY / "k8s" / "renew-server.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    by_kind = {d["kind"]: d for d in docs}
    assert "root.key" not in text  # the root stays offline
    job = by_kind["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    # every six hours, a certificate of 24: three failed runs before anything expires
    assert by_kind["CronJob"]["spec"]["schedule"].split()[1] == "*/6"
    (issue,) = job["initContainers"]
    env = {e["name"]: e["value"] for e in issue["env"]}
    assert env["SERVER_TTL"] == "24h"
    assert "mtlsproxy ca issue" in issue["args"][0] and "--out /work/out/tls" in issue["args"][0]
    (publish,) = job["containers"]
    script = publish["args"][0]
    for name in secrets:
        assert f'mtlsproxy ca publish-secret --namespace "$PROXY_NAMESPACE" {name}' in script
    assert publish["image"] == issue["image"]  # the project's image: no third-party one
    assert "tls.crt=/work/out/tls.crt" in script and "ca.crt=/work/out/ca.crt" in script
    # only the two Secrets, only updated; in the proxy's namespace, bound to the job's account
    (rule,) = by_kind["Role"]["rules"]
    assert set(rule["resourceNames"]) == secrets and set(rule["verbs"]) == {
        "get",
        "patch",
        "update",
    }
    subject = by_kind["RoleBinding"]["subjects"][0]
    assert subject["name"] == job["serviceAccountName"]
    assert subject["namespace"] == by_kind["CronJob"]["metadata"]["namespace"] != "default"
    assert (
        by_kind["Role"]["metadata"]["namespace"]
        == {e["name"]: e["value"] for e in publish["env"]}["PROXY_NAMESPACE"]
    )
    # read-only roots; what is written is an emptyDir
    volumes = {v["name"]: v for v in job["volumes"]}
    for container in (issue, publish):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        for mount in container["volumeMounts"]:
            assert mount.get("readOnly") or "emptyDir" in volumes[mount["name"]]
    assert job["securityContext"]["runAsUser"] == 10001


def _commands(text: str) -> list[str]:
    """Shell commands with their continuation lines joined, comments and blanks left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines())
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def test_the_deploy_readme_walkthrough_is_the_script_that_the_compose_test_runs() -> None:
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("## Bring it up, connect, renew: the walkthrough")[1].split("\n## ")[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    script = (DEPLOY / "walkthrough.sh").read_text()
    in_script = set(_commands(script))
    printed = [c for block in blocks[1:] for c in _commands(block)]  # [0]: how to run it
    assert len(printed) >= 12
    for command in printed:
        spelled = command.replace("localhost:8443", "localhost:$HTTPS_PORT").replace(
            "localhost:8444", "localhost:$TCP_PORT"
        )
        if command.startswith("C="):
            assert f"{spelled.split('#')[0].strip()}" in script
            continue
        # the script may check what a command printed (`| tee FILE`), not run another one
        assert any(ran == spelled or ran.startswith(spelled + " | tee ") for ran in in_script), (
            f"deploy/README.md prints a command the script does not run: {command}"
        )
    assert "docker-compose" in script and "docker compose" in script  # either is found
