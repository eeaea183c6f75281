"""What diskover users ask of an index, asked of a walk's dataset with DuckDB.

Each query reads every partition of the dataset (``part-*.parquet`` or
``part-*.ndjson``); ``{data}`` in the SQL stands for that relation.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

from . import checkpoint
from .dataset import MANIFEST

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


def status(dataset: str) -> Optional[dict[str, Any]]:
    """What the dataset says of itself: the checkpoint's summary (a walk by one process), else
    the manifest's (``complete``, ``errors``: directories that failed, ``files``: its
    committed partitions...); None when it has neither."""
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


def relation(dataset: str) -> str:
    """The DuckDB table expression that reads every partition of a dataset directory: those
    its checkpoint commits, when it has one (a partition an interrupted walk did not commit is
    not read), else every ``part-*`` file."""
    found = status(dataset)
    if found is not None and found.get("files"):
        paths = ", ".join(f"'{_quote(os.path.join(dataset, name))}'" for name in found["files"])
        if found["files"][0].endswith(".ndjson"):
            return f"read_json([{paths}], format='newline_delimited')"
        return f"read_parquet([{paths}])"
    if glob.glob(os.path.join(dataset, "part-*.parquet")):
        return f"read_parquet('{_quote(os.path.join(dataset, 'part-*.parquet'))}')"
    if glob.glob(os.path.join(dataset, "part-*.ndjson")):
        return f"read_json('{_quote(os.path.join(dataset, 'part-*.ndjson'))}', format='newline_delimited')"
    raise FileNotFoundError(f"no partitions (part-*.parquet or part-*.ndjson) in {dataset}")


def _quote(text: str) -> str:
    return text.replace("'", "''")


def run(dataset: str, name: str, limit: int = 10) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one of :data:`QUERIES`; returns (column names, rows)."""
    import duckdb

    sql = QUERIES[name].format(data=relation(dataset), limit=int(limit))
    con = duckdb.connect()
    try:
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()
