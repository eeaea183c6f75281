"""Exclusions the agent applies (never reading what they prune), and pruning in the loop body."""

from __future__ import annotations

import fnmatch
import http.client
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from diskover_agent import parallel_walk, parallel_walk_entries

from conftest import IS_ROOT, REMOTE, as_bytes_rows

MODES = ["subtree", "listdir"]


def metric(agent, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", "/_agent/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def local_walk(top: Path, keep_dir, keep_file=lambda root, name: True):
    """os.walk with the same pruning, roots mapped to REMOTE."""
    out = []
    for root, dirs, files in os.walk(str(top)):
        dirs[:] = [d for d in dirs if keep_dir(root, d)]
        files = [f for f in files if keep_file(root, f)]
        out.append((REMOTE + root[len(str(top)):], dirs, files))
    return as_bytes_rows(out)


@pytest.fixture(scope="module")
def snapshot_tree(tmp_path_factory) -> Path:
    """A share with .snapshot subtrees of 50,000 entries in all, one of them holding a
    directory nobody may read: an agent that read it would report an error."""
    top = tmp_path_factory.mktemp("snap") / "share"
    for i in range(20):
        d = top / f"proj{i}" / "src"
        d.mkdir(parents=True)
        for j in range(10):
            (d / f"f{j}.c").touch()
            (d / f"f{j}.tmp").touch()
    made = 0
    for i, where in enumerate([top, top / "proj3", top / "proj7" / "src"]):
        snap = where / ".snapshot"
        for k in range(50):
            d = snap / f"daily.{k}"
            d.mkdir(parents=True)
            for j in range(333):
                os.close(os.open(d / f"s{j}", os.O_CREAT | os.O_WRONLY, 0o644))
                made += 1
        if i == 0:
            locked = snap / "locked"
            locked.mkdir()
            locked.chmod(0)
    assert made >= 49_000
    yield top
    (top / ".snapshot" / "locked").chmod(0o755)


@pytest.mark.parametrize("mode", MODES)
def test_excluded_subtrees_are_never_read(snapshot_tree, start_agent, mode):
    agent = start_agent([(REMOTE, str(snapshot_tree))], nocaps=True)
    errors = []
    rows = list(parallel_walk(REMOTE, hosts=[agent.hostspec], mode=mode, onerror=errors.append,
                              exclude_dirs=[".snapshot"], exclude_files=["*.tmp"]))
    expected = local_walk(snapshot_tree, lambda root, d: d != ".snapshot",
                          lambda root, f: not fnmatch.fnmatchcase(f, "*.tmp"))
    assert as_bytes_rows(rows) == expected
    assert errors == []  # the unreadable directory under .snapshot was never opened
    # the agent read exactly the directories the walk yielded, and served no pruned entry
    assert metric(agent, "diskover_agent_directories_total") == len(expected)
    served = metric(agent, "diskover_agent_entries_total")
    assert served == sum(len(d) + len(f) for _, d, f in expected) < 1000


def test_without_exclusion_the_snapshot_is_read(snapshot_tree, start_agent):
    """The counter-test: the same walk without the exclusion does read .snapshot."""
    agent = start_agent([(REMOTE, str(snapshot_tree))], nocaps=True)
    errors = []
    n = sum(len(d) + len(f) for _, d, f in parallel_walk(REMOTE, hosts=[agent.hostspec], onerror=errors.append))
    assert n > 50_000
    assert [e.filename for e in errors] == [REMOTE + "/.snapshot/locked"]


def test_path_patterns_and_stat_walk(snapshot_tree, start_agent):
    agent = start_agent([(REMOTE, str(snapshot_tree))])
    pattern = REMOTE + "/proj1*/src"  # a pattern with '/' matches whole remote paths
    rows = [(r, [d.name for d in ds], [f.name for f in fs]) for r, ds, fs in parallel_walk_entries(
        REMOTE, hosts=[agent.hostspec], exclude_dirs=[".snapshot", pattern])]
    expected = local_walk(snapshot_tree, lambda root, d: d != ".snapshot" and not fnmatch.fnmatchcase(
        REMOTE + os.path.join(root, d)[len(str(snapshot_tree)):], pattern))
    assert as_bytes_rows(rows) == expected
    assert not any(r.startswith(REMOTE + "/proj1") and r.endswith("/src") for r, _, _ in rows)
    assert any(r == REMOTE + "/proj2/src" for r, _, _ in rows)


def test_walk_request_exclusions_over_http(snapshot_tree, start_agent):
    agent = start_agent([(REMOTE, str(snapshot_tree))])
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    body = {"paths": [REMOTE + "/proj3"], "exclude_dirs": [".snap*"], "exclude_files": ["*.c"], "max_entries": 10**6}
    conn.request("POST", "/_agent/v1/walk", body=json.dumps(body), headers={"Content-Type": "application/json"})
    frames = [json.loads(line) for line in conn.getresponse().read().splitlines()]
    dirs = [f[1] for f in frames if f[0] == "dir"]
    names = [e[0] for f in frames if f[0] == "entries" for e in f[1]]
    assert dirs == [REMOTE + "/proj3", REMOTE + "/proj3/src"]
    assert sorted(names) == sorted(["src"] + [f"f{j}.tmp" for j in range(10)])
    for bad in ({"paths": [REMOTE], "exclude_dirs": [""]}, {"paths": [REMOTE], "exclude_dirs": ["x"] * 300}):
        conn.request("POST", "/_agent/v1/walk", body=json.dumps(bad), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"exclude patterns" in resp.read()
    conn.close()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("mode", MODES)
def test_one_fs_prunes_other_file_systems(tmp_path, start_agent, mode):
    top = tmp_path / "share"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "file").touch()
    mnt = top / "a" / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "inside").mkdir()
        (mnt / "inside" / "x").touch()
        agent = start_agent([(REMOTE, str(top))])
        dev = os.lstat(top).st_dev
        rows = list(parallel_walk(REMOTE, hosts=[agent.hostspec], one_fs=True, mode=mode))
        expected = local_walk(top, lambda root, d: os.lstat(os.path.join(root, d)).st_dev == dev)
        assert as_bytes_rows(rows) == expected
        assert not any("/a/mnt" in r for r, _, _ in rows)
        everything = list(parallel_walk(REMOTE, hosts=[agent.hostspec], mode=mode))
        assert any(r.endswith("/mnt/inside") for r, _, _ in everything)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agents", [1, 3])
def test_pruning_in_the_loop_body(snapshot_tree, start_agent, mode, agents):
    running = [start_agent([(REMOTE, str(snapshot_tree))], nocaps=True) for _ in range(agents)]
    got = []
    # max_backlog=0: no new request while a listed directory waits for the loop body, so
    # what is read ahead of the pruning is bounded however slow the loop body is.
    for root, dirs, files in parallel_walk(REMOTE, hosts=[a.hostspec for a in running], mode=mode, workers=8,
                                           max_backlog=0):
        dirs[:] = [d for d in dirs if d not in (".snapshot", "proj5")]
        got.append((root, dirs, files))
    expected = local_walk(snapshot_tree, lambda root, d: d not in (".snapshot", "proj5"))
    assert as_bytes_rows(got) == expected
    listed = sum(metric(a, "diskover_agent_directories_total") for a in running)
    if mode == "listdir":
        # Queued work for pruned directories is dropped. What is listed besides: only pruned
        # directories taken while the loop body that prunes them runs (the 3 .snapshot and
        # proj5), never what lies below them (150 directories).
        assert len(expected) <= listed <= len(expected) + 4


@pytest.fixture
def link_tree(tmp_path) -> Path:
    """Directories, symlinks to them and to files, with names that one pattern matches."""
    top = tmp_path / "share"
    for d in ("data/inner", "skip-dir/inner", "keep"):
        (top / d).mkdir(parents=True)
    (top / "data" / "file").touch()
    (top / "skip-file").touch()
    (top / "skip-link-dir").symlink_to("data")
    (top / "skip-link-file").symlink_to("skip-file")
    (top / "skip-dangling").symlink_to("nowhere")
    return top


def agent_names(agent, pattern_kind: str, pattern: str) -> tuple[list[str], list[str]]:
    """The names of the export's top directory, as the agent's listing (``exclude_dir`` /
    ``exclude_file``) and its walk (``exclude_dirs`` / ``exclude_files``) answer them."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", f"{REMOTE}?format=ndjson&{pattern_kind}={pattern}")
        resp = conn.getresponse()
        assert resp.status == 200
        listing = [e[0] for line in resp.read().splitlines() if (f := json.loads(line))[0] == "entries" for e in f[1]]
        body = {"paths": [REMOTE], "max_entries": 1, pattern_kind + "s": [pattern]}
        conn.request("POST", "/_agent/v1/walk", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        frames = [json.loads(line) for line in resp.read().splitlines()]
    finally:
        conn.close()
    assert frames[0][:2] == ["dir", REMOTE]
    walked = [e[0] for f in frames if f[0] == "entries" for e in f[1]]
    return sorted(listing), sorted(walked)


@pytest.mark.parametrize("kind", ["exclude_dir", "exclude_file"])
def test_exclude_dirs_covers_symlinks_to_directories(link_tree, start_agent, kind):
    """``exclude_dirs`` applies to what ``os.walk`` puts in ``dirs``: directories and symlinks
    to them; ``exclude_files`` to everything else (symlinks to files, dangling ones)."""
    agent = start_agent([(REMOTE, str(link_tree))])
    pruned = {"exclude_dir": ["skip-dir", "skip-link-dir"],
              "exclude_file": ["skip-dangling", "skip-file", "skip-link-file"]}[kind]
    # the reference: os.walk's split of the top directory, then the pattern on one side of it
    _, dirs, files = next(os.walk(link_tree))
    assert sorted(dirs) == ["data", "keep", "skip-dir", "skip-link-dir"]
    side = dirs if kind == "exclude_dir" else files
    assert sorted(n for n in side if fnmatch.fnmatchcase(n, "skip-*")) == pruned
    want = sorted(n for n in dirs + files if n not in pruned)
    listing, walked = agent_names(agent, kind, "skip-*")
    assert listing == want
    assert walked == want
