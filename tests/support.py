"""Types and constants shared by the test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The interpreter running the tests; `python -m mtlsproxy` is the real CLI, entry point included.
MTLSPROXY = [sys.executable, "-m", "mtlsproxy"]


@dataclass(frozen=True)
class Pair:
    crt: Path
    key: Path


IssueFn = Callable[..., Pair]
