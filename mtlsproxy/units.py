"""Durations and sizes as people write them: ``250ms``, ``24h``, ``7d``; ``16KiB``, ``1GiB``.

One grammar for the config file and the CLI, so ``--ttl 24h`` and ``handshake_timeout = "10s"``
mean the same thing everywhere.
"""

from __future__ import annotations

import re
from datetime import timedelta

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TIME_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_TIME_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}  # fmt: skip
_SIZE = re.compile(r"(\d+)\s*([kmg]i?b|b)?")


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` or raise ``ValueError`` with a message fit to show a user."""
    cleaned = text.strip().lower()
    if not _TIME_WHOLE.fullmatch(cleaned):
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit (ms, s, m, h, d, w), "
            "e.g. '90s', '15m', '24h', '7d' or '1d12h'"
        )
    seconds = sum(float(n) * _TIME_UNITS[unit] for n, unit in _TIME_PART.findall(cleaned))
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """A short human form: ``23h59m``, ``6d23h``, ``45s``; negative values get a minus sign."""
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{n}{u}" for n, u in parts if n][:2]
    return sign + ("".join(shown) if shown else "0s")


def parse_size(text: str | int) -> int:
    """Parse ``16KiB``, ``1GiB``, ``500kb`` or a plain byte count; ``ValueError`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text} is negative; a size is a byte count of 0 or more")
        return text
    match = _SIZE.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(
            f"{text!r} is not a size; write bytes or a number with a unit "
            "(KiB, MiB, GiB, kB, MB, GB), e.g. '16KiB' or '1GiB'"
        )
    return int(match[1]) * _SIZE_UNITS[match[2] or ""]
