"""Symlink swaps with one listing per directory (``mode="listdir"``, ``readahead=False``):
a directory swapped for a symlink after its parent was listed is not walked through, as
``os.walk`` does not descend into a symlink it finds at descent time. The listing's
``nofollow`` parameter, and its fallback for an agent that predates it."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from diskover_agent import AgentConnection, parallel_walk
from diskover_agent.protocol import PROTOCOL_HEADER
from test_symlink_swap import make_tree, under

from conftest import REMOTE, FrontServer, as_bytes_rows, http_get, reference_walk

RB = REMOTE.encode()


def swap(top: Path, aside: Path) -> None:
    """``x`` (a directory) becomes a symlink to ``y``."""
    os.rename(top / "x", aside)
    os.symlink("y", top / "x")


def local_walk_with_swap(top: Path, aside: Path, followlinks: bool) -> list[tuple[bytes, list, list]]:
    """What ``os.walk`` yields on the same tree when ``x`` is swapped after the top was
    yielded, with roots mapped to REMOTE (in os.walk's order)."""
    lb = os.fsencode(top)
    rows = []
    for root, dirs, files in os.walk(lb, followlinks=followlinks):
        dirs.sort()
        rows.append((RB + root[len(lb):], sorted(dirs), sorted(files)))
        if root == lb:
            swap(top, aside)
    return rows


class SwapFront(FrontServer):
    """Forwards to a real agent; before it forwards the first request after the first
    (the top's listing), it swaps ``x`` for a symlink, so the swap comes between the
    parent's listing and its children's, whatever the loop body does."""

    def __init__(self, upstream_port: int, top: Path, aside: Path) -> None:
        self.top, self.aside = top, aside
        self.targets: list[str] = []
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.targets.append(request.raw_path)
        if len(self.targets) == 2:  # on the front's loop, before any other request is forwarded
            swap(self.top, self.aside)
        return await self.forward(request, await request.read())


def test_readahead_false_matches_os_walk_on_a_swap(tmp_path, start_agent):
    """Swap from the loop body after the top was yielded: with ``readahead=False`` no child
    was read yet, so the walk sees exactly what os.walk sees, in its order."""
    for followlinks in (False, True):
        mine, theirs = tmp_path / f"tree-{followlinks}", tmp_path / f"local-{followlinks}"
        make_tree(mine)
        make_tree(theirs)
        expected = local_walk_with_swap(theirs, tmp_path / f"local-aside-{followlinks}", followlinks)
        agent = start_agent([(REMOTE, str(mine))])
        rows, errors = [], []
        for root, dirs, files in parallel_walk(RB, hosts=[agent.hostspec], workers=4, readahead=False,
                                               followlinks=followlinks, onerror=errors.append):
            rows.append((root, sorted(dirs), sorted(files)))
            if root == RB:
                swap(mine, tmp_path / f"aside-{followlinks}")
        assert rows == expected
        assert errors == []
        walked_x = any(under(r[0], RB + b"/x") for r in rows)
        assert walked_x == followlinks  # os.walk follows x only with followlinks


@pytest.mark.parametrize("topdown", [True, False])
@pytest.mark.parametrize("mode", ["listdir", "subtree"])
def test_read_ahead_swap_between_parent_and_child_listing(tmp_path, start_agent, mode, topdown):
    top = tmp_path / "tree"
    make_tree(top)
    expected, _ = reference_walk(top, nocaps=False)
    # os.walk lists the top with x a directory, then finds x a symlink and does not descend
    expected = {row for row in expected if not under(row[0], RB + b"/x")}
    agent = start_agent([(REMOTE, str(top))])
    front = SwapFront(agent.port, top, tmp_path / "aside")
    errors: list[OSError] = []
    try:
        rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=2, mode=mode, max_budget=1,
                                  topdown=topdown, onerror=errors.append))
    finally:
        front.close()
    assert os.path.islink(top / "x")  # the swap happened, after the top's request
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)
    assert errors == []
    if mode == "listdir":
        assert not front.targets[0].endswith("nofollow=1")  # the top is followed
        assert all(t.endswith("nofollow=1") for t in front.targets[1:])


def test_listing_nofollow_answers_skip(tmp_path, start_agent):
    top = tmp_path / "tree"
    make_tree(top)
    os.symlink("y", top / "link")
    agent = start_agent([(REMOTE, str(top))])

    def frames(target: str) -> list:
        status, headers, data = http_get(agent.port, target)
        assert status == 200, data
        assert headers["Content-Type"].startswith("application/x-ndjson")
        return [msgspec.json.decode(line) for line in data.splitlines()]

    assert frames(f"{REMOTE}/link?format=ndjson&nofollow=1") == [["skip", REMOTE + "/link"], ["end", []]]
    listed = frames(f"{REMOTE}/x?format=ndjson&nofollow=1")  # a real directory is listed as usual
    assert listed[0] == ["dir", REMOTE + "/x", None] and listed[-1] == ["end", []]
    assert sorted(e[0] for e in listed[1][1]) == ["a", "b"]
    followed = frames(f"{REMOTE}/link?format=ndjson")  # without it, followed as before
    assert followed[0] == ["dir", REMOTE + "/link", None]
    assert [e[0] for e in followed[1][1]] == ["c"]
    status, _h, data = http_get(agent.port, f"{REMOTE}/link?format=msgpack&nofollow=1&stat=1")
    assert status == 200
    assert msgspec.msgpack.decode(data[4:4 + int.from_bytes(data[:4], "big")]) == ["skip", RB + b"/link"]
    status, _h, data = http_get(agent.port, f"{REMOTE}/link?nofollow=1")
    assert status == 400 and b"nofollow needs format=msgpack or format=ndjson" in data
    status, _h, data = http_get(agent.port, f"{REMOTE}/x?format=ndjson&nofollow=2")
    assert status == 400 and b"nofollow must be 0 or 1" in data
    # the user-facing calls follow symlinks, as os.listdir and os.scandir do
    with AgentConnection(agent.hostspec) as conn:
        assert conn.listdir(REMOTE + "/link") == (REMOTE + "/link", ["c"], [])
        assert [e.name for e in conn.scandir(REMOTE + "/link")] == ["c"]


class OldListingFront(FrontServer):
    """A real agent behind a front that answers a listing with ``nofollow`` as an agent
    that predates it does: 400, unknown query parameter."""

    def __init__(self, upstream_port: int) -> None:
        self.refused = 0
        self.served: list[str] = []
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if "nofollow" in request.query:
            self.refused += 1
            return web.json_response({"error": "bad_request", "message": "unknown query parameter 'nofollow'"},
                                     status=400, headers={PROTOCOL_HEADER: "1"})
        self.served.append(request.raw_path)
        return await self.forward(request)


@pytest.mark.parametrize("readahead", [True, False])
def test_new_client_lists_through_an_older_agent(awkward_tree, start_agent, readahead):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, expected_errors = reference_walk(awkward_tree)
    front = OldListingFront(agent.port)
    try:
        errors: list[OSError] = []
        rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=4, mode="listdir",
                                  readahead=readahead, onerror=errors.append))
    finally:
        front.close()
    assert as_bytes_rows(rows) == expected
    assert len(rows) == len(expected)
    assert sorted((e.errno, os.fsencode(e.filename)) for e in errors) == expected_errors
    assert 1 <= front.refused <= 4  # once per worker at most, then remembered
    assert len(front.served) >= len(expected)

