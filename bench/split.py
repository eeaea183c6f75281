"""How new connections are spread over the agent's worker processes (Linux, psutil).

    python bench/split.py                      # 100 rounds of 8 connections, 2 processes
    python bench/split.py --rounds 50 --connections 16 --processes 4

Starts one agent with ``--processes N`` exporting a tiny temporary tree; each round opens
``--connections`` connections at once, waits until every one is held by a worker process
(``psutil.Process(pid).net_connections()`` lists the sockets each has accepted), notes how
many each process took, and closes them. Prints how often each split occurred (most
loaded process first, e.g. ``7/1``) and the share of connections of the busiest process.
The agent is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import collections
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

_CHILD = re.compile(r"process \d+ of \d+ \(pid (\d+),")


def start(processes: int, top: str) -> tuple[subprocess.Popen, int, list[int]]:
    cmd = [sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0", "-r", "/x", top,
           "--processes", str(processes)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    port, pids = 0, []
    done = threading.Event()

    def read() -> None:
        nonlocal port
        assert proc.stderr is not None
        for line in proc.stderr:
            if " listening on " in line:
                port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
            m = _CHILD.search(line)
            if m:
                pids.append(int(m.group(1)))
            if port and len(pids) == processes:
                done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(30):
        proc.kill()
        raise SystemExit("the agent did not start")
    return proc, port, pids


def owners(pids: list[int], port: int) -> dict[int, int]:
    """Client port -> pid of the worker holding the accepted end, for connections to ``port``."""
    out = {}
    for pid in pids:
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.raddr:
                out[c.raddr.port] = pid
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as top:
        proc, port, pids = start(args.processes, top)
        try:
            splits: collections.Counter[str] = collections.Counter()
            busiest = 0
            for _ in range(args.rounds):
                conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.connections)]
                mine = {c.getsockname()[1] for c in conns}
                deadline = time.monotonic() + 10
                while not mine <= (held := owners(pids, port)).keys():
                    if time.monotonic() > deadline:
                        raise SystemExit("connections not accepted within 10 s")
                    time.sleep(0.01)
                counts = sorted((sum(held[p] == pid for p in mine) for pid in pids), reverse=True)
                splits["/".join(map(str, counts))] += 1
                busiest += counts[0]
                for c in conns:
                    c.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.rounds} rounds of {args.connections} connections over {args.processes} processes:")
    for split, n in sorted(splits.items(), key=lambda kv: [-int(x) for x in kv[0].split("/")]):
        print(f"  {split:>12}  {n:4d}")
    print(f"busiest process's share: {busiest / (args.rounds * args.connections):.0%} "
          f"(even: {1 / args.processes:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
