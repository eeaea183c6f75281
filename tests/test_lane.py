"""The agent's lane: walks read the file system one chunk at a time while the reading
is CPU work, and all at once while it waits for the storage or one read is stuck
(tests/test_slow_directory.py shows the stuck case through a real agent and a hung
FUSE directory)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from diskover_storage_agent.admission import Lane


class Reads:
    """Stand-ins for chunk reads in the agent's thread pool that record how many overlap
    and in which order they ran."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(16)
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.order: list[int] = []

    def submit(self, fn):
        return asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def _enter(self, tag: int) -> None:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.order.append(tag)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def cpu(self, tag: int = 0, seconds: float = 0.002):
        """A read that is all CPU work, like listing a cached directory."""
        def read() -> None:
            self._enter(tag)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            self._leave()
        return read

    def io(self, seconds: float = 0.01):
        """A read that waits for the storage (off the CPU), like an NFS round trip."""
        def read() -> None:
            self._enter(0)
            time.sleep(seconds)  # the storage being stood for, not a wait in the test
            self._leave()
        return read


def test_cpu_reads_take_turns_in_order():
    """Reads found to be CPU work run one at a time, first come, first served. Whether a read
    counts as CPU work is made certain here (``io_share=0``: no share of the CPU is below it),
    since other load on the machine can starve any real read of the CPU."""
    reads = Reads()

    async def main() -> Lane:
        lane = Lane(stall=5, io_share=0)
        await asyncio.gather(*(lane.run(reads.submit, reads.cpu(i)) for i in range(40)))
        return lane

    lane = asyncio.run(main())
    assert lane.io_turns == 0
    assert reads.peak == 1
    assert reads.order == list(range(40))


def test_reads_that_wait_for_the_storage_go_together():
    reads = Reads()

    async def main() -> Lane:
        lane = Lane(stall=5)

        async def walk() -> None:
            for _ in range(5):
                await lane.run(reads.submit, reads.io())

        await asyncio.gather(*(walk() for _ in range(4)))
        return lane

    lane = asyncio.run(main())
    assert len(reads.order) == 20
    assert lane.io_turns >= 1
    assert reads.peak > 1


def test_a_stuck_read_holds_nobody_up():
    reads = Reads()
    release = threading.Event()

    async def main() -> tuple[float, bool, int, int]:
        lane = Lane(stall=0.05, io_share=0)  # turns are dropped only for a stuck one
        stuck = asyncio.ensure_future(lane.run(reads.submit, lambda: release.wait(30)))
        try:
            await asyncio.sleep(0)  # it has the turn
            start = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(lane.run(reads.submit, reads.io(0.02)) for _ in range(8))), 10)
            took = time.monotonic() - start
            still_stuck = not stuck.done()
        finally:
            release.set()
            await stuck
        stuck_peak, reads.peak = reads.peak, 0
        # the stuck read is over: turns again, and no stale timer says otherwise
        # (ten turns of 10 ms outlast the 50 ms a timer would wait)
        await asyncio.wait_for(asyncio.gather(*(lane.run(reads.submit, reads.io(0.01)) for _ in range(10))), 10)
        return took, still_stuck, stuck_peak, reads.peak

    took, still_stuck, stuck_peak, peak_after = asyncio.run(main())
    assert still_stuck
    assert took < 5  # not the 30 s of the stuck read
    assert stuck_peak > 1  # the eight went ahead together, without turns
    assert peak_after == 1
    assert len(reads.order) == 18


def test_cancelled_waiters_pass_their_turn_on():
    reads = Reads()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lane = Lane(stall=5, io_share=0)  # always in turns, however loaded the machine
        for handed_over in (False, True):
            holding = loop.create_future()

            async def gated(fn, holding=holding):
                await holding  # the holder's read lasts until the test lets it end
                return fn()

            holder = asyncio.ensure_future(lane.run(gated, lambda: None))
            first = asyncio.ensure_future(lane.run(reads.submit, reads.cpu(1)))
            second = asyncio.ensure_future(lane.run(reads.submit, reads.cpu(2)))
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
        await asyncio.wait_for(lane.run(reads.submit, reads.cpu(3)), 10)  # and the lane is free

    asyncio.run(main())
    assert reads.order == [2, 2, 3]
