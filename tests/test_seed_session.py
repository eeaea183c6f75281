"""The 2019 README's session (curl and Python), replayed against real agents with the
test's ports and paths. See ../shared/seed/diskover-storage-agent-README.md."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import diskover_agent
from diskover_agent import AgentConnectionError

from conftest import REMOTE

SOMEDIR = REMOTE + "/somedir"
SOMEOTHERDIR = REMOTE + "/someotherdir"


@pytest.fixture
def seed_tree(tmp_path: Path) -> Path:
    """The directories of the README. Entries are made in reverse name order, so that an
    answer in creation order is not sorted by accident."""
    top = tmp_path / "isilon"
    some = top / "somedir"
    (some / "subdir2").mkdir(parents=True)
    (some / "subdir1").mkdir()
    (some / "subdir1" / "file.ext").write_text("f")
    (some / "file2.ext").write_text("2")
    (some / "file1.ext").write_text("1")
    other = top / "someotherdir"
    (other / "subdirb").mkdir(parents=True)
    (other / "subdira").mkdir()
    (other / "fileb.ext").write_text("b")
    (other / "filea.ext").write_text("a")
    (top / "a-file").write_text("x")
    return top


def free_ports(n: int) -> list[int]:
    """Ports that were free a moment ago: nothing listens there."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.skipif(not os.path.exists("/usr/bin/curl"), reason="needs curl (apt-get install curl)")
def test_curl_output_like_the_original(seed_tree, start_agent):
    agent = start_agent([(REMOTE, str(seed_tree))])
    out = subprocess.run(["/usr/bin/curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{agent.port}{SOMEDIR}"],
                         capture_output=True, check=True)
    assert out.stdout == b"file1.ext\nfile2.ext\nsubdir1/\nsubdir2/\n"
    assert out.stderr == b""
    out = subprocess.run(["/usr/bin/curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{agent.port}{SOMEOTHERDIR}"],
                         capture_output=True, check=True)
    assert out.stdout == b"filea.ext\nfileb.ext\nsubdira/\nsubdirb/\n"


def test_python_session_like_the_original(seed_tree, start_agent):
    """The README's session, line by line, with its exact results (names in the order shown)."""
    agents = [start_agent([(REMOTE, str(seed_tree))]) for _ in range(2)]
    hostlist = [a.hostspec for a in agents]

    c = diskover_agent.AgentConnection(hosts=hostlist)
    assert c.hostlist() == hostlist
    assert c.connect() is None
    assert c.conn_host() == hostlist[0]
    assert c.listdir(SOMEDIR) == (SOMEDIR, ["subdir1", "subdir2"], ["file1.ext", "file2.ext"])
    rt = c.response_time()
    assert isinstance(rt, float) and 0 < rt < 30
    assert c.connect() is None
    assert c.conn_host() == hostlist[1]
    assert c.listdir(SOMEOTHERDIR) == (SOMEOTHERDIR, ["subdira", "subdirb"], ["filea.ext", "fileb.ext"])
    rt = c.response_time()
    assert isinstance(rt, float) and 0 < rt < 30
    c.close()

    from diskover_agent import parallel_walk as pwalk

    gen = pwalk(SOMEDIR, workers=40, hosts=hostlist)
    assert repr(gen).startswith("<generator object parallel_walk at 0x")
    gen.close()
    rows = []
    for root, dirs, files in pwalk(SOMEDIR, workers=40, hosts=hostlist):
        rows.append(sorted_listing((root, dirs, files)))  # in the agent's read order, as os.walk's
    assert rows[0] == (SOMEDIR, ["subdir1", "subdir2"], ["file1.ext", "file2.ext"])
    assert (SOMEDIR + "/subdir1", [], ["file.ext"]) in rows
    assert sorted(rows[1:]) == [(SOMEDIR + "/subdir1", [], ["file.ext"]), (SOMEDIR + "/subdir2", [], [])]


def sorted_listing(result: tuple) -> tuple:
    path, dirs, files = result
    return path, sorted(dirs), sorted(files)


def test_connect_moves_to_the_next_host(seed_tree, start_agent):
    """Each connect() goes to the next host in turn, and listdir is served by that host."""
    agents = [start_agent([(REMOTE, str(seed_tree))], extra=("-v",)) for _ in range(2)]
    hostlist = [a.hostspec for a in agents]
    c = diskover_agent.AgentConnection(hosts=hostlist)
    assert c.conn_host() is None
    c.connect()
    assert c.conn_host() == hostlist[0]
    assert sorted_listing(c.listdir(SOMEDIR)) == (SOMEDIR, ["subdir1", "subdir2"], ["file1.ext", "file2.ext"])
    assert isinstance(c.response_time(), float) and c.response_time() > 0
    c.connect()
    assert c.conn_host() == hostlist[1]
    assert sorted_listing(c.listdir(SOMEOTHERDIR)) == (
        SOMEOTHERDIR, ["subdira", "subdirb"], ["filea.ext", "fileb.ext"])
    assert isinstance(c.response_time(), float) and c.response_time() > 0
    c.connect()
    assert c.conn_host() == hostlist[0]  # and round again
    c.close()
    for a in agents:
        assert a.terminate() == 0  # logs complete
    requests = [[line for line in a.log if '"GET /mnt/isilon' in line] for a in agents]
    assert len(requests[0]) == 1 and "/somedir" in requests[0][0] and " 200 " in requests[0][0], requests
    assert len(requests[1]) == 1 and "/someotherdir" in requests[1][0] and " 200 " in requests[1][0], requests


def test_pwalk_is_a_generator_of_the_tree(seed_tree, start_agent):
    agents = [start_agent([(REMOTE, str(seed_tree))]) for _ in range(2)]
    hostlist = [a.hostspec for a in agents]
    from diskover_agent import parallel_walk as pwalk

    gen = pwalk(SOMEDIR, workers=40, hosts=hostlist)
    assert inspect.isgenerator(gen)
    rows = [(root, sorted(dirs), sorted(files)) for root, dirs, files in gen]
    assert rows[0] == (SOMEDIR, ["subdir1", "subdir2"], ["file1.ext", "file2.ext"])
    assert sorted(rows) == [
        (SOMEDIR, ["subdir1", "subdir2"], ["file1.ext", "file2.ext"]),
        (SOMEDIR + "/subdir1", [], ["file.ext"]),
        (SOMEDIR + "/subdir2", [], []),
    ]


def test_listdir_errors_are_oserrors(seed_tree, start_agent):
    agent = start_agent([(REMOTE, str(seed_tree))])
    c = diskover_agent.AgentConnection(hosts=[agent.hostspec])
    c.connect()
    cases = [(REMOTE + "/nope", FileNotFoundError, 2), (REMOTE + "/a-file", NotADirectoryError, 20),
             ("/etc", PermissionError, 13), ("/mnt/isilon2", PermissionError, 13), ("/mnt", PermissionError, 13)]
    for path, exc_type, num in cases:
        with pytest.raises(exc_type) as info:
            c.listdir(path)
        assert info.value.filename == path
        assert info.value.errno == num
    with pytest.raises(FileNotFoundError) as info:  # bytes in, bytes filename out
        c.listdir(b"/mnt/isilon/nope\xff")
    assert info.value.filename == b"/mnt/isilon/nope\xff"
    # the connection is still good after errors
    assert c.listdir(SOMEDIR)[0] == SOMEDIR
    c.close()


def test_no_agent_listening_raises_connection_error():
    hosts = [f"127.0.0.1:{p}" for p in free_ports(2)]
    c = diskover_agent.AgentConnection(hosts=hosts)
    start = time.monotonic()
    with pytest.raises(AgentConnectionError) as info:
        c.listdir(SOMEDIR)
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(ConnectionError):
        c.connect()
    with pytest.raises(AgentConnectionError):
        diskover_agent.AgentConnection(hosts=hosts).connect()
    assert time.monotonic() - start < 20
    assert c.conn_host() is None
