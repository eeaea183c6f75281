"""The record schema of every walk output (the README's table "The walk's records"): one
row per entry, and one per directory that could not be listed, with the same columns, in
the same order, built the same way, whether written as NDJSON or CSV (``walk -o FILE``) or
as the partitions of a dataset (Parquet or NDJSON; ``walk --format parquet -o DIR``,
``walk --dask``).

Names and paths are the entry's directory (``parent``) and its ``name``, as UTF-8 text;
when their bytes are not UTF-8, the text has U+FFFD in their place and ``parent_raw`` /
``name_raw`` hold the exact bytes (binary in Parquet, base64 in NDJSON and CSV). The stat
columns are the ``lstat`` fields, named as ``os.stat_result``'s without ``st_``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Optional

import msgspec
import msgspec.structs

from .protocol import KIND_FILE, KIND_NAMES, KIND_SYMLINK, Entry, errno_name

#: The ``type`` of an entry, by the wire's one-letter kind; ``ERROR`` for a directory that failed.
TYPES = KIND_NAMES
ERROR = "error"

#: Every column, in order, and its type: Arrow's (the Parquet column), also what DuckDB reads
#: from the text formats (:data:`DUCKDB_TYPES`), where ``binary`` columns are base64 text.
COLUMN_TYPES: dict[str, str] = {
    "parent": "string", "parent_raw": "binary", "name": "string", "name_raw": "binary",
    "type": "string", "target_type": "string",
    # the wire's stat record holds these first, in this order
    "mode": "int64", "ino": "uint64", "dev": "uint64", "nlink": "int64", "uid": "int64", "gid": "int64",
    "size": "int64", "atime_ns": "int64", "mtime_ns": "int64", "ctime_ns": "int64", "blocks": "int64",
    "error_errno": "int32", "error_code": "string", "error_message": "string",
}
COLUMNS = tuple(COLUMN_TYPES)
STAT_COLUMNS = COLUMNS[6:17]
#: The columns holding bytes: binary in Parquet, base64 (RFC 4648, padded) in NDJSON and CSV.
BINARY_COLUMNS = ("parent_raw", "name_raw")
#: DuckDB's type of each column as the text formats (NDJSON, CSV) hold it.
DUCKDB_TYPES = {c: {"string": "VARCHAR", "binary": "VARCHAR", "int64": "BIGINT", "uint64": "UBIGINT",
                    "int32": "INTEGER"}[t] for c, t in COLUMN_TYPES.items()}


class Row(msgspec.Struct, gc=False):
    """One record, fields in :data:`COLUMNS` order (msgspec writes ``bytes`` as base64)."""

    parent: str
    parent_raw: Optional[bytes]
    name: str
    name_raw: Optional[bytes]
    type: str
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
    error_errno: Optional[int] = None
    error_code: Optional[str] = None
    error_message: Optional[str] = None


assert Row.__struct_fields__ == COLUMNS

_NO_STAT = (None,) * len(STAT_COLUMNS)


def text(raw: bytes) -> tuple[str, Optional[bytes]]:
    """``raw`` as UTF-8 text (U+FFFD for bytes that are not UTF-8), and ``raw`` itself when it is not UTF-8."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), raw


def texts(names: Sequence[bytes]) -> tuple[list[str], list[Optional[bytes]]]:
    """:func:`text` of each of ``names``, as two lists. Names hold no ``/`` (the wire's rule),
    so one decode of them all, joined by ``/``, does when every one is UTF-8."""
    try:
        decoded = b"/".join(names).decode("utf-8").split("/")
        if len(decoded) == len(names):
            return decoded, [None] * len(names)
    except UnicodeDecodeError:
        pass
    pairs = [text(n) for n in names]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def target_type(e: Entry) -> Optional[str]:
    """What a symlink points to; None for a dangling one and for everything else."""
    return TYPES.get(e.target) if e.kind == KIND_SYMLINK and e.target is not None else None


def entry_rows(parent: bytes, entries: Sequence[Entry]) -> list[Row]:
    """The rows of ``entries`` of directory ``parent``, in their order. An entry without its
    stat (it vanished, or its directory cannot be searched) has every stat column null."""
    if not entries:
        return []
    ptext, praw = text(parent)
    names, raws = texts([e.name for e in entries])
    types = TYPES
    out: list[Row] = []
    append = out.append
    for e, name, raw in zip(entries, names, raws, strict=True):
        st = e.stat
        append(Row(ptext, praw, name, raw, types.get(e.kind, "unknown"), target_type(e),
                   *(st[:11] if st is not None else _NO_STAT)))
    return out


def error_row(path: bytes, error: OSError) -> Row:
    """The row of a directory that could not be listed: ``parent`` is that directory, ``name``
    is empty, ``type`` is ``error``, the stat columns are null."""
    ptext, praw = text(path)
    return Row(ptext, praw, "", None, ERROR, None, *_NO_STAT, error_errno=error.errno,
               error_code=errno_name(error.errno), error_message=error.strerror or str(error))


def file_bytes(entries: Sequence[Entry]) -> int:
    """Bytes in the regular files of ``entries`` (``st_size``): what walk summaries count."""
    return sum([st[6] for e in entries if e.kind == KIND_FILE and (st := e.stat) is not None])


# -- the formats ------------------------------------------------------------------------------

#: One encoder for every thread (msgspec holds the GIL while it encodes).
_encode_lines = msgspec.json.Encoder().encode_lines


def ndjson(rows: Sequence[Row]) -> bytes:
    """The rows as NDJSON lines (keys in :data:`COLUMNS` order, ``null`` for null, bytes as base64)."""
    return _encode_lines(rows)


_RAW = [COLUMNS.index(c) for c in BINARY_COLUMNS]


def csv_values(row: Row) -> tuple[Any, ...]:
    """A row's CSV fields, in :data:`COLUMNS` order: null is an empty field, bytes are base64."""
    values = msgspec.structs.astuple(row)
    if values[_RAW[0]] is None and values[_RAW[1]] is None:
        return values
    out = list(values)
    for i in _RAW:
        if out[i] is not None:
            out[i] = base64.b64encode(out[i]).decode("ascii")
    return tuple(out)


def arrow_schema() -> Any:
    """The schema of a Parquet partition (pyarrow)."""
    import pyarrow as pa

    return pa.schema([(c, getattr(pa, t)()) for c, t in COLUMN_TYPES.items()])


def arrow_table(dirs: Sequence[tuple[bytes, Sequence[Entry]]], errors: Sequence[tuple[bytes, OSError]]) -> Any:
    """The rows of ``dirs`` (``(parent, entries)``, directory by directory) then of ``errors``
    as an Arrow table of :func:`arrow_schema`: the columns of :func:`entry_rows` and
    :func:`error_row`, built column by column (the stat records become their columns in
    Arrow's C++, not field by field in Python)."""
    import pyarrow as pa

    schema = arrow_schema()
    entries = [e for _, es in dirs for e in es]
    parent: list[str] = []
    parent_raw: list[Optional[bytes]] = []
    name: list[str] = []
    name_raw: list[Optional[bytes]] = []
    for path, es in dirs:
        ptext, praw = text(path)
        parent += [ptext] * len(es)
        parent_raw += [praw] * len(es)
        names, raws = texts([e.name for e in es])
        name += names
        name_raw += raws
    none = [None] * len(entries)
    cols: dict[str, Any] = {
        "parent": parent, "parent_raw": parent_raw, "name": name, "name_raw": name_raw,
        "type": [TYPES.get(e.kind, "unknown") for e in entries], "target_type": [target_type(e) for e in entries],
        "error_errno": none, "error_code": none, "error_message": none,
    }
    record = pa.struct([schema.field(c) for c in STAT_COLUMNS] + [("blksize", pa.int64()), ("rdev", pa.uint64())])
    stats = pa.array([e.stat for e in entries], type=record).flatten()
    cols.update(zip(STAT_COLUMNS, stats, strict=False))
    table = pa.Table.from_pydict({c: cols[c] for c in COLUMNS}, schema=schema)
    if errors:
        rows = [error_row(path, error) for path, error in errors]
        error_cols = {c: [getattr(r, c) for r in rows] for c in COLUMNS}
        table = pa.concat_tables([table, pa.Table.from_pydict(error_cols, schema=schema)])
    return table
