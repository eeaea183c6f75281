"""diskover's crawl through the agent scanner is complete, or it fails loudly.

Each crawl calls the scanner exactly as diskover 2.3.5 does (``diskover_sequence.py``, 16
threads) against real agents, and is compared with the same crawl through ``os.scandir``
run locally without root's capabilities, as the agents run.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from diskover_agent import scanner
from diskover_agent.scanner import AgentsUnavailableError
from diskover_sequence import FatalCrawlError, crawl

from conftest import IS_ROOT, NOCAPS, REMOTE, FrontServer, make_awkward_tree

SEQUENCE = Path(__file__).with_name("diskover_sequence.py")
LIMITED = ("-c", "1", "--max-queue", "1")  # one listing at a time, one waiting: the rest get 503


# -- the tree and the local crawl -------------------------------------------------------------------

def make_crawl_tree(root: Path) -> Path:
    """Level-1 directories for diskover's threads, nested below; every awkward kind of entry
    (conftest's tree); a directory readable but not searchable holding files; hard links."""
    top = root / "crawl"
    top.mkdir()
    make_awkward_tree(top)
    for a in range(6):
        for b in range(4):
            for c in range(3):
                d = top / f"proj{a}" / f"b{b}" / f"c {c}"
                d.mkdir(parents=True)
                for i in range(6):
                    (d / f"f{i}.dat").write_bytes(b"x" * ((a + b + c + i) * 700))
            (top / f"proj{a}" / f"b{b}" / "note.txt").write_bytes(b"n" * (a + b + 1) * 100)
    os.link(top / "proj1" / "b0" / "note.txt", top / "proj2" / "b1" / "hard-link")
    noexec = top / "proj3" / "noexec-files"
    noexec.mkdir()
    for i in range(3):
        (noexec / f"f{i}").write_bytes(b"z" * i)
    noexec.chmod(0o644)  # readable, not searchable: listed, not one entry can be stat'ed
    return top


def _unlock(top: Path) -> None:
    for p in (top / "tree" / "locked", top / "tree" / "noexec", top / "proj3" / "noexec-files"):
        os.chmod(p, 0o755)


def local_crawl(local: Path) -> dict:
    """The crawl through ``os.scandir``, without DAC capabilities, keys mapped to ``REMOTE``."""
    cmd = [sys.executable, str(SEQUENCE), str(local)]
    if IS_ROOT:
        cmd = NOCAPS + cmd
    result = msgspec.msgpack.decode(subprocess.run(cmd, check=True, capture_output=True).stdout)
    return normalise(result, os.fsencode(local))


def normalise(result: dict, prefix: bytes = os.fsencode(REMOTE)) -> dict:
    """A crawl's result with paths relative to its top and tuples as lists (as msgpack has them)."""

    def rel(p: bytes) -> bytes:
        assert p == prefix or p.startswith(prefix + b"/"), p
        return p[len(prefix):] or b"/"

    return {
        "files": {rel(k): list(v) for k, v in result["files"].items()},
        "dirs": {rel(k): list(v) for k, v in result["dirs"].items()},
        "errors": sorted((kind, name, rel(p)) for kind, name, p in result["errors"]),
        "size": result["size"], "size_du": result["size_du"], "storage": result["storage"],
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("crawl")
    root.chmod(0o755)
    top = make_crawl_tree(root)
    try:
        yield top, local_crawl(top)
    finally:
        _unlock(top)


class Collect(logging.Handler):
    """A log handler standing in for one of diskover's: keeps the messages."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(autouse=True)
def scanner_env(tmp_path, monkeypatch):
    """No DISKOVER_AGENT_* from outside, an empty config file, fresh scanner state and log handlers."""
    for name in list(os.environ):
        if name.startswith("DISKOVER_AGENT_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty-config.toml"
    empty.write_text("")
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(empty))
    handlers = {log: list(log.handlers) for log in (scanner.logger, scanner.warn_logger)}
    scanner.close()
    yield
    scanner.close()
    for log, before in handlers.items():
        log.handlers[:] = before


class Counting:
    """The scanner, counting ``scandir`` calls per path and what it holds when diskover closes it."""

    def __init__(self) -> None:
        self.scandirs: list[bytes] = []
        self.kept_at_close: int | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(scanner, name)

    def scandir(self, path):
        with self._lock:
            self.scandirs.append(os.fsencode(path))
        return scanner.scandir(path)

    def close(self, diskover_globals) -> None:
        self.kept_at_close = scanner.kept_listings()
        scanner.close(diskover_globals)


def metrics(agent) -> dict[tuple[str, str], int]:
    """The agent's request counts by (endpoint, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", "/_agent/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[tuple[str, str], int] = {}
    for labels, value in re.findall(r"^diskover_agent_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(found["endpoint"], found["status"])] = int(float(value))
    return out


def assert_complete(got: dict, expected: dict) -> None:
    assert got["errors"] == expected["errors"]
    assert set(got["dirs"]) == set(expected["dirs"])
    assert got == expected
    # the tree holds what the test is about
    denied = {p for _, kind, p in expected["errors"] if kind == "PermissionError"}
    assert b"/tree/locked" in denied  # a directory that cannot be read
    assert any(p.startswith(b"/proj3/noexec-files/") for p in denied)  # entries that cannot be stat'ed
    assert len(expected["files"]) > 400 and len(expected["dirs"]) > 100


# -- under load, and with an agent restarted: complete --------------------------------------------------

def test_crawl_through_an_agent_at_its_limit_is_complete(tree, start_agent, monkeypatch):
    local, expected = tree
    agent = start_agent([(REMOTE, str(local))], nocaps=True, extra=LIMITED)
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    counting = Counting()
    got = normalise(crawl(counting, REMOTE + "/"))
    assert_complete(got, expected)
    assert counting.kept_at_close == 0  # nothing held for calls that never came


def test_each_directory_is_listed_once_the_top_too(tree, start_agent, monkeypatch):
    local, expected = tree
    agent = start_agent([(REMOTE, str(local))], nocaps=True)
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    counting = Counting()
    assert_complete(normalise(crawl(counting, REMOTE)), expected)
    calls = counting.scandirs
    assert calls.count(os.fsencode(REMOTE)) == 2  # diskover scans its top twice...
    served = metrics(agent)
    listings = sum(n for (endpoint, _), n in served.items() if endpoint not in ("metrics", "statvfs", "health"))
    assert listings == len(set(calls))  # ...and it is listed once; stat() of the top costs nothing
    assert served[("statvfs", "200")] == 1
    assert counting.kept_at_close == 0


def test_agent_killed_mid_crawl_and_restarted_the_crawl_is_complete(tree, start_agent, monkeypatch):
    local, expected = tree
    agent = start_agent([(REMOTE, str(local))], nocaps=True, extra=LIMITED)
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    listed = []
    restarted = []
    lock = threading.Lock()
    file_log, warn_log, con_log = Collect(), Collect(), Collect()

    def on_dir(path: str) -> None:
        with lock:
            listed.append(path)
            if len(listed) != 30:
                return
            agent.kill()  # SIGKILL: requests in flight break off, new ones are refused...
            deadline = time.monotonic() + 60
            while not any("does not answer" in line for line in warn_log.lines):  # ...as the other threads see
                assert time.monotonic() < deadline, "no thread noticed the agent was gone"
                time.sleep(0.01)
            restarted.append(start_agent([(REMOTE, str(local))], nocaps=True,
                                         extra=(*LIMITED, "-p", str(agent.port))))  # ...until it is back

    got = normalise(crawl(scanner, REMOTE, on_dir=on_dir, handlers=(file_log, warn_log, con_log)))
    assert restarted and restarted[0].port == agent.port and agent.proc.returncode is not None
    assert len(listed) > 30
    assert_complete(got, expected)
    assert metrics(restarted[0]).get(("listing", "200"), 0) > 0  # the new agent served the rest
    # the outage is in diskover's warnings log, and in its log and on its console
    assert any(agent.hostspec in line and "does not answer" in line for line in warn_log.lines)
    for log in (file_log, con_log):
        assert any("does not answer" in line for line in log.lines)
        assert any("answers again" in line for line in log.lines)


# -- gone for good: fatal ---------------------------------------------------------------------------------

def test_agent_gone_for_good_is_fatal_to_diskover(tree, start_agent, monkeypatch):
    local, _ = tree
    agent = start_agent([(REMOTE, str(local))], nocaps=True)
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    monkeypatch.setenv("DISKOVER_AGENT_RETRY_FOR", "1")
    listed = []
    lock = threading.Lock()

    def on_dir(path: str) -> None:
        with lock:
            listed.append(path)
            if len(listed) == 20:
                agent.kill()

    warn_log = Collect()
    with pytest.raises(FatalCrawlError) as info:
        crawl(scanner, REMOTE, on_dir=on_dir, handlers=(Collect(), warn_log, Collect()))
    error = info.value.original
    assert isinstance(error, AgentsUnavailableError)
    assert not isinstance(error, (OSError, RuntimeError))  # what diskover neither logs nor skips
    message = str(error)
    assert f"hosts {agent.hostspec}" in message and "for 1 s" in message
    assert re.search(r"last error: \S+: .*(refused|reset|closed|disconnected|aborted|Broken pipe)", message, re.I)
    assert any("the crawl cannot be complete" in line for line in warn_log.lines)


def test_no_agent_at_all_is_fatal_after_the_retry_time(start_agent, tmp_path, monkeypatch):
    agent = start_agent([(REMOTE, str(tmp_path))])
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    monkeypatch.setenv("DISKOVER_AGENT_RETRY_FOR", "0.5")
    assert scanner.check_dirpath(REMOTE) == (True, None)
    agent.kill()
    with pytest.raises(AgentsUnavailableError, match=re.escape(agent.hostspec)):
        scanner.scandir(REMOTE + "/sub")
    with pytest.raises(AgentsUnavailableError):
        scanner.get_storage_size(REMOTE)
    ok, message = scanner.check_dirpath(REMOTE + "/other")
    assert not ok and "no diskover storage agent answered" in message


# -- busy: other hosts first, Retry-After honoured -------------------------------------------------------

class Busy(FrontServer):
    """Answers 503 with ``Retry-After: 1`` to the first ``busy_for`` requests, then forwards."""

    def __init__(self, upstream_port: int, busy_for: int) -> None:
        self.busy_for = busy_for
        self.arrivals: list[float] = []
        super().__init__(upstream_port)

    async def handle(self, request):
        from aiohttp import web

        self.arrivals.append(self.loop.time())
        if len(self.arrivals) <= self.busy_for:
            return web.Response(status=503, headers={"Retry-After": "1", "X-Diskover-Agent-Protocol": "1"},
                                content_type="application/json",
                                body=b'{"error":"busy","message":"the agent is at its limit; retry later"}')
        return await self.forward(request)


def test_busy_agent_other_hosts_first_then_after_retry_after(start_agent, tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    agent = start_agent([(REMOTE, str(tmp_path))])
    always_busy = Busy(agent.port, busy_for=10**9)
    busy_once = Busy(agent.port, busy_for=1)
    try:
        # busy first host: the same request goes to the next one at once
        monkeypatch.setenv("DISKOVER_AGENT_HOSTS", f"{always_busy.hostspec},{agent.hostspec}")
        assert [e.name for e in scanner.scandir(REMOTE + "/d")] == ["f"]
        assert len(always_busy.arrivals) == 1 and metrics(agent)[("listing", "200")] == 1

        # the only host busy: asked again after its Retry-After, not before, and the answer is complete
        scanner.close()
        monkeypatch.setenv("DISKOVER_AGENT_HOSTS", busy_once.hostspec)
        entries = list(scanner.scandir(REMOTE + "/d"))
        assert [(e.name, e.stat().st_size) for e in entries] == [("f", 3)]
        assert len(busy_once.arrivals) == 2
        assert busy_once.arrivals[1] - busy_once.arrivals[0] >= 0.95
    finally:
        always_busy.close()
        busy_once.close()


# -- PermissionError where os.DirEntry.stat() raises it ------------------------------------------------

_LOCAL_STAT = r"""
import os, sys
d = sys.argv[1]
def kind(call):
    try:
        call()
    except OSError as e:
        return type(e).__name__, e.errno, os.fsencode(e.filename)
    return None
out = [kind(e.stat) for e in sorted(os.scandir(d), key=lambda e: e.name)]
out.append(kind(lambda: os.stat(os.path.join(d, "f1"))))
print(repr(out))
"""


def test_entries_of_an_unsearchable_directory_raise_permission_error(tree, start_agent, monkeypatch):
    local, _ = tree
    agent = start_agent([(REMOTE, str(local))], nocaps=True)
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    cmd = [sys.executable, "-c", _LOCAL_STAT, str(local / "proj3" / "noexec-files")]
    want = eval(subprocess.run(NOCAPS + cmd if IS_ROOT else cmd, check=True, capture_output=True,
                               text=True).stdout)
    remote = REMOTE + "/proj3/noexec-files"

    def kind(call):
        try:
            call()
        except OSError as e:
            return type(e).__name__, e.errno, os.fsencode(e.filename).replace(os.fsencode(REMOTE), os.fsencode(local))
        return None

    entries = sorted(scanner.scandir(remote), key=lambda e: e.name)
    assert [e.name for e in entries] == ["f0", "f1", "f2"] and all(e.is_file() for e in entries)
    got = [kind(e.stat) for e in entries] + [kind(lambda: scanner.stat(remote + "/f1"))]
    assert got == want
    assert want[0][:2] == ("PermissionError", errno.EACCES)
    # where the agent can search, a missing entry is still FileNotFoundError
    assert kind(lambda: scanner.stat(REMOTE + "/proj3/nope"))[0] == "FileNotFoundError"


# -- paths: what the local scanner accepts ----------------------------------------------------------------

@pytest.mark.parametrize("given", ["/proj0/../proj1", "/proj1/", "/proj1//", "//proj1", "/./proj1/b0/..",
                                   "/proj0/b0/../../proj1"])
def test_check_dirpath_and_abspath_normalise_like_the_local_scanner(tree, start_agent, monkeypatch, given):
    local, _ = tree
    agent = start_agent([(REMOTE, str(local))])
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    local_path = str(local) + given
    assert os.path.isdir(local_path)
    assert scanner.check_dirpath(REMOTE + given) == (True, None)
    assert scanner.abspath(REMOTE + given) == REMOTE + os.path.abspath(local_path)[len(str(local)):]
    assert scanner.abspath((REMOTE + given).encode()) == scanner.abspath(REMOTE + given).encode()
    # scandir and stat take it too, entries' paths as the caller wrote them (as os.scandir's)
    got = sorted((e.name, e.path) for e in scanner.scandir(REMOTE + given))
    assert got == sorted((e.name, REMOTE + given + ("" if given.endswith("/") else "/") + e.name)
                         for e in os.scandir(local_path))
    assert scanner.stat(REMOTE + given).st_ino == os.stat(local_path).st_ino
    served = metrics(agent)
    assert not [k for k in served if k[1] == "400"], served  # the agent never saw a "..": nothing refused


def test_paths_above_the_root_stop_at_the_root(start_agent, tmp_path, monkeypatch):
    agent = start_agent([(REMOTE, str(tmp_path))])
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    assert scanner.abspath(REMOTE + "/../../..") == "/" == os.path.abspath("/mnt/../../..")
    ok, message = scanner.check_dirpath(REMOTE + "/../..")
    assert not ok and message.startswith(REMOTE + "/../..")  # "/" is not exported: refused, not a 400
    assert ("listing", "400") not in metrics(agent)


# -- settings and logging --------------------------------------------------------------------------------

def test_retry_for_setting(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('hosts = ["a"]\nretry-for = 30\n')
    assert scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(config)}).retry_for == 30.0
    assert scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(config),
                                  "DISKOVER_AGENT_RETRY_FOR": "2.5"}).retry_for == 2.5
    config.write_text('hosts = ["a"]\n')
    assert scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(config)}).retry_for == scanner.DEFAULT_RETRY_FOR
    contrib = Path(__file__).resolve().parent.parent / "contrib" / "diskover" / "config.toml"
    assert scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(contrib)}).retry_for == scanner.DEFAULT_RETRY_FOR
    for content, env in [('hosts = ["a"]\nretry-for = "x"\n', {}), ('hosts = ["a"]\nretry-for = 0\n', {}),
                         ('hosts = ["a"]\n', {"DISKOVER_AGENT_RETRY_FOR": "soon"}),
                         ('hosts = ["a"]\n', {"DISKOVER_AGENT_RETRY_FOR": "-1"})]:
        config.write_text(content)
        with pytest.raises(RuntimeError, match=r"retry-for|RETRY_FOR"):
            scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(config), **env})


def test_log_setup_uses_every_handler_it_is_given():
    file_log, warn_log, con_log = Collect(), Collect(), Collect()
    scanner.log_setup(logging.INFO, "%(message)s", True, file_log, warn_log, con_log)
    scanner.logger.info("an info line")
    scanner.warn_logger.warning("a warning line")
    assert file_log.lines == con_log.lines == ["an info line", "a warning line"]
    assert warn_log.lines == ["a warning line"]
    scanner.log_setup(logging.INFO, "%(message)s", True, file_log, warn_log, con_log)  # again: no duplicates
    scanner.warn_logger.warning("once")
    assert file_log.lines.count("once") == warn_log.lines.count("once") == 1
