"""``parallel_walk``: ``os.walk`` through many agents at once.

The engine is a work queue over hosts. ``workers`` threads each take a directory
from the queue, list it on the next healthy host (keep-alive connections, one per
thread and host), and hand the listing back to the generator, which yields it and
only then queues the subdirectories still in ``dirs``, so pruning ``dirs`` in the
loop body works as with ``os.walk(topdown=True)``. A host that fails is set aside
for a while and its work goes to the others; nothing is lost or listed twice.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import AnyStr, Generic, Optional, Union

from .connection import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, is_walk_dir, parse_hosts, split_names
from .entry import AgentDirEntry
from .errors import AgentBusyError, AgentConnectionError
from .protocol import KIND_SYMLINK
from .transport import DEFAULT_PORT, TRANSIENT_ERRORS, AgentHTTP, HostAddress, RemoteListing, fsencode_path

#: Seconds a walk keeps retrying while no agent answers, before it raises.
DEFAULT_RETRY_FOR = 10.0
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 5.0

OnError = Optional[Callable[[OSError], object]]


class _Hosts:
    """Round-robin over hosts, setting aside the ones that fail, with backoff."""

    def __init__(self, addresses: list[HostAddress]) -> None:
        self.addresses = addresses
        self._lock = threading.Lock()
        self._turn = 0
        self._down_until = [0.0] * len(addresses)
        self._failures = [0] * len(addresses)
        self.served = [0] * len(addresses)

    def pick(self) -> tuple[int, float]:
        """The next usable host's index, or (-1, seconds to wait) when all are set aside."""
        now = time.monotonic()
        with self._lock:
            n = len(self.addresses)
            for i in range(n):
                idx = (self._turn + i) % n
                if self._down_until[idx] <= now:
                    self._turn = idx + 1
                    return idx, 0.0
            return -1, min(self._down_until) - now

    def failed(self, idx: int, retry_after: Optional[float] = None) -> None:
        with self._lock:
            self._failures[idx] += 1
            delay = min(_BACKOFF_FIRST * 2 ** (self._failures[idx] - 1), _BACKOFF_MAX)
            self._down_until[idx] = time.monotonic() + (retry_after if retry_after is not None else delay)

    def succeeded(self, idx: int) -> None:
        with self._lock:
            self._failures[idx] = 0
            self.served[idx] += 1


@dataclass
class _Result:
    root: object
    listing: Optional[RemoteListing] = None
    fatal: Optional[BaseException] = None


_STOP = object()


class _Walk(Generic[AnyStr]):
    """One walk's threads, queues and connections."""

    def __init__(
        self, top: AnyStr, addresses: list[HostAddress], workers: int, want_stat: bool,
        timeout: float, connect_timeout: float, retry_for: float,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        fsencode_path(top)  # absolute, encodable
        self.top = top
        self.hosts = _Hosts(addresses)
        self.want_stat = want_stat
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry_for = retry_for
        self.todo: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self._conns: list[AgentHTTP] = []
        self._conns_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._worker, name=f"diskover-walk-{i}", daemon=True) for i in range(workers)
        ]

    # -- worker side -------------------------------------------------------------

    def _worker(self) -> None:
        conns: dict[int, AgentHTTP] = {}
        try:
            while True:
                root = self.todo.get()
                if root is _STOP or self.stopping.is_set():
                    return
                self.results.put(self._fetch(root, conns))
        finally:
            for conn in conns.values():
                conn.close()

    def _fetch(self, root: object, conns: dict[int, AgentHTTP]) -> _Result:
        raw = os.fsencode(root)  # type: ignore[call-overload]
        giving_up_at: Optional[float] = None
        last_error: Optional[BaseException] = None
        while not self.stopping.is_set():
            idx, wait = self.hosts.pick()
            if idx < 0:
                now = time.monotonic()
                if giving_up_at is None:
                    giving_up_at = now + self.retry_for
                if now >= giving_up_at:
                    return _Result(root, fatal=AgentConnectionError(
                        f"no agent answered for {self.retry_for:g} s; last error: {last_error}"))
                self.stopping.wait(min(wait, giving_up_at - now, 1.0))
                continue
            conn = conns.get(idx)
            if conn is None:
                conn = conns[idx] = AgentHTTP(self.hosts.addresses[idx], self.timeout, self.connect_timeout)
                with self._conns_lock:
                    self._conns.append(conn)
            try:
                listing = conn.listdir(raw, self.want_stat, root)
            except TRANSIENT_ERRORS as exc:
                last_error = exc
                retry_after = exc.retry_after if isinstance(exc, AgentBusyError) else None
                self.hosts.failed(idx, retry_after)
                continue
            except BaseException as exc:  # a bug or a refusal no retry can fix: end the walk
                return _Result(root, fatal=exc)
            self.hosts.succeeded(idx)
            return _Result(root, listing)
        return _Result(root, fatal=AgentConnectionError("walk stopped"))

    # -- generator side ------------------------------------------------------------

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Stop every thread and close every socket; returns when they are gone."""
        self.stopping.set()
        for _ in self.threads:
            self.todo.put(_STOP)
        with self._conns_lock:
            for conn in self._conns:
                conn.abort()
        for t in self.threads:
            t.join()

    def results_in_order(self) -> Iterator[tuple[AnyStr, RemoteListing]]:
        """Listings as they arrive; the caller queues subdirectories with :meth:`push`."""
        self.pending = 1
        self.todo.put(self.top)
        while self.pending:
            res = self.results.get()
            self.pending -= 1
            if res.fatal is not None:
                raise res.fatal
            assert res.listing is not None
            yield res.root, res.listing  # type: ignore[misc]

    def push(self, root: AnyStr, names: Sequence[AnyStr], links: set) -> None:
        """Queue the subdirectories of ``root`` that the walk goes into."""
        for name in names:
            if name not in links:
                self.todo.put(os.path.join(root, name))
                self.pending += 1


def _walk(
    top: AnyStr, hosts: Union[str, Sequence[str]], port: int, workers: int, want_stat: bool,
    timeout: float, connect_timeout: float, retry_for: float,
) -> _Walk[AnyStr]:
    return _Walk(top, parse_hosts(hosts, port), workers, want_stat, timeout, connect_timeout, retry_for)


def parallel_walk(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    retry_for: float = DEFAULT_RETRY_FOR,
) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """Walk a remote tree like ``os.walk(top)`` (top-down, symlinks not followed).

    Directories are listed ``workers`` at a time, spread over ``hosts``, and yielded
    as they arrive. Removing names from ``dirs`` keeps the walk out of them. Errors
    listing a directory go to ``onerror`` (an ``OSError`` with ``filename`` set), as
    with ``os.walk``; :class:`AgentConnectionError` is raised when no agent answers
    for ``retry_for`` seconds. Leaving the loop early stops every thread and socket.
    """
    if hosts is None:
        raise ValueError("hosts is required")
    walk = _walk(top, hosts, port, workers, False, timeout, connect_timeout, retry_for)
    walk.start()
    try:
        for root, listing in walk.results_in_order():
            if listing.error is not None:
                if onerror is not None:
                    onerror(listing.error)
                continue
            dirs, files = split_names(root, listing.entries)
            links = _symlink_names(root, listing)
            yield root, dirs, files
            walk.push(root, dirs, links)
    finally:
        walk.stop()


def parallel_walk_entries(
    top: AnyStr,
    workers: int = 40,
    hosts: Union[str, Sequence[str], None] = None,
    port: int = DEFAULT_PORT,
    onerror: OnError = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    retry_for: float = DEFAULT_RETRY_FOR,
) -> Iterator[tuple[AnyStr, list[AgentDirEntry[AnyStr]], list[AgentDirEntry[AnyStr]]]]:
    """:func:`parallel_walk` yielding ``(root, dirs, files)`` of :class:`AgentDirEntry`.

    Every entry carries its lstat record from the listing itself (``entry.stat()``
    makes no request). Removing entries from ``dirs`` prunes the walk.
    """
    if hosts is None:
        raise ValueError("hosts is required")
    walk = _walk(top, hosts, port, workers, True, timeout, connect_timeout, retry_for)
    walk.start()
    try:
        for root, listing in walk.results_in_order():
            if listing.error is not None:
                if onerror is not None:
                    onerror(listing.error)
                continue
            decode = (lambda b: b) if isinstance(root, bytes) else os.fsdecode
            dirs: list[AgentDirEntry[AnyStr]] = []
            files: list[AgentDirEntry[AnyStr]] = []
            for e in listing.entries:
                (dirs if is_walk_dir(e) else files).append(AgentDirEntry(root, decode(e.name), e))
            yield root, dirs, files
            walk.push(root, [d.name for d in dirs], {d.name for d in dirs if d.is_symlink()})
    finally:
        walk.stop()


def _symlink_names(root: AnyStr, listing: RemoteListing) -> set:
    decode = (lambda b: b) if isinstance(root, bytes) else os.fsdecode
    return {decode(e.name) for e in listing.entries if e.kind == KIND_SYMLINK}
