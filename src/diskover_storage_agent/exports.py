"""Exports: which remote paths the agent serves, and where they live locally.

A request path is split into components; ``..`` is refused outright, empty and ``.``
components are dropped. The export whose REMOTE prefix matches the most leading
components wins; the rest of the path is resolved below that export's LOCAL
directory by :func:`open_beneath`, which never leaves it, not even through symlinks.
Directories are opened one component at a time, so a path may be longer than
``PATH_MAX``; :data:`MAX_PATH` bounds what a request may name.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Optional

from diskover_wire.protocol import MAX_PATH

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as Linux's MAXSYMLINKS
#: Directory fds :meth:`ExportTable.open_beneath` keeps open while it descends (the
#: nearest ancestors, for a symlink's ``..``); farther ones are opened again if needed.
_OPEN_WINDOW = 8
#: First component of the agent's own endpoints (``/_agent/...``); no export may cover it.
CONTROL_PREFIX = b"_agent"


class BadPath(ValueError):
    """A request path that is not a valid absolute remote path; ``errno`` says which
    ``OSError`` the client raises for it (``EACCES`` for ``..``, else ``EINVAL``...)."""

    def __init__(self, message: str, num: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = num


class IsSymlink(OSError):
    """A directory asked for without following its last component is a symlink."""


class OutsideExport(PermissionError):
    """A path (or a symlink on it) that leads outside every export."""

    def __init__(self, path: bytes) -> None:
        super().__init__(errno.EACCES, "Not inside an export of this agent", os.fsdecode(path))


def split_path(path: bytes) -> tuple[bytes, ...]:
    """The components of an absolute path, refusing NUL bytes and ``..``."""
    if not path.startswith(b"/"):
        raise BadPath("path must be absolute")
    if b"\0" in path:
        raise BadPath("path contains a NUL byte")
    parts = tuple(p for p in path.split(b"/") if p and p != b".")
    if b".." in parts:
        raise BadPath("path contains a '..' component", errno.EACCES)
    return parts


@dataclass(frozen=True)
class Export:
    """One ``-r REMOTE LOCAL`` pair."""

    remote: bytes
    local: bytes

    @property
    def remote_parts(self) -> tuple[bytes, ...]:
        return split_path(self.remote)

    @property
    def local_parts(self) -> tuple[bytes, ...]:
        return split_path(self.local)


class ExportTable:
    """Maps remote paths to (export, components below it), longest REMOTE first."""

    def __init__(self, exports: list[Export]) -> None:
        self._table = sorted(
            ((e.remote_parts, e) for e in exports), key=lambda item: len(item[0]), reverse=True
        )
        # Absolute symlink targets are allowed when they point back inside the export,
        # either through its LOCAL path as configured or through its real path.
        self._local_prefixes = {
            e: {e.local_parts, split_path(os.path.realpath(e.local))} for e in exports
        }

    @property
    def exports(self) -> list[Export]:
        return [e for _, e in self._table]

    def lookup(self, parts: tuple[bytes, ...]) -> tuple[Export, tuple[bytes, ...]] | None:
        for prefix, export in self._table:
            if parts[: len(prefix)] == prefix:
                return export, parts[len(prefix):]
        return None

    def open_remote(self, path: bytes, follow_last: bool = True) -> int:
        """Open the exported directory at remote ``path`` and return its fd.

        Raises ``OSError`` (``ENAMETOOLONG`` past :data:`MAX_PATH` bytes),
        :class:`OutsideExport`, or, with ``follow_last=False``, :class:`IsSymlink`
        when the last component is a symlink (it is then not followed).
        """
        if len(path) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fsdecode(path))
        found = self.lookup(split_path(path))
        if found is None:
            raise OutsideExport(path)
        return self.open_found(found[0], found[1], path, follow_last)

    def open_found(self, export: Export, rel: tuple[bytes, ...], path: bytes, follow_last: bool = True) -> int:
        """:meth:`open_remote` for a path already looked up (``export``, ``rel``)."""
        if follow_last or not rel:
            return self.open_beneath(export, rel, path)
        parent = self.open_beneath(export, rel[:-1], path)
        try:
            return os.open(rel[-1], _OPEN_DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    is_link = stat.S_ISLNK(os.stat(rel[-1], dir_fd=parent, follow_symlinks=False).st_mode)
                except OSError:
                    is_link = False
                if is_link:
                    raise IsSymlink(exc.errno, "is a symlink now", os.fsdecode(path)) from None
            raise OSError(exc.errno, exc.strerror, os.fsdecode(path)) from None
        finally:
            os.close(parent)

    def open_beneath(self, export: Export, rel: tuple[bytes, ...], remote: bytes) -> int:
        """Open the directory ``rel`` below ``export`` and return its fd.

        Every component is opened with ``O_NOFOLLOW`` relative to its parent's fd.
        A symlink on the way is read and resolved by hand: relative targets from the
        link's directory, absolute ones only when they lie inside the export's LOCAL
        directory. Anything that would step above the export raises
        :class:`OutsideExport`; a symlink swapped in between check and use cannot
        escape because no path is ever resolved by the kernel across a symlink.
        At most ``_OPEN_WINDOW`` fds are open at once, whatever the depth: a ``..``
        above them opens its directory again from the export, component by component.
        """
        names: list[bytes] = []  # the real directories from the export down to fds[-1]
        fds = [self._open_root(export)]
        todo = list(reversed(rel))
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name in (b"", b"."):
                    continue
                if name == b"..":
                    if not names:
                        raise OutsideExport(remote)
                    names.pop()
                    os.close(fds.pop())
                    if not fds:
                        fds.append(self._reopen(export, names, remote))
                    continue
                try:
                    fds.append(os.open(name, _OPEN_DIR, dir_fd=fds[-1]))
                    names.append(name)
                    if len(fds) > _OPEN_WINDOW:
                        os.close(fds.pop(0))
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(exc.errno, exc.strerror, os.fsdecode(remote)) from None
                    try:
                        target = os.readlink(name, dir_fd=fds[-1])
                    except OSError:  # not a symlink: a real ENOTDIR
                        raise OSError(exc.errno, exc.strerror, os.fsdecode(remote)) from None
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(remote))
                if target.startswith(b"/"):
                    inside = self._strip_local(export, split_path_loose(target))
                    if inside is None:
                        raise OutsideExport(remote)
                    while fds:
                        os.close(fds.pop())
                    names.clear()
                    fds.append(self._open_root(export))
                    todo.extend(reversed(inside))
                else:
                    todo.extend(reversed(target.split(b"/")))
            return fds.pop()
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _open_root(export: Export) -> int:
        return os.open(export.local, _OPEN_DIR & ~os.O_NOFOLLOW)

    def _reopen(self, export: Export, names: list[bytes], remote: bytes) -> int:
        """The directory ``names`` below the export, opened again without following anything."""
        fd = self._open_root(export)
        try:
            for name in names:
                child = os.open(name, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, os.fsdecode(remote)) from None
        return fd

    def stat_inside(self, remote: bytes) -> Optional[os.stat_result]:
        """The stat of what a remote path leads to, following symlinks only while
        they stay inside its export; None when it leads outside, or cannot be read."""
        found = self.lookup(split_path_loose(remote))
        if found is None:
            return None
        try:
            return self._stat_beneath(found[0], list(found[1]), remote, 0)
        except OSError:
            return None

    def _stat_beneath(self, export: Export, parts: list[bytes], remote: bytes, links: int) -> os.stat_result:
        while parts and parts[-1] in (b"", b"."):
            parts.pop()
        if not parts or parts[-1] == b"..":
            fd = self.open_beneath(export, tuple(parts), remote)
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        parent = self.open_beneath(export, tuple(parts[:-1]), remote)
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                return st
            target = os.readlink(parts[-1], dir_fd=parent)
        finally:
            os.close(parent)
        if links >= _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(remote))
        if target.startswith(b"/"):
            inside = self._strip_local(export, split_path_loose(target))
            if inside is None:
                raise OutsideExport(remote)
            return self._stat_beneath(export, list(inside), remote, links + 1)
        return self._stat_beneath(export, parts[:-1] + target.split(b"/"), remote, links + 1)

    def _strip_local(self, export: Export, parts: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
        for prefix in self._local_prefixes[export]:
            if parts[: len(prefix)] == prefix:
                return parts[len(prefix):]
        return None


def split_path_loose(path: bytes) -> tuple[bytes, ...]:
    """Components of an absolute symlink target, keeping ``..`` for the resolver."""
    return tuple(p for p in path.split(b"/") if p and p != b".")
