"""The walk as a dataset: one row per entry (and per directory that failed), written
as Parquet (pyarrow) or NDJSON partitions, in the columns of :mod:`diskover_agent.schema`
(every partition the same).
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import schema
from .protocol import Entry

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
    errors: int = 0
    seconds: float = 0.0


def prepare_output(output: str) -> None:
    """Create the dataset directory ``output``, or check that it holds no partitions yet
    (``FileExistsError``); ``NotADirectoryError`` when it is something else."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), output)
    os.makedirs(output, exist_ok=True)
    if any(n.startswith(PART_PREFIX) for n in os.listdir(output)):
        raise FileExistsError(f"{output} already holds a walk's partitions; use an empty directory")


def write_manifest(summary: WalkSummary) -> None:
    """Write the summary beside the partitions, as ``MANIFEST``."""
    with open(os.path.join(summary.output, MANIFEST), "w") as f:
        json.dump(asdict(summary), f, indent=1)


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

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        self.dirs += 1
        self.entries += len(entries)
        self.bytes += schema.file_bytes(entries)
        self._dirs.append((path, entries))

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
        else:
            with open(tmp, "wb") as f:
                f.write(schema.ndjson(self.rows()))
        os.replace(tmp, final)
        return name


class DatasetWriter:
    """A walk's dataset written by one process (``walk --format parquet`` without Dask):
    directories as they come, cut into partitions of about ``part_entries`` rows in
    ``output``, then the manifest. The layout, the schema and the partition writer are
    those of the walk on Dask."""

    def __init__(self, output: str, top: str, fmt: str = "parquet", part_entries: int = 200_000) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        prepare_output(output)
        #: ``tasks`` stays 0: no Dask task ran.
        self.summary = WalkSummary(top=top, output=output, format=fmt)
        self.part_entries = part_entries
        self._rows = Rows()

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        self._rows.add_dir(path, entries)
        if len(self._rows) >= self.part_entries:
            self._write()

    def add_error(self, path: bytes, error: OSError) -> None:
        self._rows.add_error(path, error)

    def _write(self) -> None:
        rows, s = self._rows, self.summary
        s.files.append(rows.write(s.output, f"{PART_PREFIX}{len(s.files):06d}", s.format))
        s.dirs += rows.dirs
        s.entries += rows.entries
        s.bytes += rows.bytes
        s.errors += rows.errors
        self._rows = Rows()

    def close(self, seconds: float) -> WalkSummary:
        """Write the last partition (a walk that found nothing has one, empty) and the manifest."""
        if len(self._rows) or not self.summary.files:
            self._write()
        self.summary.seconds = seconds
        write_manifest(self.summary)
        return self.summary
