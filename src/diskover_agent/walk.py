"""``parallel_walk``: ``os.walk`` through many agents at once.

The engine is a work queue of directory paths over hosts. ``workers`` threads each
take a batch of paths, send it to the next healthy host and stream back every
directory the agent lists below them (the subtree protocol: the agent walks up to
a budget and answers the frontier it did not reach), or, against an agent without
it, list one directory per request. Each directory goes to the generator as soon
as it is complete; directories found but not listed go back on the queue. When a
request breaks off, whatever it had not completed is queued again, so nothing is
lost, and nothing that was completed is listed twice.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, AnyStr, Optional, Union

from .connection import is_walk_dir, parse_hosts
from .entry import AgentDirEntry
from .errors import AgentBusyError, AgentConnectionError, AgentProtocolError
from .protocol import (
    KIND_DIR,
    KIND_SYMLINK,
    DirFrame,
    EndFrame,
    EntriesFrame,
    Entry,
    ErrorFrame,
    Exclusions,
    WalkRequest,
)
from .transport import (
    DEFAULT_PORT,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    SubtreeUnsupported,
    fsencode_path,
)

#: Seconds a walk keeps retrying while no agent answers, before it raises.
DEFAULT_RETRY_FOR = 10.0
#: Entries the first subtree request may list; each request doubles it up to the max,
#: so that the first answers come back fast with a frontier that spreads the work.
FIRST_BUDGET = 256
MAX_BUDGET = 4_096
#: Seconds an agent walks for one request before it answers its frontier.
MAX_SECONDS = 0.5
#: Entries listed and waiting for the consumer before the walk stops asking for more
#: (bounds the client's memory when the loop body is slower than the agents).
MAX_BACKLOG = 200_000
#: Subtree requests in flight to one agent, at most: an agent walks each one as fast
#: as its cores allow, so more only compete for them (measured in bench/README.md).
SUBTREE_PER_HOST = 4
#: Paths sent in one subtree request, at most.
MAX_BATCH = 64
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0
MODES = ("auto", "subtree", "listdir")

OnError = Optional[Callable[[OSError], object]]


def _join(path: bytes, name: bytes) -> bytes:
    return path + name if path.endswith(b"/") else path + b"/" + name


class _Hosts:
    """Picks a host for each request: the healthy one with the fewest requests in flight
    (round-robin among equals), setting aside the ones that fail, with backoff."""

    def __init__(self, addresses: list[HostAddress]) -> None:
        self.addresses = addresses
        self._lock = threading.Lock()
        self._turn = 0
        self._down_until = [0.0] * len(addresses)
        self._failures = [0] * len(addresses)
        self.inflight = [0] * len(addresses)
        self.subtree = [True] * len(addresses)
        self.requests = [0] * len(addresses)
        self.dirs = [0] * len(addresses)
        self.last_ok = time.monotonic()
        self.last_error: Optional[str] = None
        self.last_invalid = False  # whether the last failure was an invalid answer

    def pick(self, cap: Optional[int] = None) -> tuple[int, float]:
        """A host's index, taken (release it with :meth:`release`); or (-1, seconds to
        wait) when all are set aside or, with ``cap``, all have ``cap`` requests in flight."""
        now = time.monotonic()
        with self._lock:
            n = len(self.addresses)
            best = -1
            for i in range(n):
                idx = (self._turn + i) % n
                if self._down_until[idx] > now:
                    continue
                if cap is not None and self.subtree[idx] and self.inflight[idx] >= cap:
                    continue
                if best < 0 or self.inflight[idx] < self.inflight[best]:
                    best = idx
            if best >= 0:
                self._turn = best + 1
                self.inflight[best] += 1
                return best, 0.0
            down = [t - now for t in self._down_until if t > now]
            return -1, min(down) if len(down) == n else 0.05

    def usable(self, idx: int) -> bool:
        return self._down_until[idx] <= time.monotonic()

    def release(self, idx: int) -> None:
        with self._lock:
            self.inflight[idx] -= 1

    def failed(self, idx: int, retry_after: Optional[float] = None, error: Optional[BaseException] = None) -> None:
        with self._lock:
            self._failures[idx] += 1
            delay = min(_BACKOFF_FIRST * 2 ** (self._failures[idx] - 1), _BACKOFF_MAX)
            self._down_until[idx] = time.monotonic() + (retry_after if retry_after is not None else delay)
            if error is not None:
                self.last_error = f"{self.addresses[idx].label}: {error}"
                self.last_invalid = isinstance(error, AgentProtocolError)

    def succeeded(self, idx: int, dirs: int) -> None:
        with self._lock:
            self._failures[idx] = 0
            self.requests[idx] += 1
            self.dirs[idx] += dirs
            self.last_ok = time.monotonic()


class _Dir:
    """One completed directory on its way to the generator."""

    __slots__ = ("entries", "error", "path")

    def __init__(self, path: bytes, entries: list[Entry], error: Optional[OSError]) -> None:
        self.path = path
        self.entries = entries
        self.error = error


class Walker:
    """The threads, queue and connections of one walk; iterate :meth:`dirs`."""

    def __init__(
        self,
        top: Union[str, bytes],
        hosts: Union[str, Sequence[str]],
        *,
        port: int = DEFAULT_PORT,
        workers: int = 40,
        stat: bool = False,
        mode: str = "auto",
        retry_for: float = DEFAULT_RETRY_FOR,
        max_budget: int = MAX_BUDGET,
        exclude_dirs: Iterable[Union[str, bytes]] = (),
        exclude_files: Iterable[Union[str, bytes]] = (),
        one_fs: bool = False,
        roots: Optional[Sequence[bytes]] = None,
        max_entries: Optional[int] = None,
        max_backlog: int = MAX_BACKLOG,
        **options: Any,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.top = fsencode_path(top)
        self._bytes = isinstance(top, bytes)
        self.hosts = _Hosts(parse_hosts(hosts, port))
        self.stat = stat
        self.mode = mode
        self.options = ClientOptions(**options)
        self.exclusions = Exclusions.of(exclude_dirs, exclude_files, one_fs)
        self.retry_for = retry_for
        self.max_budget = max_budget
        self._budget = min(FIRST_BUDGET, max_budget)
        self._todo: collections.deque[bytes] = collections.deque(roots if roots is not None else [self.top])
        self._cond = threading.Condition()
        #: Workers waiting for a host (all set aside, or all at their request cap) wait here.
        self._host_free = threading.Condition()
        self._results: collections.deque[Any] = collections.deque()
        self._results_ready = threading.Condition()
        #: Directories known and not yet handed to the generator (queued, in flight, or waiting).
        self._outstanding = len(self._todo)
        #: Stop taking new work once this many entries were listed (None: walk everything).
        self.max_entries = max_entries
        self.entries = 0
        #: Entries (and directories) listed and not yet taken by the consumer; past
        #: ``max_backlog``, workers send no new request until it has caught up.
        self.max_backlog = max_backlog
        self._backlog = 0
        self._exited = 0
        self._pruned: set[bytes] = set()
        self._stopping = False
        self._conns: list[AgentHTTP] = []
        self._threads = [
            threading.Thread(target=self._worker, name=f"diskover-walk-{i}", daemon=True) for i in range(workers)
        ]

    # -- the generator side ----------------------------------------------------------

    def dirs(self) -> Iterator[_Dir]:
        """Completed directories as they arrive, until the walk is complete."""
        for t in self._threads:
            t.start()
        try:
            while True:
                with self._results_ready:
                    while not self._results:
                        if self._outstanding == 0 or self._exited == len(self._threads):
                            return
                        self._results_ready.wait()
                    item = self._results.popleft()
                    if isinstance(item, _Dir):
                        self._backlog -= len(item.entries) + 1
                if isinstance(item, BaseException):
                    raise item
                if self._pruned and item.path != self.top and (
                    item.path in self._pruned or os.path.dirname(item.path) in self._pruned
                ):
                    self.prune(item.path)  # pruned, or below a pruned directory: skip its subtree
                    self._resolve(1)
                    continue
                self._resolve(1)
                yield item
        finally:
            self.stop()

    def prune(self, path: bytes) -> None:
        """Keep the walk out of ``path``: queued work for it is dropped, results skipped."""
        self._pruned.add(path)

    def add(self, path: bytes) -> None:
        """Walk a directory the walk did not know about (a name added to ``dirs``)."""
        with self._cond:
            self._outstanding_add(1)
            self._todo.append(path)
            self._cond.notify()

    def frontier(self) -> list[bytes]:
        """Directories owed and not listed: what a walk stopped by ``max_entries`` left."""
        with self._cond:
            return [p for p in self._todo if not self._is_pruned(p)]

    def served(self) -> dict[str, dict[str, int]]:
        """Requests and directories each host served so far."""
        h = self.hosts
        return {a.label: {"requests": h.requests[i], "dirs": h.dirs[i]} for i, a in enumerate(h.addresses)}

    def stop(self) -> None:
        """Stop every thread and close every socket; returns when they are gone."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        with self._host_free:
            self._host_free.notify_all()
        for conn in list(self._conns):
            conn.abort()
        for t in self._threads:
            if t.is_alive():
                t.join()

    # -- bookkeeping shared by both sides ------------------------------------------------

    def _outstanding_add(self, n: int) -> None:
        with self._results_ready:
            self._outstanding += n

    def _resolve(self, n: int) -> None:
        with self._results_ready:
            self._outstanding -= n
            if self._outstanding == 0:
                self._results_ready.notify_all()

    def _deliver(self, item: Any) -> None:
        with self._results_ready:
            self._results.append(item)
            if isinstance(item, _Dir):
                self._backlog += len(item.entries) + 1
            self._results_ready.notify()

    def _requeue(self, paths: Sequence[bytes]) -> None:
        if paths:
            with self._cond:
                self._todo.extendleft(reversed(paths))
                self._cond.notify_all()

    def _is_pruned(self, path: bytes) -> bool:
        pruned = self._pruned
        if not pruned:
            return False
        while path != self.top and len(path) > 1:
            if path in pruned:
                return True
            path = os.path.dirname(path.rstrip(b"/"))
        return False

    # -- the worker side ----------------------------------------------------------------

    def _spent(self) -> bool:
        return self.max_entries is not None and self.entries >= self.max_entries

    def _take(self, subtree: bool) -> Optional[list[bytes]]:
        """A batch of paths to walk, waiting for one; None when the walk stops."""
        with self._cond:
            # Backpressure: while the consumer has this much to catch up on, ask for no more.
            while self._backlog > self.max_backlog and not self._stopping:
                self._cond.wait(0.05)
            while not self._todo:
                if self._stopping or self._spent():
                    return None
                self._cond.wait()
            if self._stopping or self._spent():
                return None
            n = 1
            if subtree:
                lanes = min(len(self._threads), SUBTREE_PER_HOST * len(self.hosts.addresses))
                n = max(1, min(MAX_BATCH, len(self._todo) // lanes))
            batch = [self._todo.popleft() for _ in range(min(n, len(self._todo)))]
        dropped = [p for p in batch if self._is_pruned(p)]
        if dropped:
            for p in dropped:
                batch.remove(p)
            self._resolve(len(dropped))
        return batch

    def _worker(self) -> None:
        conns: dict[int, AgentHTTP] = {}
        try:
            while True:
                idx = self._pick_host()
                if idx is None:
                    return
                try:
                    subtree = self.mode != "listdir" and self.hosts.subtree[idx]
                    batch = self._take(subtree)
                    if batch is None:
                        return
                    if not batch:
                        continue
                    if not self.hosts.usable(idx):  # set aside while this worker waited for work
                        self._requeue(batch)
                        continue
                    conn = conns.get(idx)
                    if conn is None:
                        conn = conns[idx] = AgentHTTP(self.hosts.addresses[idx], self.options)
                        self._conns.append(conn)
                    self._serve(idx, conn, batch, subtree)
                finally:
                    self.hosts.release(idx)
                    with self._host_free:
                        self._host_free.notify()  # one worker may be waiting for a free host
        except BaseException as exc:  # a bug, or a refusal no retry can fix: end the walk
            self._deliver(exc)
        finally:
            for conn in conns.values():
                conn.close()
            with self._results_ready:
                self._exited += 1
                self._results_ready.notify_all()
            with self._cond:
                self._cond.notify_all()  # others waiting for work may be done too

    def _pick_host(self) -> Optional[int]:
        while True:
            with self._cond:
                if self._stopping:
                    return None
            idx, wait = self.hosts.pick(None if self.mode == "listdir" else SUBTREE_PER_HOST)
            if idx >= 0:
                return idx
            if time.monotonic() - self.hosts.last_ok >= self.retry_for:
                with self._cond:
                    if not self._stopping:
                        self._deliver(self._no_answer())
                    self._stopping = True
                    self._cond.notify_all()
                return None
            with self._host_free:
                self._host_free.wait(min(max(wait, 0.01), 0.5))

    def _no_answer(self) -> Exception:
        """The error that ends a walk no agent answered for ``retry_for`` seconds."""
        if self.hosts.last_invalid:
            return AgentProtocolError(
                f"no agent gave a valid answer for {self.retry_for:g} s; last: {self.hosts.last_error}")
        return AgentConnectionError(
            f"no agent answered for {self.retry_for:g} s; last error: {self.hosts.last_error}")

    def _serve(self, idx: int, conn: AgentHTTP, batch: list[bytes], subtree: bool) -> None:
        """Run one request for ``batch``; whatever it does not complete goes back on the queue."""
        pending = dict.fromkeys(batch)  # ordered set of paths this request owes
        try:
            if subtree:
                done = self._serve_subtree(conn, batch, pending)
            else:
                (path,) = batch
                listing = conn.listdir(path, self.stat, self._filename(path), self.exclusions)
                self._complete(path, listing.entries, listing.error, pending)
                done = 1
        except SubtreeUnsupported:
            self.hosts.subtree[idx] = False
            if self.mode == "subtree":
                raise
            self._requeue(list(pending))
            return
        except TRANSIENT_ERRORS as exc:
            self._requeue(list(pending))
            retry_after = exc.retry_after if isinstance(exc, AgentBusyError) else None
            self.hosts.failed(idx, retry_after, exc)
            return
        if not subtree:
            self._requeue(list(pending))
        self.hosts.succeeded(idx, done)

    def _serve_subtree(self, conn: AgentHTTP, batch: list[bytes], pending: dict[bytes, None]) -> int:
        ex = self.exclusions
        budget = self._budget
        if self.max_entries is not None:
            budget = max(1, min(budget, self.max_entries - self.entries))
        req = WalkRequest(
            paths=batch, stat=self.stat, max_entries=budget, max_seconds=MAX_SECONDS,
            exclude_dirs=list(ex.dirs), exclude_files=list(ex.files), one_fs=ex.one_fs,
        )
        current: Optional[bytes] = None
        entries: list[Entry] = []
        error: Optional[OSError] = None
        done = 0
        for frame in conn.walk(req):
            if isinstance(frame, EntriesFrame):
                if current is None:
                    raise AgentProtocolError("entries before any directory")
                entries.extend(frame.entries)
            elif isinstance(frame, DirFrame):
                if current is not None:
                    self._complete(current, entries, error, pending)
                    done += 1
                if frame.path not in pending:
                    raise AgentProtocolError(f"agent listed {frame.path!r}, which was not asked for")
                current, entries, error = frame.path, [], None
            elif isinstance(frame, ErrorFrame):
                if current is None:
                    raise AgentProtocolError("error before any directory")
                error = OSError(frame.errno, frame.message, self._filename(current))
            elif isinstance(frame, EndFrame):
                if current is not None:
                    self._complete(current, entries, error, pending)
                    done += 1
                if set(frame.frontier) != set(pending):
                    raise AgentProtocolError("the agent's frontier does not match the directories it left")
                self._requeue(list(pending))
                pending.clear()
                self._budget = min(self._budget * 2, self.max_budget)
                return done
        raise AgentProtocolError("walk answer ended before its end frame")

    def _complete(self, path: bytes, entries: list[Entry], error: Optional[OSError],
                  pending: dict[bytes, None]) -> None:
        """Hand one directory to the generator; its subdirectories become owed work."""
        del pending[path]
        if error is None:
            subdirs = [_join(path, e.name) for e in entries if e.kind == KIND_DIR]
            if subdirs:
                self._outstanding_add(len(subdirs))
                pending.update(dict.fromkeys(subdirs))
        else:
            entries = []
        with self._results_ready:
            self.entries += len(entries)
        self._deliver(_Dir(path, entries, error))

    def _filename(self, path: bytes) -> Union[str, bytes]:
        return path if self._bytes else os.fsdecode(path)


def _by_name(entry: Entry) -> bytes:
    return entry.name


def _typed(top: AnyStr) -> Callable[[bytes], AnyStr]:
    return (lambda b: b) if isinstance(top, bytes) else os.fsdecode  # type: ignore[return-value]


def _after_yield(walker: Walker, root: bytes, before: list, after: list, links: set) -> None:
    """Apply what the loop body did to ``dirs``: removed names prune, new names are walked."""
    if before == after:
        return
    kept = set(after)
    for name in before:
        if name not in kept:
            walker.prune(_join(root, os.fsencode(name)))
    known = set(before)
    for name in after:
        if name not in known and name not in links:
            walker.add(_join(root, os.fsencode(name)))


def _listed(
    top: AnyStr, hosts: Union[str, Sequence[str], None], onerror: OnError, **walker_args: Any
) -> Iterator[tuple[Walker, AnyStr, _Dir]]:
    """The directories a walk lists, with their roots typed like ``top``; errors to ``onerror``."""
    if hosts is None:
        raise ValueError("hosts is required")
    top = os.fspath(top)
    walker = Walker(top, hosts, **walker_args)
    typed = _typed(top)
    for d in walker.dirs():
        if d.error is not None:
            if onerror is not None:
                onerror(d.error)
            continue
        yield walker, (top if d.path == walker.top else typed(d.path)), d


def parallel_walk(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    **options: Any,
) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """Walk a remote tree like ``os.walk(top)`` (top-down, symlinks not followed).

    Directories are listed ``workers`` requests at a time, spread over ``hosts``,
    and yielded as they arrive (not in ``os.walk``'s order), ``dirs`` and ``files``
    each sorted by name as the original's were. Removing names from ``dirs`` keeps
    the walk out of them. Errors listing a directory go to ``onerror`` (an
    ``OSError`` with ``filename`` set), as with ``os.walk``;
    :class:`AgentConnectionError` is raised when no agent answers for ``retry_for``
    seconds. Leaving the loop early stops every thread and socket. ``options`` are
    :class:`Walker`'s (``mode``, ``retry_for``, ``exclude_dirs``, ``exclude_files``,
    ``one_fs``: pruning applied by the agents, which never read what it prunes) and
    :class:`~diskover_agent.transport.ClientOptions`' (``timeout``, ``connect_timeout``,
    ``token``, ``tls``, ``cafile``, ``verify``, ``compress``).
    """
    typed = _typed(top)
    for walker, root, d in _listed(top, hosts, onerror, port=port, workers=workers, **options):
        dirs: list[Any] = []
        files: list[Any] = []
        links = set()
        for e in d.entries:
            name = typed(e.name)
            if e.kind == KIND_DIR:
                dirs.append(name)
            elif e.kind == KIND_SYMLINK and e.target == KIND_DIR:
                dirs.append(name)
                links.add(name)
            else:
                files.append(name)
        dirs.sort()
        files.sort()
        before = list(dirs)
        yield root, dirs, files
        _after_yield(walker, d.path, before, dirs, links)


def parallel_walk_entries(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    **options: Any,
) -> Iterator[tuple[AnyStr, list[AgentDirEntry[AnyStr]], list[AgentDirEntry[AnyStr]]]]:
    """:func:`parallel_walk` yielding ``(root, dirs, files)`` of :class:`AgentDirEntry`.

    Every entry carries its lstat record from the listing itself (``entry.stat()``
    makes no request). Removing entries from ``dirs`` prunes the walk.
    """
    typed = _typed(top)
    for walker, root, d in _listed(top, hosts, onerror, port=port, workers=workers, stat=True, **options):
        dirs: list[AgentDirEntry[AnyStr]] = []
        files: list[AgentDirEntry[AnyStr]] = []
        for e in sorted(d.entries, key=_by_name):
            (dirs if is_walk_dir(e) else files).append(AgentDirEntry(root, typed(e.name), e))
        before = [x.name for x in dirs]
        yield root, dirs, files
        _after_yield(walker, d.path, before, [x.name for x in dirs], {x.name for x in dirs if x.is_symlink()})
