"""The engine behind ``parallel_walk``: ``os.walk`` through many agents at once.

The engine is a work queue of directory paths over hosts. Worker threads (as many as
can have a request in flight: ``SUBTREE_PER_HOST`` per host for subtree requests, up
to ``workers`` once a host lists one directory per request) each take a batch of
paths, send it to the next healthy host and stream back every directory the agent
lists below them (the subtree protocol: the agent walks up to a budget and answers
the frontier it did not reach), or, against an agent without it, list one directory
per request. The directories each block of an answer completes go to the generator
in one batch; directories found but not listed go back on the queue. When a request
breaks off, whatever it had not completed is queued again, so nothing is lost, and
nothing that was completed is listed twice.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress
from typing import Any, Optional, Union

import msgspec

from .backoff import Backoff
from .connection import parse_hosts
from .errors import AgentBusyError, AgentConnectionError, AgentProtocolError
from .protocol import (
    FS_ENCODING,
    FS_ERRORS,
    KIND_DIR,
    KIND_SYMLINK,
    MAX_PATH,
    DirFrame,
    EndFrame,
    EntriesFrame,
    Entry,
    ErrorFrame,
    Exclusions,
    FrontierFrame,
    SkipFrame,
    WalkRequest,
)
from .transport import (
    DEFAULT_PORT,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    Names,
    SubtreeUnsupported,
    WalkFieldsRefused,
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
#: Paths sent in one subtree request, at most, and their bytes (the agent takes request
#: bodies up to 1 MiB; exclusion patterns take at most half of it).
MAX_BATCH = 64
MAX_BATCH_BYTES = 256 * 1024
MODES = ("auto", "subtree", "listdir")
#: ``_Hosts.level`` steps: the agent refused ``names_frames``; then the older fields too.
NAMES_REFUSED = 1
LEGACY = 2
#: ``kinds.encode().translate(_DIR_FLAGS)``: 1 for each directory, 0 for the rest.
_DIR_FLAGS = bytes(int(c == ord(KIND_DIR)) for c in range(256))


def _join(path: bytes, name: bytes) -> bytes:
    return path + name if path.endswith(b"/") else path + b"/" + name


#: Called with a host's label and the reason when the walk sets it aside for not answering
#: (broken off, refused, timed out, an invalid answer: not a 503), and with None when it
#: answers again; from the walk's threads.
HostWatcher = Callable[[str, Optional[str]], None]


class _Hosts:
    """Picks a host for each request: the healthy one with the fewest requests in flight
    (round-robin among equals), setting aside the ones that fail, with backoff."""

    def __init__(self, addresses: list[HostAddress], watcher: Optional[HostWatcher] = None) -> None:
        self.addresses = addresses
        self.watcher = watcher
        #: Hosts set aside for not answering, and why, until they answer again.
        self.down: dict[int, str] = {}
        self._lock = threading.Lock()
        self._turn = 0
        self._backoff = Backoff(len(addresses))
        self.inflight = [0] * len(addresses)
        self.subtree = [True] * len(addresses)
        #: How many of the walk request's newer fields each agent refused, in steps: 0 all
        #: asked; NAMES_REFUSED without ``names_frames``; LEGACY without any of them.
        self.level = [0] * len(addresses)
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
                if self._backoff.down_until[idx] > now:
                    continue
                if cap is not None and self.subtree[idx] and self.inflight[idx] >= cap:
                    continue
                if best < 0 or self.inflight[idx] < self.inflight[best]:
                    best = idx
            if best >= 0:
                self._turn = best + 1
                self.inflight[best] += 1
                return best, 0.0
            down = [t - now for t in self._backoff.down_until if t > now]
            return -1, min(down) if len(down) == n else 0.05

    def usable(self, idx: int) -> bool:
        return self._backoff.down_until[idx] <= time.monotonic()

    def release(self, idx: int) -> None:
        with self._lock:
            self.inflight[idx] -= 1

    def failed(self, idx: int, retry_after: Optional[float] = None, error: Optional[BaseException] = None) -> None:
        reason = None
        with self._lock:
            self._backoff.set_aside(idx, time.monotonic(), retry_after)
            if error is not None:
                self.last_error = f"{self.addresses[idx].label}: {error}"
                self.last_invalid = isinstance(error, AgentProtocolError)
                if not isinstance(error, AgentBusyError) and idx not in self.down:
                    reason = self.down[idx] = str(error) or type(error).__name__
        if reason is not None and self.watcher is not None:
            self.watcher(self.addresses[idx].label, reason)

    def refused(self, idx: int, level: int) -> None:
        """The agent refused a request's newer fields: ask it with fewer (``level``)."""
        with self._lock:
            self.level[idx] = max(self.level[idx], level)

    def succeeded(self, idx: int, dirs: int) -> None:
        with self._lock:
            self._backoff.reset(idx)
            self.requests[idx] += 1
            self.dirs[idx] += dirs
            self.last_ok = time.monotonic()
            back = self.down.pop(idx, None) is not None
        if back and self.watcher is not None:
            self.watcher(self.addresses[idx].label, None)


class _Dir(msgspec.Struct, gc=False):
    """One completed directory on its way to the generator; ``skipped``: a path the walk
    found that is a symlink now, so neither listed nor an error (as ``os.walk``).

    Its entries are ``entries``, or, when they came in ``names`` frames, ``names`` (in
    the walk's type: ``str`` for a walk whose top is ``str``), ``kinds`` (one letter per
    name) and ``targets`` (one letter per symlink); ``entries`` is then made when read.
    (A ``msgspec.Struct``: made in C, one per directory.)"""

    path: bytes
    _entries: Optional[list[Entry]]
    error: Optional[OSError]
    skipped: bool = False
    names: Optional[list[Any]] = None
    kinds: str = ""
    targets: str = ""

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = _entries_of(self.names or [], self.kinds, self.targets)
        return self._entries

    def __len__(self) -> int:
        """Its entries."""
        return len(self._entries) if self._entries is not None else len(self.kinds)


def _entries_of(names: list[Any], kinds: str, targets: str) -> list[Entry]:
    """``Entry`` records of names in ``names`` frames' form."""
    links = iter(targets)
    out = []
    for name, kind in zip(names, kinds, strict=True):
        target = next(links) if kind == KIND_SYMLINK else "-"
        out.append(Entry(os.fsencode(name), kind, None if target == "-" else target, None, None))  # type: ignore[arg-type]
    return out


class _Out:
    """What one request completed and has not handed over yet (see :meth:`Walker._flush`)."""

    __slots__ = ("batch", "entries", "level", "size", "subdirs")

    def __init__(self) -> None:
        self.batch: list[_Dir] = []
        self.size = self.entries = self.subdirs = self.level = 0


class Walker:
    """The threads, queue and connections of one walk; iterate :meth:`dirs`. ``on_host``
    (a :data:`HostWatcher`) hears when a host is set aside for not answering, and when it
    answers again."""

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
        follow_top: Optional[bool] = None,
        max_entries: Optional[int] = None,
        max_backlog: int = MAX_BACKLOG,
        expand: bool = True,
        on_host: Optional[HostWatcher] = None,
        **options: Any,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if not expand and mode != "listdir":
            raise ValueError("expand=False lists one directory per request: mode must be 'listdir'")
        self.top = fsencode_path(top)
        self._bytes = isinstance(top, bytes)
        self.hosts = _Hosts(parse_hosts(hosts, port), on_host)
        self.stat = stat
        self.mode = mode
        self.options = ClientOptions(**options)
        self.exclusions = Exclusions.of(exclude_dirs, exclude_files, one_fs)
        self.retry_for = retry_for
        self.max_budget = max_budget
        self._budget = min(FIRST_BUDGET, max_budget)
        self._todo: collections.deque[bytes] = collections.deque(roots if roots is not None else [self.top])
        #: Paths opened following a symlink in their last component, as ``os.walk`` opens
        #: its top (and, with ``followlinks``, the links it descends into); every other
        #: path is a directory the walk found, which is not walked if it is a symlink now.
        #: ``follow_top`` defaults to whether ``roots`` are left out (the walk starts at the top).
        if follow_top is None:
            follow_top = roots is None
        self._follow: set[bytes] = {self.top} if follow_top else set()
        self._cond = threading.Condition()
        #: Workers waiting for a host (all set aside, or all at their request cap) wait here.
        self._host_free = threading.Condition()
        #: Batches of completed directories (or an exception ending the walk), as handed
        #: over, each with its size (entries and directories) and its count of directories.
        self._results: list[tuple[list[Any], int, int]] = []
        self._results_ready = threading.Condition()
        #: Directories known and not yet handed to the generator (queued, in flight, or waiting).
        self._outstanding = len(self._todo)
        #: Directories the generator has taken from the workers and not yet yielded (or skipped).
        self.in_hand = 0
        #: Stop taking new work once this many entries were listed (None: walk everything).
        self.max_entries = max_entries
        self.entries = 0
        #: Entries (and directories) listed and not yet taken by the consumer; past
        #: ``max_backlog``, workers send no new request until it has caught up.
        self.max_backlog = max_backlog
        self._backlog = 0
        self._exited = 0
        self._pruned: set[bytes] = set()
        #: Walk the subdirectories each listing shows (False: only the paths given and added).
        self.expand = expand
        self._stopping = False
        self._conns: list[AgentHTTP] = []
        self.workers = workers
        #: Threads started: only as many as can have a request in flight (subtree mode
        #: sends at most SUBTREE_PER_HOST to each host), the rest once a host lists one
        #: directory per request.
        self._threads: list[threading.Thread] = []
        self._lanes = workers if mode == "listdir" else min(workers, SUBTREE_PER_HOST * len(self.hosts.addresses))
        self._start_lock = threading.Lock()

    # -- the generator side ----------------------------------------------------------

    def dirs(self, skips: bool = False) -> Iterator[_Dir]:
        """Completed directories as they arrive, until the walk is complete; with
        ``skips``, the paths found to be symlinks now too (``skipped``)."""
        self._start(self._lanes)
        cond = self._results_ready
        top = self.top
        pruned = self._pruned
        try:
            while True:
                with cond:
                    while not self._results:
                        if self._outstanding == 0 or self._exited == len(self._threads):
                            return
                        cond.wait()
                    batches = self._results
                    self._results = []
                    for _batch, size, count in batches:
                        self._backlog -= size
                        # Taken: resolved now (what the loop body adds is counted before the next wait).
                        self._outstanding -= count
                        self.in_hand += count
                for batch, _size, count in batches:
                    if not count:  # the exception that ends the walk
                        raise batch[0]
                    for item in batch:  # (the loop body may prune what follows in the batch)
                        self.in_hand -= 1
                        if pruned and item.path != top and (
                            item.path in pruned or os.path.dirname(item.path) in pruned
                        ):
                            self.prune(item.path)  # pruned, or below a pruned directory: skip its subtree
                            continue
                        if item.skipped and not skips:
                            continue
                        yield item
        finally:
            self.stop()

    def _start(self, n: int) -> None:
        """Run ``n`` worker threads in all (never more than ``workers``)."""
        with self._start_lock:  # not _cond: each thread starts working as soon as it starts
            if self._stopping:
                return
            while len(self._threads) < min(n, self.workers):
                t = threading.Thread(target=self._worker, name=f"diskover-walk-{len(self._threads)}", daemon=True)
                with self._results_ready:
                    self._threads.append(t)
                t.start()

    def prune(self, path: bytes) -> None:
        """Keep the walk out of ``path``: queued work for it is dropped, results skipped."""
        self._pruned.add(path)

    def add(self, path: bytes, follow: bool = False) -> None:
        """Walk a directory the walk did not know about (a name added to ``dirs``, or a
        symlink to follow); with ``follow``, a symlink in its last component is followed."""
        with self._cond:
            if follow:
                self._follow.add(path)
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

    def hosts_down(self) -> dict[str, str]:
        """The hosts set aside for not answering that have not answered since, and why."""
        h = self.hosts
        with h._lock:
            return {h.addresses[i].label: reason for i, reason in sorted(h.down.items())}

    def stop(self) -> None:
        """Stop every thread and close every socket; returns when they are gone."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        with self._host_free:
            self._host_free.notify_all()
        for conn in list(self._conns):
            conn.abort()
        with self._start_lock:
            threads = list(self._threads)
        for t in threads:
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
        """Hand one directory (or the exception that ends the walk) to the generator."""
        if isinstance(item, _Dir):
            self._deliver_batch([item], len(item) + 1, len(item) if item.error is None else 0, 0)
        else:
            with self._results_ready:
                self._results.append(([item], 0, 0))
                self._results_ready.notify()

    def _deliver_batch(self, batch: list[_Dir], size: int, entries: int, subdirs: int) -> None:
        """Hand completed directories to the generator in one lock operation: ``size``
        their entries and themselves, ``entries`` the entries listed, ``subdirs`` the
        directories they made owed (counted before any of them is queued)."""
        with self._results_ready:
            self._outstanding += subdirs
            self.entries += entries
            if batch:
                self._results.append((batch, size, len(batch)))
                self._backlog += size
                self._results_ready.notify()

    def _requeue(self, paths: Sequence[bytes]) -> None:
        if paths:
            with self._cond:
                self._todo.extendleft(reversed(paths))
                self._cond.notify(len(paths))

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
            while True:
                if self._stopping:
                    return None
                if self._backlog > self.max_backlog:
                    # Backpressure: while the consumer has this much to catch up on, ask
                    # for no more (checked again by a worker that new work woke up).
                    self._cond.wait(0.05)
                elif self._todo:
                    break
                elif self._spent():
                    return None
                else:
                    self._cond.wait()
            if self._spent():
                return None
            n = 1
            if subtree:
                n = max(1, min(MAX_BATCH, len(self._todo) // self._lanes))
            batch = self._batch(n)
        dropped = [p for p in batch if self._is_pruned(p)]
        if dropped:
            for p in dropped:
                batch.remove(p)
            self._resolve(len(dropped))
        for path in [p for p in batch if len(p) > MAX_PATH]:  # no agent serves it: say so, go on
            batch.remove(path)
            error = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), self._filename(path))
            self._deliver(_Dir(path, [], error))
        return batch

    def _batch(self, n: int) -> list[bytes]:
        """Up to ``n`` queued paths of at most ``MAX_BATCH_BYTES`` in all (at least one).
        A path to follow (the top, a followed link) goes alone: the request says whether
        the last components of all its paths may be symlinks."""
        todo = self._todo
        follow = self._follow
        batch = [todo.popleft()]
        size = len(batch[0])
        if batch[0] in follow:
            return batch
        while todo and len(batch) < n:
            size += len(todo[0]) + 8
            if size > MAX_BATCH_BYTES or todo[0] in follow:
                break
            batch.append(todo.popleft())
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
        out = _Out()
        try:
            if subtree:
                done = self._serve_subtree(idx, conn, batch, pending, out)
            else:
                (path,) = batch
                nofollow = self.hosts.level[idx] < LEGACY and path not in self._follow
                listing = conn.listdir(path, self.stat, self._filename(path), self.exclusions, nofollow)
                if listing.skipped:
                    self._skip(path, pending, out)
                else:
                    self._complete(_Dir(path, listing.entries, listing.error), pending, out)
                done = 1
        except WalkFieldsRefused:
            self._flush(out)
            self.hosts.refused(idx, out.level if subtree else LEGACY)
            self._requeue(list(pending))
            return
        except SubtreeUnsupported:
            self._flush(out)
            self.hosts.subtree[idx] = False
            if self.mode == "subtree":
                raise
            self._start(self.workers)  # one directory per request: every worker has work
            self._requeue(list(pending))
            return
        except TRANSIENT_ERRORS as exc:
            self._flush(out)
            self._requeue(list(pending))
            if self._stopping:  # broken off by stop(): the host did nothing wrong
                return
            retry_after = exc.retry_after if isinstance(exc, AgentBusyError) else None
            self.hosts.failed(idx, retry_after, exc)
            return
        self._flush(out)
        if not subtree:
            self._requeue(list(pending))
        self.hosts.succeeded(idx, done)

    def _serve_subtree(self, idx: int, conn: AgentHTTP, batch: list[bytes], pending: dict[bytes, None],
                       out: _Out) -> int:
        ex = self.exclusions
        budget = self._budget
        if self.max_entries is not None:
            budget = max(1, min(budget, self.max_entries - self.entries))
        level = self.hosts.level[idx]
        modern = level < LEGACY
        req = WalkRequest(
            paths=batch, stat=self.stat, max_entries=budget, max_seconds=MAX_SECONDS,
            exclude_dirs=list(ex.dirs), exclude_files=list(ex.files), one_fs=ex.one_fs,
            frontier_frames=modern, nofollow=modern and batch[0] not in self._follow,
            names_frames=level < NAMES_REFUSED and not self.stat,
        )
        out.level = NAMES_REFUSED if req.names_frames else LEGACY  # the step to take if refused
        current: Optional[bytes] = None
        entries: list[Entry] = []
        names: Optional[list[Any]] = None
        kinds = targets = ""
        error: Optional[OSError] = None
        #: Subdirectories of ``current`` the agent sent to the frontier before it was complete.
        early: set[bytes] = set()
        done = 0
        for frame in conn.walk(req, not self._bytes):
            if isinstance(frame, Names):
                if current is None:
                    raise AgentProtocolError("entries before any directory")
                if names is None:
                    names, kinds, targets = frame.names, frame.kinds, frame.targets
                else:
                    names += frame.names
                    kinds += frame.kinds
                    targets += frame.targets
            elif isinstance(frame, DirFrame):
                if current is not None:
                    self._close_dir(_Dir(current, None if names is not None else entries, error, False,
                                         names, kinds, targets), pending, out, early)
                    done += 1
                if frame.path not in pending:
                    raise AgentProtocolError(f"agent listed {frame.path!r}, which was not asked for")
                current, entries, names, error = frame.path, [], None, None
            elif frame is None:  # the next frames wait for the network: hand over what is complete
                if out.batch:
                    self._flush(out)
            elif isinstance(frame, EntriesFrame):
                if current is None:
                    raise AgentProtocolError("entries before any directory")
                entries.extend(frame.entries)
            elif isinstance(frame, ErrorFrame):
                if current is None:
                    raise AgentProtocolError("error before any directory")
                error = OSError(frame.errno, frame.message, self._filename(current))
            elif isinstance(frame, FrontierFrame):
                ready = self._frontier_frame(frame.paths, current, pending, early)
                self._flush(out)  # their parents are counted and handed over before they are queued
                self._requeue(ready)
            elif isinstance(frame, SkipFrame):
                # A path found by the walk that is a symlink now: not walked, as os.walk.
                if current is not None:
                    self._close_dir(_Dir(current, None if names is not None else entries, error, False,
                                         names, kinds, targets), pending, out, early)
                    done += 1
                    current = None
                if frame.path not in pending or not req.nofollow:
                    raise AgentProtocolError(f"agent skipped {frame.path!r}, which was not asked for")
                self._skip(frame.path, pending, out)
            elif isinstance(frame, EndFrame):
                if current is not None:
                    self._close_dir(_Dir(current, None if names is not None else entries, error, False,
                                         names, kinds, targets), pending, out, early)
                    done += 1
                if set(frame.frontier) != set(pending):
                    raise AgentProtocolError("the agent's frontier does not match the directories it left")
                self._flush(out)
                self._requeue(list(pending))
                pending.clear()
                self._budget = min(self._budget * 2, self.max_budget)
                return done
        raise AgentProtocolError("walk answer ended before its end frame")

    def _close_dir(self, d: _Dir, pending: dict[bytes, None], out: _Out, early: set[bytes]) -> None:
        """The directory being listed is complete: hand it over, then queue what the agent
        sent to the frontier before it was (``early``)."""
        self._complete(d, pending, out, early)
        if early:
            self._queue_early(pending, early, out)

    @staticmethod
    def _frontier_frame(paths: list[bytes], current: Optional[bytes], pending: dict[bytes, None],
                        early: set[bytes]) -> list[bytes]:
        """Paths of a ``frontier`` frame: those owed, to queue now; subdirectories of
        the directory still arriving go to ``early`` until it is complete."""
        ready = []
        prefix = None if current is None else current if current.endswith(b"/") else current + b"/"
        for path in paths:
            if path in pending:
                del pending[path]
                ready.append(path)
            elif prefix is not None and path.startswith(prefix) and b"/" not in path[len(prefix):] \
                    and len(path) > len(prefix):
                early.add(path)
            else:
                raise AgentProtocolError(f"agent sent {path!r} to the frontier, which is not owed")
        return ready

    def _queue_early(self, pending: dict[bytes, None], early: set[bytes], out: _Out) -> None:
        """After :meth:`_complete`: the subdirectories already sent to the frontier
        (``early``) are queued instead of owed; void when the listing failed."""
        if not out.batch[-1].error:
            for sub in early:
                del pending[sub]
            self._flush(out)
            self._requeue(list(early))
        early.clear()

    def _skip(self, path: bytes, pending: dict[bytes, None], out: _Out) -> None:
        """A path found by the walk that is a symlink now: not walked, as ``os.walk``."""
        del pending[path]
        self._followed(path)
        out.batch.append(_Dir(path, [], None, skipped=True))
        out.size += 1

    def _complete(self, d: _Dir, pending: dict[bytes, None], out: _Out, early: Optional[set[bytes]] = None) -> None:
        """Hand one directory to the generator (with the next :meth:`_flush`); its
        subdirectories become owed work. ``early``: subdirectories it must hold."""
        path = d.path
        names = d.names
        n = len(d.kinds) if names is not None else len(d._entries)  # type: ignore[arg-type]
        if d.error is not None:
            d._entries, d.names, d.kinds, d.targets = [], None, "", ""
            n = 0
        elif self.expand:
            subdirs = None
            if names is not None:
                kinds = d.kinds
                if KIND_DIR in kinds:
                    dnames = list(compress(names, kinds.encode("ascii").translate(_DIR_FLAGS)))
                    if not self._bytes:
                        dnames = "\0".join(dnames).encode(FS_ENCODING, FS_ERRORS).split(b"\0")
                    prefix = path if path.endswith(b"/") else path + b"/"
                    subdirs = [prefix + sub for sub in dnames]
            else:
                subdirs = [_join(path, e.name) for e in d._entries if e.kind == KIND_DIR]  # type: ignore[union-attr]
            if early and not early <= set(subdirs or ()):
                raise AgentProtocolError(f"agent sent to the frontier what {path!r} does not hold")
            if subdirs:
                out.subdirs += len(subdirs)
                pending.update(dict.fromkeys(subdirs))
        del pending[path]
        if self._follow and path in self._follow:
            self._followed(path)
        out.batch.append(d)
        out.size += n + 1
        out.entries += n

    def _flush(self, out: _Out) -> None:
        """Hand over what ``out`` gathered."""
        if out.batch or out.subdirs:
            self._deliver_batch(out.batch, out.size, out.entries, out.subdirs)
            out.batch = []
            out.size = out.entries = out.subdirs = 0

    def _followed(self, path: bytes) -> None:
        """Forget a path to follow once it is served, so the set holds only work owed."""
        if path in self._follow:
            with self._cond:
                self._follow.discard(path)

    def _filename(self, path: bytes) -> Union[str, bytes]:
        return path if self._bytes else os.fsdecode(path)
