"""Reading one directory, by fd, into encoded chunks of an answer.

Runs in the agent's thread pool, one chunk per call, so that a directory of any
size streams out with bounded memory and the event loop never touches the disk.
"""

from __future__ import annotations

import heapq
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from itertools import islice
from typing import IO, Any, Optional, Protocol

from diskover_wire.codec import msgpack_decode
from diskover_wire.protocol import (
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    encode_frame,
    errno_name,
    kind_of_mode,
    read_frames_raw,
    stat_fields,
)

from .filters import Filter

#: Entries per chunk (and per ``entries`` frame).
CHUNK = 1000
#: Names the text format sorts in memory before it spills a sorted run to disk.
SORT_RUN = 100_000

_fsencode = os.fsencode
_encode = str.encode
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


class Reader(Protocol):
    """An answer being produced in the thread pool, one chunk per :meth:`read`."""

    done: bool
    headers: dict[str, str]
    #: Entries and directories produced so far (for the access log and metrics).
    entries: int
    directories: int

    def read(self) -> bytes: ...

    def error_chunk(self, exc: OSError) -> Optional[bytes]:
        """The end of an answer whose reading failed midway; None when it cannot be said."""

    def close(self) -> None: ...


def entry_kind(entry: os.DirEntry, dir_fd: int) -> str:
    """The lstat kind of an entry, from ``d_type`` when the file system gives it."""
    if entry.is_dir(follow_symlinks=False):
        return KIND_DIR
    if entry.is_file(follow_symlinks=False):
        return KIND_FILE
    if entry.is_symlink():
        return KIND_SYMLINK
    try:
        return kind_of_mode(entry.stat(follow_symlinks=False).st_mode)
    except OSError:
        return KIND_FILE  # vanished since readdir; os.walk counts it among files


def target_stat(name: str, dir_fd: int) -> Optional[os.stat_result]:
    """The stat of what a symlink points to, or None when it dangles or loops."""
    try:
        return os.stat(name, dir_fd=dir_fd)
    except OSError:
        return None


def read_entries(
    it: Iterator[os.DirEntry], dir_fd: int, want_stat: bool, limit: int, subdirs: Optional[list[bytes]] = None,
    inside: Optional[Callable[[bytes], Optional[os.stat_result]]] = None,
) -> list[tuple]:
    """Up to ``limit`` wire entries from a scandir iterator (see the protocol module).

    The names of real directories are also appended to ``subdirs`` when given. This
    loop is the agent's hot path: it stays inline, with no call per entry that
    ``d_type`` makes unnecessary. A symlink's target kind comes from following it
    (``os.walk`` needs it); its stat record only from ``inside(name)``, which follows
    it no further than the export (without ``inside``, no target stat is given).
    """
    out: list[tuple] = []
    append = out.append
    add_dir = subdirs.append if subdirs is not None else (lambda _name: None)
    if not want_stat:
        for entry in islice(it, limit):
            name = _encode(entry.name, _FS_ENCODING, _FS_ERRORS)
            if entry.is_dir(follow_symlinks=False):
                append((name, KIND_DIR, None, None, None))
                add_dir(name)
            elif entry.is_file(follow_symlinks=False):
                append((name, KIND_FILE, None, None, None))
            else:
                kind = entry_kind(entry, dir_fd)
                tst = target_stat(entry.name, dir_fd) if kind == KIND_SYMLINK else None
                append((name, kind, tst and kind_of_mode(tst.st_mode), None, None))
        return out
    for entry in islice(it, limit):
        name = _encode(entry.name, _FS_ENCODING, _FS_ERRORS)
        try:
            st: Any = entry.stat(follow_symlinks=False)
            kind = kind_of_mode(st.st_mode)
            fields: Optional[tuple] = stat_fields(st)
        except OSError:
            kind, fields = entry_kind(entry, dir_fd), None
        if kind == KIND_DIR:
            add_dir(name)
        elif kind == KIND_SYMLINK:
            tst = target_stat(entry.name, dir_fd)
            if tst is not None:
                ist = inside(name) if inside is not None else None
                append((name, kind, kind_of_mode(tst.st_mode), fields, ist and stat_fields(ist)))
                continue
        append((name, kind, None, fields, None))
    return out


def read_names(
    it: Iterator[os.DirEntry], dir_fd: int, limit: int, subdirs: list[bytes],
) -> tuple[int, bytes, str, str]:
    """Up to ``limit`` entries without stat, as the fields of a ``names`` frame:
    ``(count, names, kinds, targets)`` (see the protocol module). The names of real
    directories are appended to ``subdirs``. Names are encoded in one call per chunk."""
    names: list[str] = []
    kinds: list[str] = []
    targets: list[str] = []
    add_name = names.append
    add_kind = kinds.append
    for entry in islice(it, limit):
        name = entry.name
        add_name(name)
        if entry.is_dir(follow_symlinks=False):
            add_kind(KIND_DIR)
            subdirs.append(_encode(name, _FS_ENCODING, _FS_ERRORS))
        elif entry.is_file(follow_symlinks=False):
            add_kind(KIND_FILE)
        else:
            kind = entry_kind(entry, dir_fd)
            add_kind(kind)
            if kind == KIND_SYMLINK:
                tst = target_stat(name, dir_fd)
                targets.append("-" if tst is None else kind_of_mode(tst.st_mode))
    blob = _encode("\0".join(names), _FS_ENCODING, _FS_ERRORS)
    return len(names), blob, "".join(kinds), "".join(targets)


def names_fields(entries: list[tuple]) -> tuple[bytes, str, str]:
    """The fields of a ``names`` frame holding wire entries (without stat)."""
    return (b"\0".join([e[0] for e in entries]), "".join([e[1] for e in entries]),
            "".join([e[2] or "-" for e in entries if e[1] == KIND_SYMLINK]))


def dir_stat(fd: int, want_stat: bool) -> Optional[tuple]:
    """The stat record of an open directory, when asked for."""
    return stat_fields(os.fstat(fd)) if want_stat else None


class Listing:
    """A structured (``msgpack``/``ndjson``) listing of one open directory.

    :meth:`read` returns the next chunk of encoded frames; ``done`` is set once the
    ``end`` frame has been produced. An error while reading raises ``OSError`` from
    :meth:`read`; :meth:`error_chunk` then encodes it for an answer already under way.
    """

    headers: dict[str, str] = {}

    def __init__(self, fd: int, remote: bytes, fmt: str, want_stat: bool, filter: Optional[Filter] = None,
                 inside: Optional[Callable[[bytes], Optional[os.stat_result]]] = None) -> None:
        self.fd = fd
        self.remote = remote
        self.fmt = fmt
        self.want_stat = want_stat
        self.filter = filter
        self.inside = inside
        self.done = False
        self.entries = 0
        self.directories = 1
        self._it = os.scandir(fd)
        self._started = False

    def read(self) -> bytes:
        parts = []
        if not self._started:
            parts.append(encode_frame(("dir", self.remote, dir_stat(self.fd, self.want_stat)), self.fmt))
            self._started = True
        entries = read_entries(self._it, self.fd, self.want_stat, CHUNK, None, self.inside)
        read = len(entries)
        if self.filter is not None:
            entries = self.filter.apply(entries, self.remote, self.fd)
        self.entries += len(entries)
        if entries:
            parts.append(encode_frame(("entries", entries), self.fmt))
        if read < CHUNK:
            parts.append(encode_frame(("end", []), self.fmt))
            self.done = True
        return b"".join(parts)

    def error_chunk(self, exc: OSError) -> Optional[bytes]:
        self.done = True
        code = errno_name(exc.errno)
        return encode_frame(("error", exc.errno or 0, code, exc.strerror or str(exc)), self.fmt) + encode_frame(
            ("end", []), self.fmt
        )

    def close(self) -> None:
        self._it.close()
        os.close(self.fd)


class TextListing:
    """The curl-friendly listing: one name per line, sorted, directories as ``name/``.

    Sorting needs every name; past :data:`SORT_RUN` names, sorted runs are spilled to
    temporary files and merged, so memory stays bounded for any directory size.
    """

    headers: dict[str, str] = {}

    def __init__(self, fd: int, remote: bytes) -> None:
        self.fd = fd
        self.remote = remote
        self.done = False
        self.entries = 0
        self.directories = 1
        self._it = os.scandir(fd)
        self._runs: list[IO[bytes]] = []
        self._lines: Optional[Iterator[bytes]] = None

    def read(self) -> bytes:
        if self._lines is None:
            self._lines = self._sorted_lines()
        lines = list(islice(self._lines, CHUNK))
        self.entries += len(lines)
        chunk = b"".join(lines)
        if not chunk:
            self.done = True
        return chunk

    def error_chunk(self, exc: OSError) -> Optional[bytes]:
        self.done = True
        return None

    def _scan_run(self) -> list[tuple[bytes, bool]]:
        return [
            (_fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in islice(self._it, SORT_RUN)
        ]

    def _sorted_lines(self) -> Iterator[bytes]:
        run = self._scan_run()
        run.sort()
        if len(run) == SORT_RUN:
            while run:
                self._runs.append(_spill(run))
                run = self._scan_run()
                run.sort()
            merged: Iterator[Any] = heapq.merge(*(_unspill(f) for f in self._runs))
        else:
            merged = iter(run)
        for name, is_dir in merged:
            yield name + b"/\n" if is_dir else name + b"\n"

    def close(self) -> None:
        self._it.close()
        os.close(self.fd)
        for f in self._runs:
            f.close()


def _spill(run: list[tuple[bytes, bool]]) -> IO[bytes]:
    f = tempfile.TemporaryFile(prefix="diskover-agent-sort-")
    for i in range(0, len(run), CHUNK):
        f.write(encode_frame(run[i : i + CHUNK], "msgpack"))
    f.seek(0)
    return f


def _unspill(f: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    for body in read_frames_raw(f.read):
        yield from map(tuple, msgpack_decode(body))


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (and does not refuse it with q=0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class GzipReader:
    """Compresses another reader's chunks as they come (level 1: cheap for the agent)."""

    headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}

    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.done = False
        self._z = zlib.compressobj(1, zlib.DEFLATED, 31)

    @property
    def entries(self) -> int:
        return self.inner.entries

    @property
    def directories(self) -> int:
        return self.inner.directories

    def read(self) -> bytes:
        return self._pack(self.inner.read())

    def error_chunk(self, exc: OSError) -> Optional[bytes]:
        chunk = self.inner.error_chunk(exc)
        return None if chunk is None else self._pack(chunk)

    def _pack(self, chunk: bytes) -> bytes:
        out = self._z.compress(chunk)
        if self.inner.done:
            self.done = True
            return out + self._z.flush(zlib.Z_FINISH)
        return out + self._z.flush(zlib.Z_SYNC_FLUSH)

    def close(self) -> None:
        self.inner.close()
