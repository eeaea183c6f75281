"""The agent's lane: answers read the file system one chunk at a time while chunks are
quick, and all at once while one is stuck (tests/test_slow_directory.py shows the
same through a real agent and a hung FUSE directory)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from diskover_storage_agent.server import Lane


class Reads:
    """Stand-ins for chunk reads in the agent's thread pool that record how many overlap."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(16)
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.done = 0

    def _read(self, seconds: float) -> None:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(seconds)  # the file system call being stood for, not a wait
        with self._lock:
            self.active -= 1
            self.done += 1

    def call(self, seconds: float = 0.002):
        return lambda: asyncio.get_running_loop().run_in_executor(self.pool, self._read, seconds)


def test_quick_reads_take_turns():
    reads = Reads()

    async def main() -> None:
        lane = Lane(stall=5)
        await asyncio.gather(*(lane.run(reads.call()) for _ in range(40)))

    asyncio.run(main())
    assert reads.done == 40
    assert reads.peak == 1


def test_a_stuck_read_holds_nobody_up():
    reads = Reads()
    release = threading.Event()

    async def main() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        lane = Lane(stall=0.05)
        stuck = asyncio.ensure_future(lane.run(lambda: loop.run_in_executor(reads.pool, release.wait, 30)))
        await asyncio.sleep(0)  # it has the turn
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(lane.run(reads.call(0.02)) for _ in range(8))), 10)
        took = time.monotonic() - start
        still_stuck = not stuck.done()
        release.set()
        await stuck
        # once the stuck read is over, reads take turns again
        await asyncio.gather(*(lane.run(reads.call()) for _ in range(20)))
        return took, still_stuck

    took, still_stuck = asyncio.run(main())
    assert still_stuck
    assert took < 5  # not the 30 s of the stuck read
    assert reads.done == 28
    assert reads.peak > 1  # the eight went ahead together, without turns


def test_cancelled_waiters_pass_their_turn_on():
    reads = Reads()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lane = Lane(stall=5)
        for handed_over in (False, True):
            holding = loop.create_future()
            holder = asyncio.ensure_future(lane.run(lambda fut=holding: fut))
            first = asyncio.ensure_future(lane.run(reads.call()))
            second = asyncio.ensure_future(lane.run(reads.call()))
            await asyncio.sleep(0)  # all three in line
            if not handed_over:
                first.cancel()  # cancelled while waiting
                holding.set_result(None)
            else:
                holding.set_result(None)
                await asyncio.sleep(0)  # the holder ends and hands its turn to ``first``...
                first.cancel()  # ...which is cancelled before it runs
            await holder
            await asyncio.wait_for(second, 10)
            assert first.cancelled()
        await asyncio.wait_for(lane.run(reads.call()), 10)  # and the lane is free

    asyncio.run(main())
    assert reads.done == 3
