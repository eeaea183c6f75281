"""parallel_walk through real agents yields exactly what os.walk yields locally."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import psutil
import pytest

import diskover_agent
from diskover_agent import AgentConnectionError, parallel_walk, parallel_walk_entries

from conftest import (
    IS_ROOT,
    OWNERS,
    REMOTE,
    as_bytes_rows,
    assert_read_loop,
    assert_same_stat,
    atime_is_stable,
    reference_walk,
    settle_atimes,
)


def walk_collect(top, **kwargs):
    errors = []
    rows = list(parallel_walk(top, onerror=errors.append, **kwargs))
    return rows, errors


def error_set(errors):
    return sorted((e.errno, os.fsencode(e.filename)) for e in errors)


MODES = ["subtree", "listdir"]


@pytest.mark.parametrize(("mode", "read_loop"), [("subtree", "compiled"), ("subtree", "pure"), ("listdir", "pure")],
                         indirect=["read_loop"])
def test_awkward_tree_through_one_agent(awkward_tree, start_agent, mode, read_loop):
    """(Listings of one directory do not use the walk's read loop: one case for them.)"""
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    assert_read_loop(agent, read_loop)
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk_collect(REMOTE, hosts=[agent.hostspec], workers=8, mode=mode)
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)  # nothing yielded twice
    assert error_set(errors) == expected_errors
    # the tree really holds what the test is about
    assert {e[0] for e in expected_errors} == {13}
    assert any(b"\xff" in r[0] for r in expected)
    for e in errors:
        assert isinstance(e, PermissionError) and isinstance(e.filename, str)


def test_bytes_top_yields_bytes(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, _ = reference_walk(awkward_tree)
    rows = list(parallel_walk(REMOTE.encode(), hosts=[agent.hostspec]))
    assert all(isinstance(r, bytes) and all(isinstance(n, bytes) for n in d + f) for r, d, f in rows)
    assert {(r, tuple(sorted(d)), tuple(sorted(f))) for r, d, f in rows} == expected


def test_names_round_trip_through_fsencode(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    c = diskover_agent.AgentConnection(hosts=[agent.hostspec])
    _, dirs, files = c.listdir(REMOTE)
    local = os.listdir(os.fsencode(awkward_tree))
    assert sorted(os.fsencode(n) for n in dirs + files) == sorted(local)
    assert b"bad\xff\xfename" in {os.fsencode(n) for n in dirs}


@pytest.mark.parametrize("mode", MODES)
def test_three_agents_spread_and_exact(awkward_tree, start_agent, mode):
    agents = [start_agent([(REMOTE, str(awkward_tree))], nocaps=True) for _ in range(3)]
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk_collect(REMOTE, hosts=[a.hostspec for a in agents], workers=6, mode=mode)
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)
    assert error_set(errors) == expected_errors


def test_subdirectory_top_and_trailing_slash(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    got = list(parallel_walk(REMOTE + "/deep/", hosts=[agent.hostspec]))
    want = list(os.walk(str(awkward_tree / "deep") + "/"))
    assert [r.replace(str(awkward_tree), REMOTE) for r, _, _ in sorted(want)] == sorted(r for r, _, _ in got)


def check_entries_against_lstat(entries, local_of, top: bytes, before: dict) -> dict:
    """Each entry's stat is the node's ``lstat``, field for field (atime where nothing
    moved it: the file's, or one the walk read that was the same before and after);
    the owners and times the checks saw, to show they could tell fields apart."""
    after = settle_atimes(os.fsdecode(top))
    seen = {"uids": set(), "gids": set(), "atime_checked": 0, "files": 0, "apart": 0}
    for entry, local in ((e, local_of(e)) for e in entries):
        st = os.lstat(local)
        stable = atime_is_stable(st) or before[local].st_atime_ns == after[local].st_atime_ns
        assert_same_stat(entry.stat(follow_symlinks=False), st, local, atime=stable)
        seen["uids"].add(st.st_uid)
        seen["gids"].add(st.st_gid)
        seen["atime_checked"] += stable
        seen["files"] += stat.S_ISREG(st.st_mode)
        seen["apart"] += st.st_uid != st.st_gid and st.st_atime_ns != st.st_mtime_ns
        assert entry.inode() == st.st_ino
        if entry.is_symlink() and os.path.exists(local):
            real = os.path.realpath(local)
            if real == top or real.startswith(top + b"/"):
                assert_same_stat(entry.stat(), os.stat(local), local, atime=atime_is_stable(os.stat(local)))
            else:  # the agent tells what kind a link out of the export is, not its stat
                with pytest.raises(PermissionError):
                    entry.stat()
    return seen


def assert_fields_told_apart(seen: dict, nentries: int) -> None:
    """The tree's owners and times differ, so a swapped field could not have passed."""
    if IS_ROOT:
        assert seen["uids"] >= {u for u, _ in OWNERS} and seen["gids"] >= {g for _, g in OWNERS}
        assert not seen["uids"] & seen["gids"]
    assert seen["apart"] == nentries
    assert seen["atime_checked"] >= seen["files"] >= 4


def test_walk_entries_carry_exact_lstat(awkward_tree, start_agent, read_loop):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    assert_read_loop(agent, read_loop)
    top = os.fsencode(awkward_tree)
    before = settle_atimes(awkward_tree)
    entries = []
    for root, dirs, files in parallel_walk_entries(REMOTE, hosts=[agent.hostspec], workers=4):
        for entry in dirs + files:
            assert entry.path == os.path.join(root, entry.name)
            entries.append(entry)

    def local_of(entry) -> bytes:
        return os.fsencode(entry.path).replace(REMOTE.encode(), top, 1)

    for entry in entries:
        local = local_of(entry)
        assert entry.is_symlink() == os.path.islink(local)
        assert entry.is_dir() == os.path.isdir(local)
        assert entry.is_dir(follow_symlinks=False) == (os.path.isdir(local) and not os.path.islink(local))
        assert entry.is_file() == os.path.isfile(local)
    seen = check_entries_against_lstat(entries, local_of, top, before)
    assert len(entries) > 40
    assert_fields_told_apart(seen, len(entries))


def test_scandir_entries_carry_exact_lstat(awkward_tree, start_agent):
    """``AgentConnection.scandir``: each entry's ``stat()`` is the node's ``lstat``."""
    agent = start_agent([(REMOTE, str(awkward_tree))])
    top = os.fsencode(awkward_tree)
    before = settle_atimes(awkward_tree)
    conn = diskover_agent.AgentConnection([agent.hostspec])
    entries = list(conn.scandir(REMOTE + "/plain")) + list(conn.scandir(REMOTE))
    conn.close()
    seen = check_entries_against_lstat(entries, lambda e: os.fsencode(e.path).replace(REMOTE.encode(), top, 1),
                                       top, before)
    assert_fields_told_apart(seen, len(entries))


def open_fds() -> set[int]:
    """This process's open descriptors (not the one that listed them, closed by then)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def test_break_stops_threads_and_sockets(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    before_threads = set(threading.enumerate())
    proc = psutil.Process()
    before_fds = open_fds()
    gen = parallel_walk(REMOTE, hosts=[agent.hostspec], workers=16)
    for _ in gen:
        break
    gen.close()
    # Nothing the walk opened is left; what earlier tests left may have ended meanwhile.
    assert set(threading.enumerate()) - before_threads == set()
    assert open_fds() - before_fds == set()
    assert not [c for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr[1] == agent.port]


@pytest.mark.parametrize("mode", MODES)
def test_one_of_three_agents_killed_mid_walk(tmp_path, start_agent, mode):
    # A tree big enough that the walk is still running when an agent dies.
    top = tmp_path / "wide"
    for i in range(150):
        d = top / f"d{i:03}"
        for j in range(6):
            (d / f"s{j}").mkdir(parents=True)
            (d / f"s{j}" / "f").touch()
    agents = [start_agent([(REMOTE, str(top))]) for _ in range(3)]
    expected, _ = reference_walk(top, nocaps=False)
    rows, errors = [], []
    for i, row in enumerate(parallel_walk(REMOTE, hosts=[a.hostspec for a in agents], workers=6,
                                          onerror=errors.append, mode=mode, max_budget=64)):
        rows.append(row)
        if i == 100:
            agents[1].kill()
    assert errors == []
    assert len(rows) == len(expected)
    assert as_bytes_rows(rows) == expected


def test_all_agents_down_raises_within_seconds(tmp_path):
    ports = []
    for _ in range(3):  # ports that were free a moment ago: nobody listens there
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    start = time.monotonic()
    with pytest.raises(AgentConnectionError):
        list(parallel_walk(REMOTE, hosts=[f"127.0.0.1:{p}" for p in ports], retry_for=2.0))
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_agents_die_mid_walk_raises(tmp_path, start_agent, mode):
    top = tmp_path / "t"
    for i in range(400):  # more than the first subtree request's budget
        (top / f"d{i}" / "x").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(top))])
    gen = parallel_walk(REMOTE, hosts=[agent.hostspec], workers=2, retry_for=1.5, mode=mode)
    next(gen)
    agent.kill()
    start = time.monotonic()
    with pytest.raises(AgentConnectionError):
        for _ in gen:
            pass
    assert time.monotonic() - start < 10


def test_top_errors_go_to_onerror(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    for path, exc_type in ((REMOTE + "/nope", FileNotFoundError), (REMOTE + "/top-file", NotADirectoryError),
                           ("/etc", PermissionError), ("/mnt/isilon2", PermissionError)):
        rows, errors = walk_collect(path, hosts=[agent.hostspec])
        local = []
        if path.startswith(REMOTE + "/"):
            assert list(os.walk(str(awkward_tree) + path[len(REMOTE):], onerror=local.append)) == []
        assert rows == []
        assert len(errors) == 1 and isinstance(errors[0], exc_type)
        assert errors[0].filename == path
        if local:
            assert type(local[0]) is type(errors[0]) and local[0].errno == errors[0].errno


@pytest.mark.parametrize("mode", MODES)
def test_pruning_dirs_in_loop_body(awkward_tree, start_agent, mode):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    got = []
    for root, dirs, files in parallel_walk(REMOTE, hosts=[agent.hostspec], mode=mode):
        dirs[:] = [d for d in dirs if d not in ("deep", "plain")]
        got.append((root, sorted(dirs), sorted(files)))
    want = []
    for root, dirs, files in os.walk(str(awkward_tree)):
        dirs[:] = [d for d in dirs if d not in ("deep", "plain")]
        want.append((root.replace(str(awkward_tree), REMOTE, 1), sorted(dirs), sorted(files)))
    assert as_bytes_rows(got) == as_bytes_rows(want)
    assert not any("/deep" in r for r, _, _ in got)


def test_small_budgets_many_requests_exact(tmp_path, start_agent):
    """Every subtree answer ends early with a frontier: still exact, no directory twice."""
    top = tmp_path / "t"
    for i in range(30):
        for j in range(5):
            (top / f"a{i}" / f"b{j}" / "c").mkdir(parents=True)
            (top / f"a{i}" / f"b{j}" / "f").touch()
    agents = [start_agent([(REMOTE, str(top))]) for _ in range(2)]
    expected, _ = reference_walk(top, nocaps=False)
    walker = diskover_agent.walk.Walker(REMOTE, [a.hostspec for a in agents], workers=4, max_budget=8)
    roots = [d.path for d in walker.dirs()]
    assert len(roots) == len(set(roots)) == len(expected)
    assert set(roots) == {r for r, _, _ in expected}
    served = walker.served()
    assert sum(h["requests"] for h in served.values()) > 20  # the budget really cut the walk
    assert all(h["dirs"] > 0 for h in served.values())  # both agents took part


@pytest.mark.parametrize("mode", MODES)
def test_walk_in_parts_by_entry_budget(tmp_path, start_agent, mode):
    """A walk stopped by max_entries hands back its frontier; walking the frontiers in
    turn lists every directory exactly once (what a distributed walk is made of)."""
    top = tmp_path / "t"
    for i in range(12):
        for j in range(8):
            (top / f"a{i}" / f"b{j}").mkdir(parents=True)
            (top / f"a{i}" / f"b{j}" / "f").touch()
    agent = start_agent([(REMOTE, str(top))])
    expected, _ = reference_walk(top, nocaps=False)
    seen: list[bytes] = []
    todo = [REMOTE.encode()]
    parts = 0
    while todo:
        walker = diskover_agent.walk.Walker(REMOTE, [agent.hostspec], roots=todo, workers=3, mode=mode,
                                           max_entries=40, max_budget=16)
        seen += [d.path for d in walker.dirs()]
        todo = walker.frontier()
        parts += 1
    assert parts > 3
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == {r for r, _, _ in expected}


def test_slow_consumer_bounds_the_backlog(tmp_path, start_agent):
    """When the loop body is slower than the agents, the walk stops asking for more once
    ``max_backlog`` entries wait for it, instead of holding the whole tree in memory."""
    top = tmp_path / "t"
    for i in range(60):
        d = top / f"d{i}"
        d.mkdir(parents=True)
        for j in range(50):
            (d / f"f{j}").touch()
    agent = start_agent([(REMOTE, str(top))])
    walker = diskover_agent.walk.Walker(REMOTE, [agent.hostspec], workers=4, mode="listdir", max_backlog=200)
    peak = 0
    seen = 0
    for d in walker.dirs():
        seen += len(d.entries)
        deadline = time.monotonic() + 0.02  # a slow consumer
        while time.monotonic() < deadline:
            peak = max(peak, walker._backlog)
            time.sleep(0.002)
    assert seen == 60 + 60 * 50
    # at most the limit, plus what the requests already in flight bring (4 directories of 51)
    assert peak <= 200 + 4 * 51, peak
