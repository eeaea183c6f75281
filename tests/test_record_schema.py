"""One record schema for every output: the same tree walked through a real agent into each
output ``walk`` writes (NDJSON and CSV to a file, a Parquet dataset by this process, NDJSON
and Parquet datasets by Dask tasks) gives, read back with json, csv, pyarrow and DuckDB, the
same columns with the same values for every entry and every directory that failed, equal to
``os.walk`` + ``lstat`` of the local tree (exact path bytes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from diskover_agent import report
from test_client_cli import cli
from walk_records import COLUMNS, expected_row, key, read_csv, read_dataset, read_ndjson, text

from conftest import HAVE_SETPRIV, IS_ROOT, NO_SETPRIV, REMOTE, reference_walk

RB = REMOTE.encode()


def expected(local_top: Path) -> dict[tuple[bytes, bytes], dict]:
    """Every row by ``(parent, name)`` (``(directory, b"")`` for a directory that failed): what
    ``os.walk`` run as the agent runs (no DAC capabilities) lists, with ``lstat``'s fields; the
    entries of ``noexec`` (readable, not searchable) without them."""
    walked, failed = reference_walk(local_top)
    assert failed and any(b"\n" in n for _, d, f in walked for n in d + f), "the tree is not awkward enough"
    lb = os.fsencode(local_top)
    out = {}
    for root, dirs, files in walked:
        for name in dirs + files:
            local = lb + root[len(RB):] + b"/" + name
            out[(root, name)] = expected_row(root, name, local, with_stat=root != RB + b"/noexec")
    for num, path in failed:
        row = dict.fromkeys(COLUMNS)
        row.update(zip(("parent", "parent_raw"), text(path), strict=True))
        row.update(name="", type="error", error_errno=num, error_code=errno.errorcode[num],
                   error_message=os.strerror(num))
        out[(path, b"")] = row
    return out


def by_key(rows: list[dict]) -> dict[tuple[bytes, bytes], dict]:
    out = {key(row): row for row in rows}
    assert len(out) == len(rows), "a row written twice"
    return out


@pytest.mark.skipif(IS_ROOT and not HAVE_SETPRIV, reason=NO_SETPRIV)
def test_every_output_has_the_same_records(awkward_tree, start_agent, tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("distributed")
    duckdb = pytest.importorskip("duckdb")
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    outputs = {  # label: (walk's options, where it writes, how to read it back)
        "walk -o FILE": ([], "walk.ndjson", lambda p: read_ndjson(p.read_bytes())),
        "walk --format csv -o FILE": (["--format", "csv"], "walk.csv", lambda p: read_csv(p.read_bytes())),
        "walk --format parquet -o DIR": (["--format", "parquet"], "pq", lambda p: read_dataset(p)[1]),
        "walk --dask local:2 --format ndjson -o DIR": (["--dask", "local:2", "--format", "ndjson"], "dask-nd",
                                                      lambda p: read_dataset(p)[1]),
        "walk --dask local:2 -o DIR": (["--dask", "local:2"], "dask-pq", lambda p: read_dataset(p)[1]),
    }
    got = {}
    for label, (options, name, read) in outputs.items():
        r = cli("--hosts", agent.hostspec, "-q", "walk", REMOTE, *options, "-o", str(tmp_path / name), timeout=120)
        assert r.returncode == 1, (label, r.stderr)  # directories failed
        got[label] = by_key(read(tmp_path / name))
    want = expected(awkward_tree)
    for label, rows in got.items():
        assert rows.keys() == want.keys(), label
        for k, row in want.items():
            assert rows[k] == row, (label, k)
    # DuckDB reads each output (report's relation) with the same types: the same answer to the same query
    query = ("SELECT type, count(*), sum(size), max(ino), min(mtime_ns), max(error_errno), sum(length(name)), "
             "count(name_raw), max(target_type) FROM {} GROUP BY type ORDER BY type")
    answers = [duckdb.sql(query.format(report.relation(str(tmp_path / name)))).fetchall()
               for _, name, _ in outputs.values()]
    assert len(answers[0]) == len({row["type"] for row in want.values()})
    assert all(a == answers[0] for a in answers), answers
    # and report's queries
    totals = [cli("report", str(tmp_path / name), "totals") for _, name, _ in outputs.values()]
    assert all(t.returncode == 0 and t.stdout == totals[0].stdout for t in totals), totals
    files = [w for w in want.values() if w["type"] == "file"]
    assert totals[0].stdout.decode().splitlines()[1:] == ["files\tdirs\tbytes\tallocated\terrors", "\t".join(map(str, (
        len(files), sum(w["type"] == "dir" for w in want.values()), sum(w["size"] for w in files),
        sum(w["blocks"] * 512 for w in files), sum(w["type"] == "error" for w in want.values()))))]
