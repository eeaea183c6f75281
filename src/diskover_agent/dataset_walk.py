"""A walk into a dataset directory, checkpointed, that can be resumed: ``walk -o DIR`` and
:func:`walk_to_dataset`.

The walk lists directories through the agents (:class:`~.walk.Walker`, a stat walk) and
hands each one to a :class:`~.dataset.DatasetWriter`, which commits a partition and the
checkpoint every ``part_entries`` rows. Resumed, it walks the checkpoint's frontier: each
of those directories as one the walk found (opened without following a symlink, so one
that became a symlink is skipped, as ``os.walk`` does), except the top, which is followed
as ``os.walk(top)`` follows it. While :meth:`DatasetWalk.run` runs in the main thread,
SIGINT and SIGTERM commit what is complete and raise :class:`WalkInterrupted`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

from .checkpoint import WalkSpec
from .dataset import FORMATS, AlreadyComplete, DatasetWriter, ResumeRefused, WalkSummary, resume_point
from .protocol import KIND_DIR
from .transport import DEFAULT_PORT, fsencode_path
from .walk import HostWatcher, Walker, _join

__all__ = ["AlreadyComplete", "DatasetWalk", "ResumeRefused", "WalkInterrupted", "walk_to_dataset"]


class WalkInterrupted(Exception):
    """SIGINT or SIGTERM (``signum``) stopped the walk; what was complete is committed
    (``summary``, not complete) and ``resume=True`` continues it."""

    def __init__(self, signum: int, summary: WalkSummary) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.summary = summary


class _Stop(BaseException):
    """Raised in the main thread by a signal (outside the writer's critical sections)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


class DatasetWalk:
    """One run of a checkpointed walk of ``path`` into ``directory``: a new one, or with
    ``resume`` the continuation of the walk the directory's checkpoint describes (see
    :func:`walk_to_dataset`). Its counters (this run's) can be read while :meth:`run` runs."""

    def __init__(
        self,
        hosts: Union[str, Sequence[str]],
        path: Union[str, bytes],
        directory: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        fmt: str = "parquet",
        max_depth: Optional[int] = None,
        exclude_dirs: Iterable[Union[str, bytes]] = (),
        exclude_files: Iterable[Union[str, bytes]] = (),
        one_fs: bool = False,
        part_entries: int = 200_000,
        port: int = DEFAULT_PORT,
        on_error: Optional[Callable[[bytes, OSError], None]] = None,
        on_host: Optional[HostWatcher] = None,
        **options: Any,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        self.top = fsencode_path(path)
        self.directory = directory
        xd = [os.fsdecode(p) for p in exclude_dirs]
        xf = [os.fsdecode(p) for p in exclude_files]
        spec = WalkSpec.of(os.fsdecode(self.top), fmt, exclude_dirs=xd, exclude_files=xf, one_fs=one_fs,
                           max_depth=max_depth)
        if resume:
            self.writer = DatasetWriter.resume(directory, resume_point(directory, spec), part_entries)
            roots = list(self.writer.frontier)
        else:
            self.writer = DatasetWriter(directory, spec.top, fmt, part_entries, spec=spec, overwrite=overwrite)
            roots = [self.top]
        self.max_depth = max_depth
        self.on_error = on_error
        self.walker = Walker(self.top, hosts, port=port, stat=True, exclude_dirs=[os.fsencode(p) for p in xd],
                             exclude_files=[os.fsencode(p) for p in xf], one_fs=one_fs, roots=roots,
                             follow_top=self.top in roots, on_host=on_host, **options)
        #: This run's counts (the summary adds the runs before it).
        self.dirs = self.entries = self.bytes = self.errors = 0
        self.started = time.monotonic()
        self.ended: Optional[float] = None
        self._busy = False
        self._signalled: Optional[int] = None

    @property
    def seconds(self) -> float:
        """Seconds this run took (so far)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def served(self) -> dict[str, dict[str, int]]:
        """Requests and directories each host served so far."""
        return self.walker.served()

    def depth(self, path: bytes) -> int:
        """How far below the top a directory is: 0 for the top, 1 for its subdirectories."""
        rest = path[len(self.top):].strip(b"/")
        return rest.count(b"/") + 1 if rest else 0

    def run(self, handle_signals: bool = True) -> WalkSummary:
        """Walk to the end and commit the last partition; returns the dataset's summary
        (complete). With ``handle_signals`` (in the main thread), SIGINT and SIGTERM commit
        what is complete and raise :class:`WalkInterrupted`."""
        saved: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, self._on_signal)
        try:
            try:
                self._walk()
            except _Stop as stop:
                self.ended = time.monotonic()
                self._busy = True  # a second signal changes nothing now
                raise WalkInterrupted(stop.signum, self.writer.close()) from None
            except Exception:  # no agent answers, or a bug: keep what is complete, for a resume
                self.ended = time.monotonic()
                self._busy = True
                try:
                    self.writer.close()
                except Exception:  # the first error is the one to report
                    pass
                raise
            self.ended = time.monotonic()
            self._busy = True
            return self.writer.close()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signalled is None:
            self._signalled = signum
        if not self._busy:
            raise _Stop(signum)

    def _walk(self) -> None:
        writer, walker, maxdepth = self.writer, self.walker, self.max_depth
        listed = walker.dirs(skips=True)
        try:
            for d in listed:
                self._busy = True  # the writer's state changes as a whole: a signal waits for the end
                path = d.path
                if d.skipped:
                    writer.done(path)
                elif d.error is not None:
                    self.errors += 1
                    writer.add_error(path, d.error)
                    if self.on_error is not None:
                        self.on_error(path, d.error)
                else:
                    entries = sorted(d.entries, key=_by_name)
                    subdirs = [_join(path, e.name) for e in entries if e.kind == KIND_DIR]
                    depth = self.depth(path) if maxdepth is not None else 0
                    if maxdepth is not None and depth + 1 >= maxdepth:
                        for sub in subdirs:
                            walker.prune(sub)
                        subdirs = []
                    if maxdepth is not None and depth + 1 > maxdepth:
                        writer.done(path)  # (the top, with max depth 0)
                    else:
                        self.dirs += 1
                        self.entries += len(entries)
                        self.bytes += writer.add_dir(path, entries, subdirs)
                self._busy = False
                if self._signalled is not None:
                    raise _Stop(self._signalled)
        finally:
            self._busy = True  # (a signal now is for after the last commit)
            listed.close()  # stops every thread and closes every socket


def _by_name(e: Any) -> bytes:
    return e.name


def walk_to_dataset(
    hosts: Union[str, Sequence[str]],
    path: Union[str, bytes],
    directory: str,
    *,
    resume: bool = False,
    **kwargs: Any,
) -> WalkSummary:
    """Walk ``path`` through the agents on ``hosts`` into the dataset directory ``directory``
    (Parquet partitions, or ``fmt="ndjson"``), with a checkpoint committed with each
    partition; returns its summary (also written as ``_walk.json``).

    A new walk needs an empty (or new) ``directory``, or ``overwrite=True`` to replace a
    walk's dataset there. ``resume=True`` continues the interrupted walk the directory
    holds: nothing is listed twice, nothing is lost. It raises :class:`ResumeRefused` when
    the directory holds no checkpoint, another path's walk, or one with other options
    (``fmt``, ``max_depth``, exclusions, ``one_fs``), and :class:`AlreadyComplete` when that
    walk ran to its end. SIGINT or SIGTERM (while it runs in the main thread) commits what
    is complete and raises :class:`WalkInterrupted`.

    Other keyword arguments: ``fmt``, ``max_depth`` (as ``find -maxdepth``),
    ``exclude_dirs``, ``exclude_files``, ``one_fs``, ``part_entries`` (rows per partition),
    ``port``, ``on_error`` (called with each directory that could not be listed), and the
    connection's (``token``, ``tls``, ``workers``...).
    """
    return DatasetWalk(hosts, path, directory, resume=resume, **kwargs).run()
