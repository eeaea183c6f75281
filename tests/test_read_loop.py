"""The agent's two read loops: the optional compiled one (``_readdir``) and the pure-Python
one answer the same bytes, over trees with every kind of entry, through real agents; and the
compiled one is built where CI runs."""

from __future__ import annotations

import base64
import dataclasses
import errno
import http.client
import io
import os
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from diskover_agent.protocol import (
    MSGPACK_TYPE,
    DirFrame,
    EndFrame,
    EntriesFrame,
    ErrorFrame,
    FrontierFrame,
    NamesFrame,
    WalkRequest,
    encode_walk_request,
    read_frames,
)

from conftest import (
    NOT_BUILT,
    READ_LOOPS,
    REMOTE,
    assert_read_loop,
    compiled_read_loop_built,
    make_awkward_tree,
    settle_atimes,
    slowfs_mounted,
)

#: Entries per answer chunk (listing.CHUNK): the big directories span several.
CHUNK = 1000
KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def test_compiled_read_loop_is_built_in_ci():
    """CI has a compiler and Python's headers: there the install must build the compiled loop
    (else every ``compiled`` case would be skipped unseen). Elsewhere its absence is a skip."""
    if not compiled_read_loop_built():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but the compiled read loop (diskover_storage_agent._readdir) was not built")
        pytest.skip(NOT_BUILT)
    from diskover_storage_agent import _readdir

    assert _readdir.__file__.startswith(os.path.dirname(sys.modules["diskover_storage_agent"].__file__))


@pytest.fixture
def tricky_tree(tmp_path: Path) -> Path:
    """The awkward tree (non-UTF-8 names, newlines, spaces, symlinks to directories and
    files, dangling, looping and leaving the export, a fifo, unreadable and unsearchable
    directories, empty ones) plus directories of several chunks: one of every kind of
    entry mixed, one of symlinks only (each handed from the compiled loop to Python)."""
    top = make_awkward_tree(tmp_path)
    big = top / "big"
    big.mkdir()
    for i in range(2 * CHUNK + 345):
        name = b"e%05d" % i + (b"-\xff\n" if i % 97 == 0 else b"")
        path = os.path.join(os.fsencode(big), name)
        if i % 7 == 0:
            os.mkdir(path)
        elif i % 11 == 0:
            os.symlink([b"../plain", b"../top-file", b"gone", b"../../..", b"e00000"][i % 5], path)
        elif i % 503 == 0:
            os.mkfifo(path)
        else:
            with open(path, "wb") as f:
                f.write(b"x" * (i % 300))
    links = top / "links"
    links.mkdir()
    for i in range(CHUNK + 200):
        os.symlink([b"../plain", b"../top-file", b"nowhere", b"/"][i % 4], links / f"l{i:04d}")
    return top


def post_walk(agent, req: WalkRequest, fmt: str) -> bytes:
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=60)
    try:
        conn.request("POST", f"/_agent/v1/walk?format={fmt}", body=encode_walk_request(req),
                     headers={"Content-Type": MSGPACK_TYPE})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body[:300]
    return body


def walk_answers(agent, req: WalkRequest, fmt: str) -> list[bytes]:
    """Every answer of a walk that follows its frontier (in order) to the end."""
    bodies = []
    todo = list(req.paths)
    while todo:
        paths, todo = todo[:8], todo[8:]
        body = post_walk(agent, dataclasses.replace(req, paths=paths), fmt)
        bodies.append(body)
        if fmt == "msgpack":
            for f in read_frames(io.BytesIO(body).read):
                if isinstance(f, (FrontierFrame, EndFrame)):
                    todo += f.paths if isinstance(f, FrontierFrame) else f.frontier
        else:
            for line in body.splitlines():
                tag, *rest = msgspec.json.decode(line)
                if tag in ("frontier", "end"):
                    todo += [p.encode() if isinstance(p, str) else base64.b64decode(p["b64"]) for p in rest[0]]
        assert len(bodies) < 500, "the walk does not end"
    return bodies


@pytest.fixture
def both_agents(tricky_tree, start_agent, monkeypatch):
    """A compiled-loop agent and a pure-Python one on the same tree (its atimes settled first)."""
    if not compiled_read_loop_built():
        pytest.skip(NOT_BUILT)
    settle_atimes(tricky_tree)
    agents = {}
    for loop in READ_LOOPS:
        if loop == "pure":
            monkeypatch.setenv("DISKOVER_AGENT_PURE", "1")
        else:
            monkeypatch.delenv("DISKOVER_AGENT_PURE", raising=False)
        agents[loop] = start_agent([(REMOTE, str(tricky_tree))], nocaps=True)
        assert_read_loop(agents[loop], loop)
    return agents


@pytest.mark.parametrize("what", ["names-msgpack", "names-ndjson", "entries-msgpack", "stat-msgpack"])
def test_both_read_loops_answer_the_same_bytes(both_agents, what):
    """Byte for byte, answer after answer, following the frontier (one answer for the whole
    tree, and answers of at most about 50 entries): every frame, every name, kind, symlink
    target, stat record and target stat, and the chunk boundaries."""
    mode, fmt = what.split("-")
    for budget in (1_000_000, 50):
        req = WalkRequest([REMOTE.encode()], stat=mode == "stat", max_entries=budget, max_seconds=60,
                          frontier_frames=True, nofollow=True, names_frames=mode == "names")
        compiled = walk_answers(both_agents["compiled"], req, fmt)
        pure = walk_answers(both_agents["pure"], req, fmt)
        assert len(compiled) == len(pure)
        for i, (c, p) in enumerate(zip(compiled, pure, strict=True)):
            assert c == p, f"answer {i} of the walk with budget {budget} differs"
        frames = [frame_tag(f) for body in compiled for f in frames_of(body, fmt)]
        tag = "names" if mode == "names" else "entries"
        assert frames.count(tag) >= 8  # the big directories came in several frames each
        assert ("entries" if mode == "names" else "names") not in frames
        assert "error" in frames and (budget > 1000) == (len(compiled) == 1)


def frames_of(body: bytes, fmt: str) -> list:
    if fmt == "msgpack":
        return list(read_frames(io.BytesIO(body).read))
    return [msgspec.json.decode(line) for line in body.splitlines()]


def frame_tag(frame) -> str:
    return frame[0] if isinstance(frame, list) else type(frame).__struct_config__.tag


def test_both_read_loops_agree_without_d_type(tmp_path, start_agent, monkeypatch):
    """On a file system whose directory entries carry no type (FUSE, like some NFS and XFS:
    ``DT_UNKNOWN``), each entry's kind comes from its lstat, in both loops alike."""
    if not compiled_read_loop_built():
        pytest.skip(NOT_BUILT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with slowfs_mounted(mnt, SLOW="0"):
        req = WalkRequest([REMOTE.encode()], max_entries=1_000_000, max_seconds=60, frontier_frames=True,
                          nofollow=True, names_frames=True)
        answers = {}
        for loop in READ_LOOPS:
            if loop == "pure":
                monkeypatch.setenv("DISKOVER_AGENT_PURE", "1")
            agent = start_agent([(REMOTE, str(mnt))])
            assert_read_loop(agent, loop)
            answers[loop] = walk_answers(agent, req, "msgpack")
            agent.stop()
    assert answers["compiled"] == answers["pure"]
    listed, errors = decoded_walk_of(answers["compiled"])
    assert not errors
    assert sorted(listed[REMOTE.encode()]) == sorted(
        [(b"slow%d" % i, "d", None, None) for i in range(10)] + [(b"fast", "d", None, None)])
    assert sorted(listed[REMOTE.encode() + b"/fast"]) == [(b"x", "f", None, None), (b"y", "f", None, None)]


def decoded_walk(agent, req: WalkRequest) -> tuple[dict[bytes, list[tuple]], dict[bytes, int]]:
    """Per directory listed: its entries as (name, kind, target, stat); per directory refused: errno."""
    return decoded_walk_of(walk_answers(agent, req, "msgpack"))


def decoded_walk_of(bodies: list[bytes]) -> tuple[dict[bytes, list[tuple]], dict[bytes, int]]:
    listed: dict[bytes, list[tuple]] = {}
    errors: dict[bytes, int] = {}
    current = None
    for body in bodies:
        for f in read_frames(io.BytesIO(body).read):
            if isinstance(f, DirFrame):
                current = listed.setdefault(f.path, [])
                path = f.path
            elif isinstance(f, NamesFrame):
                targets = iter(f.targets)
                kinds = f.kinds
                names = f.names.split(b"\0")
                assert len(names) == len(kinds)
                for name, kind in zip(names, kinds, strict=True):
                    target = next(targets) if kind == "l" else None
                    current.append((name, kind, None if target == "-" else target, None))
                assert next(targets, None) is None
            elif isinstance(f, EntriesFrame):
                current.extend((e.name, e.kind, e.target, e.stat) for e in f.entries)
            elif isinstance(f, ErrorFrame):
                errors[path] = f.errno
                del listed[path]
    return listed, errors


def local_listing(local: bytes) -> list[tuple]:
    """What the node says of a directory's entries: (name, kind, target kind, lstat fields)."""
    out = []
    for name in os.listdir(local):
        path = os.path.join(local, name)
        st = os.lstat(path)
        target = None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = KINDS[stat.S_IFMT(os.stat(path).st_mode)]
            except OSError:
                target = None
        out.append((name, KINDS[stat.S_IFMT(st.st_mode)], target))
    return out


def test_names_frames_and_entries_frames_tell_the_same(tricky_tree, start_agent, read_loop):
    """With either loop, a names walk, an entries walk without stat and one with stat list the
    same directories with the same entries (name, kind, symlink target) as the node's own
    lstat and stat say, and refuse the same directories; the stat walk's records are the
    entries' lstat."""
    agent = start_agent([(REMOTE, str(tricky_tree))], nocaps=True)
    assert_read_loop(agent, read_loop)
    walks = {}
    for how in ("names", "entries", "stat"):
        req = WalkRequest([REMOTE.encode()], stat=how == "stat", max_entries=1_000_000, max_seconds=60,
                          frontier_frames=True, nofollow=True, names_frames=how == "names")
        walks[how] = decoded_walk(agent, req)
    names, errors = walks["names"]
    for how in ("entries", "stat"):
        listed, errs = walks[how]
        assert errs == errors
        assert {d: sorted(e[:3] for e in es) for d, es in listed.items()} == {
            d: sorted(e[:3] for e in es) for d, es in names.items()}
    assert errors == {REMOTE.encode() + b"/locked": errno.EACCES, REMOTE.encode() + b"/noexec/child": errno.EACCES}
    top = os.fsencode(tricky_tree)
    for remote, entries in names.items():
        local = top + remote[len(REMOTE):]
        if remote.endswith(b"/noexec"):  # readable, not searchable: no lstat of its entries
            assert {(e[0], e[1]) for e in entries} == {(b"child", "d")}
            continue
        assert sorted(e[:3] for e in entries) == sorted(local_listing(local)), remote
    stat_walk = walks["stat"][0]
    for remote, entries in stat_walk.items():
        local = top + remote[len(REMOTE):]
        for name, _kind, _target, fields in entries:
            if remote.endswith(b"/noexec"):
                assert fields is None
                continue
            st = os.lstat(os.path.join(local, name))
            assert fields[:7] == (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                                  st.st_size), (remote, name)
            assert fields[8:] == (st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, st.st_blksize, st.st_rdev)
    big = stat_walk[REMOTE.encode() + b"/big"]
    assert len(big) == 2 * CHUNK + 345 and {e[1] for e in big} == {"d", "f", "l", "p"}
    assert {e[2] for e in big if e[1] == "l"} == {"d", "f", None}
    assert b"e00097-\xff\n" in {e[0] for e in big}


# -- the compiled loop's own API (in this process, on real directories) --------------------

@pytest.fixture
def readdir_module():
    if not compiled_read_loop_built():
        pytest.skip(NOT_BUILT)
    from diskover_storage_agent import _readdir

    return _readdir


def test_compiled_loop_streams_a_big_directory_in_chunks(tmp_path, readdir_module):
    """A directory read ``limit`` entries at a time: every name once, as exact bytes, the
    subdirectories among them reported, and a short chunk only at the end."""
    names = {b"n%04d" % i + (b"\n\xfe " if i % 10 == 0 else b"") for i in range(2500)}
    names.add(b"x" * 255)
    for name in names:
        path = os.path.join(os.fsencode(tmp_path), name)
        os.mkdir(path) if name.endswith(b"7") else open(path, "wb").close()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with readdir_module.Dir(fd) as d:
            got, subdirs, counts = [], [], []
            while True:
                count, blob, kinds, targets = d.names(CHUNK, subdirs)
                counts.append(count)
                if count:
                    got += blob.split(b"\0")
                    assert len(kinds) == count and set(kinds) <= {"d", "f"} and targets == ""
                if count < CHUNK:
                    break
            assert d.names(CHUNK, subdirs)[0] == 0  # the end stays the end
    finally:
        os.close(fd)
    assert counts == [1000, 1000, 501]
    assert sorted(got) == sorted(names)
    assert sorted(subdirs) == sorted(n for n in names if n.endswith(b"7"))


def test_compiled_loop_errors(tmp_path, readdir_module):
    """Misuse and failures raise, never crash: a file's fd (ENOTDIR, with its errno), a
    closed reader, a negative limit, ``subdirs`` not a list, a bad fd."""
    (tmp_path / "file").write_bytes(b"x")
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        d = readdir_module.Dir(fd)
        with pytest.raises(NotADirectoryError) as info:
            d.names(10, [])
        assert info.value.errno == errno.ENOTDIR
        with pytest.raises(ValueError, match="limit"):
            d.names(-1, [])
        with pytest.raises(TypeError, match="list"):
            d.stat_items(10, ())
        d.close()
        d.close()
        with pytest.raises(ValueError, match="closed"):
            d.stat_items(10, [])
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        readdir_module.Dir(-1)
    assert info.value.errno == errno.EBADF
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with readdir_module.Dir(dfd) as d:
            assert d.stat_items(0, []) == (0, b"", None)  # nothing read
            count, items, pending = d.stat_items(10, [])
            assert (count, pending) == (1, None) and items.startswith(b"\x95\xc4\x04file\xa1f\xc0\x9d")
    finally:
        os.close(dfd)
