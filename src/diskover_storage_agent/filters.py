"""Exclusions applied where the data is: pruned directories are never read.

A pattern is an ``fnmatch`` pattern on bytes, case-sensitive. Without a ``/`` it
matches an entry's name; with one, the entry's whole remote path. Directory
patterns apply to what ``os.walk`` puts in ``dirs`` (directories and symlinks to
them), file patterns to everything else. With ``one_fs``, directories on another
file system than the one being listed are pruned too, like ``find -xdev``. Pruned
entries are left out of the listing, as ``dirs[:] = [...]`` leaves them out of an
``os.walk``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from typing import Optional

from diskover_wire.protocol import KIND_DIR, KIND_SYMLINK

MAX_PATTERNS = 256
MAX_PATTERN_LEN = 1024
#: Bytes of patterns of one kind in all. Compiling costs up to ~4 us a byte (patterns
#: of many ``*``): this keeps one request's compiling to a fraction of a second, which
#: the agent does in its thread pool, never on the event loop.
MAX_PATTERN_BYTES = 32 * 1024


class Patterns:
    """A set of fnmatch patterns, compiled once."""

    def __init__(self, patterns: Sequence[bytes]) -> None:
        names = [p for p in patterns if b"/" not in p]
        paths = [p for p in patterns if b"/" in p]
        self.names = _compile(names)
        self.paths = _compile(paths)

    def match(self, name: bytes, path_of: _PathOf) -> bool:
        if self.names is not None and self.names.match(name):
            return True
        return self.paths is not None and self.paths.match(path_of()) is not None


def _compile(patterns: list[bytes]) -> Optional[re.Pattern[bytes]]:
    if not patterns:
        return None
    # fnmatch.translate works on text; latin-1 maps every byte to one character and back.
    regex = "|".join(f"(?:{fnmatch.translate(p.decode('latin-1'))})" for p in patterns)
    return re.compile(regex.encode("latin-1"), re.DOTALL)


class _PathOf:
    __slots__ = ("name", "parent")

    def __init__(self, parent: bytes, name: bytes) -> None:
        self.parent = parent
        self.name = name

    def __call__(self) -> bytes:
        return self.parent + self.name if self.parent.endswith(b"/") else self.parent + b"/" + self.name


class Filter:
    """What a request prunes: excluded directories and files, other file systems."""

    def __init__(self, exclude_dirs: Sequence[bytes] = (), exclude_files: Sequence[bytes] = (),
                 one_fs: bool = False) -> None:
        self.dirs = Patterns(exclude_dirs)
        self.files = Patterns(exclude_files)
        self.one_fs = one_fs

    @classmethod
    def of(cls, exclude_dirs: Sequence[bytes], exclude_files: Sequence[bytes], one_fs: bool) -> Optional[Filter]:
        """The filter of a request, or None when it prunes nothing."""
        return cls(exclude_dirs, exclude_files, one_fs) if exclude_dirs or exclude_files or one_fs else None

    @staticmethod
    def check(patterns: Sequence[bytes]) -> Optional[str]:
        """Why a list of patterns is unacceptable, or None."""
        if len(patterns) > MAX_PATTERNS:
            return f"at most {MAX_PATTERNS} exclude patterns"
        for p in patterns:
            if not p or len(p) > MAX_PATTERN_LEN or b"\0" in p:
                return f"exclude patterns must be 1 to {MAX_PATTERN_LEN} bytes, without NUL"
        if sum(map(len, patterns)) > MAX_PATTERN_BYTES:
            return f"at most {MAX_PATTERN_BYTES} bytes of exclude patterns of each kind"
        return None

    def apply(self, entries: list[tuple], parent: bytes, dir_fd: int) -> list[tuple]:
        """The wire entries of ``parent`` that survive the exclusions."""
        dev = os.fstat(dir_fd).st_dev if self.one_fs else None
        out = []
        for e in entries:
            name, kind, target = e[0], e[1], e[2]
            path_of = _PathOf(parent, name)
            if kind == KIND_DIR or (kind == KIND_SYMLINK and target == KIND_DIR):
                if self.dirs.match(name, path_of):
                    continue
                if dev is not None and kind == KIND_DIR and _dev(e, name, dir_fd) != dev:
                    continue
            elif self.files.match(name, path_of):
                continue
            out.append(e)
        return out


def _dev(entry: tuple, name: bytes, dir_fd: int) -> Optional[int]:
    st = entry[3]
    if st is not None:
        return st[2]
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev
    except OSError:
        return None
