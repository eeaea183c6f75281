"""A directory that takes seconds to list (a FUSE file system standing in for a hung
NFS mount) holds only its own requests: other clients are served meanwhile."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REMOTE, fuse_problem, slowfs_mounted

if fuse_problem():
    pytest.skip(fuse_problem(), allow_module_level=True)

SLOW = 2.0


@pytest.fixture(scope="module")
def slowfs(tmp_path_factory) -> Iterator[SimpleNamespace]:
    mnt = tmp_path_factory.mktemp("slowfs")
    log = tmp_path_factory.mktemp("slowfs-log") / "started"
    with slowfs_mounted(mnt, SLOW=str(SLOW), SLOWFS_LOG=str(log)):
        yield SimpleNamespace(mnt=mnt, started_log=log)


def timed_get(port: int, path: str) -> tuple[int, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - start
    finally:
        conn.close()


def wait_for_slow_listings(log: Path, count: int, timeout: float = 10) -> None:
    """Until ``count`` slow listings are under way in the file system."""
    deadline = time.monotonic() + timeout
    while not log.exists() or len(log.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, "the slow listings did not start"
        time.sleep(0.01)


def test_slow_listings_do_not_stall_others(slowfs, start_agent):
    # More slow listings than asyncio's default executor has threads on 2 cores (6).
    agent = start_agent([(REMOTE, str(slowfs.mnt))])
    slowfs.started_log.unlink(missing_ok=True)
    with ThreadPoolExecutor(12) as pool:
        slow = [pool.submit(timed_get, agent.port, f"{REMOTE}/slow{i}") for i in range(10)]
        wait_for_slow_listings(slowfs.started_log, 10)
        fast_status, fast_time = timed_get(agent.port, REMOTE + "/fast")
        assert all(not f.done() for f in slow), "the slow listings should still be running"
        results = [f.result() for f in slow]
    assert fast_status == 200
    assert fast_time < SLOW / 2
    assert all(status == 200 and took >= SLOW * 0.9 for status, took in results)


def timed_walk(port: int, path: str) -> tuple[int, float, bytes]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/_agent/v1/walk?format=ndjson", body=json.dumps({"paths": [path], "max_entries": 100}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, time.monotonic() - start, body
    finally:
        conn.close()


def test_slow_subtree_walk_does_not_stall_other_walks(slowfs, start_agent):
    # A walk stuck in a slow directory must not keep the others waiting for it.
    agent = start_agent([(REMOTE, str(slowfs.mnt))])
    slowfs.started_log.unlink(missing_ok=True)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(timed_walk, agent.port, f"{REMOTE}/slow3")
        wait_for_slow_listings(slowfs.started_log, 1)
        fast_status, fast_time, fast_body = timed_walk(agent.port, REMOTE + "/fast")
        assert not slow.done(), "the slow walk should still be running"
        slow_status, slow_time, slow_body = slow.result()
    assert fast_status == 200 and b'"x"' in fast_body and b'"y"' in fast_body
    assert fast_time < SLOW / 2
    assert slow_status == 200 and b'"a"' in slow_body
    assert slow_time >= SLOW * 0.9


def test_maxconnections_queues_instead_of_dropping(slowfs, start_agent):
    agent = start_agent([(REMOTE, str(slowfs.mnt))], extra=("-c", "2"))
    start = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda i: timed_get(agent.port, f"{REMOTE}/slow{i}"), range(5)))
    elapsed = time.monotonic() - start
    assert [status for status, _ in results] == [200] * 5
    # two at a time: 5 listings need three rounds of SLOW seconds
    assert elapsed >= 2.8 * SLOW


def test_agent_at_its_limit_answers_503_retry_after_1(slowfs, start_agent):
    """With -c 1 and no line to wait in, a request that comes while the only slot reads a
    slow directory is answered at once: 503, ``Retry-After: 1`` (as documented), ``busy``."""
    agent = start_agent([(REMOTE, str(slowfs.mnt))], extra=("-c", "1", "--max-queue", "0"))
    for i in range(10):  # a fresh slow directory per try
        slowfs.started_log.unlink(missing_ok=True)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(timed_get, agent.port, f"{REMOTE}/slow{i}")
            wait_for_slow_listings(slowfs.started_log, 1)
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
            try:
                conn.request("GET", REMOTE + "/fast")
                resp = conn.getresponse()
                status, retry_after, body = resp.status, resp.getheader("Retry-After"), resp.read()
            finally:
                conn.close()
            slow_over = slow.done()
            assert slow.result()[0] == 200
        if status == 503:
            assert retry_after == "1"
            assert json.loads(body)["error"] == "busy"
            return
        # Not busy: only right if the slow listing had let go of the slot (a very slow machine).
        assert slow_over, (status, body[:200])
    raise AssertionError("the slow listing was always over before the second request came")
