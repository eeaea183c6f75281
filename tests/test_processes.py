"""Worker processes (``--processes``): one parent binds the port and supervises, the
children serve. Which child takes a new connection is the kernel's choice (on Linux by a
hash of the connection's addresses, over the children's own ``SO_REUSEPORT`` sockets), so
a test that needs a given child opens connections until that child holds one: which child
holds a connection the tests read from the kernel (psutil's per-process connections)."""

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
from pathlib import Path
from types import SimpleNamespace

import psutil
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


def holder(agent: Agent, conn: http.client.HTTPConnection) -> int | None:
    """The pid of the worker process holding the accepted end of ``conn``, None until one does."""
    client_port = conn.sock.getsockname()[1]
    for child in psutil.Process(agent.pid).children():
        try:
            held = child.net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.raddr and c.raddr.port == client_port and c.laddr.port == agent.port for c in held):
            return child.pid
    return None


def connect(agent: Agent, pid: int, host: str = "127.0.0.1") -> http.client.HTTPConnection:
    """A connection to the agent held by its worker process ``pid``: new connections until
    the kernel gives one to it (the others are closed). Every one must be taken by a worker."""
    for _ in range(100):
        conn = http.client.HTTPConnection(host, agent.port, timeout=10)
        conn.connect()
        if wait_for(lambda conn=conn: holder(agent, conn), what="a worker to accept the connection") == pid:
            return conn
        conn.close()
    pytest.fail(f"no connection of 100 went to process {pid}")


def ask(conn: http.client.HTTPConnection, target: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on ``conn``, kept alive: ``(status, headers, body)``."""
    conn.request("GET", target)
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def listing(conn: http.client.HTTPConnection) -> bytes:
    status, _, body = ask(conn, REMOTE)
    assert status == 200, body
    return body


def metrics(conn: http.client.HTTPConnection) -> dict[str, float]:
    """A scrape answered by the worker process that holds ``conn``."""
    status, _, body = ask(conn, "/_agent/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def listening(pid: int, port: int) -> set[str]:
    """The sockets (``socket:[inode]``) of process ``pid`` listening on ``port``."""
    return {os.readlink(f"/proc/{pid}/fd/{c.fd}") for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


WANT = b"a\nb\nc\nsub/\n"  # the text listing of ``tree``
LISTED = 'diskover_agent_requests_total{endpoint="listing",status="200"}'


def test_each_process_serves_and_scrapes_sum_them_all(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2, extra=("-c", "5"))
    kids = children(agent, 2)
    (one, c_one), (two, c_two) = kids[1], kids[2]
    assert {one, two}.isdisjoint({agent.pid}) and one != two
    assert sorted((c_one, c_two)) == [2, 3]  # -c 5 in all, split
    on_one, on_two = connect(agent, one), connect(agent, two)
    assert [listing(on_one) for _ in range(3)] == [WANT] * 3
    assert [listing(on_two) for _ in range(4)] == [WANT] * 4
    # A request is counted just after its answer is sent: wait until all 7 are.
    by_two = wait_for(lambda: (m := metrics(on_two))[LISTED] == 7 and m, what="7 listings counted")
    by_one = metrics(on_one)
    for scraped in (by_two, by_one):
        assert scraped[LISTED] == 7
        assert scraped["diskover_agent_entries_total"] == 7 * 4
        assert scraped['diskover_agent_request_duration_seconds_count{endpoint="listing"}'] == 7
    assert by_one['diskover_agent_requests_total{endpoint="metrics",status="200"}'] >= 1  # process 2's scrapes
    on_one.close()
    on_two.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux")
def test_each_process_listens_on_a_socket_of_its_own(tree, start_agent):
    """On Linux each worker listens on its own SO_REUSEPORT socket, from before the agent
    says it listens; the parent's socket only holds the port (bound, not listening), so it
    takes no connection."""
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    # The parent logs "listening on" (start_agent waits for it) once every worker listens.
    one, two = (child.pid for child in psutil.Process(agent.pid).children())
    own = listening(one, agent.port), listening(two, agent.port)
    assert all(own) and own[0].isdisjoint(own[1])
    assert listening(agent.pid, agent.port) == set()  # bound only (the kernel lists no such socket)


def test_new_connections_are_spread_over_the_processes(tree, start_agent):
    """32 connections at once: every one is taken by a worker (none waits on the parent's
    socket), and both workers take some (all on one: a chance of 2**-31 by hash)."""
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    pids = {pid for pid, _ in children(agent, 2).values()}
    conns = [http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10) for _ in range(32)]
    try:
        for conn in conns:
            conn.connect()
        held = [wait_for(lambda conn=conn: holder(agent, conn), what="a worker to accept") for conn in conns]
        assert set(held) == pids
        assert [listing(conn) for conn in conns] == [WANT] * 32
    finally:
        for conn in conns:
            conn.close()


def test_a_port_another_agent_serves_is_an_error(tree, start_agent):
    """SO_REUSEPORT would let a second agent (of the same user) share the port and take
    half its connections: it must fail to start instead, as on a port in use."""
    first = start_agent([(REMOTE, str(tree))], processes=2)
    children(first, 2)
    r = subprocess.run([sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", str(first.port),
                        "-r", REMOTE, str(tree), "--processes", "2"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert "in use" in r.stderr and str(first.port) in r.stderr
    assert "listening on" not in r.stderr


def test_gauges_are_summed_over_live_processes(tree, start_agent):
    """Open connections on both processes count in the sum; those of a process that was
    killed stop counting once it is gone."""
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    kids = children(agent, 2)
    one, two = kids[1][0], kids[2][0]
    on_one, on_two = connect(agent, one), connect(agent, two)
    try:
        for conn in (on_one, on_two):
            assert listing(conn) == WANT  # each connection counted by now
        assert metrics(on_two)["diskover_agent_open_connections"] == 2
        os.kill(one, signal.SIGKILL)
        new = wait_for(lambda: children(agent, 2)[1][0] != one and children(agent, 2)[1][0], what="a new process 1")
        assert metrics(on_two)["diskover_agent_open_connections"] == 1  # process 1's is gone
        on_new = connect(agent, new)
        assert listing(on_new) == WANT
        assert metrics(on_two)["diskover_agent_open_connections"] == 2
        on_new.close()
    finally:
        on_one.close()
        on_two.close()


def test_a_killed_process_is_replaced_and_its_counts_kept(tree, start_agent):
    """The new process listens on the same port (the parent holds it)."""
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    kids = children(agent, 2)
    one = kids[1][0]
    on_one = connect(agent, one)
    assert [listing(on_one), listing(on_one)] == [WANT] * 2
    # A request is counted once its answer is sent: wait until both are, by process 1.
    wait_for(lambda: metrics(on_one)[LISTED] == 2, what="process 1 to count its requests")
    on_one.close()
    os.kill(one, signal.SIGKILL)
    wait_for(lambda: any(re.search(rf"process 1 of 2 \(pid {one}\) was killed by SIGKILL: starting another", line)
                         for line in agent.log), what="the parent to see the child die")
    new = wait_for(lambda: children(agent, 2)[1][0] != one and children(agent, 2)[1][0], what="a new process 1")
    wait_for(lambda: gone(one), what="the killed child to be reaped")
    assert state(new) is not None and not gone(new)
    on_new = connect(agent, new)
    assert listing(on_new) == WANT
    assert wait_for(lambda: metrics(on_new)[LISTED] == 3, what="3 listings counted")  # the killed one's two too
    on_new.close()
    assert agent.proc.poll() is None
    assert [line for line in agent.log if "starting another" in line or " failed" in line] == [
        line for line in agent.log if f"(pid {one}) was killed by SIGKILL: starting another" in line]  # at once


def test_sigterm_stops_every_process_and_exits_0(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))], processes=2)
    pids = [pid for pid, _ in children(agent, 2).values()]
    assert http_get(agent.port, REMOTE)[2] == WANT
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
    assert http_get(agent.port, REMOTE)[2] == WANT
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
    for pid, _ in children(agent, 2).values():
        conn = connect(agent, pid, host="::1")
        assert listing(conn) == WANT
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
    one = kids[1][0]
    slow, fast = connect(agent, one), connect(agent, one)
    slow.request("GET", REMOTE + "/slow0")
    wait_for(lambda: started_listings(gated.log) == 1, what="the hung listing to start")
    status, headers, body = ask(fast, REMOTE + "/fast")
    assert (status, headers["Retry-After"], json.loads(body)["error"]) == (503, "1", "busy")
    gated.gate.touch()
    assert slow.getresponse().read() == b"a\nb\n"
    slow.close()
    fast.close()


def test_sigterm_lets_answers_in_flight_finish(gated, start_agent):
    agent = start_agent([(REMOTE, str(gated.mnt))], processes=2)
    kids = children(agent, 2)
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


def test_refused_requests_are_counted_by_what_they_asked_for(tree, tmp_path, start_agent):
    """401s on the walk, listing and info endpoints are counted under those endpoints (not
    all as listings), in whichever worker process answered them; a scrape sums them all."""
    from prometheus_client.parser import text_string_to_metric_families

    token = tmp_path / "token"
    token.write_text("metrics-token\n")
    agent = start_agent([(REMOTE, str(tree))], processes=2, extra=("--token-file", str(token)))
    kids = children(agent, 2)
    asked = (("POST", "/_agent/v1/walk?format=msgpack"), ("GET", REMOTE), ("GET", "/_agent/v1/info"))
    for pid, _ in kids.values():
        conn = connect(agent, pid)
        for method, target in asked:
            conn.request(method, target, body=b"" if method == "POST" else None)
            resp = conn.getresponse()
            assert (resp.status, resp.read()[:1]) == (401, b"{")
        conn.close()

    def requests() -> dict[tuple[str, str], float]:
        status, _, body = http_get(agent.port, "/_agent/metrics", headers={"Authorization": "Bearer metrics-token"})
        assert status == 200
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            if family.name == "diskover_agent_requests":
                for sample in family.samples:
                    if sample.name == "diskover_agent_requests_total":
                        out[sample.labels["endpoint"], sample.labels["status"]] = sample.value
        return out

    refused = wait_for(lambda: (r := requests()) and sum(v for (_, s), v in r.items() if s == "401") == 6 and r,
                       what="6 refusals counted")
    assert {k: v for k, v in refused.items() if k[1] == "401"} == {
        ("walk", "401"): 2, ("listing", "401"): 2, ("info", "401"): 2}
    assert not any(endpoint == "unknown" for endpoint, _ in refused)
