"""The project's exception tree.

Every error the project raises on purpose derives from ``MtlsProxyError``. Each one
carries the HTTP ``status`` a proxy answers with when the error ends a request (as h11's
``error_status_hint`` does) and the ``exit_code`` the CLI ends with when it ends a command.
Errors from libraries (cryptography, OpenSSL, trio, OS calls) are translated into these
at the edge that calls them, with ``raise ... from exc``, so nothing above that edge has
to know which library is underneath.

    MtlsProxyError                       500, exit 1
    ├── UsageError                       bad command-line input, exit 2
    ├── ConfigError                      the config file: names file, key path, reason; exit 2
    ├── CredentialError                  a certificate/key/bundle/deny file: names the file; exit 2
    └── CAError                          the private CA refused or failed (overwrite, TTL...)
"""

from __future__ import annotations

from pathlib import Path


class MtlsProxyError(Exception):
    """Root of the tree; the message is written for the person who reads it."""

    status: int = 500
    exit_code: int = 1


class UsageError(MtlsProxyError):
    exit_code = 2


class ConfigError(MtlsProxyError):
    """A config file that cannot be used; ``key_path`` looks like ``listeners[0].routes[1]``."""

    exit_code = 2

    def __init__(self, file: Path | str, key_path: str | None, reason: str) -> None:
        self.file = Path(file)
        self.key_path = key_path
        self.reason = reason
        where = f"{self.file}: {key_path}" if key_path else f"{self.file}"
        super().__init__(f"{where}: {reason}")


class CredentialError(MtlsProxyError):
    """A credential file (certificate, key, CA bundle, deny list) that cannot be used."""

    exit_code = 2

    def __init__(self, file: Path | str, reason: str) -> None:
        self.file = Path(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")


class CAError(MtlsProxyError):
    """The private CA refused a request or could not complete it."""
