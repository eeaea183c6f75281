"""The client under faults: hosts that never answer, agents killed and restarted mid-walk, a
port that stops accepting, directories the agent cannot read, and agents that answer 503.
Walks must still be exact (as ``os.walk`` on the node), real errors reported once, and dead
ends turned into ``AgentConnectionError`` within bounded time."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiohttp import web

from diskover_agent import AgentConnection, parallel_walk
from diskover_agent.errors import AgentConnectionError
from diskover_agent.protocol import PROTOCOL_HEADER

from conftest import HAVE_SETPRIV, IS_ROOT, NO_SETPRIV, REMOTE, FrontServer, as_bytes_rows, reference_walk, wait_for

needs_nocaps = pytest.mark.skipif(IS_ROOT and not HAVE_SETPRIV, reason=NO_SETPRIV)


# -- trees -------------------------------------------------------------------------------------

def make_tree(top: Path, fanout: int, depth: int, files: int) -> Path:
    """A regular tree: ``fanout`` subdirectories per level, ``files`` files in each directory."""
    top.mkdir(parents=True)
    level = [top]
    for _ in range(depth):
        nxt = []
        for d in level:
            for i in range(fanout):
                sub = d / f"d{i}"
                sub.mkdir()
                nxt.append(sub)
        level = nxt
    for dirpath, _, _ in os.walk(top):
        for i in range(files):
            with open(os.path.join(dirpath, f"f{i}"), "wb"):
                pass
    return top


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> tuple[Path, set]:
    top = make_tree(tmp_path_factory.mktemp("faults") / "small", fanout=3, depth=3, files=2)
    return top, reference_walk(top)[0]


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> tuple[Path, set]:
    """About 5,500 directories: with a budget of 16 entries a request, a walk takes seconds."""
    top = make_tree(tmp_path_factory.mktemp("faults") / "big", fanout=6, depth=4, files=3)
    return top, reference_walk(top)[0]


# -- hosts that never answer -------------------------------------------------------------------

class Blackhole:
    """A port that accepts connections (the kernel completes the handshake into the backlog)
    and never answers: the process behind it is hung."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.hostspec = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


class FullBacklog:
    """A port whose accept queue is full: new connections are not even completed
    (the kernel drops the SYNs), as behind a firewall that drops packets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.hostspec = f"127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        # Fill the queue until a connection attempt hangs.
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.3)
            try:
                s.connect(("127.0.0.1", self.port))
            except (TimeoutError, BlockingIOError):
                s.close()
                return
            self.fillers.append(s)
        raise AssertionError("could not fill the accept queue: connections keep being completed")

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    b = Blackhole()
    yield b
    b.close()


@pytest.fixture
def full_backlog() -> Iterator[FullBacklog]:
    b = FullBacklog()
    yield b
    b.close()


@pytest.mark.parametrize("dead", ["blackhole", "full_backlog"])
def test_walk_next_to_a_dead_host_is_exact(small_tree, start_agent, request, dead):
    top, expected = small_tree
    hole = request.getfixturevalue(dead)
    agent = start_agent([(REMOTE, str(top))])
    start = time.monotonic()
    rows = list(parallel_walk(REMOTE, hosts=[hole.hostspec, agent.hostspec], workers=4, timeout=1,
                              connect_timeout=1))
    took = time.monotonic() - start
    assert len(rows) == len(expected)
    assert as_bytes_rows(rows) == expected
    assert took < 8, f"the walk took {took:.1f} s next to a dead host"


@pytest.mark.parametrize("dead", ["blackhole", "full_backlog"])
def test_listdir_through_only_a_dead_host_raises(request, dead):
    hole = request.getfixturevalue(dead)
    conn = AgentConnection([hole.hostspec], timeout=1, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(AgentConnectionError):
        conn.listdir(REMOTE)
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("dead", ["blackhole", "full_backlog"])
def test_walk_through_only_a_dead_host_raises(request, dead):
    hole = request.getfixturevalue(dead)
    retry_for = 2
    start = time.monotonic()
    with pytest.raises(AgentConnectionError):
        list(parallel_walk(REMOTE, hosts=[hole.hostspec], workers=4, timeout=1, connect_timeout=1,
                           retry_for=retry_for))
    took = time.monotonic() - start
    assert retry_for - 0.5 <= took < retry_for + 1 + 3, took


# -- agents killed mid-walk ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def walk_requests(agent) -> int:
    return sum("/_agent/v1/walk" in line for line in agent.log)


def test_agent_killed_and_restarted_on_the_same_port(big_tree, start_agent):
    top, expected = big_tree
    port = free_port()
    first = start_agent([(REMOTE, str(top))], extra=("-p", str(port), "-v"))
    assert first.port == port
    walk = parallel_walk(REMOTE, hosts=[first.hostspec], workers=4, retry_for=20, max_budget=16)
    rows = [next(walk) for _ in range(20)]
    first.kill()
    killed_at = time.monotonic()
    second = start_agent([(REMOTE, str(top))], extra=("-p", str(port), "-v"))
    assert second.port == port
    rows += list(walk)
    took = time.monotonic() - killed_at
    assert walk_requests(second) > 0, "the walk had finished before the kill: nothing was tested"
    assert len(rows) == len(expected)  # nothing listed twice
    assert as_bytes_rows(rows) == expected
    assert took < 15


def test_worker_process_killed_mid_walk(big_tree, start_agent):
    """A 2-process agent whose worker holding the walk's connections is SIGKILLed mid-walk:
    its connections (and those waiting in its accept queue) are reset, the walk engine
    requeues what they carried, and the walk through the other workers is still exact."""
    top, expected = big_tree
    agent = start_agent([(REMOTE, str(top))], processes=2, extra=("-v",))

    def held() -> dict[int, int]:  # worker pid -> connections it holds from this client
        out = {}
        for child in psutil.Process(agent.pid).children():
            try:
                out[child.pid] = sum(c.laddr.port == agent.port and c.status == psutil.CONN_ESTABLISHED
                                     for c in child.net_connections("tcp"))
            except psutil.NoSuchProcess:
                pass
        return out

    # A small backlog: while this test holds the walk, its threads wait with their (kept-alive)
    # connections open, and the walk cannot end before the kill.
    walk = parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, retry_for=20, max_budget=16, max_backlog=50)
    rows = [next(walk) for _ in range(20)]
    victim = wait_for(lambda: next((pid for pid, n in held().items() if n), None), what="a walk connection")
    before = walk_requests(agent)
    os.kill(victim, signal.SIGKILL)
    rows += list(walk)
    assert walk_requests(agent) > before, "the walk had finished before the kill: nothing was tested"
    assert any(f"(pid {victim}) was killed by SIGKILL" in line for line in agent.log)
    assert len(rows) == len(expected)  # nothing listed twice
    assert as_bytes_rows(rows) == expected


def test_port_that_stops_accepting_raises_within_retry_for(big_tree, start_agent):
    top, _ = big_tree
    agent = start_agent([(REMOTE, str(top))])
    retry_for = 2.0
    walk = parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, retry_for=retry_for, max_budget=16,
                         timeout=2, connect_timeout=2)
    got = [next(walk) for _ in range(20)]
    agent.kill()
    killed_at = time.monotonic()
    with pytest.raises(AgentConnectionError):
        for row in walk:
            got.append(row)
    took = time.monotonic() - killed_at
    assert retry_for - 0.5 <= took <= retry_for + 3, took
    assert len(got) < 5000, "the walk should not have completed"


def test_listdir_moves_to_the_other_host_when_one_dies(small_tree, start_agent):
    top, _ = small_tree
    a = start_agent([(REMOTE, str(top))])
    b = start_agent([(REMOTE, str(top))])
    conn = AgentConnection([a.hostspec, b.hostspec], timeout=2, connect_timeout=2)
    assert sorted(conn.listdir(REMOTE)[1]) == ["d0", "d1", "d2"]
    first = conn.conn_host()
    (a if first == a.hostspec else b).kill()
    assert sorted(conn.listdir(REMOTE + "/d1")[1]) == ["d0", "d1", "d2"]
    assert conn.conn_host() != first


# -- real errors are reported, not retried -----------------------------------------------------

@pytest.fixture
def locked_tree(tmp_path) -> Iterator[Path]:
    tmp_path.chmod(0o755)
    top = tmp_path / "tree"
    for d in ("open/sub", "locked/inner", "other"):
        (top / d).mkdir(parents=True)
    (top / "locked" / "secret").write_bytes(b"s")
    (top / "open" / "f").write_bytes(b"f")
    (top / "locked").chmod(0o000)
    yield top
    (top / "locked").chmod(0o755)


@needs_nocaps
def test_unreadable_directory_reported_once(locked_tree, start_agent):
    agent = start_agent([(REMOTE, str(locked_tree))], nocaps=True, extra=("-v",))
    expected, expected_errors = reference_walk(locked_tree)
    assert expected_errors == [(errno.EACCES, f"{REMOTE}/locked".encode())]
    for mode in ("subtree", "listdir"):
        errors: list[OSError] = []
        start = time.monotonic()
        rows = list(parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, onerror=errors.append,
                                  retry_for=30, mode=mode))
        took = time.monotonic() - start
        assert took < 3, f"{mode}: a permission error must not be retried ({took:.1f} s)"
        assert as_bytes_rows(rows) == expected
        assert len(errors) == 1, errors
        assert isinstance(errors[0], PermissionError)
        assert errors[0].errno == errno.EACCES
        assert errors[0].filename == f"{REMOTE}/locked"
    start = time.monotonic()
    with pytest.raises(PermissionError) as info:
        AgentConnection([agent.hostspec]).listdir(REMOTE + "/locked")
    assert info.value.filename == f"{REMOTE}/locked"
    assert time.monotonic() - start < 2
    # asked once per walk and once by listdir: never retried
    deadline = time.monotonic() + 5  # the agent's log lines reach us through a pipe
    while len(asked := [line for line in agent.log if "GET /mnt/isilon/locked" in line]) < 2:
        assert time.monotonic() < deadline, asked
        time.sleep(0.01)
    assert len(asked) == 2, asked


# -- 503: retried after Retry-After --------------------------------------------------------------

class BusyFront(FrontServer):
    """A front for a real agent that answers its first ``busy`` requests 503 with
    ``Retry-After: 1`` (as an overloaded agent does, after ``latency`` seconds: an overloaded
    machine is slow to answer), then forwards to the agent."""

    def __init__(self, upstream_port: int, busy: int, latency: float = 0.0) -> None:
        self.busy_left = busy
        self.latency = latency
        self.refused: list[float] = []
        self.forwarded: list[float] = []
        super().__init__(upstream_port)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        if self.busy_left > 0:
            self.busy_left -= 1
            await asyncio.sleep(self.latency)
            self.refused.append(time.monotonic())
            return web.Response(status=503, content_type="application/json",
                                body=b'{"error":"busy","message":"the agent is at its limit; retry later"}',
                                headers={PROTOCOL_HEADER: "1", "Retry-After": "1"})
        self.forwarded.append(time.monotonic())
        return await self.forward(request, body)


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_503_is_retried_after_retry_after(small_tree, start_agent, mode):
    """An agent that answers 503 with Retry-After: 1 is not asked again for a second (by any
    of the walk's threads), then the walk completes exactly."""
    top, expected = small_tree
    agent = start_agent([(REMOTE, str(top))])
    # the 503 comes after 0.3 s, when all the walk's threads are up and waiting for work
    front = BusyFront(agent.port, busy=1, latency=0.3)
    try:
        start = time.monotonic()
        rows = list(parallel_walk(REMOTE, hosts=[front.hostspec], workers=4, retry_for=10, mode=mode))
        took = time.monotonic() - start
        assert as_bytes_rows(rows) == expected
        assert len(front.refused) == 1
        waited = front.forwarded[0] - front.refused[0]
        assert waited >= 0.9, f"asked again {waited:.3f} s after a 503 with Retry-After: 1"
        assert 1.2 <= took < 6
    finally:
        front.close()


def test_503_on_one_host_moves_the_work_to_the_other(small_tree, start_agent):
    top, expected = small_tree
    agent = start_agent([(REMOTE, str(top))])
    busy = BusyFront(agent.port, busy=10**6)  # always busy
    try:
        start = time.monotonic()
        rows = list(parallel_walk(REMOTE, hosts=[busy.hostspec, agent.hostspec], workers=4, retry_for=10))
        assert as_bytes_rows(rows) == expected
        assert busy.forwarded == []
        assert len(busy.refused) <= 8, "a busy host is set aside, not asked again and again"
        assert time.monotonic() - start < 5
    finally:
        busy.close()
