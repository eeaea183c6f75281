"""``diskover-agent walk --format parquet -o DIR`` without Dask: the walk's dataset written by
the command itself, run as the installed console script against real agents on loopback, and
read back with pyarrow (and DuckDB) to compare every column of every row with ``os.walk`` +
``os.lstat`` of the local tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from test_client_cli import cli, hosts_of, readable_tree
from walk_records import STAT, expected_rows, key, read_dataset

from conftest import HAVE_SETPRIV, IS_ROOT, NO_SETPRIV, REMOTE, reference_walk

pq = pytest.importorskip("pyarrow.parquet")

from diskover_agent.dataset import DatasetWriter  # noqa: E402
from diskover_agent.walk import Walker  # noqa: E402

RB = REMOTE.encode()


def read_rows(out: Path) -> tuple[dict, dict[tuple[bytes, bytes], dict], list[dict]]:
    """The manifest, the entry rows by (parent bytes, name bytes), and the error rows; checks
    that no entry is written twice."""
    manifest, all_rows = read_dataset(out)
    rows, errors = {}, []
    for row in all_rows:
        if row["type"] == "error":
            errors.append(row)
            continue
        assert key(row) not in rows, f"written twice: {key(row)}"
        rows[key(row)] = row
    return manifest, rows, errors


def test_walk_parquet_dataset_equals_local_walk(tmp_path, start_agent):
    top = readable_tree(tmp_path)
    a, b = start_agent([(REMOTE, str(top))]), start_agent([(REMOTE, str(top))])
    out = tmp_path / "ds"
    r = cli("--hosts", hosts_of(a, b), "walk", "--format", "parquet", "-o", str(out), REMOTE)
    assert r.returncode == 0, r.stderr
    manifest, got, errors = read_rows(out)
    want = expected_rows(top, RB)
    assert errors == []
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    assert got[(RB + b"/bad\xff\xfename", b"inner\xff")]["parent"] == f"{REMOTE}/bad\ufffd\ufffdname"
    assert got[(RB, b"link-to-dir")]["target_type"] == "dir"
    files = [w for w in want.values() if w["type"] == "file"]
    assert {k: manifest[k] for k in ("top", "format", "tasks", "dirs", "entries", "bytes", "errors")} == {
        "top": REMOTE, "format": "parquet", "tasks": 0, "dirs": 1 + sum(w["type"] == "dir" for w in want.values()),
        "entries": len(want), "bytes": sum(w["size"] for w in files), "errors": 0}
    # the same summary line as the NDJSON walk
    assert r.stderr.startswith(f"diskover-agent: {manifest['dirs']} directories, {len(want):,} entries, ".encode())
    # report reads it as it reads a Dask walk's dataset
    pytest.importorskip("duckdb")
    rep = cli("report", str(out), "totals")
    assert rep.returncode == 0, rep.stderr
    header, values = rep.stdout.decode().splitlines()[1:3]
    assert dict(zip(header.split("\t"), map(int, values.split("\t")), strict=True)) == {
        "files": len(files), "dirs": sum(w["type"] == "dir" for w in want.values()),
        "bytes": sum(w["size"] for w in files), "allocated": sum(w["blocks"] * 512 for w in files), "errors": 0}


@pytest.mark.skipif(IS_ROOT and not HAVE_SETPRIV, reason=NO_SETPRIV)
def test_walk_parquet_unreadable_directories_are_error_rows(awkward_tree, start_agent, tmp_path):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    out = tmp_path / "ds"
    r = cli("--hosts", agent.hostspec, "walk", "--format", "parquet", "-o", str(out), REMOTE)
    assert r.returncode == 1, r.stderr
    walked, failed = reference_walk(awkward_tree)
    assert failed, "the tree has unreadable directories"
    manifest, got, errors = read_rows(out)
    assert got.keys() == {(root, n) for root, dirs, files in walked for n in dirs + files}
    assert sorted((e["error_errno"], e["parent_raw"] or e["parent"].encode()) for e in errors) == sorted(
        (num, path) for num, path in failed)
    for e in errors:
        assert (e["name"], e["error_code"], e["error_message"]) == (
            "", errno.errorcode[e["error_errno"]], os.strerror(e["error_errno"]))
        assert all(e[c] is None for c in ("name_raw", "target_type", *STAT))
    assert manifest["errors"] == len(failed) and manifest["complete"]
    # the summary line and report say the dataset is complete, and how many directories failed
    assert r.stderr.splitlines()[-1].endswith(
        f"-> {out}: complete, {manifest['entries']:,} entries in all, {len(failed)} directories failed".encode())
    pytest.importorskip("duckdb")
    rep = cli("report", str(out), "totals")
    assert rep.stderr.decode() == (f"diskover-agent: {out}: complete, {manifest['entries']:,} entries, "
                                   f"{len(failed)} directories failed\n")
    # entries of a directory that can be read but not searched are listed without their stat
    child = got[(RB + b"/noexec", b"child")]
    assert child["type"] == "dir" and child["size"] is None and child["mtime_ns"] is None


def test_dataset_writer_cuts_partitions_and_keeps_every_row_once(tmp_path, start_agent):
    """The partitions of a walk written by one process: every row once, across many partitions."""
    top = readable_tree(tmp_path)
    agent = start_agent([(REMOTE, str(top))])
    out = tmp_path / "ds"
    writer = DatasetWriter(str(out), REMOTE, part_entries=5)
    walker = Walker(RB, [agent.hostspec], stat=True)
    listed = 0
    for d in walker.dirs():
        assert d.error is None
        writer.add_dir(d.path, d.entries)
        listed += len(d.entries)
    summary = writer.close(1.5)
    manifest, got, errors = read_rows(out)
    want = expected_rows(top, RB)
    assert got == want and errors == []
    assert len(summary.files) > 3
    assert manifest["entries"] == listed == len(want) and manifest["seconds"] == 1.5
    sizes = [pq.read_metadata(out / f).num_rows for f in summary.files]
    assert all(n >= 5 for n in sizes[:-1]) and sum(sizes) == len(want)


def test_dataset_writer_empty_walk_has_one_empty_partition(tmp_path):
    out = tmp_path / "ds"
    summary = DatasetWriter(str(out), REMOTE).close(0.0)
    manifest, got, errors = read_rows(out)
    assert len(summary.files) == 1 and got == {} and errors == [] and manifest["entries"] == 0


def test_walk_parquet_usage_errors(tmp_path, start_agent):
    top = readable_tree(tmp_path)
    agent = start_agent([(REMOTE, str(top))])
    r = cli("--hosts", agent.hostspec, "walk", "--format", "parquet", REMOTE)
    assert r.returncode == 2 and b"give -o DIR" in r.stderr and r.stdout == b""
    out = tmp_path / "ds"
    assert cli("--hosts", agent.hostspec, "-q", "walk", "--format", "parquet", "-o", str(out), REMOTE).returncode == 0
    again = cli("--hosts", agent.hostspec, "walk", "--format", "parquet", "-o", str(out), REMOTE)
    assert again.returncode == 2 and b"already holds a walk's dataset: --resume continues" in again.stderr
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    r = cli("--hosts", agent.hostspec, "walk", "--format", "parquet", "-o", str(blocker), REMOTE)
    assert r.returncode == 2 and b"cannot write" in r.stderr


def test_report_reads_walk_files_and_refuses_other_files(tmp_path):
    """``report FILE`` reads what ``walk -o FILE`` writes (an empty walk too); anything else is
    one line and exit 2, no traceback."""
    pytest.importorskip("duckdb")
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    r = cli("report", str(empty), "totals")
    assert (r.returncode, r.stdout) == (0, b"# totals\nfiles\tdirs\tbytes\tallocated\terrors\n0\t0\t0\t0\t0\n")
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"hello\n")
    (tmp_path / "no-partitions").mkdir()
    for path, says in ((junk, b"not a walk's output"), (tmp_path / "nope", b"No such file or directory"),
                       (tmp_path / "no-partitions", b"no partitions")):
        r = cli("report", str(path), "totals")
        assert (r.returncode, r.stdout) == (2, b""), r.stderr
        assert r.stderr.startswith(b"diskover-agent: ") and r.stderr.count(b"\n") == 1 and says in r.stderr, r.stderr
