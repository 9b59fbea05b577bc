"""Fixtures shared by the suite: certificates made per session by the project's own CA code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtlsproxy.pki import CertificateAuthority

# The interpreter running the tests; `python -m mtlsproxy` is the real CLI, entry point included.
MTLSPROXY = [sys.executable, "-m", "mtlsproxy"]


@dataclass(frozen=True)
class Pair:
    crt: Path
    key: Path


IssueFn = Callable[..., Pair]


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
