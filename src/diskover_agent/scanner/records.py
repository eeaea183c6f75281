"""What the scanner hands diskover: stat records shaped like ``os.stat_result`` (with
``st_sizedu``), directory entries, and ``scandir``'s iterator."""

from __future__ import annotations

import errno
from typing import Any, AnyStr, Generic

from ..entry import AgentDirEntry
from ..protocol import KIND_SYMLINK, Entry, StatFields


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
                raise no_stat(self._denied, self.path)
            super().stat(follow_symlinks=follow_symlinks)  # raises the matching OSError
            raise FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", self.path)
        return StatResult(fields)


def is_denied(entries: list[Entry]) -> bool:
    """True when the agent could stat none of a directory's entries: it may read the
    directory but not search it (``r`` without ``x``), where every ``lstat`` fails."""
    return bool(entries) and all(e.stat is None for e in entries)


def no_stat(denied: bool, path: object) -> OSError:
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


def fields_of(st: Any) -> StatFields:
    if isinstance(st, (tuple, list)) and len(st) == 13:
        return tuple(st)  # type: ignore[return-value]
    return (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, st.st_blksize, st.st_rdev)
