"""What diskover users ask of an index, asked of a walk's output with DuckDB.

Each query reads every record of a dataset (every partition, ``part-*.parquet`` or
``part-*.ndjson``) or of a ``walk -o FILE`` output (NDJSON or CSV): the same columns
(:mod:`diskover_agent.schema`) with the same types; ``{data}`` in the SQL stands for that
relation.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

from . import checkpoint
from .dataset import MANIFEST
from .schema import COLUMNS, DUCKDB_TYPES

QUERIES: dict[str, str] = {
    # files, directories, apparent and allocated bytes, unreadable directories
    "totals": """
        SELECT count(*) FILTER (WHERE type = 'file') AS files,
               count(*) FILTER (WHERE type = 'dir') AS dirs,
               coalesce(sum(size) FILTER (WHERE type = 'file'), 0) AS bytes,
               coalesce(sum(blocks * 512) FILTER (WHERE type = 'file'), 0) AS allocated,
               count(*) FILTER (WHERE type = 'error') AS errors
        FROM {data}""",
    # directories holding the most bytes in files directly inside them
    "largest_dirs": """
        SELECT parent AS directory, count(*) AS files, sum(size) AS bytes
        FROM {data} WHERE type = 'file'
        GROUP BY parent ORDER BY bytes DESC, directory LIMIT {limit}""",
    # files not modified for the longest time
    "oldest_files": """
        SELECT parent || '/' || name AS path, size, make_timestamp(mtime_ns // 1000) AS mtime
        FROM {data} WHERE type = 'file'
        ORDER BY mtime_ns, path LIMIT {limit}""",
    # per-owner totals
    "owners": """
        SELECT uid, count(*) AS files, sum(size) AS bytes
        FROM {data} WHERE type = 'file'
        GROUP BY uid ORDER BY bytes DESC, uid LIMIT {limit}""",
}


#: The first line of a CSV output.
CSV_HEADER = ",".join(COLUMNS).encode()


def status(dataset: str) -> Optional[dict[str, Any]]:
    """What the dataset says of itself: the checkpoint's summary (a walk by one process), else
    the manifest's (``complete``, ``errors``: directories that failed, ``files``: its
    committed partitions...); None when it has neither (or is a file ``walk -o FILE`` wrote)."""
    try:
        saved = checkpoint.load(dataset)
    except (ValueError, OSError):
        saved = None
    if saved is not None:
        return {**saved.summary, "complete": saved.complete}
    try:
        with open(os.path.join(dataset, MANIFEST)) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return None


def relation(output: str) -> str:
    """The DuckDB table expression that reads every record of a walk's output: a dataset
    directory (the partitions its checkpoint commits, when it has one: a partition an
    interrupted walk did not commit is not read; else every ``part-*`` file) or a file
    ``walk -o FILE`` wrote (NDJSON, or CSV: told apart by its first line, the CSV header)."""
    if os.path.isdir(output):
        found = status(output)
        if found is not None and found.get("files"):
            paths = "[" + ", ".join(f"'{_quote(os.path.join(output, name))}'" for name in found["files"]) + "]"
            if found["files"][0].endswith(".ndjson"):
                return _read_json(paths)
            return f"read_parquet({paths})"
        if glob.glob(os.path.join(output, "part-*.parquet")):
            return f"read_parquet('{_quote(os.path.join(output, 'part-*.parquet'))}')"
        if glob.glob(os.path.join(output, "part-*.ndjson")):
            return _read_json(f"'{_quote(os.path.join(output, 'part-*.ndjson'))}'")
        raise FileNotFoundError(f"no partitions (part-*.parquet or part-*.ndjson) in {output}")
    with open(output, "rb") as f:  # FileNotFoundError, IsADirectoryError... as they are
        first = f.read(len(CSV_HEADER) + 1)
    if first == CSV_HEADER + b"\n":
        # an empty name is '', not null, as NDJSON and Parquet have it (DuckDB's own force_not_null
        # goes wrong when a query reads only some of the columns)
        return ("(SELECT * REPLACE (coalesce(parent, '') AS parent, coalesce(name, '') AS name) FROM "
                f"read_csv('{_quote(output)}', header=true, auto_detect=false, delim=',', quote='\"', "
                f"escape='\"', columns={_columns()}))")
    return _read_json(f"'{_quote(output)}'")


def _read_json(files: str) -> str:
    """``files``: a quoted path or pattern, or a DuckDB list of them."""
    return f"read_json({files}, format='newline_delimited', columns={_columns()})"


def _columns() -> str:
    """The columns of the text formats, with their DuckDB types (binary ones are base64 text)."""
    return "{" + ", ".join(f"'{c}': '{t}'" for c, t in DUCKDB_TYPES.items()) + "}"


def _quote(text: str) -> str:
    return text.replace("'", "''")


def run(dataset: str, name: str, limit: int = 10) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one of :data:`QUERIES` on a walk's output (:func:`relation`); returns (column names,
    rows). ``ValueError`` when DuckDB cannot read it as one."""
    import duckdb

    sql = QUERIES[name].format(data=relation(dataset), limit=int(limit))
    con = duckdb.connect()
    try:
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as exc:  # not a walk's output: a file of something else
        raise ValueError(f"{dataset}: not a walk's output ({str(exc).splitlines()[0]})") from None
    finally:
        con.close()
