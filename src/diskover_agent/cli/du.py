"""``diskover-agent du``: disk usage of remote trees, printed as GNU ``du`` prints it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from typing import Optional

from ..protocol import KIND_DIR, Entry
from .common import EXIT_OK, Context, UsageError, _join, for_terminal, human, remote_path
from .crawl import Crawl, finish, run_crawl

#: Indexes of a total: entries that are not directories, apparent bytes, allocated bytes, directories.
FILES, APPARENT, ALLOCATED, DIRS = range(4)


class Totals:
    """Per-directory totals of one tree: ``[files, apparent bytes, allocated bytes, directories]``,
    and, when ``files`` is asked, each counted file's own ``(path, apparent, allocated)``."""

    def __init__(self, top: bytes, top_stat: Optional[os.stat_result], files: bool = False) -> None:
        self.top = top
        own = [0, top_stat.st_size, top_stat.st_blocks * 512, 1] if top_stat is not None else [0, 0, 0, 1]
        #: Directories in the order they were found: every parent before its children.
        self.dirs: dict[bytes, list[int]] = {top: own}
        self.parent: dict[bytes, bytes] = {}
        #: Hard-linked inodes: (dev, ino) -> (first path in byte order, its directory, size, allocated).
        self.links: dict[tuple[int, int], tuple[bytes, bytes, int, int]] = {}
        #: With ``files``: each directory's counted files, ``(path, apparent, allocated)``.
        self.files: Optional[dict[bytes, list[tuple[bytes, int, int]]]] = {} if files else None

    def add(self, path: bytes, entries: list[Entry]) -> None:
        self.dirs.setdefault(path, [0, 0, 0, 1])
        for e in entries:
            st = e.stat
            if e.kind == KIND_DIR:
                child = _join(path, e.name)
                self.parent[child] = path
                self.dirs[child] = [0, st[6], st[10] * 512, 1] if st is not None else [0, 0, 0, 1]
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
            self._count(path, _join(path, e.name), st[6], st[10] * 512)

    def _count(self, where: bytes, path: bytes, size: int, allocated: int) -> None:
        own = self.dirs[where]
        own[FILES] += 1
        own[APPARENT] += size
        own[ALLOCATED] += allocated
        if self.files is not None:
            self.files.setdefault(where, []).append((path, size, allocated))

    def finish(self) -> dict[bytes, list[int]]:
        """``path -> [files, apparent, allocated, dirs]`` of every directory, each including
        everything below it."""
        for name, where, size, allocated in self.links.values():
            self._count(where, name, size, allocated)
        for path in reversed(list(self.dirs)):
            parent = self.parent.get(path)
            if parent is not None:
                up, own = self.dirs[parent], self.dirs[path]
                for i in range(4):
                    up[i] += own[i]
        return self.dirs

    def rows(self, max_depth: Optional[int]) -> Iterator[tuple[bytes, list[int]]]:
        """``(path, totals)`` in GNU du's order (each directory after everything below it,
        siblings by name bytes), directories at most ``max_depth`` below the top (and, with
        files, files at most that deep); call after :meth:`finish`."""
        children: dict[bytes, list[bytes]] = {}
        for path, parent in self.parent.items():
            children.setdefault(parent, []).append(path)
        files = self.files or {}
        # (path, depth, what): what 0 = enter a directory, 1 = leave it (print), 2 = a file.
        stack: list[tuple[bytes, int, int, list[int]]] = [(self.top, 0, 0, self.dirs[self.top])]
        while stack:
            path, depth, what, totals = stack.pop()
            if what == 0:
                stack.append((path, depth, 1, totals))
                items = [(p, 0, self.dirs[p]) for p in children.get(path, ())]
                items += [(p, 2, [1, size, allocated, 0]) for p, size, allocated in files.get(path, ())]
                items.sort(key=lambda item: item[0], reverse=True)
                stack.extend((p, depth + 1, w, t) for p, w, t in items)
            elif max_depth is None or depth <= max_depth:
                yield path, totals


def _size_format(unit: Optional[str]) -> Callable[[int], str]:
    if unit == "b":
        return str
    if unit == "h":
        return human
    return lambda n: str(-(-n // 1024))


def cmd_du(args: argparse.Namespace, ctx: Context) -> int:
    tops = [remote_path(p) for p in args.paths]
    if args.summarize and args.max_depth not in (None, 0):
        raise UsageError(f"-s (--summarize) conflicts with --max-depth {args.max_depth}")
    max_depth: Optional[int] = 0 if args.summarize else args.max_depth
    which = APPARENT if args.apparent_size else ALLOCATED
    size = _size_format(args.unit)
    show = for_terminal if sys.stdout.isatty() else bytes
    out = sys.stdout.buffer
    grand = [0, 0, 0, 0]
    status = EXIT_OK
    for top in tops:
        totals, crawl = _du_one(ctx, args, top)
        if totals is not None:
            lines = []
            for path, t in totals.rows(max_depth):
                counts = f"{t[FILES]}\t{t[DIRS]}\t" if args.counts else ""
                lines.append(f"{size(t[which])}\t{counts}".encode() + show(path) + b"\n")
            out.write(b"".join(lines))
            out.flush()
            for i, n in enumerate(totals.dirs[top]):
                grand[i] += n
        status = max(status, finish(ctx, crawl), 1 if totals is None else EXIT_OK)  # the summary after the lines
    if args.total:
        counts = f"{grand[FILES]}\t{grand[DIRS]}\t" if args.counts else ""
        out.write(f"{size(grand[which])}\t{counts}total\n".encode())
        out.flush()
    return status


def _du_one(ctx: Context, args: argparse.Namespace, top: bytes) -> tuple[Optional[Totals], Crawl]:
    """Walk one PATH: its totals (None when PATH itself could not be listed: its error is on
    stderr, and it has no line) and the crawl, whose summary comes after the lines."""
    top_stat = ctx.directory_stat(top)  # also fails early, with reasons, when no agent answers
    totals = Totals(top, top_stat, files=args.all)
    failed: list[bytes] = []

    def on_error(path: bytes, _error: OSError) -> None:
        if path == top:
            failed.append(path)

    crawl = Crawl(ctx, top, exclude_dirs=args.exclude_dirs, exclude_files=args.exclude_files,
                  one_fs=args.one_file_system, on_error=on_error)

    def body(crawl: Crawl) -> None:
        for path, entries in crawl:
            totals.add(path, entries)

    run_crawl(ctx, crawl, body)
    if failed or top_stat is None:
        return None, crawl
    totals.finish()
    return totals, crawl
