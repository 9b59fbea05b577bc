"""The idle deadline of a relayed session (TCP, WebSocket): any byte either way resets it.

One clock for both directions of a session; ``watch`` runs beside the two pipes and
cancels their scope once nothing moved for ``seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio


@dataclass
class IdleClock:
    seconds: float
    deadline: float = field(init=False)
    expired: bool = False  # the session ended because it went idle

    def __post_init__(self) -> None:
        self.touch()

    def touch(self) -> float:
        """Something moved: the deadline starts again. Returns the time now."""
        now = trio.current_time()
        self.deadline = now + self.seconds
        return now

    async def watch(self, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep_until(self.deadline)
            if trio.current_time() >= self.deadline:  # not touched while we slept
                self.expired = True
                scope.cancel()
                return
