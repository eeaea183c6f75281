"""Names walks through ``names`` frames: the client asks for them, decodes and checks them
(a front server of the test's own rewrites a real agent's frames: every lie is refused
as an invalid answer), falls back a step at a time before an agent that refuses the
newer fields, and runs no more threads than it can use."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from typing import Any, Optional

import msgspec
import pytest
from aiohttp import web

from diskover_agent import parallel_walk
from diskover_agent.errors import AgentProtocolError
from diskover_agent.protocol import (
    MSGPACK_TYPE,
    PROTOCOL_HEADER,
    NamesFrame,
    ProtocolError,
    decode_names,
    encode_frame,
    read_frames_raw,
)
from diskover_agent.walk import SUBTREE_PER_HOST, Walker

from conftest import REMOTE, FrontServer, as_bytes_rows, reference_walk

Frames = list[list[Any]]
NEWER = ("frontier_frames", "nofollow", "names_frames")


class Front(FrontServer):
    """Forwards to a real agent. It refuses a walk request holding any of ``unknown`` with a
    400 naming the first, as an agent that predates those fields does (its decoder forbids
    unknown fields); it records the walk requests it served and the frame tags of their
    answers; with ``no_subtree`` it has no walk endpoint at all; ``change`` may rewrite an
    answer's frames (returns None to leave it alone)."""

    def __init__(self, upstream_port: int, unknown: tuple[str, ...] = (),
                 change: Optional[Callable[[Frames], Optional[Frames]]] = None, no_subtree: bool = False) -> None:
        self.unknown = unknown
        self.no_subtree = no_subtree
        self.change = change
        self.refused = 0
        self.tampered = 0
        self.served: list[dict] = []
        self.tags: set[str] = set()
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        walk = request.raw_path.startswith("/_agent/v1/walk")
        if walk and self.no_subtree:  # as an agent that predates the subtree walk
            return web.Response(status=404, text="no such endpoint", headers={PROTOCOL_HEADER: "1"})
        if walk:
            fields = msgspec.msgpack.decode(body)
            newer = [f for f in fields if f in self.unknown]
            if newer:
                self.refused += 1
                message = f"bad walk request: Object contains unknown field `{newer[0]}`"
                return web.json_response({"error": "bad_request", "message": message}, status=400,
                                         headers={PROTOCOL_HEADER: "1"})
            self.served.append(fields)
        resp = await self.forward(request, body)
        if not walk or resp.status != 200 or resp.headers.get("Content-Type") != MSGPACK_TYPE:
            return resp
        frames = [msgspec.msgpack.decode(b) for b in read_frames_raw(io.BytesIO(resp.body).read)]
        self.tags.update(f[0] for f in frames)
        changed = self.change(frames) if self.change is not None else None
        if changed is None:
            return resp
        self.tampered += 1
        return web.Response(status=200, body=b"".join(encode_frame(f, "msgpack") for f in changed), headers={
            k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "x-diskover-agent-protocol")})


@pytest.fixture
def front(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    fronts: list[Front] = []

    def make(**kw: Any) -> Front:
        fronts.append(Front(agent.port, **kw))
        return fronts[-1]

    make.agent = agent  # type: ignore[attr-defined]
    yield make
    for f in fronts:
        f.close()


def walk(top: Any, hosts: list[str], **kw: Any) -> tuple[list, list[OSError]]:
    errors: list[OSError] = []
    rows = list(parallel_walk(top, hosts=hosts, workers=4, max_budget=8, onerror=errors.append, **kw))
    return rows, errors


def errors_of(errors: list[OSError]) -> list:
    return sorted((e.errno, os.fsencode(e.filename)) for e in errors)


@pytest.mark.parametrize("top", [REMOTE, os.fsencode(REMOTE)], ids=["str", "bytes"])
def test_names_walk_reads_names_frames_exactly(awkward_tree, front, top):
    f = front()
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk(top, [f.hostspec])
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert errors_of(errors) == expected_errors
    assert all(type(n) is type(top) for r, d, fs in rows for n in [r, *d, *fs])
    assert f.served and all(req.get("names_frames") for req in f.served)
    assert "names" in f.tags and "entries" not in f.tags


def test_rows_are_in_the_agents_read_order(awkward_tree, front):
    """Each directory's names as ``os.scandir`` reads them (what ``os.walk`` yields), not sorted."""
    f = front()
    rows, _ = walk(REMOTE, [f.hostspec])
    local = os.fsdecode(awkward_tree)
    for root, dirs, files in rows:
        with os.scandir(local + root[len(REMOTE):]) as it:
            order = [e.name for e in it]
        assert dirs == [n for n in order if n in set(dirs)] and files == [n for n in order if n in set(files)]


def test_agent_refusing_only_names_frames_keeps_the_other_fields(awkward_tree, front):
    """An agent of the release before names frames: asked again without them, and only them."""
    f = front(unknown=("names_frames",))
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk(REMOTE, [f.hostspec])
    assert as_bytes_rows(rows) == expected and errors_of(errors) == expected_errors
    assert 1 <= f.refused <= 4  # once per worker at most, then remembered
    assert len(f.served) > 1
    assert not any("names_frames" in req for req in f.served)
    assert all(req.get("frontier_frames") for req in f.served)
    assert any(req.get("nofollow") for req in f.served)
    assert "entries" in f.tags and "names" not in f.tags


def test_agent_refusing_every_newer_field_is_asked_without_any(awkward_tree, front):
    f = front(unknown=NEWER)
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk(REMOTE, [f.hostspec])
    assert as_bytes_rows(rows) == expected and errors_of(errors) == expected_errors
    assert 2 <= f.refused <= 8  # two steps (names frames, then the rest), per worker at most
    assert f.served and not any(set(NEWER) & set(req) for req in f.served)


def test_stat_walks_do_not_ask_for_names_frames(awkward_tree, front):
    f = front()
    walker = Walker(REMOTE, [f.hostspec], workers=4, stat=True)
    assert sum(len(d.entries) for d in walker.dirs() if d.error is None) > 0
    assert f.served and not any("names_frames" in req for req in f.served)


def test_walker_entries_of_names_frames(awkward_tree, front):
    """``Walker.dirs()`` of a names walk still gives ``entries``: names, kinds and targets
    as the same agent gives them in a stat walk's ``entries`` frames, without stat."""
    f = front()

    def listed(stat: bool) -> dict[bytes, tuple]:
        out = {}
        for d in Walker(REMOTE, [f.hostspec], workers=4, stat=stat).dirs():
            for e in d.entries:
                assert stat or e.stat is None
                out[d.path + b"/" + e.name] = (e.kind, e.target)
        return out

    names = listed(False)
    assert names == listed(True)
    assert {k for k, _ in names.values()} >= {"d", "f", "l", "p"}
    assert {t for k, t in names.values() if k == "l"} >= {"d", "f", None}
    assert "names" in f.tags


# -- lies in names frames ------------------------------------------------------------------

def first_names(edit: Callable[[list], None]) -> Callable[[Frames], Optional[Frames]]:
    """A change that edits the answer's first non-empty ``names`` frame ``[tag, names, kinds, targets]``."""
    def change(frames: Frames) -> Optional[Frames]:
        for f in frames:
            if f[0] == "names" and f[2]:
                edit(f)
                return frames
        return None
    return change


def append(name: bytes, kind: str = "f", target: str = "") -> Callable[[Frames], Optional[Frames]]:
    def edit(f: list) -> None:
        f[1] += b"\0" + name
        f[2] += kind
        f[3] += target
    return first_names(edit)


def split_repeating(frames: Frames) -> Optional[Frames]:
    """The first names frame as two frames, the second repeating a name of the first."""
    for i, f in enumerate(frames):
        if f[0] == "names" and f[2] and "l" not in f[2]:
            first = f[1].split(b"\0")[0]
            frames.insert(i + 1, ["names", first, f[2][0], ""])
            return frames
    return None


def with_entries(frames: Frames) -> Optional[Frames]:
    """An ``entries`` frame after a ``names`` frame of the same directory."""
    for i, f in enumerate(frames):
        if f[0] == "names" and f[2]:
            frames.insert(i + 1, ["entries", [[b"extra-name", "f", None, None, None]]])
            return frames
    return None


def edited(field: int, fn: Callable[[Any], Any]) -> Callable[[Frames], Optional[Frames]]:
    def edit(f: list) -> None:
        f[field] = fn(f[field])
    return first_names(edit)


NAMES_LIES = {
    "slash": append(b"a/b"),
    "dotdot-path": append(b"../../x"),
    "empty-name": append(b""),
    "trailing-nul": edited(1, lambda b: b + b"\0"),
    "dot": append(b"."),
    "dotdot": append(b".."),
    "duplicate": first_names(lambda f: (f.__setitem__(1, f[1] + b"\0" + f[1].split(b"\0")[0]),
                                        f.__setitem__(2, f[2] + f[2][0]),
                                        f.__setitem__(3, f[3] + (f[3][:1] if f[2][0] == "l" else "")))),
    "duplicate-across-frames": split_repeating,
    "kinds-short": edited(2, lambda k: k[:-1]),
    "kinds-long": edited(2, lambda k: k + "f"),
    "bad-kind": edited(2, lambda k: k[:-1] + "x"),
    "bad-kind-inside": edited(2, lambda k: "x" + k[1:]),
    "targets-short": append(b"a-link", "l", ""),
    "targets-long": edited(3, lambda t: t + "d"),
    "bad-target": append(b"a-link", "l", "x"),
    "entries-and-names": with_entries,
}


@pytest.mark.parametrize("lie", sorted(NAMES_LIES))
def test_lying_names_frames_are_refused(awkward_tree, front, lie):
    liar = front(change=NAMES_LIES[lie])
    rows = []
    with pytest.raises(AgentProtocolError) as info:
        for row in parallel_walk(REMOTE, workers=2, hosts=[liar.hostspec], retry_for=1):
            rows.append(row)
    assert liar.tampered >= 1
    assert liar.hostspec in str(info.value) and "valid answer" in str(info.value)
    assert all(b"/" not in os.fsencode(n) and n not in ("", ".", "..") for _, d, f in rows for n in d + f)
    assert all(len(set(d + f)) == len(d + f) for _, d, f in rows)


@pytest.mark.parametrize("lie", ["slash", "duplicate", "kinds-short", "targets-long"])
def test_lying_host_is_set_aside_for_an_honest_one(awkward_tree, front, lie):
    liar = front(change=NAMES_LIES[lie])
    honest = front()
    expected, expected_errors = reference_walk(awkward_tree)
    rows, errors = walk(REMOTE, [liar.hostspec, honest.hostspec], retry_for=10)
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert errors_of(errors) == expected_errors
    assert liar.tampered >= 1


# -- decode_names itself --------------------------------------------------------------------

def names_frame(names: list[bytes], kinds: str, targets: str = "") -> NamesFrame:
    return NamesFrame(b"\0".join(names), kinds, targets)


def test_decode_names_as_text_and_bytes():
    names = [b"plain", "ünï".encode(), b"bad\xff\xfe", b"new\nline", b"..dots", b"-"]
    frame = names_frame(names, "fdlf?p", "-")
    text, seen = decode_names(frame, True, None)
    assert text == [os.fsdecode(n) for n in names] and seen == set(text)
    raw, seen = decode_names(frame, False, None)
    assert raw == names
    more, seen2 = decode_names(names_frame([b"next"], "d"), False, seen)
    assert more == [b"next"] and seen2 is seen and b"next" in seen and b"plain" in seen
    assert decode_names(NamesFrame(b"", "", ""), False, None) == ([], set())


@pytest.mark.parametrize("frame,seen,why,bad", [
    (NamesFrame(b"a\0b/c", "ff", ""), None, "invalid entry name", "b/c'"),
    (NamesFrame(b"a\0\0b", "fff", ""), None, "invalid entry name", "''"),
    (NamesFrame(b"a\0..", "ff", ""), None, "invalid entry name", "'..'"),
    (NamesFrame(b".\0a", "ff", ""), None, "invalid entry name", "'.'"),
    (NamesFrame(b"a\0b\0a", "fff", ""), None, "appears twice", "'a'"),
    (NamesFrame(b"c\0b", "ff", ""), {b"a", b"b"}, "appears twice", "'b'"),
    (NamesFrame(b"a\0b", "f", ""), None, "2 names and 1 kinds", ""),
    (NamesFrame(b"a", "ff", ""), None, "1 names and 2 kinds", ""),
    (NamesFrame(b"a\0b", "fz", ""), None, "invalid kind letter", ""),
    (NamesFrame(b"a\0b\0c", "fZf", ""), None, "invalid kind letter", ""),
    (NamesFrame(b"a\0b", "lf", ""), None, "targets do not match", ""),
    (NamesFrame(b"a\0b", "ff", "d"), None, "targets do not match", ""),
    (NamesFrame(b"a\0b", "lf", "x"), None, "targets do not match", ""),
    (NamesFrame(b"a", "", ""), None, "names but no kinds", ""),
])
def test_decode_names_refuses(frame, seen, why, bad):
    for text in (False, True):
        earlier = None if seen is None else {os.fsdecode(n) if text else n for n in seen}
        with pytest.raises(ProtocolError) as info:
            decode_names(frame, text, earlier)
        assert why in str(info.value) and bad in str(info.value)


# -- threads ---------------------------------------------------------------------------------

def walk_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("diskover-walk-")]


def test_subtree_walk_runs_only_the_threads_it_can_use(awkward_tree, front):
    """40 workers, one agent: at most SUBTREE_PER_HOST requests in flight, so as many threads."""
    f = front()
    before = set(walk_threads())
    most = 0
    rows = 0
    for _row in parallel_walk(REMOTE, hosts=[f.hostspec], workers=40, max_budget=4):
        most = max(most, len(set(walk_threads()) - before))
        rows += 1
    assert rows == len(reference_walk(awkward_tree)[0])
    assert 1 <= most <= SUBTREE_PER_HOST
    assert set(walk_threads()) - before == set()


def test_per_directory_walk_runs_its_workers(awkward_tree, front):
    f = front()
    before = set(walk_threads())
    most = 0
    for _row in parallel_walk(REMOTE, hosts=[f.hostspec], workers=6, mode="listdir"):
        most = max(most, len(set(walk_threads()) - before))
    assert most == 6
    assert set(walk_threads()) - before == set()


def test_walk_through_an_agent_without_subtree_runs_its_workers(awkward_tree, front):
    """Auto mode: the agent lists one directory per request, so every worker gets a thread."""
    f = front(no_subtree=True)
    before = set(walk_threads())
    most = 0
    rows = []
    for row in parallel_walk(REMOTE, hosts=[f.hostspec], workers=6):
        most = max(most, len(set(walk_threads()) - before))
        rows.append(row)
    assert as_bytes_rows(rows) == reference_walk(awkward_tree)[0]
    assert most == 6
    assert set(walk_threads()) - before == set()
