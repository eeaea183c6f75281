"""``diskover-agent ls``: one remote directory, as ``ls`` (and ``ls -l``) prints it."""

from __future__ import annotations

import argparse
import functools
import grp
import os
import pwd
import stat
import sys
import time
from collections.abc import Callable
from typing import Optional

from ..connection import AgentConnection
from ..entry import AgentDirEntry
from ..errors import AgentError
from .common import EXIT_OK, EXIT_PARTIAL, Context, for_terminal, human, remote_path, shown

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SIX_MONTHS = 31_556_952 // 2  # what ls calls recent: the average Gregorian year, halved
_LS_TYPE = {"d": "d", "f": "-", "l": "l", "p": "p", "s": "s", "c": "c", "b": "b"}


@functools.lru_cache(maxsize=4096)
def _user(uid: int) -> Optional[str]:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)
def _group(gid: int) -> Optional[str]:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


def _id_cell(num: int, name: Optional[str]) -> tuple[str, str]:
    """An owner or group cell as ls aligns it: names to the left, numbers to the right."""
    return (name, "<") if name is not None else (str(num), ">")


def ls_time(mtime: float, now: float) -> str:
    """``ls -l``'s date column (C locale, local time): the time for the last six months,
    else the year."""
    t = time.localtime(mtime)
    day = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}"
    if now - _SIX_MONTHS < mtime <= now:
        return f"{day} {t.tm_hour:02d}:{t.tm_min:02d}"
    return f"{day}  {t.tm_year}"


def ls_long(entries: list[AgentDirEntry], *, numeric: bool, human_sizes: bool,
            show: Callable[[bytes], bytes] = bytes) -> list[bytes]:
    """The lines of ``ls -l`` (``total`` first) for entries in display order."""
    now = time.time()
    rows: list[tuple[str, str, tuple[str, str], tuple[str, str], str, str]] = []
    blocks = 0
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:  # vanished before the agent could stat it: as ls shows it
            unknown = ("?", ">")
            rows.append((_LS_TYPE.get(e.kind, "?") + "?" * 9, "?", unknown, unknown, "?", "           ?"))
            continue
        blocks += st.st_blocks
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            size = f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
        else:
            size = human(st.st_size) if human_sizes else str(st.st_size)
        rows.append((
            stat.filemode(st.st_mode), str(st.st_nlink),
            _id_cell(st.st_uid, None if numeric else _user(st.st_uid)),
            _id_cell(st.st_gid, None if numeric else _group(st.st_gid)),
            size, ls_time(st.st_mtime, now),
        ))
    total = human(blocks * 512) if human_sizes else str(-(-blocks * 512 // 1024))
    lines = [f"total {total}\n".encode()]
    if rows:
        links = max(len(r[1]) for r in rows)
        owner = max(len(r[2][0]) for r in rows)
        group = max(len(r[3][0]) for r in rows)
        size_w = max(len(r[4]) for r in rows)
        for (mode, nlink, (user, ua), (grp_, ga), size, date), e in zip(rows, entries, strict=True):
            head = f"{mode} {nlink:>{links}} {user:{ua}{owner}} {grp_:{ga}{group}} {size:>{size_w}} {date} "
            lines.append(head.encode() + show(os.fsencode(e.name)) + b"\n")
    return lines


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    """``ls PATH...``: each directory's names (``-l``: long form), as ``ls`` prints them:
    with several paths, each under a ``PATH:`` header, a blank line between; a path that
    cannot be listed is named on stderr, the others are printed, and the exit status is 1."""
    paths = [remote_path(p) for p in args.paths]
    show = for_terminal if sys.stdout.isatty() else bytes
    out = sys.stdout.buffer
    status = EXIT_OK
    printed = 0
    with AgentConnection(ctx.hosts, ctx.port, **ctx.options) as conn:
        for path in paths:
            try:
                entries = sorted(conn.scandir(path), key=lambda e: os.fsencode(e.name))
            except AgentError:
                raise
            except OSError as exc:
                ctx.warn(f"{shown(path)}: {exc.strerror or exc}{_outside_exports(conn, path)}")
                status = EXIT_PARTIAL
                continue
            if args.long:
                lines = ls_long(entries, numeric=args.numeric, human_sizes=args.human, show=show)
            else:
                lines = [show(os.fsencode(e.name)) + b"\n" for e in entries]
            if len(paths) > 1:
                lines.insert(0, (b"\n" if printed else b"") + show(path) + b":\n")
            printed += 1
            out.write(b"".join(lines))
            out.flush()
    return status


def _outside_exports(conn: AgentConnection, path: bytes) -> str:
    """``" (outside every export: /mnt/a, /mnt/b)"`` when ``path`` is outside every export the
    agent lists in its ``/_agent/v1/info``, else ``""`` (also when it does not say)."""
    try:
        exports = [os.fsencode(e) for e in conn.info().get("exports", ()) if isinstance(e, str)]
    except (AgentError, OSError, TypeError, AttributeError):
        return ""
    if not exports or any(path == e or path.startswith(e.rstrip(b"/") + b"/") for e in exports):
        return ""
    return f" (outside every export: {', '.join(shown(e) for e in exports)})"
