"""Directory entries as the client hands them out, shaped like ``os.DirEntry``."""

from __future__ import annotations

import errno
import os
from typing import AnyStr, Generic, Optional

from .protocol import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry, StatFields


def make_stat(fields: StatFields) -> os.stat_result:
    """An ``os.stat_result`` from the wire's stat fields, equal to the agent's own."""
    mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime, blocks, blksize, rdev = fields
    a_s, a_ns = divmod(atime, 1_000_000_000)
    m_s, m_ns = divmod(mtime, 1_000_000_000)
    c_s, c_ns = divmod(ctime, 1_000_000_000)
    return os.stat_result((
        mode, ino, dev, nlink, uid, gid, size, a_s, m_s, c_s,
        a_s + a_ns * 1e-9, m_s + m_ns * 1e-9, c_s + c_ns * 1e-9,
        atime, mtime, ctime, blksize, blocks, rdev,
    ))


class AgentDirEntry(Generic[AnyStr]):
    """One entry of a remote directory; no method makes a network request."""

    __slots__ = ("_dirpath", "_entry", "_stat", "name")

    def __init__(self, dirpath: AnyStr, name: AnyStr, entry: Entry) -> None:
        self.name: AnyStr = name
        self._dirpath = dirpath
        self._entry = entry
        self._stat: Optional[os.stat_result] = None

    @property
    def path(self) -> AnyStr:
        """``os.path.join(dirpath, name)``, as ``os.DirEntry.path`` (made when asked for)."""
        return os.path.join(self._dirpath, self.name)

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        kind = self._entry.kind
        if follow_symlinks and kind == KIND_SYMLINK:
            return self._entry.target == KIND_DIR
        return kind == KIND_DIR

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        kind = self._entry.kind
        if follow_symlinks and kind == KIND_SYMLINK:
            return self._entry.target == KIND_FILE
        return kind == KIND_FILE

    def is_symlink(self) -> bool:
        return self._entry.kind == KIND_SYMLINK

    def is_junction(self) -> bool:
        return False

    @property
    def kind(self) -> str:
        """The one-letter type of the entry itself (``d``, ``f``, ``l``, ``p``...)."""
        return self._entry.kind

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        """The entry's stat, as the agent read it while listing. Following a symlink
        that leads outside the export raises ``PermissionError``: the agent does not
        reveal what lies there."""
        if follow_symlinks and self._entry.kind == KIND_SYMLINK:
            if self._entry.target_stat is None:
                if self._entry.stat is None:
                    raise _no_stat(self.path)
                if self._entry.target is not None:
                    raise PermissionError(errno.EACCES, "Symlink leads outside the agent's export", self.path)
                raise FileNotFoundError(errno.ENOENT, "Symlink target does not exist", self.path)
            return make_stat(self._entry.target_stat)
        if self._stat is None:
            if self._entry.stat is None:
                raise _no_stat(self.path)
            self._stat = make_stat(self._entry.stat)
        return self._stat

    def inode(self) -> int:
        return self.stat(follow_symlinks=False).st_ino

    def __fspath__(self) -> AnyStr:
        return self.path

    def __repr__(self) -> str:
        return f"<AgentDirEntry {self.name!r}>"


def _no_stat(path: object) -> OSError:
    return FileNotFoundError(errno.ENOENT, "The agent could not stat this entry", path)
