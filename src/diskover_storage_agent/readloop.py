"""The subtree walk's read loop: one directory's entries, chunk by chunk, as encoded frames.

Two implementations give the same bytes: the compiled one (the optional C extension
``_readdir``, built where a compiler was found at install time) and the pure-Python
one (:func:`listing.read_names` and :func:`listing.read_entries` over ``os.scandir``).
The compiled one is used when it is importable, unless :data:`PURE_ENV` is set (to
anything but ``0``); :data:`READ_LOOP` says which this process uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any, Optional

from diskover_wire import codec
from diskover_wire.protocol import (
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    encode_entry_item,
    encode_frame,
    entries_frame,
    kind_of_mode,
    stat_fields,
)

from .listing import CHUNK, read_entries, read_names, target_stat

#: Set (to anything but ``0``) to use the pure-Python read loop even where the compiled one is built
#: (and the pure-Python codec: see :mod:`diskover_wire.codec`).
PURE_ENV = codec.PURE_ENV

Inside = Callable[[bytes], Optional[os.stat_result]]


def _load_compiled() -> Optional[ModuleType]:
    if codec.pure_wanted():
        return None
    try:
        from . import _readdir
    except ImportError:
        return None
    return _readdir


_readdir = _load_compiled()
#: The read loop this process uses: ``"compiled"`` or ``"pure Python"``.
READ_LOOP = "pure Python" if _readdir is None else "compiled"


def lone_entry(name: bytes, dir_fd: int, hint: str, inside: Optional[Inside]) -> tuple:
    """The wire entry (with stat) of one entry, by name, as :func:`read_entries` gives it;
    ``hint`` is its kind from ``d_type`` (``""`` when unknown), for when it is gone. The
    compiled loop hands back the entries it does not decide (symlinks, lstat failures)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = kind_of_mode(st.st_mode)
        fields: Optional[tuple] = stat_fields(st)
    except OSError:
        kind, fields = hint or KIND_FILE, None
    if kind == KIND_SYMLINK:
        tst = target_stat(name, dir_fd)  # type: ignore[arg-type]  # bytes work as well as str
        if tst is not None:
            ist = inside(name) if inside is not None else None
            return (name, kind, kind_of_mode(tst.st_mode), fields, ist and stat_fields(ist))
    return (name, kind, None, fields, None)


def join(path: bytes, name: bytes) -> bytes:
    """The remote path of ``name`` in the directory ``path``."""
    return path + name if path.endswith(b"/") else path + b"/" + name


class Chunks:
    """How one walk reads its directories: :meth:`open` a directory's fd (without taking
    it), then :meth:`read` it (its fd, its remote path) until fewer than :data:`CHUNK`
    entries come back. A chunk is ``(entries read, encoded frame or b"")``; the names of
    real directories among them are appended to ``found``. ``stat_inside`` gives a
    symlink's target stat (by remote path) when stat is asked for. Without exclusions
    (which need entries as tuples: see :class:`~.filters.Filter`), the compiled loop is
    used when this process has it, for ``names`` frames in any format and for ``entries``
    frames in msgpack."""

    def __init__(self, fmt: str, stat: bool, names: bool, stat_inside: Inside,
                 compiled: Optional[bool] = None) -> None:
        self.fmt = fmt
        self.stat = stat
        self.stat_inside = stat_inside
        self.names = names and not stat
        if compiled is None:
            compiled = _readdir is not None
        self.compiled = compiled and (self.names or fmt == "msgpack")
        self.open: Callable[[int], AbstractContextManager[Any]] = _readdir.Dir if self.compiled else os.scandir
        if self.names:
            self.read = self._names_c if self.compiled else self._names_py
        elif not self.compiled:
            self.read = self._entries_py
        else:
            self.read = self._stat_c if stat else self._items_c

    def _inside(self, path: bytes) -> Inside:
        stat_inside = self.stat_inside
        return lambda name: stat_inside(join(path, name))

    def _names_c(self, d: Any, fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        read, blob, kinds, targets = d.names(CHUNK, found)
        return read, encode_frame(("names", blob, kinds, targets), self.fmt) if read else b""

    def _names_py(self, it: Any, fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        read, blob, kinds, targets = read_names(it, fd, CHUNK, found)
        return read, encode_frame(("names", blob, kinds, targets), self.fmt) if read else b""

    def _entries_py(self, it: Any, fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        entries = read_entries(it, fd, self.stat, CHUNK, found, self._inside(path) if self.stat else None)
        return len(entries), encode_frame(("entries", entries), self.fmt) if entries else b""

    def _items_c(self, d: Any, fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        read, items = d.items(CHUNK, found)
        return read, entries_frame(read, items) if read else b""

    def _stat_c(self, d: Any, fd: int, path: bytes, found: list[bytes]) -> tuple[int, bytes]:
        read, items, pending = d.stat_items(CHUNK, found)
        if pending is not None:
            parts = [items]
            inside = self._inside(path)
            while pending is not None:
                entry = lone_entry(pending[0], fd, pending[1], inside)
                if entry[1] == KIND_DIR:
                    found.append(entry[0])
                parts.append(encode_entry_item(entry))
                more, items, pending = d.stat_items(CHUNK - read - 1, found)
                read += 1 + more
                parts.append(items)
            items = b"".join(parts)
        return read, entries_frame(read, items) if read else b""
