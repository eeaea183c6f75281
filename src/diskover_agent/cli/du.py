"""``diskover-agent du``: per-directory totals of a remote tree, largest first."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..protocol import KIND_DIR, Entry
from .common import Context, _join, for_terminal, human, remote_path
from .crawl import Crawl, finish, run_crawl


class Totals:
    """Per-directory totals of a tree: ``[files, apparent bytes, allocated bytes]``."""

    def __init__(self, top: bytes, top_stat: Optional[os.stat_result]) -> None:
        self.top = top
        own = [0, top_stat.st_size, top_stat.st_blocks * 512] if top_stat is not None else [0, 0, 0]
        #: Directories in the order they were found: every parent before its children.
        self.dirs: dict[bytes, list[int]] = {top: own}
        self.parent: dict[bytes, bytes] = {}
        #: Hard-linked inodes: (dev, ino) -> (first path in byte order, its directory, size, allocated).
        self.links: dict[tuple[int, int], tuple[bytes, bytes, int, int]] = {}

    def add(self, path: bytes, entries: list[Entry]) -> None:
        own = self.dirs.setdefault(path, [0, 0, 0])
        for e in entries:
            st = e.stat
            if e.kind == KIND_DIR:
                child = _join(path, e.name)
                self.parent[child] = path
                self.dirs[child] = [0, st[6], st[10] * 512] if st is not None else [0, 0, 0]
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
            own[0] += 1
            own[1] += st[6]
            own[2] += st[10] * 512

    def finish(self) -> dict[bytes, tuple[int, list[int]]]:
        """``path -> (depth, [files, apparent, allocated])``, each including everything below."""
        for _name, where, size, allocated in self.links.values():
            own = self.dirs[where]
            own[0] += 1
            own[1] += size
            own[2] += allocated
        for path in reversed(list(self.dirs)):
            parent = self.parent.get(path)
            if parent is not None:
                up, own = self.dirs[parent], self.dirs[path]
                up[0] += own[0]
                up[1] += own[1]
                up[2] += own[2]
        depth: dict[bytes, int] = {self.top: 0}
        for path in self.dirs:
            if path in self.parent:
                depth[path] = depth[self.parent[path]] + 1
        return {p: (depth[p], t) for p, t in self.dirs.items()}


def cmd_du(args: argparse.Namespace, ctx: Context) -> int:
    top = remote_path(args.path)
    max_depth: Optional[int] = 0 if args.summarize else args.max_depth
    top_stat = ctx.directory_stat(top)  # also fails early, with reasons, when no agent answers
    totals = Totals(top, top_stat)
    crawl = Crawl(ctx, top, exclude=args.exclude, one_fs=args.one_file_system)

    def body(crawl: Crawl) -> None:
        for path, entries in crawl:
            totals.add(path, entries)

    run_crawl(ctx, crawl, body)
    which = 1 if args.apparent_size else 2
    rows = [(t[which], t[0], p) for p, (d, t) in totals.finish().items() if max_depth is None or d <= max_depth]
    rows.sort(key=lambda r: (-r[0], r[2]))
    size = human if args.human_readable else str
    top_total = totals.dirs[top]
    show = for_terminal if sys.stdout.isatty() else bytes
    lines = [f"{size(n)}\t{files}\t".encode() + show(p) + b"\n" for n, files, p in rows]
    lines.append(f"{size(top_total[which])}\t{top_total[0]}\ttotal\n".encode())
    out = sys.stdout.buffer
    out.write(b"".join(lines))
    out.flush()
    return finish(ctx, crawl)
