"""`mtlsproxy.client` without its `[client]` extra: the error says what to install."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
from support import Pair

from mtlsproxy import client
from mtlsproxy.pki import CertificateAuthority


@pytest.mark.parametrize(
    ("module", "helper"),
    [("requests", client.requests_session), ("httpx", client.httpx_client)],
)
def test_a_missing_client_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
    ca: CertificateAuthority,
    client_pair: Pair,
    module: str,
    helper: Callable[..., Any],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ImportError) as caught:
        helper(client_pair.crt, client_pair.key, ca.folder / "ca.crt")
    message = str(caught.value)
    assert f"needs {module}" in message and "pip install 'mtlsproxy[client]'" in message
    assert caught.value.name == module


def test_ssl_context_needs_neither(
    monkeypatch: pytest.MonkeyPatch, ca: CertificateAuthority, client_pair: Pair
) -> None:
    monkeypatch.setitem(sys.modules, "requests", None)
    monkeypatch.setitem(sys.modules, "httpx", None)
    assert (
        client.ssl_context(client_pair.crt, client_pair.key, ca.folder / "ca.crt").generation == 0
    )
