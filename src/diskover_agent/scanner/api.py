"""The alt-scanner surface diskover calls (:func:`scandir`, :func:`stat`, :func:`walk`...),
over state shared by every thread: the settings, a connection per thread and agent, and
the listings kept for the ``scandir()`` that follows a ``stat()``."""

from __future__ import annotations

import collections
import errno
import itertools
import os
import posixpath
import stat as _stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, AnyStr, Optional, TypeVar, Union

from ..connection import parse_hosts
from ..errors import AgentBusyError, AgentConnectionError
from ..oswalk import parallel_walk
from ..protocol import KIND_SYMLINK
from ..transport import TRANSIENT_ERRORS, AgentHTTP, ClientOptions, RemoteListing, fsencode_path
from .config import Settings, load_settings
from .hosts import AgentsUnavailableError, Hosts
from .logs import logger
from .records import ScandirIterator, ScannerDirEntry, StatResult, fields_of, is_denied, no_stat

T = TypeVar("T")

#: Listings fetched by ``stat()`` or ``check_dirpath()``, kept for the ``scandir()`` that follows.
LISTINGS_MAX = 64


# -- shared state: settings, connections, kept listings ------------------------------------------

class _State:
    """Everything the module functions share; replaced whole by :func:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exclusions = settings.exclusions
        self.options = ClientOptions(**settings.client_options())
        self.hosts = Hosts(parse_hosts(list(settings.hosts), settings.port), settings.retry_for)
        self.lock = threading.Lock()
        self.local = threading.local()
        self.counter = itertools.count()
        self.conns: weakref.WeakSet[AgentHTTP] = weakref.WeakSet()
        #: Listings fetched for ``scandir()`` calls still to come: key -> [listing, uses left].
        self.kept: collections.OrderedDict[bytes, list[Any]] = collections.OrderedDict()

    def call(self, request: Callable[[AgentHTTP], T]) -> T:
        """Run a request on this thread's connection to a usable agent, retrying busy and
        unreachable agents as :class:`Hosts` says, until one answers."""
        local = self.local
        if getattr(local, "conns", None) is None:
            local.conns, local.retried = {}, set()
            local.home = next(self.counter) % len(self.hosts.addresses)
        started = time.monotonic()
        while True:
            idx = self.hosts.take(local.home, started)
            http = local.conns.get(idx)
            if http is None:
                http = local.conns[idx] = AgentHTTP(self.hosts.addresses[idx], self.options)
                with self.lock:
                    self.conns.add(http)
            try:
                result = request(http)
            except TRANSIENT_ERRORS as exc:
                if idx not in local.retried and not isinstance(exc, AgentBusyError):
                    local.retried.add(idx)  # a kept-alive connection the agent closed: once more, on a new one
                    continue
                self.hosts.failed(idx, exc)
                continue
            local.retried.discard(idx)
            self.hosts.succeeded(idx)
            return result

    def fetch(self, key: bytes, filename: Union[str, bytes]) -> RemoteListing:
        """One listing (with stat records and the exclusions) of the normalised remote path
        ``key``; file-system errors in ``.error``, with ``filename`` as the caller wrote it."""
        return self.call(lambda http: http.listdir(key, True, filename, self.exclusions or None))

    def keep(self, key: bytes, listing: RemoteListing, uses: int) -> None:
        with self.lock:
            self.kept[key] = [listing, uses]
            self.kept.move_to_end(key)
            while len(self.kept) > LISTINGS_MAX:
                self.kept.popitem(last=False)

    def peek(self, key: bytes) -> Optional[RemoteListing]:
        with self.lock:
            kept = self.kept.get(key)
        return kept[0] if kept is not None else None

    def use(self, key: bytes) -> Optional[RemoteListing]:
        """A kept listing for ``scandir()``, forgotten after its last use."""
        with self.lock:
            kept = self.kept.get(key)
            if kept is None:
                return None
            kept[1] -= 1
            if kept[1] <= 0:
                del self.kept[key]
        return kept[0]

    def close(self) -> None:
        self.hosts.close()
        with self.lock:
            conns = list(self.conns)
            self.kept.clear()
        for conn in conns:
            conn.close()


_state_lock = threading.Lock()
_current: Optional[_State] = None


def _state() -> _State:
    global _current
    state = _current
    if state is None:
        with _state_lock:
            if _current is None:
                settings = load_settings()
                logger.info("diskover agent scanner: %s", _describe(settings))
                _current = _State(settings)
            state = _current
    return state


def _describe(s: Settings) -> str:
    return (f"hosts {','.join(s.hosts)} (port {s.port}), tls {s.tls or s.cafile is not None}, "
            f"token {'yes' if s.token else 'no'}, retry for {s.retry_for:g} s, walk workers {s.workers}, "
            f"exclude dirs {list(s.exclude_dirs)}, exclude files {list(s.exclude_files)}, one_fs {s.one_fs}, "
            f"config file {s.config_file or 'none'}")


def settings() -> Settings:
    """The settings in use (read now if not yet)."""
    return _state().settings


def kept_listings() -> int:
    """Listings the scanner holds for ``scandir()`` calls still to come (0 before any call)."""
    state = _current
    if state is None:
        return 0
    with state.lock:
        return len(state.kept)


def _key(path: Union[str, bytes]) -> bytes:
    """The remote path to ask the agents for: absolute, normalised (no ``.``, ``..``, ``//``
    or trailing slash: the agents refuse them), as ``posixpath.normpath`` computes it."""
    raw = posixpath.normpath(fsencode_path(path))
    return b"/" + raw.lstrip(b"/") if raw.startswith(b"//") else raw


# -- the module surface diskover calls -----------------------------------------------------

def scandir(path: AnyStr) -> ScandirIterator[AnyStr]:
    """Entries of a remote directory, like ``os.scandir``: one listing request, or none when
    :func:`stat` or :func:`check_dirpath` just fetched it; no entry method makes a request."""
    path = os.fspath(path)
    state = _state()
    key = _key(path)
    listing = state.use(key)
    if listing is None:
        listing = state.fetch(key, path)
    if listing.error is not None:
        raise listing.error
    decode = (lambda b: b) if isinstance(path, bytes) else os.fsdecode
    denied = is_denied(listing.entries)
    return ScandirIterator([ScannerDirEntry(path, decode(e.name), e, denied) for e in listing.entries])


def stat(path: Union[str, bytes, os.PathLike], st: Any = None) -> StatResult:
    """``os.stat(path)`` of a remote path, with ``st_sizedu``; ``st`` (wire stat fields or a
    stat result) is converted instead of asked for.

    A directory costs the one listing that the following :func:`scandir` of it then uses
    (none when that listing is held already); a file costs its parent's listing.
    """
    if st is not None:
        return st if isinstance(st, StatResult) else StatResult(fields_of(st))
    path = os.fspath(path)
    state = _state()
    key = _key(path)
    listing = state.peek(key)
    if listing is None:
        listing = state.fetch(key, path)
        if listing.error is None:
            state.keep(key, listing, 1)
    if listing.error is None and listing.stat is not None:
        return StatResult(listing.stat)
    error = listing.error or FileNotFoundError(errno.ENOENT, "The agent sent no stat record", path)
    if error.errno == errno.ENOENT:
        raise error
    # Not a directory, or one the agent cannot open: its stat is in its parent's listing.
    try:
        return _stat_in_parent(state, key, path)
    except OSError:
        raise error from None


def _stat_in_parent(state: _State, key: bytes, path: Union[str, bytes]) -> StatResult:
    parent, name = posixpath.split(key)
    if not name:
        raise FileNotFoundError(errno.ENOENT, "No parent to stat from", path)
    listing = state.fetch(parent, parent)
    if listing.error is not None:
        raise listing.error
    for e in listing.entries:
        if e.name == name:
            fields = e.target_stat if e.kind == KIND_SYMLINK else e.stat
            if fields is None:
                if e.stat is None:
                    raise no_stat(is_denied(listing.entries), path)
                raise FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", path)
            return StatResult(fields)
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)


def walk(top: AnyStr, topdown: bool = True, onerror: Any = None,
         followlinks: bool = False) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """``os.walk(top)`` through the agents (``parallel_walk`` with the configured workers,
    retry time and exclusions): top-down, symlinks not followed, directories in arrival
    order; :class:`AgentsUnavailableError` when no agent answered for ``retry-for`` seconds."""
    if not topdown or followlinks:
        raise NotImplementedError("the agent scanner walks top-down without following symlinks")
    s = _state().settings
    return _fatal_when_gone(parallel_walk(
        top, workers=s.workers, hosts=list(s.hosts), port=s.port, onerror=onerror, retry_for=s.retry_for,
        exclude_dirs=s.exclude_dirs, exclude_files=s.exclude_files, one_fs=s.one_fs, **s.client_options(),
    ))


def _fatal_when_gone(rows: Iterator[T]) -> Iterator[T]:
    try:
        yield from rows
    except AgentConnectionError as exc:  # the walk's "no agent answered": an OSError diskover would skip
        raise AgentsUnavailableError(str(exc)) from exc


def check_dirpath(path: Union[str, bytes]) -> tuple[bool, Optional[str]]:
    """``(True, None)`` when ``path`` (normalised as :func:`abspath` does) is a remote
    directory the agents serve, else ``(False, why)``. Its listing is kept for the two
    :func:`scandir` calls diskover makes of its top directory."""
    shown = os.fsdecode(path)
    if not os.fsencode(path).startswith(b"/"):
        return False, f"{shown}: the agent scanner needs an absolute remote path"
    try:
        state = _state()
        key = _key(path)
        listing = state.fetch(key, path)
    except Exception as exc:  # refused, no agent answering, a wrong token, bad settings...
        return False, f"{shown}: {exc}"
    error = listing.error
    if error is None and listing.stat is not None and _stat.S_ISDIR(listing.stat[0]):
        state.keep(key, listing, 2)
        return True, None
    if error is not None and error.errno == errno.ENOENT:
        return False, f"{shown} no such directory!"
    if error is None or error.errno == errno.ENOTDIR:
        return False, f"{shown} is not a directory!"
    return False, f"{shown}: {error}"


def abspath(path: AnyStr) -> AnyStr:
    """The normalised absolute remote path (``..`` resolved by name, no trailing slash),
    as ``os.path.abspath`` gives the local scanner; remote paths must be absolute."""
    path = os.fspath(path)
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raise ValueError(f"remote path must be absolute: {path!r}")
    key = _key(raw)
    return key if isinstance(path, bytes) else os.fsdecode(key)  # type: ignore[return-value]


def get_storage_size(path: Union[str, bytes]) -> tuple[int, int, int]:
    """``(total, free, available)`` bytes of the file system holding the remote directory."""
    state = _state()
    key = _key(path)
    result = state.call(lambda http: http.statvfs(key, path))
    if isinstance(result, OSError):
        raise result
    return result["total"], result["free"], result["available"]


def add_meta(path: Any, st: Any) -> None:
    """No extra fields: diskover asks every alternative scanner for some, per file and directory."""
    return None


def close(_: Any = None) -> None:
    """Close every connection and forget the settings and kept listings (the next call reads
    the settings again); requests still waiting for an agent raise :class:`AgentsUnavailableError`."""
    global _current
    with _state_lock:
        state, _current = _current, None
    if state is not None:
        state.close()


def init(diskover_globals: Any = None) -> None:
    """Read the settings now, so that a wrong one stops diskover at start with a clear error."""
    _state()
