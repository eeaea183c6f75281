"""Who may read the file system, and when: slots for answers, turns for walks.

At most ``-c`` answers are under way at once (:class:`Slots`); a request holds its slot
only while the agent reads for it (:class:`Hold`). Subtree walks also take turns
reading, one chunk each, while the reading is work for the CPU (:class:`Lane`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Optional, TypeVar

T = TypeVar("T")


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
    """One request's claim on a slot: held while the agent reads the file system (or
    a walk waits for its turn to), let go while the answer travels, so a client that
    reads slowly (or not at all) holds no slot."""

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


class Lane:
    """Subtree walks take turns reading the file system, one chunk each, while the
    reading is work for the CPU rather than waiting for the storage.

    Threads of one process that walk at the same time hand the GIL over at every
    system call (openat, getdents, lstat...), which costs more than the walking itself
    when the metadata is cached (bench/README.md, "Walks take turns"); waiting for a
    turn costs no thread. Reads that wait for the storage (a cold cache, an NFS round
    trip) gain from running together instead, so turns are dropped:

    - for ``io_hold`` seconds once the reading threads have been on the CPU for less
      than ``io_share`` of their turns (``thread_time`` against the clock, averaged
      over the last few turns: contention alone makes single turns dip to ~0.25);
    - while one turn has lasted ``stall`` seconds (a directory on a hung NFS server),
      until it ends, so a stuck directory holds nobody up for longer than that.

    Single-directory listings do not take turns: they are short, and in turns they
    would queue behind one another (measured: half the requests/s).
    """

    def __init__(self, stall: float = 0.05, io_share: float = 0.25, io_hold: float = 0.5,
                 count: Optional[Callable[[str], None]] = None) -> None:
        self.stall = stall
        #: Told how each read ran: ``turn``, or without one for ``storage`` or ``stuck``.
        self.count = count or (lambda _how: None)
        self.io_share = io_share
        self.io_hold = io_hold
        #: Turns after which the reading was found waiting for the storage.
        self.io_turns = 0
        self._share = 1.0  # moving average of the CPU share of recent turns
        self._busy = False
        self._stuck = False
        self._free_until = 0.0
        self._waiting: collections.deque[asyncio.Future[bool]] = collections.deque()

    async def run(self, submit: Callable[[Callable[[], Any]], Awaitable[Any]], fn: Callable[[], T]) -> T:
        """``fn()`` run by ``submit`` (into a thread pool), in its turn or without one."""
        loop = asyncio.get_running_loop()
        if self._stuck or loop.time() < self._free_until:
            self.count("stuck" if self._stuck else "storage")
            return await submit(fn)
        if self._busy:
            turn = loop.create_future()
            self._waiting.append(turn)
            try:
                mine = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled() and turn.result():
                    self._next()  # the turn came with the cancellation: pass it on
                elif turn in self._waiting:
                    self._waiting.remove(turn)
                raise
            if not mine:
                self.count("stuck" if self._stuck else "storage")
                return await submit(fn)
        self.count("turn")
        self._busy = True
        timer = loop.call_later(self.stall, self._stall_out)
        waited = False
        try:
            result, cpu, wall = await submit(functools.partial(_measured, fn))
            if wall >= _MIN_MEASURED:
                self._share = (self._share + min(cpu / wall, 1.0)) / 2
                waited = self._share < self.io_share
            return result
        finally:
            timer.cancel()
            self._stuck = False
            if waited:
                self.io_turns += 1
                self._free_until = loop.time() + self.io_hold
                self._release_all()
            self._next()

    def _next(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self._busy = False

    def _release_all(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(False)

    def _stall_out(self) -> None:
        self._stuck = True
        self._release_all()


#: Turns shorter than this (seconds) say too little about where their time went.
_MIN_MEASURED = 0.001


def _measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, with the CPU time of this thread and the wall time it took."""
    cpu, wall = time.thread_time(), time.perf_counter()
    result = fn()
    return result, time.thread_time() - cpu, time.perf_counter() - wall
