"""``diskover-agent``: list, walk and size remote trees through storage agents, from a shell.

::

    diskover-agent [--hosts H1,H2] [--port N] [--token-file F] [--tls] [--cafile F] [--insecure]
                   [--workers N] [--timeout S] [--retry-for S] [-q] {ls,walk,du} ...

``ls PATH`` lists one directory, ``walk PATH`` writes every entry of a tree as NDJSON or CSV,
``du PATH`` totals a tree per directory. Exit status: 0 complete; 1 finished, but some
directories could not be listed (each one named on stderr); 2 could not run (bad arguments,
no agent reachable, refused by the agent); 130 interrupted (Ctrl-C); 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import grp
import importlib.util
import io
import math
import operator
import os
import pwd
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, Optional, Union

import msgspec
import msgspec.structs

from .connection import AgentConnection, parse_hosts
from .dataset import DatasetWriter, prepare_output
from .entry import AgentDirEntry, make_stat
from .errors import AgentConnectionError, AgentError, AgentHTTPError
from .protocol import KIND_DIR, KIND_FILE, KIND_NAMES, KIND_SYMLINK, Entry, Exclusions
from .transport import (
    DEFAULT_PORT,
    TOKEN_ENV,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    read_token_file,
    token_problem,
)
from .walk import DEFAULT_RETRY_FOR, Walker

if TYPE_CHECKING:  # tqdm is imported when a progress display is shown (it costs start-up time)
    from tqdm import tqdm

PROG = "diskover-agent"
HOSTS_ENV = "DISKOVER_AGENT_HOSTS"

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141

#: The ``type`` of an entry in walk output, by the wire's one-letter kind.
TYPES = KIND_NAMES

#: The columns of ``walk`` output, in order (NDJSON keys, CSV header).
FIELDS = (
    "path", "path_b64", "name", "type", "target_type", "size", "allocated", "blocks", "mode", "uid", "gid",
    "inode", "nlink", "dev", "atime", "mtime", "ctime", "atime_ns", "mtime_ns", "ctime_ns",
)

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SIX_MONTHS = 31_556_952 // 2  # what ls calls recent: the average Gregorian year, halved
_LS_TYPE = {"d": "d", "f": "-", "l": "l", "p": "p", "s": "s", "c": "c", "b": "b"}


class UsageError(Exception):
    """A command line that cannot run (exit status 2)."""


# -- formatting ----------------------------------------------------------------------------

def human(n: int) -> str:
    """A size as ``du -h`` prints it: powers of 1024, rounded up, one decimal below 10."""
    if n < 1024:
        return str(n)
    units = "KMGTPEZY"
    for i, unit in enumerate(units):
        scale = 1024 ** (i + 1)
        tenths = -(-n * 10 // scale)
        if tenths < 100:
            return f"{tenths // 10}.{tenths % 10}{unit}"
        whole = -(-n // scale)
        if whole < 1024 or i == len(units) - 1:
            return f"{whole}{unit}"
    raise AssertionError("unreachable")


def size_text(n: int) -> str:
    """A byte count for the progress display and the summary line: ``36 B``, ``1.1 GiB``."""
    h = human(n)
    return f"{n} B" if n < 1024 else f"{h[:-1]} {h[-1]}iB"


def shown(path: bytes) -> str:
    """A path for a message on stderr (see :func:`for_terminal`)."""
    return for_terminal(path).decode("utf-8")


def _escape_control(ch: str) -> str:
    return ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")


def for_terminal(raw: bytes) -> bytes:
    """A name or path as ``ls``/``du`` print it to a terminal: bytes that are not UTF-8 as
    ``\\xNN`` and control characters escaped, so that no name can move the cursor or
    break a line. (To a pipe or a file they print the exact bytes, as ls and du do.)"""
    text = raw.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(map(_escape_control, text))
    return text.encode("utf-8")


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name


# -- walk records ---------------------------------------------------------------------------

class Record(msgspec.Struct, gc=False):
    """One entry of ``walk`` output; the field order is :data:`FIELDS`."""

    path: str
    path_b64: Optional[str]
    name: str
    type: str
    target_type: Optional[str]
    size: Optional[int]
    allocated: Optional[int]
    blocks: Optional[int]
    mode: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    inode: Optional[int]
    nlink: Optional[int]
    dev: Optional[int]
    atime: Optional[float]
    mtime: Optional[float]
    ctime: Optional[float]
    atime_ns: Optional[int]
    mtime_ns: Optional[int]
    ctime_ns: Optional[int]


assert Record.__struct_fields__ == FIELDS

_NO_STAT = (None,) * 15


def _texts(parent: bytes, entries: Sequence[Entry]) -> tuple[list[str], list[Optional[str]], list[str]]:
    """``(paths, path_b64s, names)`` of ``entries`` of directory ``parent`` as :data:`FIELDS`
    has them: UTF-8 text (U+FFFD for bytes that are not), and the exact path in base64 when
    it is not UTF-8. Names hold no ``/`` (the wire's rule), so one decode of them all, joined
    by ``/``, does for the directory; a directory with a name that is not UTF-8 (or a parent
    that is not) is decoded name by name."""
    try:
        prefix = (parent if parent.endswith(b"/") else parent + b"/").decode("utf-8")
        names = b"/".join([e.name for e in entries]).decode("utf-8").split("/")
        if len(names) == len(entries):
            return [prefix + n for n in names], [None] * len(names), names
    except UnicodeDecodeError:
        pass
    paths: list[str] = []
    b64s: list[Optional[str]] = []
    for e in entries:
        raw = _join(parent, e.name)
        try:
            paths.append(raw.decode("utf-8"))
            b64s.append(None)
        except UnicodeDecodeError:
            paths.append(raw.decode("utf-8", "replace"))
            b64s.append(base64.b64encode(raw).decode("ascii"))
    return paths, b64s, [e.name.decode("utf-8", "replace") for e in entries]


def records(parent: bytes, entries: Sequence[Entry]) -> list[Record]:
    """The walk records of ``entries``, in their order, of directory ``parent``. Times in
    seconds are ``os.stat_result``'s floats (whole seconds plus nanoseconds * 1e-9, the same
    rounding); an entry without its stat (vanished, or in a directory that cannot be
    searched) has every stat field null."""
    if not entries:
        return []
    types = TYPES
    out: list[Record] = []
    append = out.append
    for e, path, b64, name in zip(entries, *_texts(parent, entries), strict=True):
        kind = e.kind
        target = types.get(e.target) if kind == KIND_SYMLINK and e.target is not None else None
        st = e.stat
        if st is None:
            append(Record(path, b64, name, types.get(kind, "unknown"), target, *_NO_STAT))
            continue
        mode, ino, dev, nlink, uid, gid, size, a, m, c, blocks = st[:11]
        a_s = a // 1_000_000_000 + a % 1_000_000_000 * 1e-9
        m_s = a_s if m == a else m // 1_000_000_000 + m % 1_000_000_000 * 1e-9
        c_s = m_s if c == m else c // 1_000_000_000 + c % 1_000_000_000 * 1e-9
        append(Record(path, b64, name, types.get(kind, "unknown"), target, size, blocks * 512, blocks, mode, uid,
                      gid, ino, nlink, dev, a_s, m_s, c_s, a, m, c))
    return out


class RecordWriter:
    """Walk records to a binary stream, as NDJSON or CSV."""

    def __init__(self, out: IO[bytes], fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self._text: Optional[io.TextIOWrapper] = None
        if fmt == "csv":
            self._text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
            self._csv = csv.writer(self._text, lineterminator="\n")
            self._csv.writerow(FIELDS)
        else:
            self._encode_lines = msgspec.json.Encoder().encode_lines

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        """Write the records of a directory's entries."""
        self.write(records(path, entries))

    def add_error(self, path: bytes, error: OSError) -> None:
        """A directory that could not be listed has no record (the walk names it on stderr)."""

    def write(self, rows: list[Record]) -> None:
        if not rows:
            return
        if self._text is not None:
            self._csv.writerows(map(msgspec.structs.astuple, rows))
        else:
            self.out.write(self._encode_lines(rows))

    def flush(self) -> None:
        if self._text is not None:
            self._text.flush()
        self.out.flush()

    def detach(self) -> None:
        """Let go of the stream without closing it."""
        if self._text is not None:
            self._text.detach()
            self._text = None


# -- the run's settings ----------------------------------------------------------------------

class Context:
    """What every subcommand needs: the agents, how to talk to them, where to report."""

    def __init__(self, args: argparse.Namespace) -> None:
        hosts = args.hosts if args.hosts is not None else os.environ.get(HOSTS_ENV, "")
        if not hosts.strip():
            raise UsageError(f"no agents: give --hosts HOST[,HOST...] or set {HOSTS_ENV}")
        try:
            self.addresses: list[HostAddress] = parse_hosts(hosts, args.port)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.hosts = [a.label for a in self.addresses]
        self.port: int = args.port
        self.workers: int = args.workers
        self.retry_for: float = args.retry_for
        self.quiet: bool = args.quiet
        token = None
        if args.token_file is not None:
            try:
                token = read_token_file(args.token_file)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        elif os.environ.get(TOKEN_ENV):
            problem = token_problem(os.environ[TOKEN_ENV])
            if problem:
                raise UsageError(f"${TOKEN_ENV}: {problem}")
        #: Keyword options of ClientOptions, for AgentConnection and Walker.
        self.options: dict[str, Any] = {
            "timeout": args.timeout, "token": token, "tls": args.tls or args.cafile is not None,
            "cafile": args.cafile, "verify": not args.insecure,
        }
        #: The live progress display while there is one (messages are written around it).
        self.bar: Optional[tqdm] = None

    def warn(self, message: str) -> None:
        """One line on stderr, prefixed with the program's name; around the progress display."""
        line = f"{PROG}: {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def check_reachable(self, path: bytes) -> None:
        """Fail early, with the reasons, when no agent answers a request (down, refused, TLS
        or token trouble), rather than after a walk's ``--retry-for``. The request is the
        cheapest an agent has (``statvfs`` of PATH); whether PATH can be listed is the walk's
        business."""
        with AgentConnection(self.hosts, self.port, **self.options) as conn:
            try:
                conn.statvfs(path)
            except AgentHTTPError as exc:
                if exc.status != 404:  # 404: an agent without that endpoint, which answered all the same
                    raise
            except AgentError:
                raise
            except OSError:
                pass

    def directory_stat(self, path: bytes) -> Optional[os.stat_result]:
        """The stat record of a remote directory itself (``du`` counts its size), or None
        when it cannot be listed (the walk reports that). The library keeps a directory's
        own stat from a walk to itself, so this asks a listing with every entry excluded."""
        everything = Exclusions.of([b"*"], [b"*"])
        reasons = []
        options = ClientOptions(**self.options)
        for address in self.addresses:
            conn = AgentHTTP(address, options)
            try:
                listing = conn.listdir(path, True, os.fsdecode(path), everything)
            except TRANSIENT_ERRORS as exc:
                reasons.append(f"{address.label}: {exc}")
                continue
            finally:
                conn.close()
            if listing.error is not None or listing.stat is None:
                return None
            return make_stat(listing.stat)
        raise AgentConnectionError("no agent reachable: " + "; ".join(reasons))


def remote_path(text: str) -> bytes:
    raw = os.fsencode(text)
    if not raw.startswith(b"/"):
        raise UsageError(f"{text}: the remote path must be absolute (as the agents export it, e.g. /mnt/isilon)")
    return raw


# -- the walk, its counters and its progress display ---------------------------------------------

class Crawl:
    """One stat walk through the agents: directories as they arrive, errors reported and counted."""

    def __init__(self, ctx: Context, top: bytes, *, exclude: Sequence[str] = (), one_fs: bool = False,
                 on_error: Optional[Callable[[bytes, OSError], None]] = None) -> None:
        self.ctx = ctx
        self.top = top
        #: Called with each directory that could not be listed (after the message on stderr).
        self.on_error = on_error
        patterns = [os.fsencode(p) for p in exclude]
        self.walker = Walker(
            top, ctx.hosts, port=ctx.port, workers=ctx.workers, stat=True, retry_for=ctx.retry_for,
            exclude_dirs=patterns, exclude_files=patterns, one_fs=one_fs, **ctx.options,
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

    @property
    def seconds(self) -> float:
        """Seconds the walk took (so far)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def summary(self) -> str:
        secs = self.seconds
        rate = self.entries / secs if secs > 0 else 0.0
        served = self.walker.served()
        used = sum(1 for s in served.values() if s["requests"])
        return (f"{_count_of(self.dirs, 'directory', 'directories')}, {_count_of(self.entries, 'entry', 'entries')}, "
                f"{size_text(self.bytes)} in files, {_count_of(self.errors, 'error', 'errors')}, {secs:.2f} s "
                f"({rate:,.0f} entries/s, {used}/{len(served)} hosts)")


def _count_of(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


_BY_NAME = operator.attrgetter("name")


class Progress:
    """The live display on stderr (tqdm), refreshed by its own thread a few times a second."""

    INTERVAL = 0.25
    ACTIVE_FOR = 2.0  # a host is "in use" when it answered within this many seconds

    def __init__(self, ctx: Context, crawl: Crawl) -> None:
        from tqdm import tqdm

        self.ctx = ctx
        self.crawl = crawl
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
        served = self.crawl.walker.served()
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
        c = self.crawl
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


# -- ls ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _user(uid: int) -> Optional[str]:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)
def _group(gid: int) -> Optional[str]:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


def _id_cell(num: int, name: Optional[str]) -> tuple[str, str]:
    """An owner or group cell as ls aligns it: names to the left, numbers to the right."""
    return (name, "<") if name is not None else (str(num), ">")


def ls_time(mtime: float, now: float) -> str:
    """``ls -l``'s date column (C locale, local time): the time for the last six months,
    else the year."""
    t = time.localtime(mtime)
    day = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}"
    if now - _SIX_MONTHS < mtime <= now:
        return f"{day} {t.tm_hour:02d}:{t.tm_min:02d}"
    return f"{day}  {t.tm_year}"


def ls_long(entries: list[AgentDirEntry], *, numeric: bool, human_sizes: bool,
            show: Callable[[bytes], bytes] = bytes) -> list[bytes]:
    """The lines of ``ls -l`` (``total`` first) for entries in display order."""
    now = time.time()
    rows: list[tuple[str, str, tuple[str, str], tuple[str, str], str, str]] = []
    blocks = 0
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:  # vanished before the agent could stat it: as ls shows it
            unknown = ("?", ">")
            rows.append((_LS_TYPE.get(e.kind, "?") + "?" * 9, "?", unknown, unknown, "?", "           ?"))
            continue
        blocks += st.st_blocks
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            size = f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
        else:
            size = human(st.st_size) if human_sizes else str(st.st_size)
        rows.append((
            stat.filemode(st.st_mode), str(st.st_nlink),
            _id_cell(st.st_uid, None if numeric else _user(st.st_uid)),
            _id_cell(st.st_gid, None if numeric else _group(st.st_gid)),
            size, ls_time(st.st_mtime, now),
        ))
    total = human(blocks * 512) if human_sizes else str(-(-blocks * 512 // 1024))
    lines = [f"total {total}\n".encode()]
    if rows:
        links = max(len(r[1]) for r in rows)
        owner = max(len(r[2][0]) for r in rows)
        group = max(len(r[3][0]) for r in rows)
        size_w = max(len(r[4]) for r in rows)
        for (mode, nlink, (user, ua), (grp_, ga), size, date), e in zip(rows, entries, strict=True):
            head = f"{mode} {nlink:>{links}} {user:{ua}{owner}} {grp_:{ga}{group}} {size:>{size_w}} {date} "
            lines.append(head.encode() + show(os.fsencode(e.name)) + b"\n")
    return lines


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    path = remote_path(args.path)
    with AgentConnection(ctx.hosts, ctx.port, **ctx.options) as conn:
        try:
            entries = sorted(conn.scandir(path), key=lambda e: os.fsencode(e.name))
        except AgentError:
            raise
        except OSError as exc:
            ctx.warn(f"{shown(path)}: {exc.strerror or exc}")
            return EXIT_PARTIAL
    show = for_terminal if sys.stdout.isatty() else bytes
    if args.long:
        lines = ls_long(entries, numeric=args.numeric, human_sizes=args.human, show=show)
    else:
        lines = [show(os.fsencode(e.name)) + b"\n" for e in entries]
    out = sys.stdout.buffer
    out.write(b"".join(lines))
    out.flush()
    return EXIT_OK


# -- walk -------------------------------------------------------------------------------------

def cmd_walk(args: argparse.Namespace, ctx: Context) -> int:
    if args.dask is not None:
        return cmd_walk_dask(args, ctx)
    top = remote_path(args.path)
    maxdepth: Optional[int] = args.maxdepth
    to_stdout = args.output in (None, "-")
    if args.format == "parquet":
        if to_stdout:
            raise UsageError("--format parquet writes a dataset: give -o DIR")
        if importlib.util.find_spec("pyarrow") is None:  # imported when the first partition is written
            raise UsageError("--format parquet needs pyarrow (pip install 'diskover-storage-agent[dask]')")
    ctx.check_reachable(top)
    out: Optional[IO[bytes]] = None
    sink: Union[RecordWriter, DatasetWriter]
    if args.format == "parquet":
        _prepare_dataset(args.output)
        sink = DatasetWriter(args.output, os.fsdecode(top))
    else:
        try:
            out = sys.stdout.buffer if to_stdout else open(args.output, "wb", buffering=1 << 20)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        sink = RecordWriter(out, args.format)
    crawl = Crawl(ctx, top, exclude=args.exclude, one_fs=args.one_file_system, on_error=sink.add_error)

    def body(crawl: Crawl) -> None:
        for path, entries in crawl:
            depth = crawl.depth(path)
            if maxdepth is not None and depth + 1 >= maxdepth:
                for e in entries:
                    if e.kind == KIND_DIR:
                        crawl.prune(_join(path, e.name))
                if depth + 1 > maxdepth:
                    continue
            sink.add_dir(path, entries)

    try:
        run_crawl(ctx, crawl, body, output_is_terminal=to_stdout and sys.stdout.isatty())
        if isinstance(sink, DatasetWriter):
            sink.close(crawl.seconds)
        else:
            sink.flush()
        return finish(ctx, crawl)
    finally:
        if isinstance(sink, RecordWriter):
            sink.detach()
        if out is not None and not to_stdout:
            out.close()


def _prepare_dataset(output: str) -> None:
    """Create, or check, the directory of a walk's dataset: a usage error when it cannot be one."""
    try:
        prepare_output(output)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None


def cmd_walk_dask(args: argparse.Namespace, ctx: Context) -> int:
    """``walk --dask``: the walk as Dask tasks, written as a dataset of partitions in ``-o DIR``."""
    try:
        from .distributed import dask_walk, local_cluster
    except ImportError as exc:  # pragma: no cover - the [dask] extra is missing
        raise UsageError(f"--dask needs the dask extra (pip install 'diskover-storage-agent[dask]'): {exc}") from None
    if args.output in (None, "-"):
        raise UsageError("--dask writes a dataset: give -o DIR")
    if args.format == "csv":
        raise UsageError("--dask writes parquet or ndjson partitions")
    if args.maxdepth is not None:
        raise UsageError("--maxdepth is not available with --dask")
    top = remote_path(args.path)
    ctx.check_reachable(top)
    _prepare_dataset(args.output)
    try:
        if args.dask.startswith("local:"):
            client = local_cluster(_positive(args.dask[6:]))
        else:
            from distributed import Client

            client = Client(args.dask)
    except (ValueError, OSError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler {args.dask}: {exc}") from None
    bar = None
    if _show_progress(ctx):
        from tqdm import tqdm

        bar = ctx.bar = tqdm(total=None, file=sys.stderr, unit=" entries", unit_scale=True, dynamic_ncols=True)

    def progress(summary: Any, result: Any) -> None:
        if result.errors:
            ctx.warn(f"{result.errors} directories could not be listed (error rows in {result.file})")
        if bar is not None:
            bar.update(result.entries)
            bar.set_postfix_str(f"{summary.dirs:,} dirs, {size_text(summary.bytes)} in files, "
                                f"{len(summary.files)}/{summary.tasks} tasks, {summary.errors} errors",
                                refresh=False)

    try:
        summary = dask_walk(
            top, ctx.hosts, args.output, client=client, fmt=args.format, port=ctx.port, progress=progress,
            retry_for=ctx.retry_for, exclude_dirs=args.exclude, exclude_files=args.exclude,
            one_fs=args.one_file_system, **ctx.options,
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
            ctx.bar = None
        client.close()
        if args.dask.startswith("local:"):
            client.cluster.close()
    if not ctx.quiet:
        rate = summary.entries / summary.seconds if summary.seconds else 0.0
        print(f"{PROG}: {summary.dirs:,} directories, {summary.entries:,} entries, {size_text(summary.bytes)} in "
              f"files, {summary.errors} errors, {summary.tasks} tasks, {summary.seconds:.2f} s "
              f"({rate:,.0f} entries/s) -> {args.output}", file=sys.stderr)
    return EXIT_PARTIAL if summary.errors else 0


# -- report -----------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    """``report DIR``: what a walk's dataset says, through DuckDB."""
    from . import report

    names = [args.query] if args.query else list(report.QUERIES)
    try:
        for name in names:
            columns, rows = report.run(args.dataset, name, args.limit)
            print(f"# {name}")
            print("\t".join(columns))
            for row in rows:
                print("\t".join("" if v is None else str(v) for v in row))
    except (FileNotFoundError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    return 0


# -- du ---------------------------------------------------------------------------------------

class Totals:
    """Per-directory totals of a tree: ``[files, apparent bytes, allocated bytes]``."""

    def __init__(self, top: bytes, top_stat: Optional[os.stat_result]) -> None:
        self.top = top
        own = [0, top_stat.st_size, top_stat.st_blocks * 512] if top_stat is not None else [0, 0, 0]
        #: Directories in the order they were found: every parent before its children.
        self.dirs: dict[bytes, list[int]] = {top: own}
        self.parent: dict[bytes, bytes] = {}
        #: Hard-linked inodes: (dev, ino) -> (first path in byte order, its directory, size, allocated).
        self.links: dict[tuple[int, int], tuple[bytes, bytes, int, int]] = {}

    def add(self, path: bytes, entries: list[Entry]) -> None:
        own = self.dirs.setdefault(path, [0, 0, 0])
        for e in entries:
            st = e.stat
            if e.kind == KIND_DIR:
                child = _join(path, e.name)
                self.parent[child] = path
                self.dirs[child] = [0, st[6], st[10] * 512] if st is not None else [0, 0, 0]
                continue
            if st is None:  # vanished while being listed
                continue
            if st[3] > 1:  # counted once, in the directory of its first name (byte order): deterministic
                key = (st[2], st[1])
                name = _join(path, e.name)
                seen = self.links.get(key)
                if seen is None or name < seen[0]:
                    self.links[key] = (name, path, st[6], st[10] * 512)
                continue
            own[0] += 1
            own[1] += st[6]
            own[2] += st[10] * 512

    def finish(self) -> dict[bytes, tuple[int, list[int]]]:
        """``path -> (depth, [files, apparent, allocated])``, each including everything below."""
        for _name, where, size, allocated in self.links.values():
            own = self.dirs[where]
            own[0] += 1
            own[1] += size
            own[2] += allocated
        for path in reversed(list(self.dirs)):
            parent = self.parent.get(path)
            if parent is not None:
                up, own = self.dirs[parent], self.dirs[path]
                up[0] += own[0]
                up[1] += own[1]
                up[2] += own[2]
        depth: dict[bytes, int] = {self.top: 0}
        for path in self.dirs:
            if path in self.parent:
                depth[path] = depth[self.parent[path]] + 1
        return {p: (depth[p], t) for p, t in self.dirs.items()}


def cmd_du(args: argparse.Namespace, ctx: Context) -> int:
    top = remote_path(args.path)
    max_depth: Optional[int] = 0 if args.summarize else args.max_depth
    top_stat = ctx.directory_stat(top)  # also fails early, with reasons, when no agent answers
    totals = Totals(top, top_stat)
    crawl = Crawl(ctx, top, exclude=args.exclude, one_fs=args.one_file_system)

    def body(crawl: Crawl) -> None:
        for path, entries in crawl:
            totals.add(path, entries)

    run_crawl(ctx, crawl, body)
    which = 1 if args.apparent_size else 2
    rows = [(t[which], t[0], p) for p, (d, t) in totals.finish().items() if max_depth is None or d <= max_depth]
    rows.sort(key=lambda r: (-r[0], r[2]))
    size = human if args.human_readable else str
    top_total = totals.dirs[top]
    show = for_terminal if sys.stdout.isatty() else bytes
    lines = [f"{size(n)}\t{files}\t".encode() + show(p) + b"\n" for n, files, p in rows]
    lines.append(f"{size(top_total[which])}\t{top_total[0]}\ttotal\n".encode())
    out = sys.stdout.buffer
    out.write(b"".join(lines))
    out.flush()
    return finish(ctx, crawl)


# -- the command line -----------------------------------------------------------------------------

def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {n}")
    return n


def _positive(text: str) -> int:
    n = _count(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return v


class _Version(argparse.Action):
    """``--version``, looking the version up only when asked (the lookup costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from . import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


_PATH_HELP = "a remote path, as the agents export it (e.g. /mnt/isilon/projects)"


def build_parser() -> argparse.ArgumentParser:
    """The ``diskover-agent`` argument parser (global options, then a subcommand)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="List, walk and size trees on storage nodes through diskover storage agents.",
        epilog="Exit status: 0 complete; 1 some directories could not be listed (named on stderr); "
               "2 could not run (bad arguments, no agent reachable, refused); 130 interrupted.",
    )
    p.add_argument("--version", action=_Version, help="show program's version number and exit")
    g = p.add_argument_group("agents")
    g.add_argument("--hosts", metavar="H1,H2,...",
                   help=f"agents as name, name:port or [v6addr]:port, comma-separated (default: ${HOSTS_ENV})")
    g.add_argument("--port", type=_positive, default=DEFAULT_PORT, help="port of hosts given without one (%(default)s)")
    g.add_argument("--token-file", metavar="FILE",
                   help="bearer token for agents that require one (default: $DISKOVER_AGENT_TOKEN)")
    g.add_argument("--tls", action="store_true", help="HTTPS, verifying the agents' certificates")
    g.add_argument("--cafile", metavar="FILE", help="CA bundle to verify the agents' certificates (implies --tls)")
    g.add_argument("--insecure", action="store_true", help="with --tls: do not verify certificates")
    g.add_argument("--workers", type=_positive, default=40, metavar="N",
                   help="requests in flight at once, spread over the hosts (%(default)s)")
    g.add_argument("--timeout", type=_seconds_arg, default=60.0, metavar="SECONDS",
                   help="silence from an agent before its request goes to another (%(default)g)")
    g.add_argument("--retry-for", type=_seconds_arg, default=DEFAULT_RETRY_FOR, metavar="SECONDS",
                   help="how long a walk goes on retrying while no agent answers (%(default)g)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no summary line on stderr")
    sub = p.add_subparsers(dest="command", metavar="{ls,walk,du,report}", required=True)

    ls = sub.add_parser("ls", add_help=False, help="list one directory",
                        description="List one remote directory, sorted by name (bytes, as LC_ALL=C ls).")
    ls.add_argument("path", metavar="PATH", help=_PATH_HELP)
    ls.add_argument("-l", dest="long", action="store_true", help="long form: mode, links, owner, group, size, mtime")
    ls.add_argument("-n", dest="numeric", action="store_true", help="with -l: numeric user and group IDs")
    ls.add_argument("-h", "--human-readable", dest="human", action="store_true", help="with -l: sizes like 1.5K")
    ls.add_argument("--help", action="help", help="show this help and exit")
    ls.set_defaults(func=cmd_ls)

    walk = sub.add_parser("walk", help="every entry of a tree, as NDJSON or CSV",
                          description="Write every entry below PATH (not PATH itself), one record per entry: "
                                      "path, path_b64 (the exact bytes, base64, when the path is not UTF-8), name, "
                                      "type, target_type, size, allocated, blocks, mode, uid, gid, inode, nlink, "
                                      "dev, atime, mtime, ctime and their *_ns.")
    walk.add_argument("path", metavar="PATH", help=_PATH_HELP)
    walk.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE instead of stdout (with --format parquet or --dask: the dataset directory)")
    walk.add_argument("--format", choices=("ndjson", "csv", "parquet"), default=None,
                      help="ndjson (default), csv, or parquet: a dataset of Parquet partitions in -o DIR, as "
                           "with --dask; with --dask: parquet (default) or ndjson partitions")
    walk.add_argument("--dask", metavar="SCHEDULER",
                      help="run the walk as Dask tasks on this scheduler (tcp://host:8786), or on a local "
                           "cluster of N worker processes (local:N); -o DIR receives the dataset")
    walk.add_argument("--maxdepth", type=_count, metavar="N",
                      help="as find -mindepth 1 -maxdepth N: entries at most N levels below PATH (1: PATH's own)")
    _add_selection(walk)
    walk.set_defaults(func=cmd_walk)

    du = sub.add_parser("du", add_help=False, help="per-directory totals, largest first",
                        description="Totals per directory, each including everything below it, largest first: "
                                    "SIZE<tab>FILES<tab>PATH, then a total line. SIZE is allocated bytes "
                                    "(st_blocks*512), or apparent bytes (st_size) with --apparent-size; FILES "
                                    "counts what is not a directory. Hard links are counted once.")
    du.add_argument("path", metavar="PATH", help=_PATH_HELP)
    du.add_argument("-d", "--max-depth", type=_count, metavar="N",
                    help="print directories at most N levels below PATH (totals still include everything)")
    du.add_argument("-s", "--summarize", action="store_true", help="only PATH (--max-depth 0)")
    du.add_argument("-h", "--human-readable", action="store_true", help="sizes like 1.0K 234M 2.1G")
    du.add_argument("--apparent-size", action="store_true", help="show and sort by apparent sizes (st_size)")
    _add_selection(du)
    du.add_argument("--help", action="help", help="show this help and exit")
    du.set_defaults(func=cmd_du)

    rep = sub.add_parser("report", help="totals, largest directories, oldest files, owners of a walk's dataset",
                         description="Query a dataset written by walk --dask (DuckDB): totals, largest_dirs, "
                                     "oldest_files, owners. Tab-separated, one section per query.")
    rep.add_argument("dataset", metavar="DIR", help="the directory walk --dask -o wrote")
    rep.add_argument("query", nargs="?", choices=("totals", "largest_dirs", "oldest_files", "owners"),
                     help="one query (default: all)")
    rep.add_argument("--limit", type=_positive, default=10, help="rows per query (%(default)s)")
    rep.set_defaults(func=None)
    return p


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out entries whose name matches GLOB (or whose path does, when GLOB has a '/'); "
                        "excluded directories are not read at all. Repeatable")
    p.add_argument("-x", "--one-file-system", action="store_true", help="stay on PATH's file system")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: parse, run one subcommand, return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "format", "") is None:
        args.format = "parquet" if args.dask is not None else "ndjson"
    try:
        if args.command == "report":
            return cmd_report(args)
        ctx = Context(args)
        return args.func(args, ctx)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except AgentError as exc:  # no agent reachable, a refusal (401...), an agent that is not one
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not complain again
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
