"""The subtree walk: many directories in one answer, up to a budget.

Depth-first below each requested directory, every child opened by fd relative to
its parent with ``O_NOFOLLOW`` (symlinks are never walked, as with ``os.walk``), at
most one open fd per level. Each directory is streamed as soon as it is read. Once
the budget (entries or seconds) is spent, the walk stops between two directories
and ends the answer with the frontier: the directories found but not listed. No
state is kept once the answer is sent, so any agent can continue any walk.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from typing import Optional

import msgspec

from diskover_agent.protocol import KIND_DIR, WalkRequest, decode_json_walk_request, encode_frame, errno_name

from .exports import BadPath, ExportTable, OutsideExport, split_path
from .filters import Filter
from .listing import CHUNK, dir_stat, read_entries

_OPEN_CHILD = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bytes of encoded frames gathered before a chunk goes out.
_CHUNK_BYTES = 64 * 1024

MAX_PATHS = 1024
MAX_ENTRIES = 1_000_000
MAX_SECONDS = 60.0


def _join(path: bytes, name: bytes) -> bytes:
    return path + name if path.endswith(b"/") else path + b"/" + name


def validate(req: WalkRequest) -> Optional[str]:
    """Why a walk request is unacceptable, or None."""
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
                return f"{path!r}: {exc}"
    return Filter.check(req.exclude_dirs) or Filter.check(req.exclude_files)


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
        self._filter = Filter.of(req.exclude_dirs, req.exclude_files, req.one_fs)

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

    def _encode(self, frame: tuple) -> bytes:
        return encode_frame(frame, self.fmt)

    def _error(self, exc: OSError) -> bytes:
        return self._encode(("error", exc.errno or 0, errno_name(exc.errno), exc.strerror or str(exc)))

    def _walk(self) -> Iterator[bytes]:
        deadline = time.monotonic() + self.req.max_seconds
        roots = list(reversed(self.req.paths))
        stack = self._stack
        while roots and not self._spent(deadline):
            path = roots.pop()
            try:
                fd = self._open_root(path)
            except OSError as exc:
                yield self._encode(("dir", path, None))
                yield self._error(exc)
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
                path = _join(parent, name)
                try:
                    child = os.open(name, _OPEN_CHILD, dir_fd=fd)
                except OSError as exc:
                    yield self._encode(("dir", path, None))
                    yield self._error(OSError(exc.errno, exc.strerror))
                    continue
                yield from self._list(child, path)
        frontier = [_join(parent, name) for _, parent, names in stack for name in reversed(names)]
        frontier.extend(reversed(roots))
        while stack:
            os.close(stack.pop()[0])
        yield self._encode(("end", frontier))

    def _spent(self, deadline: float) -> bool:
        return self.directories > 0 and (self.entries >= self.req.max_entries or time.monotonic() >= deadline)

    def _open_root(self, path: bytes) -> int:
        try:
            parts = split_path(path)
        except BadPath as exc:  # answered in-band, like any path that cannot be listed
            raise OSError(exc.errno, str(exc)) from None
        found = self.exports.lookup(parts)
        if found is None:
            raise OutsideExport(path)
        return self.exports.open_beneath(found[0], found[1], path)

    def _list(self, fd: int, path: bytes) -> Iterator[bytes]:
        """Stream one directory (owning ``fd``); its subdirectories go on the stack."""
        self.directories += 1
        subdirs: list[bytes] = []
        pushed = False
        filter = self._filter
        stat_inside = self.exports.stat_inside

        def inside(name: bytes) -> Optional[os.stat_result]:
            return stat_inside(_join(path, name))

        try:
            yield self._encode(("dir", path, dir_stat(fd, self.req.stat)))
            with os.scandir(fd) as it:
                while True:
                    if filter is None:
                        entries = read_entries(it, fd, self.req.stat, CHUNK, subdirs, inside)
                        read = len(entries)
                    else:
                        entries = read_entries(it, fd, self.req.stat, CHUNK, None, inside)
                        read = len(entries)
                        entries = filter.apply(entries, path, fd)
                        subdirs.extend(e[0] for e in entries if e[1] == KIND_DIR)
                    self.entries += len(entries)
                    if entries:
                        yield self._encode(("entries", entries))
                    if read < CHUNK:
                        break
        except OSError as exc:
            yield self._error(exc)
        else:
            if subdirs:
                subdirs.reverse()  # pop() then takes them in listing order
                self._stack.append((fd, path, subdirs))
                pushed = True
        finally:
            if not pushed:
                os.close(fd)


def decode_request(body: bytes, content_type: str) -> WalkRequest:
    """A walk request from a msgpack or JSON body; raises ``ValueError``."""
    try:
        if content_type.startswith("application/json"):
            return decode_json_walk_request(body)
        return msgspec.msgpack.decode(body, type=WalkRequest)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad walk request: {exc}") from None
