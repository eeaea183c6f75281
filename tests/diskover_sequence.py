"""diskover 2.3.5's crawl, cut to the calls it makes of its scanner, and what it records.

The order of calls is diskover's: ``log_setup``, ``init(globals)``, ``check_dirpath``,
``abspath``, ``scandir(top)`` for the level-1 subdirectories, ``get_storage_size``; then a
pool of threads: the top on its own (``stat(top)``, then ``scandir``, not recursing), then
one job per level-1 subdirectory, recursing with each subdirectory's stat from
``entry.stat()``; per entry ``is_symlink()``, ``is_dir()``, ``stat()`` (``st_size``,
``st_sizedu`` or ``st_blocks``, ``st_nlink``, ``st_ino``, times, owner); in the ``scandir``
loop an ``OSError`` or ``RuntimeError`` is logged and the directory skipped, anything else
is fatal (diskover deletes the index and exits 1); ``close(globals)`` at the end.

Run as a script (``python diskover_sequence.py TOP``) it crawls TOP with the local scanner
(``os.scandir``) and writes the result, msgpack-encoded, to stdout: the tests run it without
root's capabilities, as the agent runs.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from types import SimpleNamespace
from typing import Any, Optional

THREADS = 16


class FatalCrawlError(Exception):
    """What diskover would stop on: the crawl raised something it neither logs nor skips."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"FATAL ERROR: an exception has occurred: {original!r}")
        self.original = original


def _names(uid: int, gid: int) -> tuple[str, str]:
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return owner, group


def local_scanner() -> SimpleNamespace:
    """diskover's own scanner: ``os.scandir`` and ``os.stat`` on a local path."""

    def check_dirpath(path: str) -> tuple[bool, Optional[str]]:
        if not os.path.exists(path):
            return False, f"{path} no such directory!"
        if not os.path.isdir(path):
            return False, f"{path} is not a directory!"
        return True, None

    def get_storage_size(path: str) -> tuple[int, int, int]:
        st = os.statvfs(path)
        return st.f_frsize * st.f_blocks, st.f_frsize * st.f_bfree, st.f_frsize * st.f_bavail

    return SimpleNamespace(
        log_setup=lambda *args: None, init=lambda g: None, close=lambda g: None, check_dirpath=check_dirpath,
        abspath=os.path.abspath, scandir=os.scandir, stat=os.stat, get_storage_size=get_storage_size,
        du=lambda st: st.st_blocks * 512,
    )


def crawl(scanner: Any, path: str, *, threads: int = THREADS, handlers: tuple = (None, None, None),
          on_dir: Optional[Callable[[str], None]] = None) -> dict:
    """Crawl ``path`` with ``scanner`` (a module with diskover's alt-scanner surface, or
    :func:`local_scanner`) as diskover 2.3.5 does. ``on_dir(path)`` runs after each
    ``scandir`` returned. Returns files, directories, logged errors and totals (paths as
    bytes); raises :class:`FatalCrawlError` where diskover would stop."""
    du = getattr(scanner, "du", lambda st: st.st_sizedu)
    lock = threading.Lock()
    inodes: set[int] = set()
    files: dict[bytes, tuple] = {}
    dirs: dict[bytes, tuple] = {}
    errors: list[tuple[str, str, bytes]] = []
    quit = threading.Event()
    handler_file, handler_warnfile, handler_con = handlers

    scanner.log_setup(logging.INFO, "%(message)s", handler_file is not None, handler_file, handler_warnfile,
                      handler_con)
    diskover_globals = {"options": SimpleNamespace(altscanner="scandir_agent"), "args": [path]}
    scanner.init(diskover_globals)
    ok, message = scanner.check_dirpath(path)
    if not ok:
        raise ValueError(message)
    top = scanner.abspath(path)
    level1 = []
    for entry in scanner.scandir(top):
        if not entry.is_symlink() and entry.is_dir():
            level1.append((entry.path, entry.stat()))
    total, free, available = scanner.get_storage_size(top)

    def tree(path: str, depth: int, maxdepth: int, d_stat: Any = None) -> tuple[int, int, int, int]:
        size = size_du = nfiles = ndirs = 0
        if d_stat is None:
            try:
                d_stat = scanner.stat(path)
            except Exception as exc:  # ALT SCANNER ERROR / EXCEPTION: logged, nothing indexed
                with lock:
                    errors.append(("stat", type(exc).__name__, os.fsencode(path)))
                return 0, 0, 0, 0
        try:
            listing = scanner.scandir(path)
            if on_dir is not None:
                on_dir(path)
            for entry in listing:
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    if depth < maxdepth and not quit.is_set():
                        s, sdu, fc, dc = tree(entry.path, depth + 1, maxdepth, entry.stat())
                        size, size_du, nfiles, ndirs = size + s, size_du + sdu, nfiles + fc, ndirs + dc + 1
                    continue
                st = entry.stat()
                fsize_du = du(st)
                with lock:
                    if st.st_ino in inodes:
                        counted_du = 0
                    else:
                        counted_du = fsize_du
                        if st.st_nlink > 1:
                            inodes.add(st.st_ino)
                size, size_du, nfiles = size + st.st_size, size_du + counted_du, nfiles + 1
                record = (st.st_size, fsize_du, st.st_nlink, st.st_ino, st.st_mode, *_names(st.st_uid, st.st_gid),
                          int(st.st_mtime), int(st.st_atime), int(st.st_ctime))
                with lock:
                    files[os.fsencode(entry.path)] = record
            if depth > 0 or maxdepth == 0:
                record = (d_stat.st_ino, d_stat.st_nlink, d_stat.st_mode, *_names(d_stat.st_uid, d_stat.st_gid),
                          int(d_stat.st_mtime), int(d_stat.st_ctime), size, nfiles, ndirs)
                with lock:
                    dirs[os.fsencode(path)] = record
        except OSError as exc:  # OS ERROR: logged, the directory skipped
            with lock:
                errors.append(("OSError", type(exc).__name__, os.fsencode(exc.filename or path)))
        except RuntimeError as exc:  # ALT SCANNER ERROR: logged, the directory skipped
            with lock:
                errors.append(("RuntimeError", type(exc).__name__, os.fsencode(path)))
        return size, size_du, nfiles, ndirs

    fatal: Optional[BaseException] = None
    sums = [0, 0, 0, 0]
    with futures.ThreadPoolExecutor(max_workers=threads) as pool:
        jobs = [pool.submit(tree, top, 0, 0)]
        try:
            sums = list(jobs[0].result())
        except Exception as exc:
            fatal = exc
        if fatal is None:
            jobs += [pool.submit(tree, sub, 1, 999, st) for sub, st in level1]
        for job in futures.as_completed(jobs[1:]):
            try:
                got = job.result()
            except Exception as exc:
                if fatal is None:
                    fatal = exc
                quit.set()  # diskover exits at once; here the other jobs stop recursing
                continue
            sums = [a + b for a, b in zip(sums, got, strict=True)]
    scanner.close(diskover_globals)
    if fatal is not None:
        raise FatalCrawlError(fatal) from fatal
    return {"files": files, "dirs": dirs, "errors": sorted(errors), "size": sums[0], "size_du": sums[1],
            "storage": total > 0 and 0 <= available <= free <= total}


if __name__ == "__main__":
    import msgspec

    result = crawl(local_scanner(), sys.argv[1])
    sys.stdout.buffer.write(msgspec.msgpack.encode(result))
