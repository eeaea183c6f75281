"""The subtree walk: many directories in one answer, up to a budget.

Depth-first below each requested directory, children in name order, every child opened by fd relative to
its parent with ``O_NOFOLLOW`` (symlinks are never walked, as with ``os.walk``). Each
directory is streamed as soon as it is read. Once the budget (entries or seconds) is
spent, the walk stops between two directories and answers the frontier: the
directories found but not listed. No state is kept once the answer is sent, so any
agent can continue any walk.

Memory and descriptors per request are bounded whatever the tree: at most
:data:`MAX_DEPTH` directories are open at once (deeper ones go to the frontier), and
the names kept for descent take at most :data:`DESCENT_BYTES`; the other directories
found go to the frontier at once (see :class:`Frontier`).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import IO, Optional

from diskover_wire import codec
from diskover_wire.protocol import (
    FRONTIER_FRAME_BYTES,
    KIND_DIR,
    MAX_PATH,
    WalkRequest,
    encode_frame,
    encode_path_item,
    end_frame_pieces,
    errno_name,
    walk_request_of,
)

from .exports import BadPath, ExportTable, IsSymlink, split_path
from .filters import Filter
from .listing import CHUNK, dir_stat, names_fields, read_entries
from .readloop import Chunks
from .readloop import join as _join

_OPEN_CHILD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bytes of encoded frames gathered before a chunk goes out.
_CHUNK_BYTES = 64 * 1024

MAX_PATHS = 1024
MAX_ENTRIES = 1_000_000
MAX_SECONDS = 60.0
#: Directories open at once below a requested path (one fd each); the subdirectories
#: of the deepest go to the frontier.
MAX_DEPTH = 32
#: Bytes of subdirectory names kept for descent (each counted with ``_NAME_COST`` more
#: for its Python object); the subdirectories found past it go to the frontier at once.
DESCENT_BYTES = 1024 * 1024
_NAME_COST = 48


def validate(req: WalkRequest) -> Optional[str]:
    """Why a walk request is unacceptable, or None. (A path too long to serve is
    not: it is answered in-band with ``ENAMETOOLONG``, like any directory that
    cannot be listed.)"""
    if not 1 <= len(req.paths) <= MAX_PATHS:
        return f"paths must hold 1 to {MAX_PATHS} paths"
    if not 1 <= req.max_entries <= MAX_ENTRIES:
        return f"max_entries must be between 1 and {MAX_ENTRIES}"
    if not 0 < req.max_seconds <= MAX_SECONDS:
        return f"max_seconds must be above 0 and at most {MAX_SECONDS:g}"
    for path in req.paths:
        try:
            split_path(path)
        except BadPath as exc:
            if exc.errno != errno.EACCES:  # a '..' is refused in the answer, for that path alone
                return f"{os.fsdecode(path[:200])!r}: {exc}"
    return Filter.check(req.exclude_dirs) or Filter.check(req.exclude_files)


class Frontier:
    """Where a walk's frontier goes, in bounded memory.

    For a client that reads ``frontier`` frames, paths go out in frames of about
    ``FRONTIER_FRAME_BYTES`` as they are found. For one that expects the whole frontier
    in the ``end`` frame, past that many bytes they are spilled to a temporary file,
    and the ``end`` frame is written from it in pieces.

    :meth:`begin` marks the start of a directory's listing; :meth:`rollback` takes
    back what was added since, when the listing fails (paths already sent in frames
    are void for the client, as the directory's entries are).
    """

    def __init__(self, fmt: str, frames: bool) -> None:
        self.fmt = fmt
        self.frames = frames
        self._buf: list[bytes] = []
        self._size = 0
        self._spill: Optional[IO[bytes]] = None
        self._spilled = 0  # paths in the spill file
        #: Where the current directory's paths start: an index in ``_buf``, or (once
        #: flushed) None and the spill file's offset and count then.
        self._mark_index: Optional[int] = 0
        self._mark_file = (0, 0)

    def begin(self) -> None:
        self._mark_index = len(self._buf)

    def rollback(self) -> None:
        if self._mark_index is not None:
            del self._buf[self._mark_index:]
        else:
            self._buf.clear()
            if self._spill is not None:
                offset, self._spilled = self._mark_file
                self._spill.seek(offset)
                self._spill.truncate()
        self._size = sum(map(len, self._buf))
        self.begin()

    def push(self, paths: Iterable[bytes]) -> Iterator[bytes]:
        """Add paths; yields the frames (if any) that this fills."""
        for path in paths:
            self._buf.append(path)
            self._size += len(path)
            if self._size >= FRONTIER_FRAME_BYTES:
                yield from self._flush()

    def _flush(self) -> Iterator[bytes]:
        if not self._buf:
            return
        if self.frames:
            yield encode_frame(("frontier", self._buf), self.fmt)
        else:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(prefix="diskover-agent-frontier-")
            sep = end_frame_pieces(0, 0, self.fmt)[1]
            for i, path in enumerate(self._buf):
                if i == self._mark_index:
                    self._mark_file = (self._spill.tell(), self._spilled)
                self._spill.write((sep if self._spilled else b"") + encode_path_item(path, self.fmt))
                self._spilled += 1
            if self._mark_index == len(self._buf):
                self._mark_file = (self._spill.tell(), self._spilled)
        self._mark_index = None
        self._buf = []
        self._size = 0

    def end(self) -> Iterator[bytes]:
        """The rest of the frontier and the ``end`` frame, in pieces of bounded size."""
        if self._spill is None:  # frames sent so far, and what is left in one end frame
            yield encode_frame(("end", self._buf), self.fmt)
            return
        yield from self._flush()
        spill = self._spill
        size = spill.tell()
        head, _, tail = end_frame_pieces(self._spilled, size, self.fmt)
        yield head
        spill.seek(0)
        while True:
            piece = spill.read(_CHUNK_BYTES)
            if not piece:
                break
            yield piece
        yield tail

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


class SubtreeWalk:
    """A walk answer being produced: :meth:`read` returns its next chunk."""

    headers: dict[str, str] = {}

    def __init__(self, exports: ExportTable, req: WalkRequest, fmt: str) -> None:
        self.exports = exports
        self.req = req
        self.fmt = fmt
        self.done = False
        self.entries = 0
        self.directories = 0
        self._frames = self._walk()
        self._stack: list[tuple[int, bytes, list[bytes]]] = []
        #: Bytes of names on the stack, counted as against DESCENT_BYTES.
        self._kept = 0
        self._frontier = Frontier(fmt, req.frontier_frames)
        self._filter = Filter.of(req.exclude_dirs, req.exclude_files, req.one_fs)
        #: The read loop, when no exclusions apply (see :meth:`_filtered`).
        self._chunks = (Chunks(fmt, req.stat, req.names_frames, exports.stat_inside)
                        if self._filter is None else None)

    def read(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        for frame in self._frames:
            parts.append(frame)
            size += len(frame)
            if size >= _CHUNK_BYTES:
                break
        else:
            self.done = True
        return b"".join(parts)

    def error_chunk(self, exc: OSError) -> Optional[bytes]:
        return None  # errors are reported in-band, per directory

    def close(self) -> None:
        self._frames.close()
        while self._stack:
            os.close(self._stack.pop()[0])
        self._frontier.close()

    def _encode(self, frame: tuple) -> bytes:
        return encode_frame(frame, self.fmt)

    def _error(self, exc: OSError) -> bytes:
        return self._encode(("error", exc.errno or 0, errno_name(exc.errno), exc.strerror or str(exc)))

    def _unlistable(self, path: bytes, exc: OSError) -> Iterator[bytes]:
        yield self._encode(("dir", path, None))
        yield self._error(exc)

    def _walk(self) -> Iterator[bytes]:
        deadline = time.monotonic() + self.req.max_seconds
        roots = list(reversed(self.req.paths))
        stack = self._stack
        while roots and not self._spent(deadline):
            path = roots.pop()
            try:
                fd = self.exports.open_remote(path, follow_last=not self.req.nofollow)
            except IsSymlink:
                yield self._encode(("skip", path))
                continue
            except BadPath as exc:  # a '..' (validate let it through): refused in-band, for that path alone
                yield from self._unlistable(path, OSError(exc.errno, str(exc)))
                continue
            except OSError as exc:
                yield from self._unlistable(path, exc)
                continue
            yield from self._list(fd, path)
            while stack:
                fd, parent, names = stack[-1]
                if not names:
                    os.close(fd)
                    stack.pop()
                    continue
                if self._spent(deadline):
                    break
                name = names.pop()
                self._kept -= len(name) + _NAME_COST
                path = _join(parent, name)
                if len(path) > MAX_PATH:
                    yield from self._unlistable(path, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))
                    continue
                try:
                    child = os.open(name, _OPEN_CHILD, dir_fd=fd)
                except OSError as exc:
                    yield from self._unlistable(path, OSError(exc.errno, exc.strerror))
                    continue
                yield from self._list(child, path)
        frontier = self._frontier
        for _, parent, names in stack:
            yield from frontier.push(_join(parent, name) for name in reversed(names))
        yield from frontier.push(reversed(roots))
        while stack:
            os.close(stack.pop()[0])
        self._kept = 0
        yield from frontier.end()

    def _spent(self, deadline: float) -> bool:
        return self.directories > 0 and (self.entries >= self.req.max_entries or time.monotonic() >= deadline)

    def _list(self, fd: int, path: bytes) -> Iterator[bytes]:
        """Stream one directory (owning ``fd``); the subdirectories it keeps for descent
        go on the stack, the others to the frontier."""
        self.directories += 1
        subdirs: list[bytes] = []
        kept = 0
        pushed = False
        frontier = self._frontier
        descend = len(self._stack) + 1 < MAX_DEPTH
        chunks = self._chunks
        frontier.begin()
        head = b""  # the dir frame, sent with the directory's first chunk (or its error)
        try:
            head = self._encode(("dir", path, dir_stat(fd, self.req.stat) if self.req.stat else None))
            with (os.scandir(fd) if chunks is None else chunks.open(fd)) as it:
                while True:
                    found: list[bytes] = []
                    if chunks is None:
                        read, frame = self._filtered(it, fd, path, found)
                    else:
                        read, frame = chunks.read(it, fd, path, found)
                        self.entries += read
                    if head:
                        frame, head = head + frame, b""
                    if frame:
                        yield frame
                    room = DESCENT_BYTES - self._kept - kept if descend else 0
                    overflow: list[bytes] = []
                    for name in found:
                        cost = len(name) + _NAME_COST
                        if cost <= room:
                            subdirs.append(name)
                            kept += cost
                            room -= cost
                        else:
                            overflow.append(name)
                    if overflow:
                        yield from frontier.push(_join(path, name) for name in overflow)
                    if read < CHUNK:
                        break
        except OSError as exc:
            frontier.rollback()
            yield head + self._error(exc)
        else:
            if subdirs:
                subdirs.sort(reverse=True)  # pop() then takes them in name order, as dirs is sorted
                self._stack.append((fd, path, subdirs))
                self._kept += kept
                pushed = True
        finally:
            if not pushed:
                os.close(fd)

    def _filtered(self, it: Iterator[os.DirEntry], fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        """A chunk of a directory under exclusions: its entries read, and the frame of
        those that survive (counted in ``entries``; their subdirectories appended to ``found``)."""
        assert self._filter is not None
        stat_inside = self.exports.stat_inside
        entries = read_entries(it, fd, self.req.stat, CHUNK, None, lambda name: stat_inside(_join(path, name)))
        read = len(entries)
        entries = self._filter.apply(entries, path, fd)
        found += [e[0] for e in entries if e[1] == KIND_DIR]
        self.entries += len(entries)
        if not entries:
            return read, b""
        names = self.req.names_frames and not self.req.stat
        return read, self._encode(("names", *names_fields(entries)) if names else ("entries", entries))


def decode_request(body: bytes, content_type: str) -> WalkRequest:
    """A walk request from a msgpack or JSON body; raises ``ValueError``."""
    json = content_type.startswith("application/json")
    try:
        return walk_request_of(codec.json_decode(body) if json else codec.msgpack_decode(body), json)
    except ValueError as exc:
        raise ValueError(f"bad walk request: {exc}") from None
