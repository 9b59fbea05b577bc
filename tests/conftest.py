"""Fixtures shared by the suite: certificates made per session by the project's own CA code."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from proxy_env import Env, route, start_backend, start_proxy, write_config
from support import IssueFn, Pair

from mtlsproxy.pki import CertificateAuthority

# Hypothesis fails an example that takes over 200 ms by default; on a loaded 2-core CI
# machine that is timing noise, not a finding. The examples themselves stay the same.
settings.register_profile("mtlsproxy", deadline=None)
settings.load_profile("mtlsproxy")


def _issuer(ca: CertificateAuthority, folder: Path) -> IssueFn:
    counter = iter(range(1_000_000))

    def issue(kind: str = "client", name: str = "player-1", **kwargs: object) -> Pair:
        prefix = folder / f"{kind}-{name}-{next(counter)}"
        crt, key = ca.issue(kind=kind, name=name, **kwargs).write(prefix)  # type: ignore[arg-type]
        return Pair(crt, key)

    return issue


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", name="test")


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("other-ca") / "ca", name="other")


@pytest.fixture(scope="session")
def issue(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> IssueFn:
    """issue(kind="client", name="player-1", **CertificateAuthority.issue kwargs) -> Pair."""
    return _issuer(ca, tmp_path_factory.mktemp("leaves"))


@pytest.fixture(scope="session")
def issue_other(
    other_ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> IssueFn:
    return _issuer(other_ca, tmp_path_factory.mktemp("other-leaves"))


@pytest.fixture(scope="session")
def server_pair(issue: IssueFn) -> Pair:
    return issue("server", "localhost", dns=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="session")
def client_pair(issue: IssueFn) -> Pair:
    return issue("client", "player-1", ous=["players"], uris=["spiffe://game.example/player/1"])


@pytest.fixture
def creds(tmp_path: Path, ca: CertificateAuthority, server_pair: Pair) -> Path:
    """Credential files of a proxy in a folder of their own, ready to be rotated."""
    folder = tmp_path / "creds"
    folder.mkdir()
    shutil.copy(server_pair.crt, folder / "server.crt")
    shutil.copy(server_pair.key, folder / "server.key")
    shutil.copy(ca.folder / "ca.crt", folder / "ca.crt")
    (folder / "deny.txt").write_text("")
    return folder


@pytest.fixture
def make_env(
    nursery: Any, tmp_path: Path, ca: CertificateAuthority, server_pair: Pair, client_pair: Pair
) -> Callable[..., Awaitable[Any]]:
    """make_env(routes=None, backends=1, listener="", tls="", top="") -> proxy_env.Env.

    ``routes`` is TOML for [[listeners.routes]] and may use {b0}, {b1}... for the ports of
    the demo backends started for it; by default one catch-all route to backend 0.
    """

    async def make(
        routes: str | None = None,
        backends: int = 1,
        listener: str = "",
        tls: str = "",
        top: str = "",
        server: Pair | None = None,
        bundle: Path | None = None,
    ) -> Env:
        ports = [await start_backend(nursery) for _ in range(backends)]
        text = (
            route(ports[:1])
            if routes is None
            else routes.format(**{f"b{i}": p for i, p in enumerate(ports)})
        )
        bundle = bundle or ca.folder / "ca.crt"
        path = write_config(
            tmp_path,
            ca_bundle=bundle,
            server=server or server_pair,
            routes=text,
            listener=listener,
            tls=tls,
            top=top,
        )
        proxy, port, admin_port = await start_proxy(nursery, path)
        return Env(proxy, port, bundle, client_pair, tmp_path, ports, admin_port)

    return make
