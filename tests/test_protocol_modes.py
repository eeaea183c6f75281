"""The subtree protocol's negotiation: gzip on request, and per-directory fallback
against an agent that does not offer the subtree walk."""

from __future__ import annotations

import asyncio
import http.client
import threading
import zlib
from collections.abc import Iterator

import pytest
from aiohttp import web

from diskover_agent import parallel_walk
from diskover_agent.protocol import PROTOCOL_HEADER, read_frames
from diskover_agent.walk import Walker

from conftest import REMOTE, as_bytes_rows, reference_walk


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


class ListingOnlyAgent:
    """A front for a real agent that forwards listings and has no subtree walk,
    like an agent that predates it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.walk_requests = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.runner = web.ServerRunner(web.Server(self._handle))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.raw_path.startswith("/_agent/"):
            self.walk_requests += 1
            return web.Response(status=404, text="no such endpoint", headers={PROTOCOL_HEADER: "1"})
        status, headers, body = await self.loop.run_in_executor(None, self._forward, request.raw_path)
        return web.Response(status=status, body=body, headers=headers)

    def _forward(self, target: str) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", PROTOCOL_HEADER.lower())}
            return resp.status, keep, resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


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
    assert walker.served()[hosts[0]]["dirs"] > 0  # and still used, one directory per request
    rows = list(parallel_walk(REMOTE, hosts=hosts[:1]))
    assert as_bytes_rows(rows) == expected


def test_subtree_mode_refuses_to_fall_back(listing_only):
    with pytest.raises(Exception, match="does not offer the subtree walk"):
        list(parallel_walk(REMOTE, hosts=[f"127.0.0.1:{listing_only.port}"], mode="subtree"))
