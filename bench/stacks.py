"""HTTP client stacks against a running agent, and the agent's CPU per listing.

::

    python bench/stacks.py                     # starts its own agent on loopback
    python bench/stacks.py -n 5000 -c 40 --json bench/results/stacks.json
    python bench/stacks.py --agent 127.0.0.1:9999 --agent-pid 1234   # an agent already running

Every client sends the same structured listing request (``GET
/mnt/isilon/<dir>?format=msgpack``, keep-alive, no compression) ``-n`` times
with ``-c`` requests in flight, and reads each answer whole:

* stdlib ``http.client``: ``-c`` threads, one keep-alive connection each
  (what ``diskover_agent`` uses);
* ``aiohttp.ClientSession``: ``-c`` tasks on one connector of ``-c``
  connections, on the asyncio loop and, when installed, on uvloop;
* ``urllib3`` (one ``HTTPConnectionPool`` of ``-c`` connections, ``-c`` threads)
  and ``requests`` (a ``Session`` per thread), when installed: they are optional,
  a missing one is skipped with a note.

For each: requests/s, and the client's CPU per request (``time.process_time``
of this process, all threads, divided by the requests), plus the agent's CPU
per request (from ``/proc/PID/stat``).  The client figures use a small
directory (``--client-entries``, default 10), so that the client's own
per-request cost shows; then the server-side figure: the agent's CPU per
listing of a 200-entry directory, names only and with ``stat=1``, driven by
the stdlib client.

The machine is shared by client and agent (2 cores here): the req/s of a
stack is bounded by both, CPU per request is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from cpu import proc_cpu
from diskover_agent.protocol import MSGPACK_TYPE
from procs import REMOTE, Agent, proc_status_kb

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = {"Accept": MSGPACK_TYPE, "Accept-Encoding": "identity"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_dirs(root: str, sizes: list[int]) -> None:
    for n in sizes:
        d = os.path.join(root, f"d{n}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            with open(os.path.join(d, f"file_{i:05d}.dat"), "wb") as f:
                f.write(b"x" * (i % 97))


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def run_threads(n: int, conc: int, make: Callable[[], Callable[[int], None]]) -> float:
    """Run ``conc`` threads doing ``n`` requests in all; wall seconds from the common start."""
    counts = split(n, conc)
    workers = [make() for _ in range(conc)]  # connections made before the clock starts
    barrier = threading.Barrier(conc + 1)
    errors: list[BaseException] = []

    def body(fn: Callable[[int], None], k: int) -> None:
        barrier.wait()
        try:
            fn(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(w, k), daemon=True) for w, k in zip(workers, counts, strict=True)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall


# -- the clients ---------------------------------------------------------------------------


def stdlib_client(host: str, port: int, target: str) -> Callable[[int, int], float]:
    def run(n: int, conc: int) -> float:
        def make() -> Callable[[int], None]:
            conn = http.client.HTTPConnection(host, port, timeout=60)

            def fn(k: int) -> None:
                try:
                    for _ in range(k):
                        conn.request("GET", target, headers=HEADERS)
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
                finally:
                    conn.close()

            return fn

        return run_threads(n, conc, make)

    return run


def urllib3_client(host: str, port: int, target: str) -> Callable[[int, int], float]:
    import urllib3

    def run(n: int, conc: int) -> float:
        pool = urllib3.HTTPConnectionPool(host, port, maxsize=conc, block=True, retries=False, timeout=60)
        try:

            def make() -> Callable[[int], None]:
                def fn(k: int) -> None:
                    for _ in range(k):
                        resp = pool.request("GET", target, headers=HEADERS)
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")

                return fn

            return run_threads(n, conc, make)
        finally:
            pool.close()

    return run


def requests_client(host: str, port: int, target: str) -> Callable[[int, int], float]:
    import requests

    url = f"http://{host}:{port}{target}"

    def run(n: int, conc: int) -> float:
        sessions: list[Any] = []

        def make() -> Callable[[int], None]:
            session = requests.Session()
            sessions.append(session)

            def fn(k: int) -> None:
                for _ in range(k):
                    resp = session.get(url, headers=HEADERS, timeout=60)
                    resp.content  # noqa: B018  # read the body
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}")

            return fn

        try:
            return run_threads(n, conc, make)
        finally:
            for s in sessions:
                s.close()

    return run


def aiohttp_client(host: str, port: int, target: str, use_uvloop: bool) -> Callable[[int, int], float]:
    import aiohttp

    url = f"http://{host}:{port}{target}"

    async def main(n: int, conc: int) -> float:
        connector = aiohttp.TCPConnector(limit=conc, force_close=False)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

            async def one(k: int) -> None:
                for _ in range(k):
                    async with session.get(url, headers=HEADERS) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")

            await asyncio.gather(*(one(1) for _ in range(conc)))  # open the connections first
            t0 = time.perf_counter()
            await asyncio.gather(*(one(k) for k in split(n, conc)))
            return time.perf_counter() - t0

    def run(n: int, conc: int) -> float:
        if use_uvloop:
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(main(n, conc))
        finally:
            loop.close()

    return run


def httpx_client(host: str, port: int, target: str) -> Callable[[int, int], float]:
    import httpx

    url = f"http://{host}:{port}{target}"

    def run(n: int, conc: int) -> float:
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        with httpx.Client(limits=limits, timeout=60) as client:

            def make() -> Callable[[int], None]:
                def fn(k: int) -> None:
                    for _ in range(k):
                        resp = client.get(url, headers=HEADERS)
                        if resp.status_code != 200:
                            raise RuntimeError(f"HTTP {resp.status_code}")

                return fn

            return run_threads(n, conc, make)

    return run


CLIENTS: list[tuple[str, str, Callable[..., Callable[[int, int], float]], dict]] = [
    ("stdlib http.client, thread per connection", "http.client", stdlib_client, {}),
    ("aiohttp ClientSession (asyncio loop)", "aiohttp", aiohttp_client, {"use_uvloop": False}),
    ("aiohttp ClientSession (uvloop)", "uvloop", aiohttp_client, {"use_uvloop": True}),
    ("urllib3 HTTPConnectionPool, threads", "urllib3", urllib3_client, {}),
    ("requests Session per thread", "requests", requests_client, {}),
    ("httpx Client (sync), threads", "httpx", httpx_client, {}),
]


def importable(module: str) -> bool:
    if module == "http.client":
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -- measuring ---------------------------------------------------------------------------


def measure(run: Callable[[int, int], float], n: int, conc: int, agent_pid: Optional[int], repeat: int) -> dict:
    run(min(n, 500), conc)  # warm-up
    results = []
    for _ in range(repeat):
        a0 = proc_cpu(agent_pid) if agent_pid else None
        c0 = time.process_time()
        wall = run(n, conc)
        client = time.process_time() - c0
        agent = proc_cpu(agent_pid) - a0 if agent_pid and a0 is not None else None
        results.append({
            "seconds": wall,
            "req_per_s": n / wall,
            "client_cpu_us": client / n * 1e6,
            "agent_cpu_us": None if agent is None else agent / n * 1e6,
        })
    best = max(results, key=lambda r: r["req_per_s"])
    return {
        "runs": results,
        "req_per_s": best["req_per_s"],
        "client_cpu_us": statistics.median(r["client_cpu_us"] for r in results),
        "agent_cpu_us": None if agent_pid is None else statistics.median(r["agent_cpu_us"] for r in results),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Compare HTTP client stacks against a diskover agent.")
    parser.add_argument("-n", "--requests", type=int, default=5000, help="requests per figure (default %(default)s)")
    parser.add_argument("-c", "--concurrency", type=int, default=40, help="requests in flight (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure: best req/s, median CPU")
    parser.add_argument("--client-entries", type=int, default=10, help="entries of the directory the clients list")
    parser.add_argument("--agent", help="HOST:PORT of a running agent exporting the dirs (default: start one)")
    parser.add_argument("--agent-pid", type=int, help="PID of that agent, for its CPU figures")
    parser.add_argument("--remote-dir", default=None, help="with --agent: remote path of the directory to list")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "stacks.json"), help="JSON output file")
    args = parser.parse_args(argv)

    tmp = None
    agent: Optional[Agent] = None
    results: dict[str, Any] = {"requests": args.requests, "concurrency": args.concurrency, "clients": [],
                               "server": [], "skipped": []}
    try:
        if args.agent:
            host, _, port_text = args.agent.rpartition(":")
            port = int(port_text)
            agent_pid = args.agent_pid
            client_dir = args.remote_dir or REMOTE
            server_dir = None
        else:
            tmp = tempfile.mkdtemp(prefix="diskover-stacks-")
            make_dirs(tmp, [args.client_entries, 200])
            agent = Agent(tmp)
            host, port, agent_pid = "127.0.0.1", agent.port, agent.pid
            client_dir = f"{REMOTE}/d{args.client_entries}"
            server_dir = f"{REMOTE}/d200"
            log(f"agent {agent.hostspec} (pid {agent.pid}) exporting {tmp}")
        target = client_dir + "?format=msgpack"
        results["client_request"] = f"GET {target}"
        for label, module, factory, kw in CLIENTS:
            if not importable(module):
                results["skipped"].append(f"{label}: {module} is not installed")
                log(f"skipped {label}: {module} is not installed")
                continue
            log(f"{label}: {args.requests} requests, {args.concurrency} in flight")
            try:
                r = measure(factory(host, port, target, **kw), args.requests, args.concurrency, agent_pid,
                            args.repeat)
            except Exception as exc:
                results["skipped"].append(f"{label}: failed: {type(exc).__name__}: {exc}")
                log(f"{label} failed: {exc!r}")
                continue
            r["client"] = label
            results["clients"].append(r)
        if server_dir is not None and agent_pid is not None:
            for stat in (False, True):
                target = server_dir + ("?format=msgpack&stat=1" if stat else "?format=msgpack")
                log(f"server side: GET {target}")
                r = measure(stdlib_client(host, port, target), args.requests, args.concurrency, agent_pid,
                            args.repeat)
                r["request"] = f"GET {target}"
                r["stat"] = stat
                results["server"].append(r)
            results["agent_vmhwm_mb"] = proc_status_kb(agent_pid, "VmHWM") / 1024
    finally:
        if agent is not None:
            agent.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"HTTP clients: {results['client_request']}, {args.requests} requests, {args.concurrency} in flight, "
          f"keep-alive (best req/s of {args.repeat}, median CPU)")
    print(f"  {'client':<44} {'req/s':>8} {'client CPU us/req':>18} {'agent CPU us/req':>17}")
    for r in results["clients"]:
        agent_us = "-" if r["agent_cpu_us"] is None else f"{r['agent_cpu_us']:,.0f}"
        print(f"  {r['client']:<44} {r['req_per_s']:>8,.0f} {r['client_cpu_us']:>18,.0f} {agent_us:>17}")
    for note in results["skipped"]:
        print(f"  (skipped: {note})")
    if results["server"]:
        print()
        print("Agent CPU per listing (stdlib client, same load):")
        print(f"  {'request':<52} {'req/s':>8} {'agent CPU us/req':>17} {'client CPU us/req':>18}")
        for r in results["server"]:
            print(f"  {r['request']:<52} {r['req_per_s']:>8,.0f} {r['agent_cpu_us']:>17,.0f} "
                  f"{r['client_cpu_us']:>18,.0f}")
        print(f"  agent peak RSS after all this: {results['agent_vmhwm_mb']:.1f} MB")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    log(f"results written to {args.json}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
