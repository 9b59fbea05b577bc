"""``mtlsproxy ca publish-secret``: put freshly issued files into a Kubernetes Secret.

The renewal CronJob of ``deploy/k8s/renew-server.yaml`` issues the proxy's certificate
with ``ca issue`` and then needs it in the Secrets the proxy mounts. This is that last
step, with nothing but the standard library and the pod's service account: one
``PATCH`` (a JSON merge patch of ``data``) per Secret, so keys not named stay as they are
and a Secret the job may not touch, or that does not exist, is an error that says so.

In a pod the API server, its CA and the token come from the service account
(``KUBERNETES_SERVICE_HOST``/``_PORT``, ``/var/run/secrets/kubernetes.io/serviceaccount``);
the API's certificate is verified against that CA only, never the system's store.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from mtlsproxy.client import PrivateTrustContext
from mtlsproxy.errors import MtlsProxyError, UsageError

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PublishError(MtlsProxyError):
    pass


@dataclass(frozen=True)
class Api:
    """Where the API server is and how to prove who we are to it."""

    url: str  # https://host:port
    ca: Path
    token: str

    @classmethod
    def in_cluster(
        cls, url: str | None = None, ca: Path | None = None, token_file: Path | None = None
    ) -> Api:
        if url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise UsageError(
                    "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set): give --api"
                )
            url = f"https://{f'[{host}]' if ':' in host else host}:{port}"
        ca = ca or ACCOUNT / "ca.crt"
        token_file = token_file or ACCOUNT / "token"
        try:
            token = token_file.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise UsageError(f"cannot read the service account token {token_file}: {exc}") from exc
        if not ca.is_file():
            raise UsageError(f"no CA for the API server at {ca}")
        return cls(url, ca, token)


def default_namespace() -> str:
    try:
        return (ACCOUNT / "namespace").read_text(encoding="ascii").strip() or "default"
    except OSError:
        return "default"


def publish_secret(
    api: Api, namespace: str, name: str, files: dict[str, bytes], timeout: float = 30
) -> str:
    """Set ``files`` (key -> content) in Secret ``namespace/name``; its resourceVersion."""
    parts = urlsplit(api.url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"--api {api.url!r}: give https://host:port")
    context = PrivateTrustContext(api.ca)  # only the cluster's CA, name checked
    conn = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=context, timeout=timeout
    )
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets/{quote(name, safe='')}"
    body = {"data": {key: base64.b64encode(data).decode("ascii") for key, data in files.items()}}
    where = f"secret {namespace}/{name} at {api.url}"
    try:
        conn.request(
            "PATCH",
            path,
            body=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {api.token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        answer = conn.getresponse()
        raw = answer.read(1 << 20)
    except ssl.SSLCertVerificationError as exc:
        raise PublishError(
            f"{where}: the API server's certificate does not verify against {api.ca}"
            f" ({exc.verify_message})"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise PublishError(f"{where}: {exc}") from exc
    finally:
        conn.close()
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {}
    if answer.status == 200:
        return str(reply.get("metadata", {}).get("resourceVersion", "?"))
    said = reply.get("message") or raw[:200].decode("utf-8", "replace")
    if answer.status == 404:
        hint = "it does not exist: create it once by hand (deploy/README.md, Kubernetes)"
    elif answer.status in (401, 403):
        hint = "this service account may not patch it (the Role in renew-server.yaml)"
    else:
        hint = f"the API server answered {answer.status}"
    raise PublishError(f"{where}: {hint}: {said}")
