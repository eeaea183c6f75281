"""Who may read the file system, and when: slots for answers.

At most ``-c`` answers (of this process) are under way at once (:class:`Slots`); a request
holds its slot only while the agent reads for it (:class:`Hold`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Optional


class Slots:
    """At most ``size`` answers under way; a bounded line waits for a turn."""

    def __init__(self, size: int, max_queue: int, max_wait: float,
                 moved: Optional[Callable[[int], None]] = None) -> None:
        self._sem = asyncio.Semaphore(size)
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.waiting = 0
        #: Told +1 and -1 as requests start and stop waiting (the metrics' gauge).
        self._moved = moved or (lambda _n: None)

    async def acquire(self) -> bool:
        """Take a slot; False when the line is full or the wait too long (answer 503)."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            return False
        self._wait(1)
        try:
            await asyncio.wait_for(self._sem.acquire(), self.max_wait)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._wait(-1)

    def release(self) -> None:
        self._sem.release()

    async def acquire_admitted(self) -> None:
        """Take a slot for a request already admitted: it waits as long as it takes."""
        self._wait(1)
        try:
            await self._sem.acquire()
        finally:
            self._wait(-1)

    def _wait(self, n: int) -> None:
        self.waiting += n
        self._moved(n)


class Hold:
    """One request's claim on a slot: held while the agent reads the file system, let
    go while the answer travels, so a client that reads slowly (or not at all) holds no
    slot."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.held = False

    async def admit(self) -> bool:
        self.held = await self.slots.acquire()
        return self.held

    async def take(self) -> None:
        if not self.held:
            await self.slots.acquire_admitted()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()
