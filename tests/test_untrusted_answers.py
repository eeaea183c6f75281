"""The client checks every answer an agent gives. A test server in front of a real agent
rewrites its answers (entry names that are not one path component, duplicate names, stat
fields out of range, frontiers and directories that were not asked for); the client must
never yield, count or walk any of it: the lying host is set aside and its work goes to an
honest one, and with no honest host the caller gets ``AgentProtocolError`` naming the host
and the reason."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import msgspec
import pytest
from aiohttp import web

from diskover_agent import AgentConnection, parallel_walk, parallel_walk_entries
from diskover_agent.errors import AgentProtocolError
from diskover_agent.protocol import MSGPACK_TYPE, encode_frame, read_frames_raw

from conftest import REMOTE, FrontServer, as_bytes_rows, reference_walk

Frames = list[list[Any]]
SCRIPT = Path(sys.executable).with_name("diskover-agent")


class Tamper(FrontServer):
    """Forwards every request to the agent and rewrites its msgpack answers with ``change``
    (which returns the new frames, or None to leave an answer alone); counts what it changed."""

    def __init__(self, upstream_port: int, change: Callable[[Frames], Optional[Frames]]) -> None:
        self.change = change
        self.tampered = 0
        super().__init__(upstream_port)

    async def handle(self, request):
        resp = await self.forward(request, await request.read())
        if resp.status != 200 or resp.headers.get("Content-Type") != MSGPACK_TYPE:
            return resp
        frames = [msgspec.msgpack.decode(b) for b in read_frames_raw(io.BytesIO(resp.body).read)]
        changed = self.change(frames)
        if changed is None:
            return resp
        self.tampered += 1
        body = b"".join(encode_frame(f, "msgpack") for f in changed)
        return web.Response(status=200, body=body, headers={
            k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "x-diskover-agent-protocol")})


def in_first_entries(edit: Callable[[list], None]) -> Callable[[Frames], Optional[Frames]]:
    """A change that edits the entry list of the answer's first ``entries`` frame."""
    def change(frames: Frames) -> Optional[Frames]:
        for f in frames:
            if f[0] == "entries" and f[1]:
                edit(f[1])
                return frames
        return None
    return change


def in_first_listing(edit_entries: Callable[[list], None],
                     edit_names: Callable[[list], None]) -> Callable[[Frames], Optional[Frames]]:
    """A change that edits the answer's first ``entries`` frame with ``edit_entries``, or
    its first ``names`` frame (``[tag, names, kinds, targets]``) with ``edit_names``."""
    def change(frames: Frames) -> Optional[Frames]:
        for f in frames:
            if f[0] == "entries" and f[1]:
                edit_entries(f[1])
                return frames
            if f[0] == "names" and f[2]:
                edit_names(f)
                return frames
        return None
    return change


def added(name: bytes, kind: str = "f") -> Callable[[Frames], Optional[Frames]]:
    def to_names(f: list) -> None:
        f[1] += b"\0" + name
        f[2] += kind
    return in_first_listing(lambda entries: entries.append([name, kind, None, None, None]), to_names)


def repeated_first(f: list) -> None:
    f[1] += b"\0" + f[1].split(b"\0")[0]
    f[2] += f[2][0]
    if f[2][0] == "l":
        f[3] += f[3][0]


def stat_field(index: int, value: int) -> Callable[[Frames], Optional[Frames]]:
    def edit(entries: list) -> None:
        for e in entries:
            if e[3] is not None:
                e[3][index] = value
    return in_first_entries(edit)


def dotdot_dir_in_frontier(frames: Frames) -> Optional[Frames]:
    """An entry ``..`` of kind dir, and its path in the frontier, as a consistent liar would."""
    current = None
    for f in frames:
        if f[0] == "dir":
            current = f[1]
        elif f[0] in ("entries", "names") and f[1] and current is not None:
            if f[0] == "names":
                f[1] += b"\0.."
                f[2] += "d"
            else:
                f[1].append([b"..", "d", None, None, None])
            for g in frames:
                if g[0] == "end":
                    g[1].append(current + b"/..")
            return frames
    return None


def outside_frontier(frames: Frames) -> Optional[Frames]:
    frames[-1][1].append(b"/etc")
    return frames


def other_dir(frames: Frames) -> Optional[Frames]:
    frames[0][1] = b"/etc"
    return frames


LIES = {
    "dotdot-name": added(b"../../x"),
    "slash-name": added(b"a/b"),
    "empty-name": added(b""),
    "dot-name": added(b"."),
    "dotdot": added(b".."),
    "nul-name": added(b"x\0y"),
    "duplicate": in_first_listing(lambda entries: entries.append(list(entries[0])), repeated_first),
    "bad-kind": added(b"fine-name", "x"),
    "dotdot-dir-in-frontier": dotdot_dir_in_frontier,
    "frontier-outside": outside_frontier,
    "dir-not-asked": other_dir,
}
STAT_LIES = {
    "negative-size": stat_field(6, -1),
    "negative-ino": stat_field(1, -5),
    "negative-nlink": stat_field(3, -1),
    "negative-blocks": stat_field(10, -8),
    "uid-over-32-bits": stat_field(4, 2**32),
    "mode-over-32-bits": stat_field(0, 2**40),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("lies") / "tree"
    for d in ("a/x", "a/y", "b", "c/z/deep"):
        (top / d).mkdir(parents=True)
    for f in ("a/f1", "a/x/f2", "b/f3", "c/z/f4", "top1", "top2"):
        (top / f).write_bytes(b"x" * 100)
    return top


@pytest.fixture
def agent(tree, start_agent):
    return start_agent([(REMOTE, str(tree))])


@pytest.fixture
def tamper(agent):
    fronts: list[Tamper] = []

    def make(change: Callable[[Frames], Optional[Frames]]) -> Tamper:
        front = Tamper(agent.port, change)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.close()


def walk_rows(hosts: list[str], mode: str, **kw: Any) -> set:
    errors: list[OSError] = []
    rows = list(parallel_walk(REMOTE, workers=2, hosts=hosts, mode=mode, onerror=errors.append, **kw))
    assert errors == []
    return as_bytes_rows(rows)


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
@pytest.mark.parametrize("lie", sorted(LIES))
def test_walk_sets_a_lying_host_aside(tree, agent, tamper, lie, mode):
    front = tamper(LIES[lie])
    # The lying host comes first: it gets the first request, then is set aside.
    assert walk_rows([front.hostspec, agent.hostspec], mode) == reference_walk(tree, nocaps=False)[0]
    assert front.tampered >= 1


# (Not "frontier-outside": every directory of that answer is valid and kept, the walk is whole.)
@pytest.mark.parametrize("lie", sorted(set(LIES) - {"frontier-outside"}))
def test_walk_with_only_lying_hosts_raises(agent, tamper, lie):
    front = tamper(LIES[lie])
    rows = []
    with pytest.raises(AgentProtocolError) as info:
        for row in parallel_walk(REMOTE, workers=2, hosts=[front.hostspec], retry_for=1):
            rows.append(row)
    assert front.hostspec in str(info.value) and "valid answer" in str(info.value)
    assert all(b"/" not in os.fsencode(n) and n not in ("", ".", "..") for _, d, f in rows for n in d + f)


@pytest.mark.parametrize("lie", sorted(STAT_LIES))
def test_stat_fields_out_of_range(tree, agent, tamper, lie):
    front = tamper(STAT_LIES[lie])
    hosts = [front.hostspec, agent.hostspec]
    got = {}
    for _root, dirs, files in parallel_walk_entries(REMOTE, workers=2, hosts=hosts, retry_for=10):
        for e in dirs + files:
            got[e.path] = e.stat()
    assert front.tampered >= 1
    for path, st in got.items():
        local = os.lstat(str(tree) + path[len(REMOTE):])
        assert (st.st_size, st.st_ino, st.st_nlink, st.st_uid, st.st_mode) == (
            local.st_size, local.st_ino, local.st_nlink, local.st_uid, local.st_mode), path
    with pytest.raises(AgentProtocolError) as info:
        list(AgentConnection([front.hostspec]).scandir(REMOTE))
    assert front.hostspec in str(info.value)


def test_times_before_1970_are_legal(agent, tamper):
    """``st_mtime_ns`` may be negative on POSIX: such a record is passed on as it came."""
    front = tamper(stat_field(8, -86_400 * 10**9))
    entries = list(AgentConnection([front.hostspec]).scandir(REMOTE))
    assert front.tampered == 1 and entries
    assert all(e.stat().st_mtime_ns == -86_400 * 10**9 for e in entries)


@pytest.mark.parametrize("lie", ["dotdot-name", "slash-name", "empty-name", "dot-name", "dotdot", "nul-name",
                                 "duplicate", "bad-kind", "dir-not-asked", "frontier-outside"])
def test_listing_tries_the_next_host_then_raises(agent, tamper, lie):
    front = tamper(LIES[lie])
    honest = AgentConnection([agent.hostspec]).listdir(REMOTE)
    with AgentConnection([front.hostspec, agent.hostspec]) as conn:
        assert conn.listdir(REMOTE) == honest
        assert conn.conn_host() == agent.hostspec
    assert front.tampered == 1
    with AgentConnection([front.hostspec]) as conn:
        with pytest.raises(AgentProtocolError) as info:
            conn.listdir(REMOTE)
        with pytest.raises(AgentProtocolError):
            list(conn.scandir(REMOTE))
    assert front.hostspec in str(info.value) and "valid answer" in str(info.value)


def test_duplicates_across_frames_of_one_directory(tmp_path, start_agent, tamper):
    """A big directory comes in several ``entries`` frames; a name repeated in a later frame
    is caught as well."""
    top = tmp_path / "big"
    top.mkdir()
    for i in range(2500):
        (top / f"n{i:05d}").write_bytes(b"")
    agent = start_agent([(REMOTE, str(top))])

    repeated: list[bytes] = []

    def repeat_in_last_frame(frames: Frames) -> Optional[Frames]:
        entry_frames = [f for f in frames if f[0] == "entries"]
        if len(entry_frames) < 2:
            return None
        entry_frames[-1][1].append(list(entry_frames[0][1][0]))
        repeated.append(entry_frames[0][1][0][0])
        return frames

    front = Tamper(agent.port, repeat_in_last_frame)
    try:
        assert len(AgentConnection([agent.hostspec]).listdir(REMOTE)[2]) == 2500
        with pytest.raises(AgentProtocolError, match="appears twice in one directory") as info:
            AgentConnection([front.hostspec]).listdir(REMOTE)
        assert front.tampered == 1 and repr(repeated[0]) in str(info.value)
    finally:
        front.close()


def test_cli_du_refuses_negative_sizes(agent, tamper):
    """``du`` summed a negative size; now the lying host is reported and nothing is summed."""
    front = tamper(stat_field(6, -(10**12)))
    env = {k: v for k, v in os.environ.items() if k not in ("DISKOVER_AGENT_HOSTS", "DISKOVER_AGENT_TOKEN")}
    r = subprocess.run([str(SCRIPT), "-q", "--hosts", front.hostspec, "--retry-for", "1", "du", "-s",
                        "--apparent-size", REMOTE], capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 2, r.stderr
    assert b"-" not in r.stdout
    err = r.stderr.decode()
    assert front.hostspec in err and "valid answer" in err and "Traceback" not in err
