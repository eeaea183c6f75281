"""The walk's records as the README's table documents them, for the tests: the reference
row of an entry (from ``lstat`` of the local file), and readers of every output (``walk -o
FILE`` as NDJSON or CSV, a dataset's Parquet or NDJSON partitions) that give rows as the
same Python values (exact bytes in the ``*_raw`` columns, ints, None for null)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Optional

import msgspec

#: The documented columns, in their documented order (written down here, not imported).
COLUMNS = ["parent", "parent_raw", "name", "name_raw", "type", "target_type", "mode", "ino", "dev", "nlink", "uid",
           "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "blocks", "error_errno", "error_code", "error_message"]
STAT = ["mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "blocks"]
RAW = ("parent_raw", "name_raw")
_INTS = {*STAT, "error_errno"}
_NULLABLE_TEXT = {"target_type", "error_code", "error_message"}
TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}


def text(raw: bytes) -> tuple[str, Optional[bytes]]:
    """A name or path as its column and its ``*_raw`` column hold it."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), raw


def expected_row(parent: bytes, name: bytes, local: bytes, with_stat: bool = True) -> dict:
    """The row of entry ``name`` of remote directory ``parent``, from ``lstat`` of ``local``
    (``with_stat=False``: the agent cannot stat it, every stat column null)."""
    st = os.lstat(local)
    kind = TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
    target = None
    if kind == "symlink":
        try:
            target = TYPES.get(stat.S_IFMT(os.stat(local).st_mode), "unknown")
        except OSError:
            target = None
    parent_text, parent_raw = text(parent)
    name_text, name_raw = text(name)
    row = {"parent": parent_text, "parent_raw": parent_raw, "name": name_text, "name_raw": name_raw,
           "type": kind, "target_type": target}
    row.update({c: getattr(st, f"st_{c}") if with_stat else None for c in STAT})
    row.update(error_errno=None, error_code=None, error_message=None)
    assert list(row) == COLUMNS
    return row


def expected_rows(local_top: Path, remote_top: bytes) -> dict[tuple[bytes, bytes], dict]:
    """Every entry's row by ``(parent, name)`` bytes: ``os.walk`` + ``lstat`` of the local tree."""
    lb = os.fsencode(local_top)
    out = {}
    for root, dirs, files in os.walk(lb):
        parent = remote_top + root[len(lb):]
        for name in dirs + files:
            out[(parent, name)] = expected_row(parent, name, os.path.join(root, name))
    return out


def key(row: dict) -> tuple[bytes, bytes]:
    """``(parent, name)``, the exact bytes of a row read back."""
    return (row["parent_raw"] if row["parent_raw"] is not None else row["parent"].encode(),
            row["name_raw"] if row["name_raw"] is not None else row["name"].encode())


def path(row: dict) -> bytes:
    """The exact path of a row's entry (``parent + '/' + name``)."""
    parent, name = key(row)
    return parent + b"/" + name


def _from_base64(row: dict) -> dict:
    for c in RAW:
        if row[c] is not None:
            row[c] = base64.b64decode(row[c], validate=True)
    return row


def read_ndjson(data: bytes) -> list[dict]:
    """NDJSON records (``walk -o FILE`` or a partition); every key in the documented order."""
    rows = []
    for line in data.splitlines():
        row = msgspec.json.decode(line)
        assert list(row) == COLUMNS, list(row)
        rows.append(_from_base64(row))
    return rows


def read_csv(data: bytes) -> list[dict]:
    """CSV records: the header is the documented columns; an empty field is null (but for
    ``parent`` and ``name``, never null), the ``*_raw`` fields are base64."""
    lines = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert lines[0] == COLUMNS, lines[0]
    rows = []
    for values in lines[1:]:
        row: dict = dict(zip(COLUMNS, values, strict=True))
        for c, v in row.items():
            if c in _INTS:
                row[c] = int(v) if v else None
            elif c in _NULLABLE_TEXT or c in RAW:
                row[c] = v or None
        rows.append(_from_base64(row))
    return rows


def read_dataset(out: Path) -> tuple[dict, list[dict]]:
    """A dataset's manifest and the rows of its partitions (Parquet, or NDJSON), checking that
    the partitions on disk are the manifest's (beside it, only the checkpoint) and hold the
    documented columns."""
    manifest = json.loads((out / "_walk.json").read_text())
    checkpoint = ["_checkpoint.json"] if (out / "_checkpoint.json").exists() else []
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "_walk.json", *checkpoint])
    rows: list[dict] = []
    for name in manifest["files"]:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(out / name)
            assert table.column_names == COLUMNS
            rows += table.to_pylist()
        else:
            assert name.endswith(".ndjson"), name
            rows += read_ndjson((out / name).read_bytes())
    return manifest, rows
