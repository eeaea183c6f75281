"""What the client promises about its traffic, seen on the wire: gzip when asked for, the
agent's own 503 honoured, hosts set aside with growing backoff, a subtree budget that starts
small and doubles to 4,096, at most 4 subtree requests in flight per agent, and ``connect()``
skipping hosts that do not answer. A recording front (``FrontServer``) stands between the
client and a real agent where the traffic itself is the claim."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import os
import re
import select
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from diskover_agent import AgentConnection, parallel_walk
from diskover_agent.backoff import BACKOFF_FIRST, BACKOFF_MAX
from diskover_agent.errors import AgentConnectionError, AgentProtocolError
from diskover_agent.protocol import WalkRequest
from diskover_agent.transport import AgentHTTP, ClientOptions, parse_host
from diskover_agent.walk import FIRST_BUDGET, MAX_BUDGET, SUBTREE_PER_HOST, Walker, _Hosts

from conftest import REMOTE, FrontServer, as_bytes_rows, reference_walk, slowfs_mounted, wait_for

RB = REMOTE.encode()

MODES = ["subtree", "listdir"]


class Recorder(FrontServer):
    """Forwards every request to the agent and records it: arrival time, ``Accept-Encoding``,
    the walk request's budget, the answer's status, encoding and first bytes, and the most
    requests it had in flight at once. With ``gather``, the first requests are held until
    ``gather`` are in flight (or ``hold`` seconds passed), so that a client that would send
    that many at once is seen doing it."""

    def __init__(self, upstream_port: int, gather: int = 0, hold: float = 0.0) -> None:
        self.records: list[dict] = []
        self.inflight = 0
        self.peak = 0
        self.gather = gather
        self.hold = hold
        self._gathered: asyncio.Event | None = None
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.gather:
                if self._gathered is None:
                    self._gathered = asyncio.Event()
                if self.inflight >= self.gather:
                    self._gathered.set()
                try:
                    await asyncio.wait_for(self._gathered.wait(), self.hold)
                except asyncio.TimeoutError:
                    self._gathered.set()  # the gathering is over, for good
            resp = await self.forward(request, body)
        finally:
            self.inflight -= 1
        budget = None
        if request.path.endswith("/_agent/v1/walk"):
            budget = msgspec.msgpack.decode(body, type=WalkRequest).max_entries
        self.records.append({
            "arrived": arrived, "path": request.path, "accept_encoding": request.headers.get("Accept-Encoding"),
            "budget": budget, "status": resp.status, "encoding": resp.headers.get("Content-Encoding"),
            "head": bytes(resp.body[:2]), "retry_after": resp.headers.get("Retry-After"),
        })
        return resp


class DeadAgent(FrontServer):
    """What a proxy in front of a dead agent answers (502, not an agent's answer): records
    when each request came."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        super().__init__(0)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.arrivals.append(time.monotonic())
        await request.read()
        return web.Response(status=502, text="bad gateway")


def make_tree(top: Path, dirs: int, subdirs: int, files: int) -> Path:
    for i in range(dirs):
        for j in range(subdirs):
            (top / f"d{i:03}" / f"s{j}").mkdir(parents=True)
        for k in range(files):
            os.close(os.open(top / f"d{i:03}" / f"f{k:03}", os.O_CREAT | os.O_WRONLY, 0o644))
    return top


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, set]:
    top = make_tree(tmp_path_factory.mktemp("wire") / "small", dirs=8, subdirs=2, files=3)
    return top, reference_walk(top, nocaps=False)[0]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, set]:
    """About 3,500 entries in 240 directories: more than the budgets of the first requests."""
    top = make_tree(tmp_path_factory.mktemp("wire") / "wide", dirs=80, subdirs=2, files=40)
    return top, reference_walk(top, nocaps=False)[0]


@pytest.fixture
def recorder_for():
    fronts: list[Recorder] = []

    def make(agent, **kwargs) -> Recorder:
        front = Recorder(agent.port, **kwargs)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.close()


# -- gzip --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_compress_asks_for_gzip_and_gets_it_on_the_wire(small, start_agent, recorder_for, mode):
    top, expected = small
    agent = start_agent([(REMOTE, str(top))])
    front = recorder_for(agent)
    rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=4, mode=mode, compress=True))
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert front.records
    for r in front.records:
        assert r["accept_encoding"] == "gzip", r
        assert r["status"] == 200 and r["encoding"] == "gzip" and r["head"] == b"\x1f\x8b", r


def test_no_gzip_on_loopback_by_default(small, start_agent, recorder_for):
    top, expected = small
    agent = start_agent([(REMOTE, str(top))])
    front = recorder_for(agent)
    rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=4))
    assert as_bytes_rows(rows) == expected
    assert front.records
    assert all(r["accept_encoding"] == "identity" and r["encoding"] is None for r in front.records)


# -- the agent's own 503 ---------------------------------------------------------------------

def metric(port: int, name: str, labels: str = "") -> float:
    """A value of the agent's metrics (0 when it has none yet)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_agent/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    series = name + (f"{{{labels}}}" if labels else "")
    found = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_walk_through_the_agents_own_503_is_exact(small, start_agent, recorder_for, tmp_path, mode):
    """An agent at ``-c 1 --max-queue 1`` with its slot held (a listing stuck in a slow
    directory) and its line full answers the walk 503 with Retry-After; the walk waits and
    completes exactly once the slot is free."""
    top, expected = small
    mnt, gate, log = tmp_path / "slowfs", tmp_path / "gate", tmp_path / "started"
    mnt.mkdir()
    with slowfs_mounted(mnt, SLOWFS_GATE=str(gate), SLOWFS_LOG=str(log)):
        agent = start_agent([(REMOTE, str(top)), ("/mnt/slow", str(mnt))], extra=("-c", "1", "--max-queue", "1"))
        try:
            front = recorder_for(agent)
            statuses: list[int] = []
            holders = [threading.Thread(target=lambda p=p: statuses.append(http_listing(agent.port, p)), daemon=True)
                       for p in ("/mnt/slow/slow0", "/mnt/slow/fast")]
            holders[0].start()  # takes the one slot, stuck in the slow directory
            wait_until(lambda: log.exists() and log.read_text(), "the slow listing to start")
            holders[1].start()  # waits in the line of one
            wait_until(lambda: metric(agent.port, "diskover_agent_requests_waiting") == 1, "a full line")
            endpoint = "walk" if mode == "subtree" else "listing"
            busy = f'endpoint="{endpoint}",status="503"'
            rows: list = []
            walk = threading.Thread(target=lambda: rows.extend(parallel_walk(
                REMOTE, hosts=[front.hostspec], workers=2, mode=mode, retry_for=60)), daemon=True)
            walk.start()
            wait_until(lambda: metric(agent.port, "diskover_agent_requests_total", busy) >= 1, "the agent's 503")
        finally:
            gate.touch()  # the slow listing ends, the slot is free
        walk.join(60)
        assert not walk.is_alive()
        for t in holders:
            t.join(30)
        agent.stop()  # before the unmount: it holds the export open
    assert statuses == [200, 200]  # the listings that held the slot and the line were served
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    refused = [r for r in front.records if r["status"] == 503]
    assert refused and all(r["retry_after"] == "1" for r in refused)
    assert all(r["status"] in (200, 503) for r in front.records)


def http_listing(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# -- backoff -----------------------------------------------------------------------------------

def test_backoff_doubles_from_0_2_to_5_seconds_and_resets():
    hosts = _Hosts([AgentConnection(["127.0.0.1:1"])._addresses[0]])
    assert (BACKOFF_FIRST, BACKOFF_MAX) == (0.2, 5.0)
    for failures in range(1, 10):
        before = time.monotonic()
        hosts.failed(0)
        idx, wait = hosts.pick()
        took = time.monotonic() - before
        want = min(0.2 * 2 ** (failures - 1), 5.0)
        assert idx == -1 and want - took <= wait <= want, (failures, wait)
    hosts.succeeded(0, 1)
    before = time.monotonic()
    hosts.failed(0)
    _, wait = hosts.pick()
    assert 0.2 - (time.monotonic() - before) <= wait <= 0.2
    # Retry-After wins over the backoff
    hosts.failed(0, retry_after=1.0)
    _, wait = hosts.pick()
    assert 0.5 < wait <= 1.0


def test_a_failing_host_is_retried_with_growing_intervals():
    """A walk whose only host fails is retried after 0.2, 0.4, 0.8... s (lower bounds exact:
    a retry comes no sooner than the backoff after the failure; upper ones generous)."""
    dead = DeadAgent()
    try:
        # what answers 502 without the protocol header is no agent: the walk says so in the end
        with pytest.raises(AgentProtocolError, match="not a diskover storage agent"):
            list(parallel_walk(REMOTE, hosts=[dead.hostspec], workers=1, mode="subtree", retry_for=3.5))
    finally:
        dead.close()
    arrivals = dead.arrivals
    assert len(arrivals) >= 4, arrivals
    intervals = [b - a for a, b in itertools.pairwise(arrivals)]
    for k, got in enumerate(intervals[:4]):
        want = 0.2 * 2 ** k
        assert want * 0.98 <= got <= want + 1.5, (k, intervals)


# -- budgets and requests in flight ------------------------------------------------------------

def test_first_budget_small_doubling_to_4096(wide, start_agent, recorder_for):
    top, expected = wide
    agent = start_agent([(REMOTE, str(top))])
    front = recorder_for(agent)
    rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=8))
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    budgets = [r["budget"] for r in sorted(front.records, key=lambda r: r["arrived"])]
    assert (FIRST_BUDGET, MAX_BUDGET) == (256, 4096)
    assert budgets[0] == 256, budgets
    assert set(budgets) <= {256, 512, 1024, 2048, 4096}, budgets
    assert max(budgets) == 4096, budgets


def test_at_most_4_subtree_requests_per_agent(wide, start_agent, recorder_for):
    top, expected = wide
    agent = start_agent([(REMOTE, str(top))])
    # the first requests wait until a fifth one comes (or 2 s): a client that sends more
    # than 4 at once is caught doing it
    front = recorder_for(agent, gather=SUBTREE_PER_HOST + 1, hold=2.0)
    rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=40, max_budget=64))
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert SUBTREE_PER_HOST == 4
    assert 1 < front.peak <= 4, front.peak
    assert len(front.records) > 20


def test_at_most_4_subtree_requests_per_agent_beside_a_dead_one(wide, start_agent, recorder_for):
    """Two hosts give the walk 8 threads; with one dead, the live one still gets at most 4 at once."""
    top, expected = wide
    agent = start_agent([(REMOTE, str(top))])
    front = recorder_for(agent, gather=SUBTREE_PER_HOST + 1, hold=2.0)
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    rows = list(parallel_walk(REMOTE, hosts=[dead, front.hostspec], workers=40, max_budget=64))
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert 1 < front.peak <= SUBTREE_PER_HOST, front.peak


# -- connect() -----------------------------------------------------------------------------------

def test_connect_skips_a_dead_host(small, start_agent):
    top, _ = small
    a = start_agent([(REMOTE, str(top))])
    b = start_agent([(REMOTE, str(top))])
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    conn = AgentConnection([dead, a.hostspec, b.hostspec], connect_timeout=2)
    try:
        conn.connect()
        assert conn.conn_host() == a.hostspec
        assert conn.listdir(REMOTE)[1] == sorted(os.listdir(top))
        conn.connect()
        assert conn.conn_host() == b.hostspec
        conn.connect()  # round again: the dead one skipped
        assert conn.conn_host() == a.hostspec
    finally:
        conn.close()
    with pytest.raises(AgentConnectionError, match=re.escape(dead)):
        AgentConnection([dead], connect_timeout=2).connect()



def test_walk_requests_reuse_their_connections(tmp_path, start_agent):
    """Each walk thread keeps one connection: answers are read to their end, so the next
    request goes over the same connection (it used to open a new one per request)."""
    top = tmp_path / "t"
    for i in range(40):
        for j in range(10):
            (top / f"d{i}" / f"e{j}").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(top))])
    walker = Walker(REMOTE, [agent.hostspec], workers=2, max_budget=8, mode="subtree")
    rows = sum(1 for _ in walker.dirs())
    assert rows == 1 + 40 + 400
    requests = sum(walker.hosts.requests)
    assert requests > 20  # budgets of at most 8 entries: many requests
    opened = [conn.opened for conn in walker._conns]
    assert 1 <= len(opened) <= 2 and opened == [1] * len(opened), (opened, requests)  # one per walk thread


def test_a_kept_alive_connection_the_agent_closed_is_sent_again(tmp_path, start_agent):
    """The agent closes an idle connection (its keep-alive timeout); the next request on it
    goes out again on a new connection instead of failing (a walk would set the host aside
    and name it as not answering)."""
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(top))], extra=("--keepalive-timeout", "1"))
    conn = AgentHTTP(parse_host(agent.hostspec), ClientOptions())
    try:
        assert conn.statvfs(RB, REMOTE)["f_bsize"] > 0  # its answer read to the end: kept alive
        assert conn._conn is not None
        sock = conn._conn.sock

        def closed_by_the_agent() -> bool:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""

        wait_for(closed_by_the_agent, what="the agent to close the idle connection")
        assert conn.statvfs(RB, REMOTE)["f_bsize"] > 0
        assert conn.opened == 2
    finally:
        conn.close()
