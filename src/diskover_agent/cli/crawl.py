"""One stat walk through the agents for a command: its counters, its progress display
and its summary line."""

from __future__ import annotations

import math
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Protocol

from ..protocol import KIND_FILE, Entry
from ..walk import Walker
from .common import EXIT_OK, EXIT_PARTIAL, PROG, Context, shown, size_text


class Crawl:
    """One stat walk through the agents: directories as they arrive, errors reported and counted."""

    def __init__(self, ctx: Context, top: bytes, *, exclude_dirs: Sequence[str] = (),
                 exclude_files: Sequence[str] = (), one_fs: bool = False,
                 on_error: Optional[Callable[[bytes, OSError], None]] = None) -> None:
        self.ctx = ctx
        self.top = top
        #: Called with each directory that could not be listed (after the message on stderr).
        self.on_error = on_error
        self.walker = Walker(
            top, ctx.hosts, port=ctx.port, workers=ctx.workers, stat=True, retry_for=ctx.retry_for,
            exclude_dirs=[os.fsencode(p) for p in exclude_dirs],
            exclude_files=[os.fsencode(p) for p in exclude_files], one_fs=one_fs, on_host=host_watcher(ctx),
            **ctx.options,
        )
        self.dirs = 0
        self.entries = 0
        self.bytes = 0
        self.errors = 0
        self.started = time.monotonic()
        self.ended: Optional[float] = None

    def __iter__(self) -> Iterator[tuple[bytes, list[Entry]]]:
        """``(path, entries sorted by name)`` of every directory listed."""
        listed = self.walker.dirs()
        try:
            for d in listed:
                if d.error is not None:
                    self.errors += 1
                    err = d.error
                    self.ctx.warn(f"{shown(d.path)}: {err.strerror or err}")
                    if self.on_error is not None:
                        self.on_error(d.path, err)
                    continue
                entries = sorted(d.entries, key=_BY_NAME)
                self.dirs += 1
                self.entries += len(entries)
                self.bytes += sum(e.stat[6] for e in entries if e.kind == KIND_FILE and e.stat is not None)
                yield d.path, entries
        finally:
            listed.close()  # stops every thread and closes every socket
            self.ended = time.monotonic()

    def depth(self, path: bytes) -> int:
        """How far below the top a directory is: 0 for the top, 1 for its subdirectories."""
        rest = path[len(self.top):].strip(b"/")
        return rest.count(b"/") + 1 if rest else 0

    def prune(self, path: bytes) -> None:
        self.walker.prune(path)

    def served(self) -> dict[str, dict[str, int]]:
        """Requests and directories each host served so far."""
        return self.walker.served()

    @property
    def seconds(self) -> float:
        """Seconds the walk took (so far)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def summary(self) -> str:
        return summary_text(self)


def host_watcher(ctx: Context) -> Callable[[str, Optional[str]], None]:
    """What names on stderr a host set aside for not answering (with the reason, at once), or back."""
    def changed(host: str, reason: Optional[str]) -> None:
        ctx.warn(f"{host} is set aside, not answering: {reason}" if reason is not None else f"{host} answers again")
    return changed


def summary_text(crawl: Any) -> str:
    """The summary line of a walk by this process (a :class:`Crawl`, or a walk into a
    dataset): its counts, time, rate and hosts."""
    secs = crawl.seconds
    rate = crawl.entries / secs if secs > 0 else 0.0
    served = crawl.walker.served()
    used = sum(1 for s in served.values() if s["requests"])
    down = crawl.walker.hosts_down()
    aside = f", set aside (not answering): {', '.join(down)}" if down else ""
    return (f"{_count_of(crawl.dirs, 'directory', 'directories')}, {_count_of(crawl.entries, 'entry', 'entries')}, "
            f"{size_text(crawl.bytes)} in files, {_count_of(crawl.errors, 'error', 'errors')}, {secs:.2f} s "
            f"({rate:,.0f} entries/s, {used}/{len(served)} hosts{aside})")


def _count_of(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


_BY_NAME = operator.attrgetter("name")


class Counts(Protocol):
    """What a walk counted so far, as the progress display reads it (a :class:`Crawl`, or
    the tasks' results of ``walk --dask``)."""

    dirs: int
    entries: int
    bytes: int
    errors: int

    def served(self) -> dict[str, dict[str, int]]:
        """``{host: {"requests": N, ...}}`` for every host of the walk."""
        ...


class Progress:
    """The live display on stderr (tqdm), refreshed by its own thread a few times a second;
    it erases itself when it closes."""

    INTERVAL = 0.25
    ACTIVE_FOR = 2.0  # a host is "in use" when it answered within this many seconds

    def __init__(self, ctx: Context, counts: Counts) -> None:
        from tqdm import tqdm

        self.ctx = ctx
        self.counts = counts
        self.bar = tqdm(total=None, unit=" dirs", unit_scale=True, file=sys.stderr, leave=False, mininterval=0,
                        miniters=1, bar_format="{n:,}{unit} ({rate_fmt}){postfix} [{elapsed}]")
        self._stop = threading.Event()
        self._last_entries = 0
        self._last_time = time.monotonic()
        self._entry_rate: Optional[float] = None
        self._requests: dict[str, tuple[int, float]] = {}
        ctx.bar = self.bar
        self._thread = threading.Thread(target=self._run, name="diskover-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.tick()

    def _hosts_in_use(self, now: float) -> tuple[int, int]:
        """Hosts that answered a request within the last ``ACTIVE_FOR`` seconds, and all hosts."""
        served = self.counts.served()
        used = 0
        for host, s in served.items():
            seen, when = self._requests.get(host, (0, -math.inf))
            if s["requests"] != seen:
                seen, when = s["requests"], now
                self._requests[host] = (seen, when)
            if now - when <= self.ACTIVE_FOR:
                used += 1
        return used, len(served)

    def tick(self) -> None:
        c = self.counts
        now = time.monotonic()
        entries = c.entries
        dt = now - self._last_time
        if dt > 0:
            rate = (entries - self._last_entries) / dt
            self._entry_rate = rate if self._entry_rate is None else 0.3 * rate + 0.7 * self._entry_rate
        self._last_entries, self._last_time = entries, now
        used, hosts = self._hosts_in_use(now)
        self.bar.set_postfix_str(
            f"{self.bar.format_sizeof(entries)} entries ({self.bar.format_sizeof(self._entry_rate or 0)}/s), "
            f"{size_text(c.bytes)} in files, hosts {used}/{hosts}, "
            f"{_count_of(c.errors, 'error', 'errors')}", refresh=False)
        delta = c.dirs - self.bar.n
        if delta > 0:
            self.bar.update(delta)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()
        self.bar.close()
        self.ctx.bar = None


def _show_progress(ctx: Context, output_is_terminal: bool = False) -> bool:
    return not ctx.quiet and sys.stderr.isatty() and not output_is_terminal


def run_crawl(ctx: Context, crawl: Crawl, body: Callable[[Crawl], None], *, output_is_terminal: bool = False) -> None:
    """Run ``body`` over a crawl, with the progress display when there is one."""
    progress = Progress(ctx, crawl) if _show_progress(ctx, output_is_terminal) else None
    try:
        body(crawl)
    finally:
        if progress is not None:
            progress.close()


def finish(ctx: Context, crawl: Crawl) -> int:
    """The summary line (unless quiet) and the exit status of a crawl that ran to its end."""
    if not ctx.quiet:
        print(f"{PROG}: {crawl.summary()}", file=sys.stderr, flush=True)
    return EXIT_PARTIAL if crawl.errors else EXIT_OK
