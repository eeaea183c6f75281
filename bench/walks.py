"""The walks the benchmark times, and their checks against ``os.walk`` and ``lstat``."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from diskover_agent import parallel_walk, parallel_walk_entries
from diskover_agent import walk as walk_module

from tree import walk_digest


class Mismatch(Exception):
    """A timed walk did not yield what os.walk yields."""


def local_walk(top: str) -> list:
    out = []
    append = out.append
    for root, dirs, files in os.walk(top):
        append((root, dirs, files))
    return out


def local_walk_lstat(top: str) -> list:
    # root + "/" + name: about 15% faster than os.path.join, so the stricter baseline.
    out = []
    append = out.append
    lstat = os.lstat
    for root, dirs, files in os.walk(top):
        prefix = root + "/"
        append((root, dirs, files, [lstat(prefix + n) for n in dirs], [lstat(prefix + n) for n in files]))
    return out


def remote_walk(top: str, hosts: list[str], **options: Any) -> list:
    out = []
    append = out.append
    for root, dirs, files in parallel_walk(top, hosts=hosts, onerror=_raise, **options):
        append((root, dirs, files))
    return out


def remote_walk_stat(top: str, hosts: list[str], **options: Any) -> list:
    out = []
    append = out.append
    for root, dirs, files in parallel_walk_entries(top, hosts=hosts, onerror=_raise, **options):
        for e in dirs:
            e.stat(follow_symlinks=False)
        for e in files:
            e.stat(follow_symlinks=False)
        append((root, dirs, files))
    return out


def _raise(exc: OSError) -> None:
    raise exc


def stat_key(mode: int, ino: int, dev: int, nlink: int, uid: int, gid: int, size: int, mtime_ns: int,
             ctime_ns: int) -> bytes:
    """What the stat checks compare: every lstat field but atime (listing a directory may change it)."""
    return b"%d %d %d %d %d %d %d %d %d" % (mode, ino, dev, nlink, uid, gid, size, mtime_ns, ctime_ns)


def _stat_key(st: os.stat_result) -> bytes:
    return stat_key(st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                    st.st_ctime_ns)


def path_stat_digest(items: Iterable[tuple[bytes, bytes]]) -> tuple[int, str]:
    """``(entries, sha256)`` of ``(path, stat_key)`` pairs, in any order."""
    ordered = sorted(items)
    digest = hashlib.sha256()
    for path, key in ordered:
        digest.update(b"%d\0%s\0%s\n" % (len(path), path, key))
    return len(ordered), digest.hexdigest()


def stat_digest(records: Iterator[tuple[str, str, os.stat_result]]) -> tuple[int, str]:
    """``(entries, sha256)`` of ``(root, name, lstat)`` records, in any order."""
    fsencode = os.fsencode
    return path_stat_digest((fsencode(root) + b"/" + fsencode(name), _stat_key(st)) for root, name, st in records)


class Reference:
    """What os.walk yields for the tree, with roots mapped to the remote path."""

    def __init__(self, local_top: str, remote_top: str) -> None:
        self.local_top = local_top
        self.remote_top = remote_top
        self.names = walk_digest(self.map_local(local_walk(local_top)))
        lst = local_walk_lstat(local_top)
        self.stats = stat_digest(self._local_stat_records(lst))
        self.dirs = len(lst)
        self.dir_paths = {os.fsencode(self.to_remote(rec[0])) for rec in lst}
        self.tiny_dir = min(
            (self.to_remote(r) for r, d, f, _, _ in lst if not d and not f), default=self.remote_top
        )

    def to_remote(self, root: str) -> str:
        return self.remote_top + root[len(self.local_top) :]

    def map_local(self, out: list) -> Iterator[tuple]:
        for rec in out:
            yield self.to_remote(rec[0]), rec[1], rec[2]

    def _local_stat_records(self, out: list) -> Iterator[tuple[str, str, os.stat_result]]:
        for root, dirs, files, dstats, fstats in out:
            r = self.to_remote(root)
            yield from zip([r] * len(dirs), dirs, dstats, strict=True)
            yield from zip([r] * len(files), files, fstats, strict=True)

    # -- checks: each returns the entry count, raises Mismatch -----------------------

    def _check_names(self, what: str, walk_iter: Iterator[tuple]) -> int:
        got = walk_digest(walk_iter)
        if got != self.names:
            raise Mismatch(f"{what}: {got[0]} entries, digest {got[1][:16]}; os.walk: {self.names[0]}, "
                           f"{self.names[1][:16]}")
        return got[0]

    def _check_stats(self, what: str, records: Iterator[tuple]) -> None:
        got = stat_digest(records)
        if got != self.stats:
            raise Mismatch(f"{what}: stat digest {got[1][:16]} over {got[0]} entries; lstat: {self.stats[1][:16]} "
                           f"over {self.stats[0]}")

    def check_local(self, out: list) -> int:
        return self._check_names("local os.walk", self.map_local(out))

    def check_local_lstat(self, out: list) -> int:
        n = self._check_names("local os.walk + lstat", self.map_local(out))
        self._check_stats("local os.walk + lstat", self._local_stat_records(out))
        return n

    def check_remote(self, out: list) -> int:
        return self._check_names("parallel_walk", iter(out))

    def check_remote_stat(self, out: list) -> int:
        n = self._check_names(
            "parallel_walk_entries", ((r, [e.name for e in d], [e.name for e in f]) for r, d, f in out)
        )

        def records() -> Iterator[tuple]:
            for root, dirs, files in out:
                for e in dirs:
                    yield root, e.name, e.stat(follow_symlinks=False)
                for e in files:
                    yield root, e.name, e.stat(follow_symlinks=False)

        self._check_stats("parallel_walk_entries", records())
        return n


@contextlib.contextmanager
def recording_walker() -> Iterator[Callable[[], dict]]:
    """Remember the last ``Walker`` built, whichever module builds it (``oswalk`` does now),
    by patching the class's ``__init__`` itself; yields a reader of its ``served()``: requests
    and directories per agent, and shares."""
    cls = walk_module.Walker
    own = cls.__dict__.get("__init__")
    original = cls.__init__
    last: list[Any] = []

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        last[:] = [self]

    def served() -> dict:
        if not last:
            raise RuntimeError("no Walker was built by the walk (does parallel_walk still use walk.Walker?)")
        s = last[0].served()
        total = sum(v["dirs"] for v in s.values()) or 1
        return {"served": s, "shares": [v["dirs"] / total for v in s.values()]}

    cls.__init__ = init  # type: ignore[method-assign]
    try:
        yield served
    finally:
        if own is not None:
            cls.__init__ = own  # type: ignore[method-assign]
        else:
            del cls.__init__
