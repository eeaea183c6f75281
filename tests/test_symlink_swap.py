"""A directory swapped for a symlink after its parent was listed is not walked through,
as ``os.walk`` does not descend into a symlink it finds at descent time; the top the user
asked for is still followed. And the newer walk fields fall back for an older agent."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from diskover_agent import parallel_walk
from diskover_agent.protocol import PROTOCOL_HEADER, WalkRequest, encode_walk_request

from conftest import REMOTE, FrontServer, as_bytes_rows, http_get, reference_walk

RB = REMOTE.encode()


class GatedFront(FrontServer):
    """Forwards to a real agent; every walk request after the first waits until
    ``release`` is set, so the test acts between two requests of one walk."""

    def __init__(self, upstream_port: int) -> None:
        self.release = threading.Event()
        self.walks = 0
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        if request.raw_path.startswith("/_agent/v1/walk"):
            self.walks += 1
            if self.walks > 1:
                released = await self.loop.run_in_executor(None, self.release.wait, 60)
                assert released, "the test never released the walk"
        return await self.forward(request, body)


def make_tree(top: Path) -> None:
    (top / "x" / "a").mkdir(parents=True)
    (top / "x" / "a" / "f").write_bytes(b"f")
    (top / "x" / "b").mkdir()
    (top / "y" / "c").mkdir(parents=True)
    (top / "y" / "c" / "g").write_bytes(b"g")
    (top / "z").write_bytes(b"z")


def under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def test_directory_swapped_for_a_symlink_is_not_walked(tmp_path, start_agent):
    top = tmp_path / "tree"
    top.mkdir()
    make_tree(top)
    agent = start_agent([(REMOTE, str(top))])
    expected, _ = reference_walk(top, nocaps=False)
    # os.walk yields the top as it listed it, then finds x a symlink and does not descend
    expected = {row for row in expected if not under(row[0], RB + b"/x")}
    front = GatedFront(agent.port)
    rows = []
    try:
        # a budget of one entry: the top is listed alone, x and y come from its frontier
        for root, dirs, files in parallel_walk(REMOTE, hosts=[front.hostspec], workers=2, max_budget=1):
            rows.append((root, dirs, files))
            if root == REMOTE:
                os.rename(top / "x", tmp_path / "x-moved")
                os.symlink("y", top / "x")
                front.release.set()
    finally:
        front.release.set()
        front.close()
    assert front.walks >= 2  # x was asked for in a later request than its parent
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)


@pytest.mark.parametrize("budget", [1, 4096])
def test_top_that_is_a_symlink_is_followed(tmp_path, start_agent, budget):
    top = tmp_path / "tree"
    top.mkdir()
    make_tree(top)
    os.symlink("x", top / "link")
    agent = start_agent([(REMOTE, str(top))])
    want = {(RB + b"/link" + r[len(RB + b"/x"):], d, f)
            for r, d, f in reference_walk(top, nocaps=False)[0] if under(r, RB + b"/x")}
    rows = list(parallel_walk(REMOTE + "/link", hosts=[agent.hostspec], workers=2, max_budget=budget))
    assert as_bytes_rows(rows) == want
    assert len(rows) == len(want) == 3


def test_walk_request_nofollow_answers_skip(tmp_path, start_agent):
    top = tmp_path / "tree"
    top.mkdir()
    make_tree(top)
    os.symlink("y", top / "link")
    agent = start_agent([(REMOTE, str(top))])
    paths = [RB + b"/link", RB + b"/x/a"]

    def frames(**fields) -> list:
        body = msgspec.json.encode({"paths": [os.fsdecode(p) for p in paths], "max_entries": 1000, **fields})
        status, _h, data = http_get(agent.port, "/_agent/v1/walk", method="POST", body=body,
                                    headers={"Content-Type": "application/json"})
        assert status == 200, data
        return [msgspec.json.decode(line) for line in data.splitlines()]

    got = frames(nofollow=True)
    assert got[0] == ["skip", REMOTE + "/link"]
    assert [f[1] for f in got if f[0] == "dir"] == [REMOTE + "/x/a"]
    assert got[-1] == ["end", []]
    # without nofollow (a top, or a client that predates it) the symlink is followed, as before
    assert [f[1] for f in frames() if f[0] == "dir"] == [REMOTE + "/link", REMOTE + "/link/c", REMOTE + "/x/a"]


class OldAgentFront(FrontServer):
    """A real agent behind a front that refuses the newer walk fields with 400, as an
    agent that predates them does (its request decoder forbids unknown fields)."""

    def __init__(self, upstream_port: int) -> None:
        self.refused = 0
        self.served: list[dict] = []
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        if request.raw_path.startswith("/_agent/v1/walk"):
            fields = msgspec.msgpack.decode(body)
            newer = sorted({"frontier_frames", "nofollow"} & set(fields))
            if newer:
                self.refused += 1
                message = f"bad walk request: Object contains unknown field `{newer[0]}`"
                return web.json_response({"error": "bad_request", "message": message}, status=400,
                                         headers={PROTOCOL_HEADER: "1"})
            self.served.append(fields)
        return await self.forward(request, body)


def test_new_client_walks_through_an_older_agent(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, expected_errors = reference_walk(awkward_tree)
    front = OldAgentFront(agent.port)
    try:
        errors: list[OSError] = []
        rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=4, max_budget=8,
                                  onerror=errors.append))
    finally:
        front.close()
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)
    assert sorted((e.errno, os.fsencode(e.filename)) for e in errors) == expected_errors
    assert 1 <= front.refused <= 4  # once per worker at most, then remembered
    assert len(front.served) > 1


def test_request_encoding_omits_default_fields():
    """What a client sends an older agent without the newer fields: no trace of them."""
    body = msgspec.msgpack.decode(encode_walk_request(WalkRequest(paths=[b"/a"])))
    assert body == {"paths": [b"/a"]}
