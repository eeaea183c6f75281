"""diskover alternative scanner: crawl through diskover storage agents.

diskover 2 (``diskover.py --altscanner scandir_agent``) imports ``scanners/scandir_agent.py``
(the one-line shim in ``contrib/diskover/``, which star-imports this module) and replaces
``os.scandir`` with :func:`scandir`. It calls :func:`check_dirpath` and :func:`abspath` on
the top path, then ``scandir`` of every directory from many threads, and ``is_symlink()``,
``is_dir()`` and ``stat()`` on each entry; :func:`stat` only for the top (diskover 2.3.5),
or for every directory (older versions).

Each :func:`scandir` is one listing request (with stat records); no entry method makes a
request. :func:`stat` of a directory fetches the listing that the following ``scandir`` of
it then uses. Nothing else is cached: the scanner holds no stat record diskover will not ask for.

A busy agent (503) or one that does not answer is not an error: the request goes to the
other agents first, then waits (the agent's ``Retry-After``, or a backoff from 0.2 s doubling
to 5 s) and tries again, for as long as some agent answered within ``retry-for`` seconds.
Past that, :class:`AgentsUnavailableError` is raised, which diskover treats as fatal (it
deletes the partial index and exits 1); a directory's own file-system error stays the
``OSError`` the local scanner would raise, which diskover logs and skips.

Settings come from ``DISKOVER_AGENT_*`` environment variables over an optional TOML file
(``DISKOVER_AGENT_CONFIG``, default ``~/.config/diskover_scandir_agent/config.toml``); they
are read on first use, or by :func:`init`. :func:`close` forgets them with every connection
and kept listing, so the next call starts afresh.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import posixpath
import stat as _stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, AnyStr, Generic, Optional, TypeVar, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .connection import parse_hosts
from .entry import AgentDirEntry
from .errors import AgentBusyError, AgentConnectionError, AgentError
from .oswalk import parallel_walk
from .protocol import KIND_SYMLINK, Entry, Exclusions, StatFields
from .transport import (
    DEFAULT_PORT,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    RemoteListing,
    fsencode_path,
    read_token_file,
)

T = TypeVar("T")

__all__ = [
    "AgentsUnavailableError",
    "abspath",
    "add_meta",
    "check_dirpath",
    "close",
    "get_storage_size",
    "init",
    "log_setup",
    "scandir",
    "stat",
    "walk",
]

logger = logging.getLogger(__name__)
#: Warnings and errors, also sent to diskover's warnings log (see :func:`log_setup`).
warn_logger = logging.getLogger(__name__ + ".warnings")

DEFAULT_CONFIG = "~/.config/diskover_scandir_agent/config.toml"
DEFAULT_WORKERS = 40
#: Seconds the scanner keeps retrying while no agent answers, before the crawl fails.
DEFAULT_RETRY_FOR = 120.0
#: Listings fetched by ``stat()`` or ``check_dirpath()``, kept for the ``scandir()`` that follows.
LISTINGS_MAX = 64
#: Backoff of an agent that does not answer: 0.2 s, doubling up to 5 s.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


class ScannerConfigError(RuntimeError):
    """The scanner's settings are missing or wrong (diskover logs it as ALT SCANNER ERROR)."""


class AgentsUnavailableError(AgentError):
    """No agent answered for ``retry-for`` seconds: the crawl cannot be complete.

    Neither an ``OSError`` nor a ``RuntimeError``, which diskover would log and skip:
    diskover treats it as fatal, deletes the partial index and exits 1.
    """


# -- settings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Where the agents are and how to talk to them."""

    hosts: tuple[str, ...]
    port: int = DEFAULT_PORT
    token: Optional[str] = field(default=None, repr=False)
    tls: bool = False
    cafile: Optional[str] = None
    insecure: bool = False
    workers: int = DEFAULT_WORKERS
    retry_for: float = DEFAULT_RETRY_FOR
    exclude_dirs: tuple[str, ...] = ()
    exclude_files: tuple[str, ...] = ()
    one_fs: bool = False
    #: The config file that was read, if any.
    config_file: Optional[str] = None

    def client_options(self) -> dict[str, Any]:
        """Keyword options for ``AgentConnection`` and ``parallel_walk``."""
        return {"token": self.token, "tls": self.tls, "cafile": self.cafile, "verify": not self.insecure}

    @property
    def exclusions(self) -> Exclusions:
        return Exclusions.of(self.exclude_dirs, self.exclude_files, self.one_fs)


_ENV = {
    "hosts": "DISKOVER_AGENT_HOSTS",
    "port": "DISKOVER_AGENT_PORT",
    "token-file": "DISKOVER_AGENT_TOKEN_FILE",
    "tls": "DISKOVER_AGENT_TLS",
    "cafile": "DISKOVER_AGENT_CAFILE",
    "insecure": "DISKOVER_AGENT_INSECURE",
    "workers": "DISKOVER_AGENT_WORKERS",
    "retry-for": "DISKOVER_AGENT_RETRY_FOR",
    "exclude-dirs": "DISKOVER_AGENT_EXCLUDE_DIRS",
    "exclude-files": "DISKOVER_AGENT_EXCLUDE_FILES",
    "one-fs": "DISKOVER_AGENT_ONE_FS",
}
_LISTS = ("hosts", "exclude-dirs", "exclude-files")
_BOOLS = ("tls", "insecure", "one-fs")
_INTS = ("port", "workers")
_STRS = ("token-file", "cafile")
_NUMBERS = ("retry-for",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from the environment over the config file; :class:`ScannerConfigError` when wrong.

    An empty environment variable counts as unset.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("DISKOVER_AGENT_CONFIG") or None
    path = os.path.expanduser(explicit or DEFAULT_CONFIG)
    values: dict[str, Any] = {}
    config_file = None
    if explicit or os.path.exists(path):
        values = _read_config_file(path)
        config_file = path
    for key, name in _ENV.items():
        raw = env.get(name)
        if raw:
            values[key] = _from_env(key, name, raw)
    hosts = values.get("hosts") or []
    if not hosts:
        raise ScannerConfigError(
            "no diskover storage agents configured: set DISKOVER_AGENT_HOSTS=stornode1,stornode2 "
            f"(comma-separated host[:port]) or hosts = [\"stornode1\", ...] in {path} "
            "(another file: DISKOVER_AGENT_CONFIG)"
        )
    port = values.get("port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ScannerConfigError(f"diskover agent scanner: port {port} is out of range")
    try:
        parse_hosts(hosts, port)
    except ValueError as exc:
        raise ScannerConfigError(f"diskover agent scanner: {exc}") from None
    workers = values.get("workers", DEFAULT_WORKERS)
    if workers < 1:
        raise ScannerConfigError("diskover agent scanner: workers must be at least 1")
    retry_for = values.get("retry-for", DEFAULT_RETRY_FOR)
    if not retry_for > 0:
        raise ScannerConfigError("diskover agent scanner: retry-for must be more than 0 seconds")
    token = env.get("DISKOVER_AGENT_TOKEN") or None
    if token is None and values.get("token-file"):
        token = _read_token(values["token-file"])
    return Settings(
        hosts=tuple(hosts), port=port, token=token, tls=values.get("tls", False), cafile=values.get("cafile"),
        insecure=values.get("insecure", False), workers=workers, retry_for=float(retry_for),
        exclude_dirs=tuple(values.get("exclude-dirs", ())), exclude_files=tuple(values.get("exclude-files", ())),
        one_fs=values.get("one-fs", False), config_file=config_file,
    )


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScannerConfigError(f"diskover agent scanner config {path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"diskover agent scanner config {path}: {key}"
        if key not in _ENV:
            raise ScannerConfigError(f"{where}: unknown setting (known: {', '.join(_ENV)})")
        if key in _LISTS:
            if isinstance(value, str):
                value = _split(value)
            elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ScannerConfigError(f"{where} must be a list of strings")
        elif key in _BOOLS:
            if not isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be true or false")
        elif key in _INTS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be an integer")
        elif key in _NUMBERS:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be a number")
        elif not isinstance(value, str):
            raise ScannerConfigError(f"{where} must be a string")
        out[key] = value
    return out


def _from_env(key: str, name: str, raw: str) -> Any:
    if key in _LISTS:
        return _split(raw)
    if key in _BOOLS:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ScannerConfigError(f"{name}={raw!r}: expected 1 or 0")
    if key in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise ScannerConfigError(f"{name}={raw!r}: expected an integer") from None
    if key in _NUMBERS:
        try:
            return float(raw)
        except ValueError:
            raise ScannerConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    return raw


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _read_token(path: str) -> str:
    try:
        return read_token_file(path)
    except ValueError as exc:
        raise ScannerConfigError(f"diskover agent scanner: {exc}") from None


# -- stat records and entries ------------------------------------------------------------------

def _seconds(ns: int) -> float:
    s, rest = divmod(ns, 1_000_000_000)
    return s + rest * 1e-9  # as os.stat computes its float times


class StatResult:
    """A stat record shaped like ``os.stat_result``, plus ``st_sizedu`` (``st_blocks * 512``)."""

    __slots__ = ("_f",)

    def __init__(self, fields: StatFields) -> None:
        self._f = fields

    st_mode = property(lambda self: self._f[0])
    st_ino = property(lambda self: self._f[1])
    st_dev = property(lambda self: self._f[2])
    st_nlink = property(lambda self: self._f[3])
    st_uid = property(lambda self: self._f[4])
    st_gid = property(lambda self: self._f[5])
    st_size = property(lambda self: self._f[6])
    st_atime_ns = property(lambda self: self._f[7])
    st_mtime_ns = property(lambda self: self._f[8])
    st_ctime_ns = property(lambda self: self._f[9])
    st_blocks = property(lambda self: self._f[10])
    st_blksize = property(lambda self: self._f[11])
    st_rdev = property(lambda self: self._f[12])
    st_atime = property(lambda self: _seconds(self._f[7]))
    st_mtime = property(lambda self: _seconds(self._f[8]))
    st_ctime = property(lambda self: _seconds(self._f[9]))
    st_sizedu = property(lambda self: self._f[10] * 512)

    def __getitem__(self, i: int) -> int:
        """``os.stat_result``'s ten indexed fields (times as whole seconds)."""
        f = self._f
        return (*f[:7], f[7] // 1_000_000_000, f[8] // 1_000_000_000, f[9] // 1_000_000_000)[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StatResult) and other._f == self._f

    def __hash__(self) -> int:
        return hash(self._f)

    def __repr__(self) -> str:
        f = self._f
        return (f"StatResult(st_mode={f[0]:#o}, st_ino={f[1]}, st_dev={f[2]}, st_nlink={f[3]}, st_uid={f[4]}, "
                f"st_gid={f[5]}, st_size={f[6]}, st_mtime_ns={f[8]}, st_sizedu={f[10] * 512})")


class ScannerDirEntry(AgentDirEntry[AnyStr]):
    """An ``AgentDirEntry`` whose ``stat()`` is a :class:`StatResult` (with ``st_sizedu``)."""

    __slots__ = ("_denied",)

    def __init__(self, dirpath: AnyStr, name: AnyStr, entry: Entry, denied: bool = False) -> None:
        super().__init__(dirpath, name, entry)
        #: The agent could stat no entry of the directory: it may read it but not search it.
        self._denied = denied

    def stat(self, *, follow_symlinks: bool = True) -> StatResult:  # type: ignore[override]
        e = self._entry
        fields = e.target_stat if follow_symlinks and e.kind == KIND_SYMLINK else e.stat
        if fields is None:
            if e.stat is None:
                raise _no_stat(self._denied, self.path)
            super().stat(follow_symlinks=follow_symlinks)  # raises the matching OSError
            raise FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", self.path)
        return StatResult(fields)


def _is_denied(entries: list[Entry]) -> bool:
    """True when the agent could stat none of a directory's entries: it may read the
    directory but not search it (``r`` without ``x``), where every ``lstat`` fails."""
    return bool(entries) and all(e.stat is None for e in entries)


def _no_stat(denied: bool, path: object) -> OSError:
    """What ``os.DirEntry.stat()`` raises for an entry the agent could not stat: ``PermissionError``
    in a directory it cannot search, else ``FileNotFoundError`` (the entry vanished)."""
    if denied:
        return PermissionError(errno.EACCES, "Permission denied", path)
    return FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", path)


class ScandirIterator(Generic[AnyStr]):
    """What :func:`scandir` returns: an iterator that is also a context manager, as ``os.scandir``'s."""

    __slots__ = ("_it",)

    def __init__(self, entries: list[ScannerDirEntry[AnyStr]]) -> None:
        self._it = iter(entries)

    def __iter__(self) -> ScandirIterator[AnyStr]:
        return self

    def __next__(self) -> ScannerDirEntry[AnyStr]:
        return next(self._it)

    def close(self) -> None:
        self._it = iter(())

    def __enter__(self) -> ScandirIterator[AnyStr]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- which agent to ask: retries of busy and unreachable agents --------------------------------

class _Hosts:
    """The agents' health, shared by every thread: an agent that answered 503 is set aside
    for its ``Retry-After``, one that did not answer for a backoff (0.2 s doubling to 5 s);
    a request goes to the first usable agent from its thread's own, and waits when none is.
    An answer from an agent makes it usable again at once (it has room now) and wakes one
    waiting thread."""

    def __init__(self, addresses: list[HostAddress], retry_for: float) -> None:
        self.addresses = addresses
        self.retry_for = retry_for
        self.cond = threading.Condition()
        self.down_until = [0.0] * len(addresses)
        self.failures = [0] * len(addresses)
        self.unreachable = [False] * len(addresses)
        self.last_ok = time.monotonic()
        self.last_error: Optional[str] = None
        self.closed = False
        self._gave_up = False

    def take(self, home: int, started: float) -> int:
        """The first usable agent from ``home``, waiting for one while some agent answered
        (or this request started) less than ``retry_for`` seconds ago; else
        :class:`AgentsUnavailableError`."""
        n = len(self.addresses)
        with self.cond:
            while True:
                if self.closed:
                    raise AgentsUnavailableError("the diskover agent scanner was closed")
                now = time.monotonic()
                for i in range(n):
                    idx = (home + i) % n
                    if self.down_until[idx] <= now:
                        return idx
                left = max(started, self.last_ok) + self.retry_for - now
                if left <= 0:
                    raise self._unavailable()
                self.cond.wait(min(min(self.down_until) - now, left))

    def _unavailable(self) -> AgentsUnavailableError:
        hosts = ", ".join(a.label for a in self.addresses)
        message = (f"no diskover storage agent answered for {self.retry_for:g} s (hosts {hosts}); "
                   f"last error: {self.last_error}")
        if not self._gave_up:
            self._gave_up = True
            warn_logger.error("diskover agent scanner: %s; the crawl cannot be complete", message)
        return AgentsUnavailableError(message)

    def failed(self, idx: int, exc: BaseException) -> None:
        busy = isinstance(exc, AgentBusyError)
        label = self.addresses[idx].label
        with self.cond:
            now = time.monotonic()
            self.last_error = f"{label}: {exc}"
            if self.down_until[idx] > now:
                return  # set aside already, by a request that failed at the same time
            self.failures[idx] += 1
            if isinstance(exc, AgentBusyError) and exc.retry_after is not None:
                delay = exc.retry_after
            else:
                delay = min(BACKOFF_FIRST * 2 ** (self.failures[idx] - 1), BACKOFF_MAX)
            self.down_until[idx] = now + delay
            if not busy and not self.unreachable[idx]:
                self.unreachable[idx] = True
                warn_logger.warning("diskover agent scanner: %s does not answer (%s); other agents first, "
                                    "retrying while some agent answered in the last %g s", label, exc, self.retry_for)
            else:
                logger.debug("diskover agent scanner: %s set aside for %.1f s: %s", label, delay, exc)

    def succeeded(self, idx: int) -> None:
        with self.cond:
            self.failures[idx] = 0
            self.down_until[idx] = 0.0
            self.last_ok = time.monotonic()
            if self.unreachable[idx]:
                self.unreachable[idx] = False
                logger.info("diskover agent scanner: %s answers again", self.addresses[idx].label)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


# -- shared state: settings, connections, kept listings ------------------------------------------

class _State:
    """Everything the module functions share; replaced whole by :func:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exclusions = settings.exclusions
        self.options = ClientOptions(**settings.client_options())
        self.hosts = _Hosts(parse_hosts(list(settings.hosts), settings.port), settings.retry_for)
        self.lock = threading.Lock()
        self.local = threading.local()
        self.counter = itertools.count()
        self.conns: weakref.WeakSet[AgentHTTP] = weakref.WeakSet()
        #: Listings fetched for ``scandir()`` calls still to come: key -> [listing, uses left].
        self.kept: collections.OrderedDict[bytes, list[Any]] = collections.OrderedDict()

    def call(self, request: Callable[[AgentHTTP], T]) -> T:
        """Run a request on this thread's connection to a usable agent, retrying busy and
        unreachable agents as :class:`_Hosts` says, until one answers."""
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
    denied = _is_denied(listing.entries)
    return ScandirIterator([ScannerDirEntry(path, decode(e.name), e, denied) for e in listing.entries])


def stat(path: Union[str, bytes, os.PathLike], st: Any = None) -> StatResult:
    """``os.stat(path)`` of a remote path, with ``st_sizedu``; ``st`` (wire stat fields or a
    stat result) is converted instead of asked for.

    A directory costs the one listing that the following :func:`scandir` of it then uses
    (none when that listing is held already); a file costs its parent's listing.
    """
    if st is not None:
        return st if isinstance(st, StatResult) else StatResult(_fields_of(st))
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
                    raise _no_stat(_is_denied(listing.entries), path)
                raise FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", path)
            return StatResult(fields)
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)


def _fields_of(st: Any) -> StatFields:
    if isinstance(st, (tuple, list)) and len(st) == 13:
        return tuple(st)  # type: ignore[return-value]
    return (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, st.st_blksize, st.st_rdev)


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


def log_setup(loglevel: Any, logformat: str, filelogging: bool, handler_file: Optional[logging.Handler],
              handler_warnfile: Optional[logging.Handler], handler_con: Optional[logging.Handler]) -> None:
    """Log at diskover's level, through its log file and console handlers when it logs to a
    file; warnings and errors (an agent that does not answer, the crawl given up) also go to
    its warnings log (``handler_warnfile``)."""
    logger.setLevel(loglevel)
    warn_logger.setLevel(logging.WARNING)
    if filelogging:
        for log, handler in ((logger, handler_file), (logger, handler_con), (warn_logger, handler_warnfile)):
            if handler is not None and handler not in log.handlers:
                log.addHandler(handler)
