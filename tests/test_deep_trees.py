"""Trees past PATH_MAX and directories of any fan-out, walked exactly by real agents.

The reference is ``os.fwalk`` of the local tree: it opens every directory relative to its
parent, so it yields what ``os.walk`` yields on a system without ``PATH_MAX`` (``os.walk``
itself stops with ``ENAMETOOLONG`` past 4,096 bytes, as any path-based walk does there).
The walk through the agents must yield exactly that, up to ``MAX_PATH`` bytes of remote
path; a deeper directory is one ``ENAMETOOLONG`` error for ``onerror``, and nothing else
fails with it.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import walk_records
from diskover_agent import parallel_walk
from diskover_agent.protocol import FRONTIER_FRAME_BYTES, MAX_PATH, WalkRequest, encode_walk_request

from conftest import REMOTE, as_bytes_rows, http_get

RB = REMOTE.encode()
SCRIPT = Path(sys.executable).with_name("diskover-agent")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How much an agent's peak resident memory (VmHWM) may grow above what it took once
#: started, serving the big directories below. Measured: 3-8 MiB; before the frontier
#: was bounded, 46 MiB for 250,000 subdirectories and 650 MiB for 20,000 under a long path.
RSS_GROWTH = 32 * 1024 * 1024


def long_name(i: int, size: int = 250) -> bytes:
    head = b"n%04d-" % i
    return head + b"x" * (size - len(head))


def make_chain(top: bytes, names: list[bytes], extra=None) -> list[bytes]:
    """Nested directories ``top/names[0]/names[1]/...``, made relative to each parent's fd
    (their paths pass PATH_MAX); ``extra(fd, depth)`` adds entries at each level.
    Returns the local path of every level."""
    paths = []
    fd = os.open(top, _DIR)
    path = top
    try:
        for depth, name in enumerate(names):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            path = path + b"/" + name
            paths.append(path)
            if extra is not None:
                extra(fd, depth)
    finally:
        os.close(fd)
    return paths


def started_agent(start_agent, tree: Path):
    """An agent exporting ``tree``, and its peak resident memory once started."""
    agent = start_agent([(REMOTE, str(tree))])
    return agent, peak_rss(agent.pid)


def touch(name: bytes, dir_fd: int) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd))


def fwalk_reference(local: Path, remote: bytes = RB) -> set:
    """What ``os.walk`` yields for ``local`` without a PATH_MAX, as remote rows."""
    lb = os.fsencode(local)
    return {(remote + root[len(lb):], tuple(sorted(dirs)), tuple(sorted(files)))
            for root, dirs, files, _fd in os.fwalk(lb)}


def peak_rss(pid: int) -> int:
    """The highest resident memory the process has had (bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def walk_rows(top: str, hosts: list[str], **kwargs):
    errors: list[OSError] = []
    rows = list(parallel_walk(top, hosts=hosts, onerror=errors.append, **kwargs))
    return rows, errors


def raw_walk(port: int, req: WalkRequest) -> list[bytes]:
    """The frames (msgpack bodies) of one walk answer, of any size."""
    status, _headers, body = http_get(port, "/_agent/v1/walk?format=msgpack", method="POST",
                                      body=encode_walk_request(req), timeout=60)
    assert status == 200, body[:300]
    frames, pos = [], 0
    while pos < len(body):
        size = int.from_bytes(body[pos:pos + 4], "big")
        frames.append(body[pos + 4:pos + 4 + size])
        pos += 4 + size
    assert pos == len(body)
    return frames


@pytest.fixture
def tree_root(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for a big tree: on tmpfs (``/dev/shm``) when there is one, where
    250,000 directories take a second to make (a minute or two on a disk)."""
    base = Path(tempfile.mkdtemp(prefix="diskover-deep-", dir="/dev/shm")) if os.access("/dev/shm", os.W_OK) \
        else tmp_path
    top = base / "tree"
    top.mkdir()
    try:
        yield top
    finally:
        shutil.rmtree(top)  # fd-relative: works past PATH_MAX
        if base != tmp_path:
            base.rmdir()


# -- 1. paths of any length -------------------------------------------------------------

@pytest.fixture
def deep_tree(tree_root: Path) -> Path:
    """40 nested 250-byte names (remote paths to 10 KB, past PATH_MAX and aiohttp's
    8,190-byte request line), with files and side directories along the way."""
    def extra(fd: int, depth: int) -> None:
        for i in range(30):  # past the first requests' budgets: long paths travel in later ones
            touch(b"file-%d-%d" % (depth, i), fd)
        if depth % 5 == 0:
            os.mkdir(b"side", dir_fd=fd)
            os.mkdir(b"side/inner", dir_fd=fd)
            touch(b"side/inner/leaf", fd)
    make_chain(os.fsencode(tree_root), [long_name(i) for i in range(40)], extra)
    os.mkdir(tree_root / "plain")
    return tree_root


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_paths_past_path_max_walk_exactly(deep_tree, start_agent, mode):
    agent = start_agent([(REMOTE, str(deep_tree))])
    expected = fwalk_reference(deep_tree)
    assert max(len(r) for r, _, _ in expected) > 10_000  # past PATH_MAX and the default request line
    # small budgets: many of the long paths come back from the frontier in later requests
    rows, errors = walk_rows(REMOTE, [agent.hostspec], workers=4, mode=mode, max_budget=4)
    assert errors == []
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)


def test_long_paths_in_one_request_and_a_listing(deep_tree, start_agent):
    """One long path does not fail the others of its request; a GET listing of one works."""
    agent = start_agent([(REMOTE, str(deep_tree))])
    long_path = max((r for r, _, _ in fwalk_reference(deep_tree) if b"side" not in r), key=len)
    assert len(long_path) > 9_000
    too_long = RB + b"/a" * (MAX_PATH // 2)
    frames = [msgspec.msgpack.decode(f) for f in raw_walk(agent.port, WalkRequest(
        paths=[long_path, too_long, RB + b"/plain"], max_entries=100_000))]
    assert [f[:2] for f in frames if f[0] in ("dir", "error")] == [
        ["dir", long_path], ["dir", too_long], ["error", errno.ENAMETOOLONG], ["dir", RB + b"/plain"]]
    target = urllib.parse.quote_from_bytes(long_path, safe="/") + "?format=ndjson"
    status, _h, body = http_get(agent.port, target)
    assert status == 200, body[:200]
    assert b'"file-39-0"' in body
    status, _h, body = http_get(agent.port, urllib.parse.quote_from_bytes(too_long) + "?format=ndjson")
    assert (status, json.loads(body)["error"]) == (404, "ENAMETOOLONG")


@pytest.fixture
def too_deep_tree(tree_root: Path) -> tuple[Path, bytes, bytes]:
    """A chain whose remote path passes MAX_PATH; beside the last directory that fits,
    a short sibling that fits too. Returns (tree, first remote path too long, sibling)."""
    names = []
    length = len(RB)
    while MAX_PATH - 100 - length > 256:
        names.append(long_name(len(names), 200))
        length += 201
    pad = MAX_PATH - 100 - length - 1  # the last level that fits ends 100 bytes short of MAX_PATH
    names.append(b"p" * pad)
    names += [long_name(9000 + i, 255) for i in range(3)]  # past MAX_PATH: never read
    fit = len(names) - 3
    make_chain(os.fsencode(tree_root), names)
    parent_fd = os.open(os.fsencode(tree_root), _DIR)
    try:
        for name in names[:fit]:
            fd = os.open(name, _DIR, dir_fd=parent_fd)
            os.close(parent_fd)
            parent_fd = fd
        os.mkdir(b"s", dir_fd=parent_fd)
        touch(b"s/f", parent_fd)
    finally:
        os.close(parent_fd)
    remote_parent = RB + b"".join(b"/" + n for n in names[:fit])
    assert len(remote_parent) == MAX_PATH - 100
    return tree_root, remote_parent + b"/" + names[fit], remote_parent + b"/s"


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_past_max_path_one_enametoolong_and_the_walk_goes_on(too_deep_tree, start_agent, mode):
    tree, too_long, sibling = too_deep_tree
    agent = start_agent([(REMOTE, str(tree))])
    expected = {row for row in fwalk_reference(tree) if len(row[0]) <= MAX_PATH}
    assert (sibling, (), (b"f",)) in expected
    rows, errors = walk_rows(REMOTE, [agent.hostspec], workers=4, mode=mode, max_budget=8)
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)
    assert [(e.errno, os.fsencode(e.filename)) for e in errors] == [(errno.ENAMETOOLONG, too_long)]


def test_cli_walk_deep_tree_exits_0(deep_tree, start_agent, tmp_path):
    agent = start_agent([(REMOTE, str(deep_tree))])
    out = tmp_path / "out.ndjson"
    done = subprocess.run([str(SCRIPT), "--hosts", agent.hostspec, "-q", "walk", REMOTE, "-o", str(out)],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-500:]
    expected = fwalk_reference(deep_tree)
    written = {walk_records.path(row) for row in walk_records.read_ndjson(out.read_bytes())}
    assert written == {r + b"/" + n for r, d, f in expected for n in d + f}


def test_cli_walk_past_max_path_exits_1_naming_it(too_deep_tree, start_agent, tmp_path):
    tree, too_long, sibling = too_deep_tree
    agent = start_agent([(REMOTE, str(tree))])
    out = tmp_path / "out.ndjson"
    done = subprocess.run([str(SCRIPT), "--hosts", agent.hostspec, "walk", REMOTE, "-o", str(out)],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr[-500:]
    assert b"diskover-agent: " + too_long + b": File name too long" in done.stderr
    rows = walk_records.read_ndjson(out.read_bytes())
    assert sibling + b"/f" in {walk_records.path(row) for row in rows if row["type"] != "error"}
    assert [(walk_records.key(row), row["error_code"]) for row in rows if row["type"] == "error"] == [
        ((too_long, b""), "ENAMETOOLONG")]  # the directory that failed, as a row


# -- 2. bounded frames and memory for any fan-out ---------------------------------------

@pytest.fixture
def wide_under_long(tree_root: Path) -> tuple[Path, bytes]:
    """20,000 subdirectories under a 3,700-byte path. Returns (tree, remote parent path)."""
    names = [long_name(i, 245) for i in range(15)]
    levels = make_chain(os.fsencode(tree_root), names)
    fd = os.open(levels[-1], _DIR) if len(levels[-1]) < 4096 else None
    assert fd is not None
    try:
        for i in range(20_000):
            os.mkdir(b"d%05d" % i, dir_fd=fd)
    finally:
        os.close(fd)
    remote = RB + b"".join(b"/" + n for n in names)
    assert 3_600 < len(remote) < 3_800
    return tree_root, remote


def test_20000_subdirectories_under_a_long_path(wide_under_long, start_agent):
    tree, _wide = wide_under_long
    agent, base = started_agent(start_agent, tree)
    expected = fwalk_reference(tree)
    rows, errors = walk_rows(REMOTE, [agent.hostspec], workers=8)
    assert errors == []
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected) == 20_016
    grown = peak_rss(agent.pid) - base
    print(f"agent peak RSS grew by {grown / 2**20:.1f} MiB")
    assert grown < RSS_GROWTH


def test_frontier_frames_are_bounded(wide_under_long, start_agent):
    """The directory's whole frontier (74 MB of paths) goes out in frames of about
    FRONTIER_FRAME_BYTES; to a client without frontier frames, in the one end frame,
    with the agent's memory bounded either way."""
    tree, wide = wide_under_long
    agent, base = started_agent(start_agent, tree)
    want = {wide + b"/d%05d" % i for i in range(20_000)}
    frames = raw_walk(agent.port, WalkRequest(paths=[wide], max_entries=1, frontier_frames=True))
    biggest = max(len(f) for f in frames)
    assert biggest <= FRONTIER_FRAME_BYTES + 4096 + 64
    decoded = [msgspec.msgpack.decode(f) for f in frames]
    assert [f[0] for f in decoded[:2]] == ["dir", "entries"] and decoded[-1][0] == "end"
    sent = [p for f in decoded if f[0] in ("frontier", "end") for p in f[1]]
    assert len(sent) == len(want) and set(sent) == want
    # a client that predates frontier frames: everything in one end frame, as before
    frames = raw_walk(agent.port, WalkRequest(paths=[wide], max_entries=1))
    end = msgspec.msgpack.decode(frames[-1])
    assert end[0] == "end" and len(end[1]) == len(want) and set(end[1]) == want
    assert not [f for f in frames if msgspec.msgpack.decode(f)[0] == "frontier"]
    del frames, end
    body = msgspec.json.encode({"paths": [os.fsdecode(wide)], "max_entries": 1})  # the same, in ndjson
    status, _h, data = http_get(agent.port, "/_agent/v1/walk", method="POST", body=body,
                                headers={"Content-Type": "application/json"}, timeout=60)
    assert status == 200
    end = msgspec.json.decode(data.splitlines()[-1])
    assert end[0] == "end" and len(end[1]) == len(want) and {os.fsencode(p) for p in end[1]} == want
    grown = peak_rss(agent.pid) - base
    print(f"agent peak RSS grew by {grown / 2**20:.1f} MiB; biggest frame {biggest} bytes")
    assert grown < RSS_GROWTH


def test_250000_subdirectories_in_one_directory(tree_root, start_agent):
    wide = tree_root / "wide"
    wide.mkdir()
    started = time.monotonic()
    fd = os.open(wide, _DIR)
    try:
        for i in range(250_000):
            os.mkdir(b"%06d" % i, dir_fd=fd)
    finally:
        os.close(fd)
    made = time.monotonic() - started
    agent, base = started_agent(start_agent, tree_root)
    expected = fwalk_reference(tree_root)
    rows, errors = walk_rows(REMOTE, [agent.hostspec], workers=8)
    assert errors == []
    assert len(rows) == len(expected) == 250_002
    assert as_bytes_rows(rows) == expected
    grown = peak_rss(agent.pid) - base
    print(f"made 250,000 directories in {made:.1f} s; agent peak RSS grew by {grown / 2**20:.1f} MiB")
    assert grown < RSS_GROWTH


# -- descriptors: bounded whatever the depth ---------------------------------------------

def test_deep_chain_with_few_descriptors(tree_root, start_agent):
    """300 nested directories walked, and listed by a 300-component path, by an agent
    allowed 100 descriptors: it keeps open at most 32 levels of a walk and a few of a path."""
    make_chain(os.fsencode(tree_root), [b"d"] * 300)
    agent = start_agent([(REMOTE, str(tree_root))])
    resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (100, 100))
    expected = fwalk_reference(tree_root)
    rows, errors = walk_rows(REMOTE, [agent.hostspec], workers=4)
    assert errors == []
    assert as_bytes_rows(rows) == expected
    status, _h, body = http_get(agent.port, REMOTE + "/d" * 299 + "?format=ndjson")
    assert status == 200, body[:200]
    assert b'"d","d"' in body


def test_symlink_up_past_the_open_descriptors(tree_root, start_agent):
    """A symlink's ``..`` that climbs above the descriptors kept open while opening a path
    is resolved by opening the directories again from the export."""
    levels = make_chain(os.fsencode(tree_root), [b"l%02d" % i for i in range(20)])
    os.mkdir(levels[4] + b"/target")
    with open(levels[4] + b"/target/inside", "wb"):
        pass
    os.symlink(b"../" * 15 + b"target", levels[-1] + b"/up")
    agent = start_agent([(REMOTE, str(tree_root))])
    remote = RB + levels[-1][len(os.fsencode(tree_root)):] + b"/up"
    status, _h, body = http_get(agent.port, urllib.parse.quote_from_bytes(remote) + "?format=ndjson")
    assert status == 200, body[:200]
    assert b'["inside","f"' in body
    os.symlink(b"../" * 21 + b"etc", levels[-1] + b"/out")  # one level above the export: refused
    status, _h, body = http_get(agent.port, urllib.parse.quote_from_bytes(remote[:-2] + b"out"))
    assert status == 403, body[:200]
