"""How long an agent that failed is set aside: its ``Retry-After`` when it sent one, else
a backoff from 0.2 s doubling up to 5 s, started again by an answer. Shared by the walk
engine and the diskover scanner; the owner's lock guards it."""

from __future__ import annotations

from typing import Optional

#: Backoff of an agent that does not answer: 0.2 s, doubling up to 5 s.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


class Backoff:
    """Per-agent failure counts and the monotonic time until which each is set aside."""

    def __init__(self, hosts: int) -> None:
        self.down_until = [0.0] * hosts
        self.failures = [0] * hosts

    def set_aside(self, idx: int, now: float, retry_after: Optional[float] = None) -> float:
        """Count a failure of agent ``idx`` at ``now``; the seconds it is set aside."""
        self.failures[idx] += 1
        backoff = min(BACKOFF_FIRST * 2 ** (self.failures[idx] - 1), BACKOFF_MAX)
        delay = retry_after if retry_after is not None else backoff
        self.down_until[idx] = now + delay
        return delay

    def reset(self, idx: int) -> None:
        """Agent ``idx`` answered: its next failure starts the backoff again."""
        self.failures[idx] = 0
