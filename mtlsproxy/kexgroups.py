"""Key exchange groups: the default list and the check that the OpenSSL in use knows each.

Below ``tls/`` on the data floor, because ``config`` refuses an unknown ``tls.groups`` entry
at load (a typo fails there, not in handshakes) and ``config`` imports nothing above it.
``tls/context.py`` sets the checked list on its contexts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

# Mozilla's "intermediate" profile (ssl-config.mozilla.org): the hybrid post-quantum
# X25519MLKEM768 first (a recorded session stays secret if X25519 ever falls), then
# X25519, P-256 and P-384. Not secp521r1, X448 or finite-field DH: slower,
# rarely needed, and each one more code path a client can choose. ``tls.groups`` in the
# config replaces the list.
DEFAULT_GROUPS: tuple[str, ...] = ("X25519MLKEM768", "X25519", "prime256v1", "secp384r1")

# One plain group name per entry. OpenSSL's list syntax (``:`` separators, ``/`` tuples,
# ``?`` to ignore unknown names, ``*`` key shares) stays ours: a ``?`` would let a typo
# pass silently, which is what validating the list is for.
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_groups(groups: Sequence[str]) -> None:
    """Raise ValueError naming the first entry that is not one key exchange group the
    OpenSSL in use knows (``groups[1] = 'nope' ...``)."""
    if not groups:
        raise ValueError("groups needs at least one key exchange group")
    probe = SSL.Context(SSL.TLS_METHOD)
    for i, name in enumerate(groups):
        if not _GROUP_NAME.fullmatch(name) or not set_groups(probe, name):
            raise ValueError(
                f"groups[{i}] = {name!r} is not a key exchange group this OpenSSL knows "
                f"(one name per entry; the default is {', '.join(DEFAULT_GROUPS)})"
            )
    if not set_groups(probe, ":".join(groups)):  # each name is fine; the list is not
        raise ValueError(f"groups: OpenSSL refuses the list {list(groups)!r} as a whole")


def set_groups(ctx: SSL.Context, spec: str) -> bool:
    # pyOpenSSL keeps the SSL_CTX* in the private ``_context``; the setter is in the
    # bindings it ships on but has no pyOpenSSL wrapper.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, spec.encode("ascii")) == 1:
        return True
    _lib.ERR_clear_error()  # a stale error would be reported by the next pyOpenSSL call
    return False
