"""The walk as a dataset: one row per entry (and per directory that failed), written
as Parquet (pyarrow) or NDJSON partitions, in the columns of :mod:`diskover_agent.schema`
(every partition the same).
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import checkpoint as ckpt
from . import schema
from .checkpoint import Checkpoint, WalkSpec
from .protocol import KIND_DIR, Entry

FORMATS = ("parquet", "ndjson")
#: A dataset's partition files are named ``PART_PREFIX``..., beside the ``MANIFEST`` (the summary).
PART_PREFIX = "part-"
MANIFEST = "_walk.json"


@dataclass
class WalkSummary:
    """A whole walk written as a dataset (its ``MANIFEST``)."""

    top: str
    output: str
    format: str
    files: list[str] = field(default_factory=list)
    tasks: int = 0
    dirs: int = 0
    entries: int = 0
    bytes: int = 0
    #: Directories that could not be listed (each one an ``error`` row).
    errors: int = 0
    seconds: float = 0.0
    #: Whether the walk ran to its end (False: interrupted, ``--resume`` continues it).
    complete: bool = False


def _walk_files(name: str) -> bool:
    """Whether ``name`` is a file a walk writes in its dataset directory (or its temporary)."""
    return name.startswith((PART_PREFIX, f".{PART_PREFIX}")) or name in (
        MANIFEST, ckpt.CHECKPOINT, f".{ckpt.CHECKPOINT}.tmp", f".{MANIFEST}.tmp")


def prepare_output(output: str, overwrite: bool = False) -> None:
    """Create the dataset directory ``output``, or check that it is empty (``FileExistsError``);
    with ``overwrite``, delete the files a walk wrote there (other files stay).
    ``NotADirectoryError`` when it is something else."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), output)
    os.makedirs(output, exist_ok=True)
    names = os.listdir(output)
    if overwrite:
        for name in names:
            if _walk_files(name):
                os.unlink(os.path.join(output, name))
        names = os.listdir(output)
    if names:
        what = "a walk's dataset" if any(map(_walk_files, names)) else "files"
        raise FileExistsError(f"{output} already holds {what}: --resume continues an interrupted walk, "
                              "--overwrite replaces a walk's dataset, or use an empty directory")


class ResumeRefused(ValueError):
    """The directory cannot be resumed as asked: no checkpoint, another walk's, other options."""


class AlreadyComplete(Exception):
    """A resume of a walk that already ran to its end; ``summary`` is its own."""

    def __init__(self, message: str, summary: WalkSummary) -> None:
        super().__init__(message)
        self.summary = summary


def resume_point(directory: str, spec: WalkSpec) -> Checkpoint:
    """The checkpoint to resume the walk ``spec`` from, in ``directory``: :class:`ResumeRefused`
    when there is none or it is another walk's, :class:`AlreadyComplete` when it ran to its end."""
    if not os.path.isdir(directory):
        raise ResumeRefused(f"{directory} is not a directory: nothing to resume")
    try:
        saved = ckpt.load(directory)
    except (ValueError, OSError) as exc:
        raise ResumeRefused(str(exc)) from None
    if saved is None:
        raise ResumeRefused(f"{directory} holds no walk checkpoint: nothing to resume")
    if saved.spec.top != spec.top:
        raise ResumeRefused(f"{directory} holds the walk of {saved.spec.top}, not of {spec.top}")
    diffs = saved.spec.differences(spec)
    if diffs:
        raise ResumeRefused(f"{directory} holds a walk with other options ({'; '.join(diffs)}): "
                            "resume it with the options it started with")
    if saved.complete:
        summary = WalkSummary(**{**saved.summary, "output": directory})
        raise AlreadyComplete(f"the walk of {spec.top} into {directory} is already complete", summary)
    return saved


def discard_uncommitted(directory: str, saved: Checkpoint) -> None:
    """Delete the partitions (and temporary files) in ``directory`` that ``saved`` does not
    name: written by a run that stopped before it committed them."""
    kept = set(saved.summary["files"])
    for name in os.listdir(directory):
        if _walk_files(name) and name not in kept and name not in (MANIFEST, ckpt.CHECKPOINT):
            os.unlink(os.path.join(directory, name))


def write_manifest(summary: WalkSummary) -> None:
    """Write the summary beside the partitions, as ``MANIFEST`` (atomically)."""
    ckpt.write_durably(summary.output, MANIFEST, json.dumps(asdict(summary), indent=1).encode())


class Rows:
    """A partition being filled, one directory at a time; its columns are built when written."""

    def __init__(self) -> None:
        self._dirs: list[tuple[bytes, Sequence[Entry]]] = []
        self._errors: list[tuple[bytes, OSError]] = []
        self.entries = 0
        self.dirs = 0
        self.errors = 0
        #: Bytes in files (``st_size``).
        self.bytes = 0

    def __len__(self) -> int:
        return self.entries + self.errors

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> int:
        """Add a directory's rows; returns the bytes in its files."""
        self.dirs += 1
        self.entries += len(entries)
        size = schema.file_bytes(entries)
        self.bytes += size
        self._dirs.append((path, entries))
        return size

    def add_error(self, path: bytes, error: OSError) -> None:
        self.errors += 1
        self._errors.append((path, error))

    def rows(self) -> list[schema.Row]:
        """Every row: the entries, directory by directory, then the error rows."""
        rows = [r for path, es in self._dirs for r in schema.entry_rows(path, es)]
        return rows + [schema.error_row(path, error) for path, error in self._errors]

    def table(self) -> Any:
        """The rows, in the order of :meth:`rows`, as an Arrow table (:func:`~.schema.arrow_table`)."""
        return schema.arrow_table(self._dirs, self._errors)

    def write(self, directory: str, stem: str, fmt: str) -> str:
        """Write the rows as one partition file (atomically); returns its name."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        name = f"{stem}-{uuid.uuid4().hex[:12]}.{fmt}"
        final = os.path.join(directory, name)
        tmp = os.path.join(directory, f".{name}.tmp")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(self.table(), tmp, compression="zstd")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(tmp, "wb") as f:
                f.write(schema.ndjson(self.rows()))
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
        return name


class DatasetWriter:
    """A walk's dataset written by one process (``walk -o DIR`` without Dask), with its
    checkpoint: directories as they come (each after its parent), cut into partitions of
    about ``part_entries`` rows in ``output``; each partition is committed with the
    checkpoint (see :mod:`.checkpoint`), which keeps the frontier: the directories owed,
    (the top and the subdirectories of the directories added) minus those added. The
    layout, the schema and the partition writer are those of the walk on Dask.

    A new writer starts a dataset in ``output`` (see :func:`prepare_output`);
    :meth:`resume` continues the one a checkpoint describes."""

    def __init__(self, output: str, top: str, fmt: str = "parquet", part_entries: int = 200_000, *,
                 spec: Optional[WalkSpec] = None, overwrite: bool = False,
                 _resumed: Optional[Checkpoint] = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        self.part_entries = part_entries
        self._rows = Rows()
        self._started = time.monotonic()
        if _resumed is None:
            prepare_output(output, overwrite)
            #: ``tasks`` stays 0: no Dask task ran.
            self.summary = WalkSummary(top=top, output=output, format=fmt)
            self.spec = spec or WalkSpec.of(top, fmt)
            #: Directories owed: neither added nor known to be left out (remote paths).
            self.frontier: set[bytes] = {os.fsencode(top)}
            self._seconds = 0.0
            self._save()
        else:
            self.spec = _resumed.spec
            self.summary = WalkSummary(**{**_resumed.summary, "output": output})
            self.frontier = set(_resumed.frontier)
            self._seconds = self.summary.seconds

    @classmethod
    def resume(cls, output: str, checkpoint: Checkpoint, part_entries: int = 200_000) -> DatasetWriter:
        """Continue the dataset in ``output`` from its ``checkpoint``: the partitions it
        does not name (written by a run that stopped before committing them) are deleted."""
        discard_uncommitted(output, checkpoint)
        return cls(output, checkpoint.spec.top, checkpoint.spec.format, part_entries, _resumed=checkpoint)

    def add_dir(self, path: bytes, entries: Sequence[Entry], subdirs: Optional[Sequence[bytes]] = None) -> int:
        """Rows for the entries of ``path``; its ``subdirs`` (default: the entries that are
        directories) become owed. Commits a partition when it is full. Returns the bytes in
        its files."""
        size = self._rows.add_dir(path, entries)
        if subdirs is None:
            prefix = path if path.endswith(b"/") else path + b"/"
            subdirs = [prefix + e.name for e in entries if e.kind == KIND_DIR]
        self.frontier.discard(path)
        self.frontier.update(subdirs)
        if len(self._rows) >= self.part_entries:
            self.commit()
        return size

    def add_error(self, path: bytes, error: OSError) -> None:
        """An ``error`` row for a directory that could not be listed."""
        self._rows.add_error(path, error)
        self.frontier.discard(path)
        if len(self._rows) >= self.part_entries:
            self.commit()

    def done(self, path: bytes) -> None:
        """A directory owed that has no rows (found a symlink since, as ``os.walk`` skips it)."""
        self.frontier.discard(path)

    def commit(self, empty: bool = False) -> None:
        """Write what was added as one partition (durably; with ``empty``, even when it holds
        no rows), then the checkpoint naming it and holding the frontier."""
        rows, s = self._rows, self.summary
        if len(rows) or rows.dirs or empty:
            name = rows.write(s.output, f"{PART_PREFIX}{len(s.files):06d}", s.format)
            ckpt.fsync_dir(s.output)  # the partition's name is durable before the checkpoint names it
            s.files.append(name)
            s.dirs += rows.dirs
            s.entries += rows.entries
            s.bytes += rows.bytes
            s.errors += rows.errors
            self._rows = Rows()
        self._save()

    def _save(self) -> None:
        s = self.summary
        s.seconds = self._seconds + time.monotonic() - self._started
        s.complete = not self.frontier
        ckpt.save(s.output, Checkpoint(self.spec, asdict(s), self.frontier, s.complete))

    def close(self, seconds: Optional[float] = None) -> WalkSummary:
        """Commit the last partition (a walk that found nothing has one, empty) and write the
        manifest; ``seconds``: this run's time, if not the writer's own count. Complete when
        the frontier is empty (else :meth:`resume` continues it)."""
        self.commit(empty=not self.summary.files)
        if seconds is not None:
            self.summary.seconds = self._seconds + seconds
        write_manifest(self.summary)
        return self.summary
