"""The subtree protocol's negotiation: gzip on request, and per-directory fallback
against an agent that does not offer the subtree walk."""

from __future__ import annotations

import http.client
import zlib
from collections.abc import Iterator

import pytest
from aiohttp import web

from diskover_agent import parallel_walk
from diskover_agent.protocol import PROTOCOL_HEADER, read_frames
from diskover_agent.walk import Walker

from conftest import REMOTE, FrontServer, as_bytes_rows, reference_walk


def test_gzip_answers_when_asked(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", REMOTE + "?format=msgpack", headers={"Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") == "gzip"
    body = zlib.decompress(resp.read(), 31)
    frames = list(read_frames(_reader(body)))
    assert frames[0].path == REMOTE.encode()
    conn.request("GET", REMOTE + "?format=msgpack", headers={"Accept-Encoding": "gzip;q=0, identity"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") is None
    resp.read()
    conn.close()


def _reader(data: bytes):
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = data[pos:pos + n]
        pos += len(out)
        return out

    return read


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_compressed_walk_is_exact(awkward_tree, start_agent, mode):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, _ = reference_walk(awkward_tree)
    rows = list(parallel_walk(REMOTE, hosts=[agent.hostspec], compress=True, mode=mode))
    assert as_bytes_rows(rows) == expected


class ListingOnlyAgent(FrontServer):
    """A front for a real agent that forwards listings and has no subtree walk,
    like an agent that predates it."""

    def __init__(self, upstream_port: int) -> None:
        self.walk_requests = 0
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if request.raw_path.startswith("/_agent/"):
            self.walk_requests += 1
            return web.Response(status=404, text="no such endpoint", headers={PROTOCOL_HEADER: "1"})
        return await self.forward(request)


@pytest.fixture
def listing_only(awkward_tree, start_agent) -> Iterator[ListingOnlyAgent]:
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    front = ListingOnlyAgent(agent.port)
    yield front
    front.close()


def test_falls_back_to_listings_per_directory(awkward_tree, listing_only, start_agent):
    modern = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    expected, expected_errors = reference_walk(awkward_tree)
    hosts = [f"127.0.0.1:{listing_only.port}", modern.hostspec]
    walker = Walker(REMOTE, hosts, workers=4)
    paths = [d.path for d in walker.dirs()]
    assert sorted(paths) == sorted({r for r, _, _ in expected} | {p for _, p in expected_errors})
    # asked at most once per worker (they may race at the start), then remembered
    assert 1 <= listing_only.walk_requests <= 4
    # alone, the old agent serves the whole walk, one directory per request
    asked = listing_only.walk_requests
    walker = Walker(REMOTE, hosts[:1], workers=4)
    assert sum(1 for _ in walker.dirs()) == len(paths)
    assert listing_only.walk_requests - asked <= 4
    assert walker.served()[hosts[0]] == {"requests": len(paths), "dirs": len(paths)}
    assert as_bytes_rows(list(parallel_walk(REMOTE, hosts=hosts[:1]))) == expected


def test_subtree_mode_refuses_to_fall_back(listing_only):
    with pytest.raises(Exception, match="does not offer the subtree walk"):
        list(parallel_walk(REMOTE, hosts=[f"127.0.0.1:{listing_only.port}"], mode="subtree"))
