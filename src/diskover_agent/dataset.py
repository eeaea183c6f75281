"""The walk as a dataset: one row per entry (and per directory that failed), written
as Parquet (pyarrow) or NDJSON partitions.

Schema (every partition the same):

=============== ========= ====================================================
column          type      meaning
=============== ========= ====================================================
parent          string    the directory holding the entry (remote path, UTF-8;
                          bytes that are not UTF-8 replaced by U+FFFD)
parent_raw      binary    the exact bytes of ``parent`` when they are not UTF-8
name            string    the entry's name (as ``parent``)
name_raw        binary    the exact bytes of ``name`` when they are not UTF-8
type            string    file, dir, symlink, fifo, socket, char, block,
                          unknown; ``error`` for a directory that failed
symlink         bool      the entry is a symlink
target_type     string    what a symlink points to (null when dangling)
mode ino dev    uint64 /  the entry's lstat fields; ``*_ns`` times in
nlink uid gid   int64     nanoseconds since the epoch
size blocks
atime_ns ...
error_errno     int32     for ``error`` rows: errno, its name and message;
error_code      string    ``parent`` is then the directory that failed and
error_message   string    ``name`` is empty
=============== ========= ====================================================
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

import msgspec

from . import checkpoint as ckpt
from .checkpoint import Checkpoint, WalkSpec
from .protocol import KIND_DIR, KIND_FILE, KIND_NAMES, KIND_SYMLINK, Entry, errno_name

TYPES = KIND_NAMES
FORMATS = ("parquet", "ndjson")
_STAT_COLUMNS = ("mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "blocks")
COLUMNS = ("parent", "parent_raw", "name", "name_raw", "type", "symlink", "target_type", *_STAT_COLUMNS,
           "error_errno", "error_code", "error_message")
#: A dataset's partition files are named ``PART_PREFIX``..., beside the ``MANIFEST`` (the summary).
PART_PREFIX = "part-"
MANIFEST = "_walk.json"


def arrow_schema() -> Any:
    import pyarrow as pa

    u64, i64 = pa.uint64(), pa.int64()
    stat_types = {"mode": i64, "ino": u64, "dev": u64, "nlink": i64, "uid": i64, "gid": i64, "size": i64,
                  "atime_ns": i64, "mtime_ns": i64, "ctime_ns": i64, "blocks": i64}
    return pa.schema([
        ("parent", pa.string()), ("parent_raw", pa.binary()), ("name", pa.string()), ("name_raw", pa.binary()),
        ("type", pa.string()), ("symlink", pa.bool_()), ("target_type", pa.string()),
        *((c, stat_types[c]) for c in _STAT_COLUMNS),
        ("error_errno", pa.int32()), ("error_code", pa.string()), ("error_message", pa.string()),
    ])


def _text(raw: bytes) -> tuple[str, Optional[bytes]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), raw


def texts(names: Sequence[bytes]) -> tuple[list[str], list[Optional[bytes]]]:
    """``names`` as UTF-8 text (bytes that are not UTF-8 replaced by U+FFFD), and each one's
    exact bytes where it is not UTF-8 (else None). Names hold no ``/`` (the wire's rule), so
    one decode of them all, joined by ``/``, does when every one is UTF-8."""
    try:
        decoded = b"/".join(names).decode("utf-8").split("/")
        if len(decoded) == len(names):
            return decoded, [None] * len(names)
    except UnicodeDecodeError:
        pass
    pairs = [_text(n) for n in names]
    return [p[0] for p in pairs], [p[1] for p in pairs]


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


class _Row(msgspec.Struct, gc=False):
    """One row of an NDJSON partition (keys in :data:`COLUMNS` order; bytes as base64)."""

    parent: str
    parent_raw: Optional[bytes]
    name: str
    name_raw: Optional[bytes]
    type: str
    symlink: bool
    target_type: Optional[str]
    mode: Optional[int]
    ino: Optional[int]
    dev: Optional[int]
    nlink: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    size: Optional[int]
    atime_ns: Optional[int]
    mtime_ns: Optional[int]
    ctime_ns: Optional[int]
    blocks: Optional[int]
    error_errno: Optional[int]
    error_code: Optional[str]
    error_message: Optional[str]


assert _Row.__struct_fields__ == COLUMNS


class Rows:
    """A partition being filled, one directory at a time; its columns are built when written."""

    def __init__(self) -> None:
        self._dirs: list[tuple[bytes, Sequence[Entry]]] = []
        self._errors: list[tuple[bytes, OSError]] = []
        self.entries = 0
        self.dirs = 0
        self.errors = 0
        #: Bytes in files (``st_size``), known once the rows are written.
        self.bytes = 0

    def __len__(self) -> int:
        return self.entries + self.errors

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        self.dirs += 1
        self.entries += len(entries)
        self._dirs.append((path, entries))

    def add_error(self, path: bytes, error: OSError) -> None:
        self.errors += 1
        self._errors.append((path, error))

    def _entry_columns(self) -> tuple[dict[str, list[Any]], list[Optional[tuple[int, ...]]]]:
        """The columns of the entry rows (directory by directory) but the stat columns, and
        each entry's stat record (None when it has none)."""
        entries = [e for _, es in self._dirs for e in es]
        kinds = [e.kind for e in entries]
        parent: list[str] = []
        parent_raw: list[Optional[bytes]] = []
        name: list[str] = []
        name_raw: list[Optional[bytes]] = []
        for path, es in self._dirs:
            text, raw = _text(path)
            parent += [text] * len(es)
            parent_raw += [raw] * len(es)
            names, raws = texts([e.name for e in es])
            name += names
            name_raw += raws
        none = [None] * len(entries)
        cols: dict[str, list[Any]] = {
            "parent": parent, "parent_raw": parent_raw, "name": name, "name_raw": name_raw,
            "type": [TYPES.get(k, "unknown") for k in kinds], "symlink": [k == KIND_SYMLINK for k in kinds],
            "target_type": [TYPES.get(e.target) if e.target is not None else None for e in entries],
            "error_errno": none, "error_code": none, "error_message": none,
        }
        stats = [e.stat for e in entries]
        self.bytes = sum([st[6] for e in entries if e.kind == KIND_FILE and (st := e.stat) is not None])
        return cols, stats

    def _error_columns(self) -> dict[str, list[Any]]:
        cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for path, error in self._errors:
            text, raw = _text(path)
            row = dict.fromkeys(COLUMNS)
            row.update(parent=text, parent_raw=raw, name="", type="error", symlink=False,
                       error_errno=error.errno, error_code=errno_name(error.errno), error_message=error.strerror)
            for c in COLUMNS:
                cols[c].append(row[c])
        return cols

    def columns(self) -> dict[str, list[Any]]:
        """Every column, as Python values: the entries, directory by directory, then the error rows."""
        cols, stats = self._entry_columns()
        for i, col in enumerate(_STAT_COLUMNS):  # the wire's stat record holds them first, in this order
            cols[col] = [st[i] if st is not None else None for st in stats]
        errors = self._error_columns()
        return {c: cols[c] + errors[c] for c in COLUMNS}

    def table(self) -> Any:
        """The rows as an Arrow table of :func:`arrow_schema`, in the order of :meth:`columns`."""
        import pyarrow as pa

        schema = arrow_schema()
        cols, stats = self._entry_columns()
        # the stat records become their columns in Arrow's C++, not field by field in Python
        record = pa.struct([schema.field(c) for c in _STAT_COLUMNS] + [("blksize", pa.int64()), ("rdev", pa.uint64())])
        for col, values in zip(_STAT_COLUMNS, pa.array(stats, type=record).flatten(), strict=False):
            cols[col] = values
        table = pa.Table.from_pydict({c: cols[c] for c in COLUMNS}, schema=schema)
        if self._errors:
            table = pa.concat_tables([table, pa.Table.from_pydict(self._error_columns(), schema=schema)])
        return table

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
            cols = self.columns()
            rows = [_Row(*values) for values in zip(*(cols[c] for c in COLUMNS), strict=True)]
            with open(tmp, "wb") as f:
                f.write(msgspec.json.Encoder().encode_lines(rows))
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

    def add_dir(self, path: bytes, entries: Sequence[Entry], subdirs: Optional[Sequence[bytes]] = None) -> None:
        """Rows for the entries of ``path``; its ``subdirs`` (default: the entries that are
        directories) become owed. Commits a partition when it is full."""
        self._rows.add_dir(path, entries)
        if subdirs is None:
            prefix = path if path.endswith(b"/") else path + b"/"
            subdirs = [prefix + e.name for e in entries if e.kind == KIND_DIR]
        self.frontier.discard(path)
        self.frontier.update(subdirs)
        if len(self._rows) >= self.part_entries:
            self.commit()

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
