"""diskover alternative scanner: crawl through diskover storage agents.

diskover 2 (``diskover.py --altscanner scandir_agent``) imports ``scanners/scandir_agent.py``
(the one-line shim in ``contrib/diskover/``, which star-imports this module) and replaces
``os.scandir`` with :func:`scandir`. For every directory it then calls :func:`stat`, then
``scandir``, then ``is_symlink()``, ``is_dir()`` and ``stat()`` on each entry, from many
threads at once.

Each :func:`scandir` is one listing request (with stat records); no entry method and no
:func:`stat` of a directory seen in its parent's listing makes a request. Every thread has
its own :class:`~diskover_agent.AgentConnection`, the threads starting on different hosts.

Settings come from ``DISKOVER_AGENT_*`` environment variables over an optional TOML file
(``DISKOVER_AGENT_CONFIG``, default ``~/.config/diskover_scandir_agent/config.toml``); they
are read on first use, or by :func:`init`. :func:`close` forgets them with every connection
and cache, so the next call starts afresh.
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
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, AnyStr, Generic, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .connection import AgentConnection, parse_hosts
from .entry import AgentDirEntry
from .oswalk import parallel_walk
from .protocol import KIND_DIR, KIND_SYMLINK, Exclusions, StatFields
from .transport import DEFAULT_PORT, RemoteListing, fsencode_path, read_token_file

__all__ = [
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

DEFAULT_CONFIG = "~/.config/diskover_scandir_agent/config.toml"
DEFAULT_WORKERS = 40
#: Stat records of subdirectories seen in a listing and not yet asked for by ``stat()``.
DIR_STATS_MAX = 65_536
#: Listings fetched by ``stat()`` of a directory not seen before, kept for its ``scandir()``.
LISTINGS_MAX = 64


class ScannerConfigError(RuntimeError):
    """The scanner's settings are missing or wrong (diskover logs it as ALT SCANNER ERROR)."""


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
    "exclude-dirs": "DISKOVER_AGENT_EXCLUDE_DIRS",
    "exclude-files": "DISKOVER_AGENT_EXCLUDE_FILES",
    "one-fs": "DISKOVER_AGENT_ONE_FS",
}
_LISTS = ("hosts", "exclude-dirs", "exclude-files")
_BOOLS = ("tls", "insecure", "one-fs")
_INTS = ("port", "workers")
_STRS = ("token-file", "cafile")
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
    token = env.get("DISKOVER_AGENT_TOKEN") or None
    if token is None and values.get("token-file"):
        token = _read_token(values["token-file"])
    return Settings(
        hosts=tuple(hosts), port=port, token=token, tls=values.get("tls", False), cafile=values.get("cafile"),
        insecure=values.get("insecure", False), workers=workers,
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

    __slots__ = ()

    def stat(self, *, follow_symlinks: bool = True) -> StatResult:  # type: ignore[override]
        e = self._entry
        fields = e.target_stat if follow_symlinks and e.kind == KIND_SYMLINK else e.stat
        if fields is None:
            super().stat(follow_symlinks=follow_symlinks)  # raises the matching OSError
            raise FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", self.path)
        return StatResult(fields)


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


# -- shared state: settings, connections, caches ---------------------------------------------

class _State:
    """Everything the module functions share; replaced whole by :func:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exclusions = settings.exclusions
        self.lock = threading.Lock()
        self.local = threading.local()
        self.counter = itertools.count()
        self.conns: weakref.WeakSet[AgentConnection] = weakref.WeakSet()
        self.dir_stats: collections.OrderedDict[bytes, StatFields] = collections.OrderedDict()
        self.listings: collections.OrderedDict[bytes, RemoteListing] = collections.OrderedDict()

    def connection(self) -> AgentConnection:
        """This thread's connection; each new thread starts on the next host."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            s = self.settings
            n = next(self.counter) % len(s.hosts)
            conn = AgentConnection(list(s.hosts[n:] + s.hosts[:n]), port=s.port, **s.client_options())
            with self.lock:
                self.conns.add(conn)
            self.local.conn = conn
        return conn

    def fetch(self, path: Union[str, bytes]) -> RemoteListing:
        """One listing request (with stat records and the exclusions); errors in ``.error``."""
        fsencode_path(path)  # absolute, encodable
        return self.connection().listing(path, stat=True, exclusions=self.exclusions or None)

    def close(self) -> None:
        with self.lock:
            conns = list(self.conns)
            self.dir_stats.clear()
            self.listings.clear()
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
            f"token {'yes' if s.token else 'no'}, walk workers {s.workers}, exclude dirs {list(s.exclude_dirs)}, "
            f"exclude files {list(s.exclude_files)}, one_fs {s.one_fs}, "
            f"config file {s.config_file or 'none'}")


def settings() -> Settings:
    """The settings in use (read now if not yet)."""
    return _state().settings


def _key(path: Union[str, bytes]) -> bytes:
    return posixpath.normpath(os.fsencode(path))


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name


# -- the module surface diskover calls -----------------------------------------------------

def scandir(path: AnyStr) -> ScandirIterator[AnyStr]:
    """Entries of a remote directory, like ``os.scandir``: one listing request, or none when
    :func:`stat` just fetched it; no entry method makes a request."""
    path = os.fspath(path)
    state = _state()
    key = _key(path)
    with state.lock:
        listing = state.listings.pop(key, None)
    if listing is None:
        listing = state.fetch(path)
    if listing.error is not None:
        raise listing.error
    decode = (lambda b: b) if isinstance(path, bytes) else os.fsdecode
    entries = [ScannerDirEntry(path, decode(e.name), e) for e in listing.entries]
    subdirs = [(_join(key, e.name), e.stat) for e in listing.entries if e.kind == KIND_DIR and e.stat is not None]
    if subdirs:
        with state.lock:
            cache = state.dir_stats
            cache.update(subdirs)
            while len(cache) > DIR_STATS_MAX:
                cache.popitem(last=False)
    return ScandirIterator(entries)


def stat(path: Union[str, bytes, os.PathLike], st: Any = None) -> StatResult:
    """``os.stat(path)`` of a remote path, with ``st_sizedu``; ``st`` (wire stat fields or a
    stat result) is converted instead of asked for.

    A directory seen in its parent's listing costs no request; another one costs the one
    listing that the following :func:`scandir` of it then uses; a file costs its parent's listing.
    """
    if st is not None:
        return st if isinstance(st, StatResult) else StatResult(_fields_of(st))
    path = os.fspath(path)
    state = _state()
    key = _key(path)
    with state.lock:
        fields = state.dir_stats.pop(key, None)
        listing = state.listings.get(key) if fields is None else None
    if fields is not None:
        return StatResult(fields)
    if listing is None:
        listing = state.fetch(path)
        with state.lock:
            state.listings[key] = listing
            while len(state.listings) > LISTINGS_MAX:
                state.listings.popitem(last=False)
    if listing.error is None and listing.stat is not None:
        return StatResult(listing.stat)
    error = listing.error or FileNotFoundError(errno.ENOENT, "The agent sent no stat record", path)
    if error.errno == errno.ENOENT:
        raise error
    # Not a directory, or one the agent cannot open: its stat is in its parent's listing.
    try:
        return _stat_in_parent(state, path)
    except OSError:
        raise error from None


def _stat_in_parent(state: _State, path: Union[str, bytes]) -> StatResult:
    parent, name = posixpath.split(os.fsencode(path).rstrip(b"/"))
    if not name:
        raise FileNotFoundError(errno.ENOENT, "No parent to stat from", path)
    listing = state.fetch(parent)
    if listing.error is not None:
        raise listing.error
    for e in listing.entries:
        if e.name == name:
            fields = e.target_stat if e.kind == KIND_SYMLINK else e.stat
            if fields is None:
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
    """``os.walk(top)`` through the agents (``parallel_walk`` with the configured workers and
    exclusions): top-down, symlinks not followed, directories in arrival order."""
    if not topdown or followlinks:
        raise NotImplementedError("the agent scanner walks top-down without following symlinks")
    s = _state().settings
    return parallel_walk(
        top, workers=s.workers, hosts=list(s.hosts), port=s.port, onerror=onerror,
        exclude_dirs=s.exclude_dirs, exclude_files=s.exclude_files, one_fs=s.one_fs, **s.client_options(),
    )


def check_dirpath(path: Union[str, bytes]) -> tuple[bool, Optional[str]]:
    """``(True, None)`` when ``path`` is a remote directory the agents serve, else ``(False, why)``."""
    shown = os.fsdecode(path)
    if not os.fsencode(path).startswith(b"/"):
        return False, f"{shown}: the agent scanner needs an absolute remote path"
    try:
        st = stat(path)
    except FileNotFoundError:
        return False, f"{shown} no such directory!"
    except Exception as exc:  # refused, no agent answering, a wrong token, bad settings...
        return False, f"{shown}: {exc}"
    if not _stat.S_ISDIR(st.st_mode):
        return False, f"{shown} is not a directory!"
    return True, None


def abspath(path: AnyStr) -> AnyStr:
    """The normalized absolute remote path (no trailing slash); remote paths must be absolute."""
    path = os.fspath(path)
    if not os.fsencode(path).startswith(b"/"):
        raise ValueError(f"remote path must be absolute: {path!r}")
    return posixpath.normpath(path)


def get_storage_size(path: Union[str, bytes]) -> tuple[int, int, int]:
    """``(total, free, available)`` bytes of the file system holding the remote directory."""
    sizes = _state().connection().statvfs(path)
    return sizes["total"], sizes["free"], sizes["available"]


def add_meta(path: Any, st: Any) -> None:
    """No extra fields: diskover asks every alternative scanner for some, per file and directory."""
    return None


def close(_: Any = None) -> None:
    """Close every connection and forget the settings and caches (the next call reads them again)."""
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
    """Log at diskover's level, through its log file and console handlers when it logs to a file."""
    logger.setLevel(loglevel)
    if filelogging:
        for handler in (handler_file, handler_con):
            if handler is not None and handler not in logger.handlers:
                logger.addHandler(handler)
