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

import os
import uuid
from typing import Any, Optional

import msgspec

from .protocol import KIND_NAMES, Entry, errno_name

TYPES = KIND_NAMES
FORMATS = ("parquet", "ndjson")
_STAT_COLUMNS = ("mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "blocks")
# positions of those fields in the wire's stat record
_STAT_INDEX = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
COLUMNS = ("parent", "parent_raw", "name", "name_raw", "type", "symlink", "target_type", *_STAT_COLUMNS,
           "error_errno", "error_code", "error_message")


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


class Rows:
    """Columns being filled, one directory at a time."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self.entries = 0
        self.dirs = 0
        self.errors = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.columns["name"])

    def add_dir(self, path: bytes, entries: list[Entry]) -> None:
        self.dirs += 1
        self.entries += len(entries)
        cols = self.columns
        parent, parent_raw = _text(path)
        n = len(entries)
        cols["parent"].extend([parent] * n)
        cols["parent_raw"].extend([parent_raw] * n)
        for e in entries:
            name, name_raw = _text(e.name)
            cols["name"].append(name)
            cols["name_raw"].append(name_raw)
            cols["type"].append(TYPES.get(e.kind, "unknown"))
            cols["symlink"].append(e.kind == "l")
            cols["target_type"].append(TYPES.get(e.target) if e.target is not None else None)
            st = e.stat
            for col, i in zip(_STAT_COLUMNS, _STAT_INDEX, strict=True):
                cols[col].append(st[i] if st is not None else None)
            if st is not None and e.kind == "f":
                self.bytes += st[6]
        for col in ("error_errno", "error_code", "error_message"):
            cols[col].extend([None] * n)

    def add_error(self, path: bytes, error: OSError) -> None:
        self.errors += 1
        cols = self.columns
        parent, parent_raw = _text(path)
        row = {c: None for c in COLUMNS}
        row.update(parent=parent, parent_raw=parent_raw, name="", type="error", symlink=False,
                   error_errno=error.errno, error_code=errno_name(error.errno), error_message=error.strerror)
        for c in COLUMNS:
            cols[c].append(row[c])

    def write(self, directory: str, stem: str, fmt: str) -> str:
        """Write the rows as one partition file (atomically); returns its name."""
        name = f"{stem}-{uuid.uuid4().hex[:12]}.{fmt}"
        final = os.path.join(directory, name)
        tmp = os.path.join(directory, f".{name}.tmp")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pydict(self.columns, schema=arrow_schema())
            pq.write_table(table, tmp, compression="zstd")
        elif fmt == "ndjson":
            encode = msgspec.json.Encoder().encode
            cols = self.columns
            with open(tmp, "wb") as f:
                for i in range(len(self)):
                    row = {c: cols[c][i] for c in COLUMNS}
                    for raw in ("parent_raw", "name_raw"):  # JSON has no bytes: base64 them
                        if row[raw] is not None:
                            row[raw] = msgspec.json.decode(msgspec.json.encode(row[raw]))
                    f.write(encode(row) + b"\n")
        else:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        os.replace(tmp, final)
        return name
