"""Worker processes (``--processes``): one parent binds the port and supervises, the
children serve. Which child answers a connection is the kernel's choice, so the tests
make it certain by stopping (SIGSTOP) the other child while they ask: a stopped process
accepts nothing, and the connections go to the one that runs."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REMOTE, Agent, fuse_problem, http_get, slowfs_mounted, wait_for

_CHILD = re.compile(r"process (\d+) of (\d+) \(pid (\d+), -c (\d+)\)")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    (top / "sub").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (top / name).write_bytes(b"x")
    return top


def children(agent: Agent, count: int) -> dict[int, tuple[int, int]]:
    """Child number -> (pid, its -c), the latest started, once ``count`` have said so."""
    def found() -> dict[int, tuple[int, int]] | None:
        out: dict[int, tuple[int, int]] = {}
        for line in list(agent.log):
            m = _CHILD.search(line)
            if m:
                out[int(m.group(1))] = (int(m.group(3)), int(m.group(4)))
        return out if len(out) == count else None

    return wait_for(found, what=f"{count} worker processes to start")


def state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def gone(pid: int) -> bool:
    return state(pid) in (None, "Z", "X")


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) until the block ends: it accepts no connection meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(pid) == "T", what=f"pid {pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def listing(port: int) -> bytes:
    status, _, body = http_get(port, REMOTE)
    assert status == 200, body
    return body


def metrics(port: int) -> dict[str, float]:
    status, _, body = http_get(port, "/_agent/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


WANT = b"a\nb\nc\nsub/\n"  # the text listing of ``tree``
LISTED = 'diskover_agent_requests_total{endpoint="listing",status="200"}'


def test_each_process_serves_and_scrapes_sum_them_all(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2, extra=("-c", "5"))
    kids = children(agent, 2)
    (one, c_one), (two, c_two) = kids[1], kids[2]
    assert {one, two}.isdisjoint({agent.pid}) and one != two
    assert sorted((c_one, c_two)) == [2, 3]  # -c 5 in all, split
    # A request is counted just after its answer is sent: each block waits until its
    # process has counted its last, before that process is stopped in the next block.
    with stopped(two):
        assert [listing(agent.port) for _ in range(3)] == [WANT] * 3  # all by process 1
        wait_for(lambda: metrics(agent.port)[LISTED] == 3, what="3 listings counted")
    with stopped(one):
        assert [listing(agent.port) for _ in range(4)] == [WANT] * 4  # all by process 2
        by_two = wait_for(lambda: (m := metrics(agent.port))[LISTED] == 7 and m, what="7 listings counted")
    with stopped(two):
        by_one = metrics(agent.port)
    for scraped in (by_two, by_one):
        assert scraped[LISTED] == 7
        assert scraped["diskover_agent_entries_total"] == 7 * 4
        assert scraped['diskover_agent_request_duration_seconds_count{endpoint="listing"}'] == 7
    assert by_one['diskover_agent_requests_total{endpoint="metrics",status="200"}'] >= 1  # process 2's scrapes


def test_gauges_are_summed_over_live_processes(tree, start_agent):
    """Open connections on both processes count in the sum; those of a process that was
    killed stop counting once it is gone."""
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    kids = children(agent, 2)
    one, two = kids[1][0], kids[2][0]
    held = []
    try:
        for other in (two, one):
            with stopped(other):
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
                conn.request("GET", REMOTE)
                assert conn.getresponse().read() == WANT
                held.append(conn)  # kept alive, on process 1 then on process 2
        with stopped(two):
            assert metrics(agent.port)["diskover_agent_open_connections"] == 3  # the two held, and this one
        os.kill(one, signal.SIGKILL)
        new = wait_for(lambda: children(agent, 2)[1][0] != one and children(agent, 2)[1][0], what="a new process 1")
        with stopped(new):
            assert metrics(agent.port)["diskover_agent_open_connections"] == 2  # the one on process 2, and this
    finally:
        for conn in held:
            conn.close()


def test_a_killed_process_is_replaced_and_its_counts_kept(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    kids = children(agent, 2)
    one, two = kids[1][0], kids[2][0]
    with stopped(two):
        listing(agent.port)
        listing(agent.port)
        # A request is counted once its answer is sent: wait until both are, by process 1.
        wait_for(lambda: metrics(agent.port)[LISTED] == 2, what="process 1 to count its requests")
    os.kill(one, signal.SIGKILL)
    wait_for(lambda: any(re.search(rf"process 1 of 2 \(pid {one}\) was killed by SIGKILL: starting another", line)
                         for line in agent.log), what="the parent to see the child die")
    new = wait_for(lambda: children(agent, 2)[1][0] != one and children(agent, 2)[1][0], what="a new process 1")
    wait_for(lambda: gone(one), what="the killed child to be reaped")
    assert state(new) is not None and not gone(new)
    with stopped(two):
        assert listing(agent.port) == WANT  # by the new process 1
        assert metrics(agent.port)[LISTED] == 3  # the killed one's two still count
    assert agent.proc.poll() is None


def test_sigterm_stops_every_process_and_exits_0(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    pids = [pid for pid, _ in children(agent, 2).values()]
    listing(agent.port)
    assert agent.terminate() == 0
    assert all(state(pid) is None for pid in pids)  # stopped, and reaped by the parent
    assert any(line.rstrip().endswith(" stopped") for line in agent.log)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", agent.port), timeout=5).close()


def test_children_die_with_the_parent(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    pids = [pid for pid, _ in children(agent, 2).values()]
    agent.kill()  # SIGKILL: the parent cannot tell anyone
    try:
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), what=f"child {pid} to end with its parent")
    finally:
        for pid in pids:  # none left behind, whatever the outcome
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", agent.port), timeout=5).close()
        except OSError:
            return True
        return False

    wait_for(refused, what="the port to close")


def test_c_1_means_one_process(tree, start_agent):
    """No more processes than -c: with -c 1 the agent serves alone, unforked, as before."""
    agent = start_agent([(REMOTE, str(tree))], processes=4, extra=("-c", "1"))
    assert listing(agent.port) == WANT
    with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
        assert f.read().split() == []
    assert not any(_CHILD.search(line) for line in agent.log)
    assert any("event loop: " in line for line in agent.log)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_listen_with_processes(tree, start_agent):
    try:
        agent = start_agent([(REMOTE, str(tree))], processes=2, listen="::1")
    except RuntimeError as exc:
        if "Cannot assign requested address" in str(exc) or "not available" in str(exc):
            pytest.skip("no IPv6 loopback")
        raise
    assert agent.url.startswith("http://[::1]:")
    kids = children(agent, 2)
    for other in (kids[2][0], kids[1][0]):
        with stopped(other):
            conn = http.client.HTTPConnection("::1", agent.port, timeout=10)
            conn.request("GET", REMOTE)
            assert conn.getresponse().read() == WANT
            conn.close()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_processes_must_be_at_least_1(tree, value):
    r = subprocess.run([sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0",
                        "-r", REMOTE, str(tree), "--processes", value],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["diskover-storage-agent: error: --processes must be at least 1"]


def test_processes_from_the_config_file(tree, tmp_path, start_agent):
    conf = tmp_path / "agent.toml"
    conf.write_text("processes = 2\nmaxconnections = 3\n")
    agent = start_agent([(REMOTE, str(tree))], processes=None, extra=("--config", str(conf)))
    assert sorted(c for _, c in children(agent, 2).values()) == [1, 2]
    conf.write_text("processes = 0\n")
    r = subprocess.run([sys.executable, "-m", "diskover_storage_agent", "-p", "0", "--config", str(conf),
                        "-r", REMOTE, str(tree)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["diskover-storage-agent: error: --processes must be at least 1"]


# -- with a directory that hangs until the test lets it go ----------------------------------

@pytest.fixture
def gated(tmp_path_factory) -> Iterator[SimpleNamespace]:
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    mnt = tmp_path_factory.mktemp("gatedfs")
    aux = tmp_path_factory.mktemp("gatedfs-aux")
    gate, log = aux / "open", aux / "started"
    with slowfs_mounted(mnt, SLOWFS_GATE=str(gate), SLOWFS_LOG=str(log)):
        ns = SimpleNamespace(mnt=mnt, gate=gate, log=log)
        try:
            yield ns
        finally:
            gate.touch()  # never leave a listing hanging


def started_listings(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_503_at_a_process_limit(gated, start_agent):
    """-c 2 over two processes is one listing each, and --max-queue 0 a line of none: a
    request to a process whose listing hangs gets 503 with Retry-After: 1 at once."""
    agent = start_agent([(REMOTE, str(gated.mnt))], processes=2, extra=("-c", "2", "--max-queue", "0"))
    kids = children(agent, 2)
    assert [c for _, c in kids.values()] == [1, 1]
    with stopped(kids[2][0]):
        slow = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
        slow.request("GET", REMOTE + "/slow0")
        wait_for(lambda: started_listings(gated.log) == 1, what="the hung listing to start")
        status, headers, body = http_get(agent.port, REMOTE + "/fast")
        assert (status, headers["Retry-After"], json.loads(body)["error"]) == (503, "1", "busy")
        gated.gate.touch()
        assert slow.getresponse().read() == b"a\nb\n"
        slow.close()


def test_sigterm_lets_answers_in_flight_finish(gated, start_agent):
    agent = start_agent([(REMOTE, str(gated.mnt))], processes=2)
    kids = children(agent, 2)
    with stopped(kids[2][0]):
        slow = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
        slow.request("GET", REMOTE + "/slow1")
        wait_for(lambda: started_listings(gated.log) == 1, what="the hung listing to start")
    agent.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any("stopping: finishing answers in flight" in line for line in agent.log), what="the stop")
    assert agent.proc.poll() is None  # waiting for the answer in flight
    gated.gate.touch()
    resp = slow.getresponse()
    assert (resp.status, resp.read()) == (200, b"a\nb\n")
    slow.close()
    assert agent.proc.wait(30) == 0
    assert all(state(pid) is None for pid, _ in kids.values())
