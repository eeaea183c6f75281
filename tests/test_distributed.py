"""The walk as Dask tasks on a local cluster of worker processes, written as Parquet."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import REMOTE, vary_owners_and_times

pytest.importorskip("distributed")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")

from diskover_agent import report  # noqa: E402
from diskover_agent.distributed import dask_walk, local_cluster  # noqa: E402

STAT_COLUMNS = {"mode": "st_mode", "ino": "st_ino", "dev": "st_dev", "nlink": "st_nlink", "uid": "st_uid",
                "gid": "st_gid", "size": "st_size", "blocks": "st_blocks", "atime_ns": "st_atime_ns",
                "mtime_ns": "st_mtime_ns", "ctime_ns": "st_ctime_ns"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("dask") / "share"
    for i in range(40):
        for j in range(6):
            d = top / f"p{i}" / f"q{j}"
            d.mkdir(parents=True)
            for k in range(12):
                (d / f"f{k}").write_bytes(b"x" * (i * 7 + k))
    os.mkdir(os.fsencode(top / "p0") + b"/bad\xff")
    os.symlink("p1", top / "link")
    vary_owners_and_times(top)
    os.utime(top / "p3" / "q2" / "f5", ns=(10**9, 10**9))  # the oldest file
    return top


@pytest.fixture(scope="module")
def cluster():
    client = local_cluster(2, threads_per_worker=2)
    yield client
    client.close()
    client.cluster.close()


def expected_rows(top: Path) -> dict[tuple[bytes, bytes], os.stat_result]:
    local = os.fsencode(top)
    out = {}
    for root, dirs, files in os.walk(local):
        remote = REMOTE.encode() + root[len(local):]
        for name in dirs + files:
            out[(remote, name)] = os.lstat(os.path.join(root, name))
    return out


def read_dataset(output: Path) -> list[dict]:
    files = sorted(output.glob("part-*.parquet"))
    assert files
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def check_dataset(output: Path, top: Path) -> None:
    rows = read_dataset(output)
    want = expected_rows(top)
    got = {}
    for row in rows:
        assert row["type"] != "error", row
        parent = row["parent_raw"] if row["parent_raw"] is not None else row["parent"].encode()
        name = row["name_raw"] if row["name_raw"] is not None else row["name"].encode()
        assert (parent, name) not in got, f"written twice: {parent!r} {name!r}"
        got[(parent, name)] = row
    assert got.keys() == want.keys()
    for key, row in got.items():
        st = want[key]
        for col, attr in STAT_COLUMNS.items():
            if col == "atime_ns" and row["type"] != "file":
                continue  # listing a directory, or reading a link, moves its atime
            assert row[col] == getattr(st, attr), (key, col)
    assert any(row["name_raw"] == b"bad\xff" for row in rows)
    assert {r["type"] for r in rows} == {"dir", "file", "symlink"}


def start_agents(start_agent, top: Path, n: int = 3):
    return [start_agent([(REMOTE, str(top))]) for _ in range(n)]


def test_dataset_is_exactly_the_tree(tree, cluster, start_agent, tmp_path):
    agents = start_agents(start_agent, tree)
    out = tmp_path / "ds"
    summary = dask_walk(REMOTE, [a.hostspec for a in agents], str(out), client=cluster, part_entries=500)
    assert summary.tasks > 4  # the walk really was split
    assert summary.entries == len(expected_rows(tree))
    check_dataset(out, tree)
    assert (out / "_walk.json").exists()


def test_ndjson_partitions(tree, cluster, start_agent, tmp_path):
    agents = start_agents(start_agent, tree, 1)
    out = tmp_path / "ds"
    summary = dask_walk(REMOTE, [agents[0].hostspec], str(out), client=cluster, fmt="ndjson", part_entries=2000)
    lines = sum(len(f.read_bytes().splitlines()) for f in out.glob("part-*.ndjson"))
    assert lines == summary.entries == len(expected_rows(tree))
    columns, rows = report.run(str(out), "totals")
    assert dict(zip(columns, rows[0], strict=True))["files"] == sum(
        1 for st in expected_rows(tree).values() if st.st_mode & 0o170000 == 0o100000)


def test_worker_and_agent_killed_mid_walk(tree, cluster, start_agent, tmp_path):
    agents = start_agents(start_agent, tree)
    out = tmp_path / "ds"
    worker_pids = cluster.run(os.getpid)
    killed = []

    def progress(summary, result):
        if not killed:  # after the first task: the frontier is out on both workers
            os.kill(next(iter(worker_pids.values())), signal.SIGKILL)
            killed.append("worker")
        elif len(killed) == 1:  # the next task to finish, on whichever worker survived
            agents[1].kill()
            killed.append("agent")

    # 2 threads per task and 150 entries per part: a task lists at most ~2 x 150 entries
    # (each request's budget is capped by what the task has left), so the ~3,200-entry
    # tree takes at least 10 tasks and both kills happen while most of it is unwalked.
    summary = dask_walk(REMOTE, [a.hostspec for a in agents], str(out), client=cluster, part_entries=150,
                        threads=2, progress=progress, retry_for=20)
    assert killed == ["worker", "agent"]
    assert summary.tasks >= 10
    assert summary.entries == len(expected_rows(tree))
    check_dataset(out, tree)
    # no partition of a lost run is left behind
    assert sorted(p.name for p in out.glob("part-*")) == sorted(summary.files)


def test_report_queries_match_os_walk(tree, cluster, start_agent, tmp_path):
    agents = start_agents(start_agent, tree, 2)
    out = tmp_path / "ds"
    dask_walk(REMOTE, [a.hostspec for a in agents], str(out), client=cluster, part_entries=1000)
    want = expected_rows(tree)
    files = {k: st for k, st in want.items() if st.st_mode & 0o170000 == 0o100000}
    cols, rows = report.run(str(out), "totals")
    totals = dict(zip(cols, rows[0], strict=True))
    assert totals == {"files": len(files), "dirs": sum(1 for st in want.values() if st.st_mode & 0o170000 == 0o040000),
                      "bytes": sum(st.st_size for st in files.values()),
                      "allocated": sum(st.st_blocks * 512 for st in files.values()), "errors": 0}
    per_dir: dict[bytes, int] = {}
    for (parent, _), st in files.items():
        per_dir[parent] = per_dir.get(parent, 0) + st.st_size
    _, rows = report.run(str(out), "largest_dirs", limit=3)
    top3 = sorted(per_dir.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(r[0].encode(), r[2]) for r in rows] == top3
    _, rows = report.run(str(out), "oldest_files", limit=1)
    assert rows[0][0] == REMOTE + "/p3/q2/f5"
    _, rows = report.run(str(out), "owners")
    by_uid: dict[int, int] = {}
    for st in files.values():
        by_uid[st.st_uid] = by_uid.get(st.st_uid, 0) + st.st_size
    assert {r[0]: r[2] for r in rows} == by_uid


def test_cli_walk_dask_and_report(tree, start_agent, tmp_path):
    """``diskover-agent walk --dask local:2 -o DIR --format parquet``, then ``report``."""
    import subprocess
    import sys

    agents = start_agents(start_agent, tree, 2)
    cli = str(Path(sys.executable).with_name("diskover-agent"))
    out = tmp_path / "ds"
    proc = subprocess.run([cli, "--hosts", ",".join(a.hostspec for a in agents), "walk", "--dask", "local:2",
                           "-o", str(out), "--format", "parquet", REMOTE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(expected_rows(tree)):,} entries" in proc.stderr
    check_dataset(out, tree)
    proc = subprocess.run([cli, "report", str(out), "totals"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, values = proc.stdout.splitlines()[1:3]
    totals = dict(zip(header.split("\t"), map(int, values.split("\t")), strict=True))
    assert totals["files"] == sum(1 for st in expected_rows(tree).values() if st.st_mode & 0o170000 == 0o100000)
    bad = subprocess.run([cli, "--hosts", agents[0].hostspec, "walk", "--dask", "local:1", REMOTE],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "-o DIR" in bad.stderr
