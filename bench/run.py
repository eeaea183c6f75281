"""The benchmark: a walk through the agents against the node's own ``os.walk``.

One command::

    python bench/run.py                 # 100k-entry tree, RTTs 0,1,5 ms, best of 5 (~7 min)
    python bench/run.py --big           # 1M-entry tree
    python bench/run.py --quick         # one timed run per figure (a smoke test)
    python bench/run.py --json out.json --rtts 0,1,5 --runs 3 --workers 4

In one run it

* builds (or reuses) the deterministic tree (``bench/tree.py``; 100,000 entries,
  1,000,000 with ``--big``) and a flat directory of 1,000,000 entries under
  ``--workdir``;
* starts three agents (separate processes) exporting ``--workdir`` as
  ``/mnt/isilon``, and for each round trip of ``--rtts`` one delaying proxy
  process (``bench/delayproxy.py``) in front of each agent; the round trip is
  measured through a proxy of the same kind to an echo target, and by timing
  a tiny listing through the real proxy and agent;
* times, best of ``--runs`` after one warm-up run each: local ``os.walk``, local
  ``os.walk`` + ``lstat`` of every entry; ``parallel_walk`` (subtree mode) through
  one and three agents, names only and with stat (``parallel_walk_entries``);
  the per-directory mode through one agent -- directly (no proxy) and at each
  round trip (``0`` is a row through the proxy, showing the proxy's own cost);
  gzip on and off through a 100 Mbit/s link at 1 ms; and, at 1 ms, the subtree
  walks at other ``workers`` settings (``--sweep-workers``); one agent with
  ``--processes 1`` and one with ``--processes 2`` walked by the frontier client
  (``bench/frontier.py``); the command line ``walk -o FILE`` (NDJSON) and its
  Parquet dataset, whole process timed (``bench/cli_rows.py``);
* lists the 1,000,000-entry directory streamed (time to first entry, total
  time) against a local ``os.scandir``, and reads the peak RSS growth of a freshly
  started agent (``VmHWM``);
* checks every timed walk against ``os.walk`` (entry count and
  ``tree.walk_digest``; stat walks also against ``lstat`` of every entry), and
  exits with status 1, loudly, when one differs;
* prints a table (each figure, its ratio to local ``os.walk``, stat walks also
  to ``os.walk`` + ``lstat``; the CPU seconds per 100,000 entries of the agents'
  process trees and of the client, and their ratio to the local walk's; issues
  3 and 13's targets with PASS/FAIL) and writes it all as JSON
  (``bench/results/latest.json`` by default).

Every process it starts (agents, proxies) is stopped by its PID at the end;
agents also die with this process (``PR_SET_PDEATHSIG``), proxies when their
stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import msgspec

import diskover_agent
from cli_rows import CliRows
from cpu import per_100k, proc_cpu, tree_cpu, tree_pids
from diskover_agent.protocol import MSGPACK_TYPE, DirFrame, EndFrame, EntriesFrame, ErrorFrame, quote_path, read_frames
from frontier import FrontierWalk, check_dirs, connections_per_process
from procs import REMOTE, Agent, Procs, agent_accepts, log, proc_io_bytes, proc_status_kb
from walks import (
    Mismatch,
    Reference,
    local_walk,
    local_walk_lstat,
    recording_walker,
    remote_walk,
    remote_walk_stat,
)

import delayproxy
from tree import build_huge_dir, build_tree

HERE = os.path.dirname(os.path.abspath(__file__))
HUGE_ENTRIES = 1_000_000

#: The issue's targets, checked as written.
TARGET_TEXT = {
    "names_1ms": "1 agent, 1 ms, names-only walk >= 0.5 x local os.walk",
    "stat_1ms": "1 agent, 1 ms, stat walk >= 0.5 x local os.walk + lstat",
    "names_5ms": "1 agent, 5 ms, names-only walk >= 0.35 x local os.walk",
    "stat_5ms": "1 agent, 5 ms, stat walk >= 0.35 x local os.walk + lstat",
    "three_names_1ms": "3 agents, 1 ms, names: no slower than 1 agent",
    "three_stat_1ms": "3 agents, 1 ms, stat: no slower than 1 agent",
    "three_share_1ms": "3 agents, 1 ms: each agent serves 20%-45% of the directories (every timed run)",
    "subtree_vs_listdir_1ms": "1 ms: subtree mode >= 10 x per-directory mode (names, 1 agent)",
    "huge_first": "1M-entry directory: first entry within 0.2 s",
    "huge_total": "1M-entry directory: whole listing within 2 x local os.scandir",
    "huge_rss": "1M-entry directory: agent peak RSS grows by less than 64 MB",
    # issue 13
    "names_1ms_13": "names walk, 1 agent, 1 ms >= 1.0 x local os.walk",
    "names_1ms_agent_cpu": "names walk, 1 agent, 1 ms: agent CPU per entry <= 0.8 x os.walk's",
    "names_1ms_client_cpu": "names walk, 1 agent, 1 ms: client CPU per entry <= 0.5 x os.walk's",
    "stat_1ms_13": "stat walk, 1 agent, 1 ms >= 0.8 x local os.walk + lstat",
    "stat_1ms_agent_cpu": "stat walk, 1 agent, 1 ms: agent CPU per entry <= 1.2 x os.walk + lstat's",
    "stat_1ms_client_cpu": "stat walk, 1 agent, 1 ms: client CPU per entry <= 0.5 x os.walk + lstat's",
    "processes_2": "agent throughput with 2 processes >= 1.6 x 1 process (frontier client, names)",
    "cli_ndjson": "CLI walk -o FILE (NDJSON, every stat field) >= 0.5 x local os.walk + lstat",
    "cli_parquet": "CLI walk, Parquet dataset >= 0.5 x local os.walk + lstat",
}
#: Which issue each target comes from (the table prints them in these groups).
TARGET_ISSUE = {key: 13 if i >= 11 else 3 for i, key in enumerate(TARGET_TEXT)}


# -- processes --------------------------------------------------------------------------


def netem_available() -> str:
    """Whether this kernel has the netem qdisc, from its build configuration (nothing is changed)."""
    import gzip

    sources = [("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}", open)]
    for path, opener in sources:
        try:
            with opener(path, "rt") as f:  # type: ignore[operator]
                for line in f:
                    if "CONFIG_NET_SCH_NETEM" in line:
                        return f"{line.strip()} ({path})"
        except OSError:
            continue
    return "unknown (no kernel config readable)"


# -- timing -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs()
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.watch: list[int] = []  # agent and proxy PIDs whose CPU a run accounts for
        self.proxy_pids: list[int] = []

    def cpu_snapshot(self) -> tuple[float, float, float, int]:
        agents = sum(tree_cpu(p) for p in self.watch)  # each agent's whole process tree
        proxies = sum(proc_cpu(p) for p in self.proxy_pids)
        wire = sum(proc_io_bytes(p) for p in self.proxy_pids)
        return time.process_time(), agents, proxies, wire

    def measure(
        self,
        group: str,
        name: str,
        fn: Callable[[], Any],
        check: Callable[[Any], int],
        *,
        stat: bool = False,
        extra: Optional[Callable[[], dict]] = None,
        runs: Optional[int] = None,
        watch: Optional[list[int]] = None,
        client_cpu_of: Optional[Callable[[Any], float]] = None,
        **info: Any,
    ) -> dict:
        """Warm up once, then time ``fn`` ``runs`` times; every result goes through ``check``.

        ``watch``: the agent PIDs of this row (default ``self.watch``), their process trees
        counted. ``client_cpu_of(result)``: the client's CPU when the client is not this
        process (a command run as a child process)."""
        runs = runs or self.args.runs
        saved_watch = self.watch
        if watch is not None:
            self.watch = watch
        row: dict[str, Any] = {"group": group, "name": name, "stat": stat, "runs": [], **info}
        label = f"{group}: {name}"
        try:
            check(fn())  # warm-up, checked too
            for _ in range(runs):
                c0, a0, p0, w0 = self.cpu_snapshot()
                t0 = time.perf_counter()
                out = fn()
                wall = time.perf_counter() - t0
                c1, a1, p1, w1 = self.cpu_snapshot()
                run = {
                    "seconds": wall,
                    "client_cpu": c1 - c0,
                    "agent_cpu": a1 - a0,
                    "proxy_cpu": p1 - p0,
                    "proxy_bytes_written": w1 - w0,
                }
                if client_cpu_of is not None:
                    run["client_cpu"] = client_cpu_of(out)
                if extra is not None:
                    run.update(extra())
                run["entries"] = check(out)
                del out
                row["runs"].append(run)
        except Exception as exc:
            what = "MISMATCH" if isinstance(exc, Mismatch) else "ERROR"
            detail = str(exc) if isinstance(exc, Mismatch) else f"{type(exc).__name__}: {exc}"
            msg = f"{what} in {label}: {detail}"
            self.failures.append(msg)
            row["error"] = msg
            log("!" * 72 + "\n" + msg + "\n" + "!" * 72)
            self.rows.append(row)
            return row
        finally:
            self.watch = saved_watch
        times = [r["seconds"] for r in row["runs"]]
        best = min(range(len(times)), key=times.__getitem__)
        row["best"] = row["runs"][best]
        row["seconds"] = times[best]
        row["median_seconds"] = statistics.median(times)
        row["entries"] = row["best"]["entries"]
        row["rate"] = row["entries"] / row["seconds"]
        row["median_rate"] = row["entries"] / row["median_seconds"]
        # CPU per entry (steadier than the wall time on a shared machine): all timed runs together, since
        # /proc counts in 10 ms ticks and a sum rounds once; the median of the runs' figures beside it.
        entries = sum(r["entries"] for r in row["runs"])
        row["cpu_per_100k"] = {side: per_100k(sum(r[f"{side}_cpu"] for r in row["runs"]), entries)
                               for side in ("client", "agent", "proxy")}
        row["cpu_per_100k_median"] = {
            side: statistics.median(per_100k(r[f"{side}_cpu"], r["entries"]) for r in row["runs"])
            for side in ("client", "agent", "proxy")}
        log(f"{label}: {row['rate']:,.0f} entries/s (best of {len(times)}: "
            f"{', '.join(f'{t:.3f}' for t in times)} s)")
        self.rows.append(row)
        return row


# -- the 1,000,000-entry directory -------------------------------------------------------


def local_scandir(path: str) -> dict:
    t0 = time.perf_counter()
    first = None
    out = []
    append = out.append
    with os.scandir(path) as it:
        for e in it:
            if first is None:
                first = time.perf_counter() - t0
            append((e.name, e.is_dir(follow_symlinks=False)))
    total = time.perf_counter() - t0
    return {"first": first, "total": total, "names": [os.fsencode(n) for n, _ in out],
            "dirs": sum(1 for _, d in out if d)}


def streamed_listing(port: int, remote: str) -> dict:
    """GET one directory as msgpack frames, decoding them as they arrive (http.client)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", quote_path(os.fsencode(remote)) + "?format=msgpack",
                     headers={"Accept": MSGPACK_TYPE, "Accept-Encoding": "identity"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"listing {remote}: HTTP {resp.status} {resp.read(500)!r}")
        first = None
        entries: list = []
        ended = False
        for frame in read_frames(resp.read):
            if isinstance(frame, EntriesFrame):
                if first is None:
                    first = time.perf_counter() - t0
                entries.extend(frame.entries)
            elif isinstance(frame, ErrorFrame):
                raise RuntimeError(f"listing {remote}: {frame.code} {frame.message}")
            elif isinstance(frame, EndFrame):
                ended = True
            elif not isinstance(frame, DirFrame):
                raise RuntimeError(f"unexpected frame {frame!r}")
        total = time.perf_counter() - t0
    finally:
        conn.close()
    if not ended:
        raise RuntimeError("listing ended without its end frame")
    return {"first": first, "total": total, "entries": entries}


def names_digest(names: list[bytes]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n + b"\0")
    return h.hexdigest()


def tiny_listing_ms(port: int, remote: str, samples: int = 50) -> float:
    """Median ms of a keep-alive GET of a small directory (msgpack)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    target = quote_path(os.fsencode(remote)) + "?format=msgpack"
    headers = {"Accept": MSGPACK_TYPE, "Accept-Encoding": "identity"}
    times = []
    try:
        for i in range(samples + 3):
            t0 = time.perf_counter()
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"tiny listing: HTTP {resp.status}")
            if i >= 3:
                times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return statistics.median(times) * 1000


# -- the run ------------------------------------------------------------------------------


def fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.b = Bench(args)
        self.result: dict[str, Any] = {}

    def main(self) -> int:
        args = self.args
        started = time.perf_counter()
        self.result["meta"] = self.meta()
        workdir = os.path.abspath(args.workdir)
        os.makedirs(workdir, exist_ok=True)
        entries = 1_000_000 if args.big else 100_000
        tree_name = "tree-1m" if args.big else "tree-100k"
        local_top = os.path.join(workdir, tree_name)
        huge_local = os.path.join(workdir, "huge-1m")
        log(f"tree: {local_top} ({entries:,} entries), huge directory: {huge_local}")
        t0 = time.perf_counter()
        summary = build_tree(local_top, entries, seed=1)
        build_huge_dir(huge_local, HUGE_ENTRIES)
        log(f"trees ready in {time.perf_counter() - t0:.1f} s (reused: {summary['reused']})")
        self.result["tree"] = summary
        remote_top = REMOTE + "/" + tree_name
        huge_remote = REMOTE + "/huge-1m"

        log("reference os.walk (and warming the caches)")
        ref = Reference(local_top, remote_top)
        self.result["reference"] = {"entries": ref.names[0], "digest": ref.names[1], "stat_digest": ref.stats[1],
                                    "dirs": ref.dirs, "tiny_dir": ref.tiny_dir}
        b = self.b
        try:
            agents = [b.procs.agent(workdir) for _ in range(3)]
            b.watch = [a.pid for a in agents]
            log("agents: " + ", ".join(f"{a.hostspec} (pid {a.pid})" for a in agents))
            skip = args.skip
            self.local_rows(ref)
            if "network" not in skip:
                self.network_rows(ref, agents, remote_top)
            if "compression" not in skip:
                self.compression_rows(ref, agents[0], remote_top)
            if "processes" not in skip:
                self.processes_rows(ref, workdir, remote_top)
            if "cli" not in skip:
                log("command-line rows (through the first agent, no proxy)")
                CliRows(b, ref, agents[0].hostspec, remote_top, workdir).rows()
            self.local_rows(ref, "local, again at the end")
            if "huge" not in skip:
                self.huge(workdir, huge_local, huge_remote)
        finally:
            b.procs.stop_all()
        self.result["rows"] = b.rows
        self.cpu_ratios()
        self.result["targets"] = self.targets()
        self.result["failures"] = b.failures
        self.result["elapsed_seconds"] = time.perf_counter() - started
        self.result["meta"]["loadavg_end"] = os.getloadavg()
        self.print_table()
        out = args.json
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=1, default=_json_default)
            f.write("\n")
        log(f"results written to {out} ({self.result['elapsed_seconds']:.0f} s in all)")
        if b.failures:
            print("\n" + "!" * 72, file=sys.stderr)
            print("FAILED: a timed walk did not yield exactly what os.walk yields:", file=sys.stderr)
            for msg in b.failures:
                print("  " + msg, file=sys.stderr)
            print("!" * 72, file=sys.stderr)
            return 1
        if args.fail_on_target and any(t["status"] == "FAIL" for t in self.result["targets"]):
            return 2
        return 0

    def meta(self) -> dict:
        commit = ""
        with contextlib.suppress(Exception):
            commit = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        try:
            import uvloop  # noqa: F401

            have_uvloop = True
        except ImportError:
            have_uvloop = False
        return {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "diskover_agent": diskover_agent.__version__,
            "git": commit,
            "uvloop": have_uvloop,
            "netem": netem_available(),
            "msgspec": msgspec.__version__,
            "workers": self.args.workers,
            "frontier_connections": self.args.frontier_connections,
            "agent_processes_option": agent_accepts("--processes"),
            "skipped": sorted(self.args.skip),
            "listdir_workers": self.args.listdir_workers,
            "source": os.path.dirname(diskover_agent.__file__),
            "runs": self.args.runs,
            "statistic": f"best of {self.args.runs} timed runs after 1 warm-up run (median also recorded)",
        }

    # -- rows ----------------------------------------------------------------------------

    def local_rows(self, ref: Reference, group: str = "local") -> None:
        b = self.b
        b.proxy_pids = []
        b.measure(group, "os.walk", lambda: local_walk(ref.local_top), ref.check_local, kind="os.walk")
        b.measure(group, "os.walk + lstat", lambda: local_walk_lstat(ref.local_top), ref.check_local_lstat,
                  stat=True, kind="os.walk+lstat")

    def walk_rows(self, ref: Reference, group: str, rtt: dict, hosts1: list[str], hosts3: list[str],
                  remote_top: str) -> None:
        b = self.b
        w = self.args.workers
        common = {"rtt": rtt, "workers": w}
        b.measure(group, "subtree, 1 agent, names", lambda: remote_walk(remote_top, hosts1, workers=w,
                  mode="subtree", compress=False), ref.check_remote, kind="subtree", agents=1, **common)
        b.measure(group, "subtree, 1 agent, stat", lambda: remote_walk_stat(remote_top, hosts1, workers=w,
                  mode="subtree", compress=False), ref.check_remote_stat, stat=True, kind="subtree", agents=1,
                  **common)
        with recording_walker() as served:
            b.measure(group, "subtree, 3 agents, names", lambda: remote_walk(remote_top, hosts3, workers=w,
                      mode="subtree", compress=False), ref.check_remote, kind="subtree", agents=3, extra=served,
                      **common)
            b.measure(group, "subtree, 3 agents, stat", lambda: remote_walk_stat(remote_top, hosts3, workers=w,
                      mode="subtree", compress=False), ref.check_remote_stat, stat=True, kind="subtree", agents=3,
                      extra=served, **common)
        lw = self.args.listdir_workers
        b.measure(group, "per-directory, 1 agent, names", lambda: remote_walk(remote_top, hosts1, workers=lw,
                  mode="listdir", compress=False), ref.check_remote, kind="listdir", agents=1, rtt=rtt, workers=lw)

    def sweep_rows(self, ref: Reference, rtt: dict, hosts: list[str], remote_top: str) -> None:
        b = self.b
        group = "RTT 1 ms, other workers settings"
        with recording_walker() as served:
            for w in self.args.sweep_workers:
                if w == self.args.workers:
                    continue
                for n in (1, 3):
                    agents = f"{n} agent{'s' if n > 1 else ''}"
                    extra = served if n > 1 else None
                    b.measure(group, f"subtree, {agents}, names, workers={w}", lambda w=w, n=n: remote_walk(
                              remote_top, hosts[:n], workers=w, mode="subtree", compress=False), ref.check_remote,
                              kind="sweep", agents=n, rtt=rtt, workers=w, extra=extra)
                    b.measure(group, f"subtree, {agents}, stat, workers={w}", lambda w=w, n=n: remote_walk_stat(
                              remote_top, hosts[:n], workers=w, mode="subtree", compress=False),
                              ref.check_remote_stat, stat=True, kind="sweep", agents=n, rtt=rtt, workers=w,
                              extra=extra)

    def network_rows(self, ref: Reference, agents: list[Agent], remote_top: str) -> None:
        b = self.b
        rtts = self.result.setdefault("rtt", [])
        direct_tiny = tiny_listing_ms(agents[0].port, ref.tiny_dir)
        echo = delayproxy.run_echo_server_in_thread()
        try:
            loopback = delayproxy.measure_rtt("127.0.0.1", echo.port)
        finally:
            echo.stop()
        info = {"setting": "direct", "requested_ms": None, "echo_rtt_ms": loopback, "tiny_listing_ms": direct_tiny,
                "added_ms": 0.0}
        rtts.append(info)
        log(f"direct: loopback echo RTT {loopback:.3f} ms, tiny listing {direct_tiny:.3f} ms")
        b.proxy_pids = []
        self.walk_rows(ref, "direct (no proxy)", info, [agents[0].hostspec], [a.hostspec for a in agents],
                       remote_top)
        for rtt_ms in self.args.rtts:
            echo_rtt = delayproxy.measure_proxy_rtt(rtt_ms)
            proxies = [b.procs.proxy(a.port, rtt_ms) for a in agents]
            try:
                b.proxy_pids = [p.pid for p in proxies]
                tiny = tiny_listing_ms(proxies[0].port, ref.tiny_dir)
                info = {"setting": f"proxy {rtt_ms:g} ms", "requested_ms": rtt_ms, "echo_rtt_ms": echo_rtt,
                        "tiny_listing_ms": tiny, "added_ms": tiny - direct_tiny}
                rtts.append(info)
                log(f"proxy {rtt_ms:g} ms: echo RTT {echo_rtt:.3f} ms, tiny listing {tiny:.3f} ms "
                    f"({tiny - direct_tiny:+.3f} ms over direct)")
                hosts = [f"127.0.0.1:{p.port}" for p in proxies]
                self.walk_rows(ref, f"RTT {rtt_ms:g} ms", info, hosts[:1], hosts, remote_top)
                if rtt_ms == 1.0 and self.args.sweep_workers:
                    self.sweep_rows(ref, info, hosts, remote_top)
            finally:
                for p in proxies:
                    b.procs.stop(p)
                b.proxy_pids = []

    def processes_rows(self, ref: Reference, workdir: str, remote_top: str) -> None:
        """One agent with ``--processes 1``, one with ``--processes 2``, each walked by the frontier
        client (``bench/frontier.py``) directly: what the agent serves when the client costs almost nothing."""
        b = self.b
        group = f"agent processes (frontier client, {self.args.frontier_connections} connections, no proxy)"
        supported = agent_accepts("--processes")
        top = os.fsencode(remote_top)
        for n in (1, 2):
            label = f"{n} process{'es' if n > 1 else ''}"
            if not supported and n > 1:
                for kind in ("names", "stat"):
                    b.rows.append({"group": group, "name": f"{label}, {kind}", "stat": kind == "stat", "runs": [],
                                   "kind": "processes", "processes": n, "note": "n/a (agent has no --processes)"})
                continue
            agent = b.procs.agent(workdir, ("--processes", str(n)) if supported else ())
            try:
                tiny_listing_ms(agent.port, ref.tiny_dir, samples=5)  # the workers are up and serving
                log(f"agent with {label}: pids {tree_pids(agent.pid)}"
                    + ("" if supported else " (no --processes option: 1 process)"))
                for stat in (False, True):
                    self._frontier_row(ref, group, f"{label}, {'stat' if stat else 'names'}", agent, top, stat,
                                       processes=n, processes_option=supported)
            finally:
                b.procs.stop(agent)

    def _frontier_row(self, ref: Reference, group: str, name: str, agent: Agent, top: bytes, stat: bool,
                      **info: Any) -> None:
        conns = self.args.frontier_connections
        last: list[FrontierWalk] = []

        def walk() -> FrontierWalk:
            last[:] = [FrontierWalk("127.0.0.1", agent.port, top, connections=conns, stat=stat, keep_open=True).run()]
            return last[0]

        def extra() -> dict:  # after the timed part, before the check closes the connections
            w = last[0]
            return {"requests": w.requests, "names_frames": w.names_frames,
                    "connections_per_process": connections_per_process(tree_pids(agent.pid), agent.port,
                                                                       w.local_ports)}

        def check(w: FrontierWalk) -> int:
            try:
                return check_dirs(w, ref.dir_paths, ref.names[0])
            finally:
                w.close()

        self.b.measure(group, name, walk, check, stat=stat, watch=[agent.pid], extra=extra, kind="processes",
                       connections=conns, agent_pids=tree_pids(agent.pid), **info)

    def compression_rows(self, ref: Reference, agent: Agent, remote_top: str) -> None:
        b = self.b
        rtt_ms, rate = self.args.compress_rtt, self.args.rate_mbit
        group = f"{rate:g} Mbit/s, RTT {rtt_ms:g} ms"
        echo_proxy = b.procs.proxy(None, rtt_ms, rate)
        try:
            echo_rtt = delayproxy.measure_rtt("127.0.0.1", echo_proxy.port)
            mbit = delayproxy.measure_throughput("127.0.0.1", echo_proxy.port, 4 << 20)
        finally:
            b.procs.stop(echo_proxy)
        proxy = b.procs.proxy(agent.port, rtt_ms, rate)
        try:
            b.proxy_pids = [proxy.pid]
            tiny = tiny_listing_ms(proxy.port, ref.tiny_dir)
            info = {"setting": group, "requested_ms": rtt_ms, "rate_mbit": rate, "echo_rtt_ms": echo_rtt,
                    "measured_mbit": mbit, "tiny_listing_ms": tiny}
            self.result["rtt"].append(info)
            log(f"{group}: echo RTT {echo_rtt:.3f} ms, link {mbit:.1f} Mbit/s, tiny listing {tiny:.3f} ms")
            hosts = [f"127.0.0.1:{proxy.port}"]
            w = self.args.workers
            for compress in (False, True):
                gz = "gzip" if compress else "no compression"
                b.measure(group, f"subtree, 1 agent, names, {gz}", lambda c=compress: remote_walk(
                          remote_top, hosts, workers=w, mode="subtree", compress=c), ref.check_remote,
                          kind="compress", agents=1, compress=compress, rtt=info, workers=w)
                b.measure(group, f"subtree, 1 agent, stat, {gz}", lambda c=compress: remote_walk_stat(
                          remote_top, hosts, workers=w, mode="subtree", compress=c), ref.check_remote_stat,
                          stat=True, kind="compress", agents=1, compress=compress, rtt=info, workers=w)
        finally:
            b.procs.stop(proxy)
            b.proxy_pids = []

    def huge(self, workdir: str, huge_local: str, huge_remote: str) -> None:
        b = self.b
        runs = self.args.runs
        log("1M-entry directory: local os.scandir")
        local_scandir(huge_local)  # warm-up
        local = [local_scandir(huge_local) for _ in range(runs)]
        want_names = names_digest(local[0]["names"])
        want_count = len(local[0]["names"])
        for r in local:
            if len(r["names"]) != want_count or names_digest(r["names"]) != want_names:
                b.failures.append("MISMATCH: local os.scandir of the huge directory varies between runs")
        res: dict[str, Any] = {
            "entries": want_count,
            "local": {"first": [r["first"] for r in local], "total": [r["total"] for r in local]},
            "remote": {},
        }
        agent = b.procs.agent(workdir)  # fresh, so that its peak RSS says what this listing costs
        try:
            tiny_listing_ms(agent.port, REMOTE, samples=5)  # the first requests' imports and pools
            hwm0 = proc_status_kb(agent.pid, "VmHWM")
            rss0 = proc_status_kb(agent.pid, "VmRSS")
            settings: list[tuple[str, Optional[float]]] = [("direct", None)]
            if 1.0 in self.args.rtts:
                settings.append(("RTT 1 ms", 1.0))
            hwm_first = None
            for label, rtt_ms in settings:
                proxy = b.procs.proxy(agent.port, rtt_ms) if rtt_ms is not None else None
                port = proxy.port if proxy is not None else agent.port
                try:
                    log(f"1M-entry directory: streamed listing, {label}")
                    times = []
                    for i in range(runs + 1):  # the first is a warm-up (and the RSS reading)
                        a0 = tree_cpu(agent.pid)
                        c0 = time.process_time()
                        r = streamed_listing(port, huge_remote)
                        cpu = {"client_cpu": time.process_time() - c0, "agent_cpu": tree_cpu(agent.pid) - a0}
                        if hwm_first is None:
                            hwm_first = proc_status_kb(agent.pid, "VmHWM")
                        names = [e.name for e in r["entries"]]
                        if len(names) != want_count or names_digest(names) != want_names or any(
                            e.kind != "f" for e in r["entries"]
                        ):
                            msg = f"MISMATCH: streamed listing of the huge directory ({label}): {len(names)} entries"
                            b.failures.append(msg)
                            log("!" * 72 + "\n" + msg)
                        del r["entries"], names
                        if i == 0:
                            continue
                        times.append({"first": r["first"], "total": r["total"], **cpu})
                finally:
                    if proxy is not None:
                        b.procs.stop(proxy)
                res["remote"][label] = times
            hwm1 = proc_status_kb(agent.pid, "VmHWM")
        finally:
            b.procs.stop(agent)
        res["agent_vmhwm_kb"] = {"before": hwm0, "after_first": hwm_first, "after_all": hwm1, "rss_before": rss0}
        res["rss_growth_mb"] = (hwm1 - hwm0) / 1024
        res["local_best"] = {"first": min(res["local"]["first"]), "total": min(res["local"]["total"])}
        for label, times in res["remote"].items():
            res.setdefault("remote_best", {})[label] = {
                "first": min(t["first"] for t in times),
                "total": min(t["total"] for t in times),
                "median_first": statistics.median(t["first"] for t in times),
                "median_total": statistics.median(t["total"] for t in times),
            }
        self.result["huge"] = res
        log(f"1M-entry directory: local {res['local_best']['total']:.3f} s; " + "; ".join(
            f"{k}: first {v['first'] * 1000:.1f} ms, total {v['total']:.3f} s"
            for k, v in res["remote_best"].items()) + f"; agent peak RSS +{res['rss_growth_mb']:.1f} MB")

    # -- targets and the table ---------------------------------------------------------------

    def row(self, group: str, name: str) -> Optional[dict]:
        for r in self.b.rows:
            if r["group"] == group and r["name"] == name and "rate" in r:
                return r
        return None

    def local(self, stat: bool) -> list[dict]:
        """The local walk's rows (timed at the start and at the end of the run)."""
        kind = "os.walk+lstat" if stat else "os.walk"
        return [r for r in self.b.rows if r.get("kind") == kind and "rate" in r]

    def base(self, stat: bool) -> Optional[float]:
        """The local walk's rate: the faster of its timings (load only ever slows a run down)."""
        return max((r["rate"] for r in self.local(stat)), default=None)

    def base_cpu(self, stat: bool) -> Optional[float]:
        """The local walk's CPU seconds per 100,000 entries: the lower of its timings."""
        return min((r["cpu_per_100k"]["client"] for r in self.local(stat)), default=None)

    def cpu_ratios(self) -> None:
        """Each row's CPU per entry (agent, client) over the local walk's: names walks over
        ``os.walk``'s, stat walks over ``os.walk + lstat``'s."""
        bases = {stat: self.base_cpu(stat) for stat in (False, True)}
        for r in self.b.rows:
            base = bases[r["stat"]]
            if "cpu_per_100k" in r and base:
                r["cpu_ratio"] = {side: r["cpu_per_100k"][side] / base for side in ("agent", "client")}

    def targets(self) -> list[dict]:
        out: list[dict] = []

        def add(key: str, value: Optional[float], want: str, ok: Optional[bool], detail: str = "") -> None:
            status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            out.append({"key": key, "issue": TARGET_ISSUE[key], "target": TARGET_TEXT[key], "value": value,
                        "want": want, "status": status, "detail": detail})

        for key, rtt, stat, need in (("names_1ms", 1, False, 0.5), ("stat_1ms", 1, True, 0.5),
                                     ("names_5ms", 5, False, 0.35), ("stat_5ms", 5, True, 0.35)):
            r = self.row(f"RTT {rtt} ms", f"subtree, 1 agent, {'stat' if stat else 'names'}")
            base = self.base(stat)
            if r is None or base is None:
                add(key, None, f">= {need}", None, "not measured")
                continue
            ratio = r["rate"] / base
            add(key, ratio, f">= {need}", ratio >= need, f"{r['rate']:,.0f} vs {base:,.0f} entries/s")
        for key, stat in (("three_names_1ms", False), ("three_stat_1ms", True)):
            kind = "stat" if stat else "names"
            one = self.row("RTT 1 ms", f"subtree, 1 agent, {kind}")
            three = self.row("RTT 1 ms", f"subtree, 3 agents, {kind}")
            if one is None or three is None:
                add(key, None, ">= 1.0", None, "not measured")
                continue
            ratio = three["rate"] / one["rate"]
            add(key, ratio, ">= 1.0 (3 agents / 1 agent)", ratio >= 1.0,
                f"{three['rate']:,.0f} vs {one['rate']:,.0f} entries/s")
        shares = []
        for kind in ("names", "stat"):
            r = self.row("RTT 1 ms", f"subtree, 3 agents, {kind}")
            if r is not None:
                shares += [s for run in r["runs"] for s in run["shares"]]
        if shares:
            add("three_share_1ms", None, "each in [0.20, 0.45]", all(0.20 <= s <= 0.45 for s in shares),
                f"shares from {min(shares):.1%} to {max(shares):.1%}")
        else:
            add("three_share_1ms", None, "each in [0.20, 0.45]", None, "not measured")
        sub = self.row("RTT 1 ms", "subtree, 1 agent, names")
        per = self.row("RTT 1 ms", "per-directory, 1 agent, names")
        if sub and per:
            ratio = sub["rate"] / per["rate"]
            add("subtree_vs_listdir_1ms", ratio, ">= 10", ratio >= 10,
                f"{sub['rate']:,.0f} vs {per['rate']:,.0f} entries/s")
        else:
            add("subtree_vs_listdir_1ms", None, ">= 10", None, "not measured")
        huge = self.result.get("huge")
        if huge and huge.get("remote_best"):
            label = "RTT 1 ms" if "RTT 1 ms" in huge["remote_best"] else "direct"
            rb, lb = huge["remote_best"][label], huge["local_best"]
            add("huge_first", rb["first"], "<= 0.2 s", rb["first"] <= 0.2, f"{label}: {rb['first'] * 1000:.1f} ms")
            ratio = rb["total"] / lb["total"]
            add("huge_total", ratio, "<= 2.0 (remote / local)", ratio <= 2.0,
                f"{label}: {rb['total']:.3f} s vs local {lb['total']:.3f} s")
            add("huge_rss", huge["rss_growth_mb"], "< 64 MB", huge["rss_growth_mb"] < 64,
                f"VmHWM {huge['agent_vmhwm_kb']['before'] / 1024:.1f} -> "
                f"{huge['agent_vmhwm_kb']['after_all'] / 1024:.1f} MB")
        else:
            for key in ("huge_first", "huge_total", "huge_rss"):
                add(key, None, "", None, "not measured")
        self.targets_13(add)
        return out

    def targets_13(self, add: Callable[..., None]) -> None:
        for kind, stat, need, agent_max, client_max in (("names", False, 1.0, 0.8, 0.5), ("stat", True, 0.8, 1.2, 0.5)):
            r = self.row("RTT 1 ms", f"subtree, 1 agent, {kind}")
            base = self.base(stat)
            if r is None or base is None or "cpu_ratio" not in r:
                for key in (f"{kind}_1ms_13", f"{kind}_1ms_agent_cpu", f"{kind}_1ms_client_cpu"):
                    add(key, None, "", None, "not measured")
                continue
            ratio = r["rate"] / base
            add(f"{kind}_1ms_13", ratio, f">= {need}", ratio >= need, f"{r['rate']:,.0f} vs {base:,.0f} entries/s")
            cpu, rel = r["cpu_per_100k"], r["cpu_ratio"]
            base_cpu = self.base_cpu(stat)
            add(f"{kind}_1ms_agent_cpu", rel["agent"], f"<= {agent_max}", rel["agent"] <= agent_max,
                f"{cpu['agent']:.3f} vs {base_cpu:.3f} CPU s per 100k entries")
            add(f"{kind}_1ms_client_cpu", rel["client"], f"<= {client_max}", rel["client"] <= client_max,
                f"{cpu['client']:.3f} vs {base_cpu:.3f} CPU s per 100k entries")
        group = f"agent processes (frontier client, {self.args.frontier_connections} connections, no proxy)"
        one, two = self.row(group, "1 process, names"), self.row(group, "2 processes, names")
        if one and two:
            ratio = two["rate"] / one["rate"]
            stat1, stat2 = self.row(group, "1 process, stat"), self.row(group, "2 processes, stat")
            also = f"; stat: {stat2['rate'] / stat1['rate']:.2f} x" if stat1 and stat2 else ""
            add("processes_2", ratio, ">= 1.6 (2 / 1 process)", ratio >= 1.6,
                f"{two['rate']:,.0f} vs {one['rate']:,.0f} entries/s{also}")
        else:
            note = next((r["note"] for r in self.b.rows if r["group"] == group and "note" in r), "not measured")
            add("processes_2", None, ">= 1.6 (2 / 1 process)", None, note)
        base = self.base(True)
        cli = "command line, 1 agent, no proxy (whole process)"
        plain = self.row(cli, "walk --format parquet -o DIR")
        parquet = plain or self.row(cli, "walk --dask local:2 --format parquet -o DIR")
        for key, r in (("cli_ndjson", self.row(cli, "walk -o FILE (NDJSON)")), ("cli_parquet", parquet)):
            if r is None or base is None:
                add(key, None, ">= 0.5", None, "not measured")
                continue
            ratio = r["rate"] / base
            add(key, ratio, ">= 0.5", ratio >= 0.5, f"{r['name']}: {r['rate']:,.0f} vs {base:,.0f} entries/s")

    def print_table(self) -> None:
        res = self.result
        meta = res["meta"]
        tree = res["tree"]
        p = print
        p()
        p(f"diskover agent benchmark -- {meta['date']}, {meta['cpus']} CPUs, Python {meta['python']}, "
          f"git {meta['git'] or '?'}")
        p(f"tree: {tree['entries']:,} entries in {tree['dirs']:,} directories, depth {tree['max_depth']}, "
          f"largest directory {tree['largest_dir']:,} entries")
        p(f"workers={meta['workers']} (per-directory mode: {meta['listdir_workers']}); {meta['statistic']}")
        load = " -> ".join(" ".join(f"{x:.2f}" for x in meta[k]) for k in ("loadavg_start", "loadavg_end") if k in meta)
        p(f"round trips emulated by bench/delayproxy.py processes (kernel netem: {meta['netem']}); load average {load}")
        p()
        p("Round trips (median; 'tiny listing' = keep-alive GET of an empty directory through proxy + agent):")
        p(f"  {'setting':<28} {'requested':>9} {'echo RTT':>9} {'tiny listing':>12} {'over direct':>11}")
        for r in res.get("rtt", []):
            req = "-" if r.get("requested_ms") is None else f"{r['requested_ms']:g} ms"
            over = "-" if r.get("added_ms") is None else f"{r['added_ms']:+.3f} ms"
            extra = f"   link {r['measured_mbit']:.1f} Mbit/s" if "measured_mbit" in r else ""
            p(f"  {r['setting']:<28} {req:>9} {r['echo_rtt_ms']:>6.3f} ms {r['tiny_listing_ms']:>9.3f} ms "
              f"{over:>11}{extra}")
        p()
        walk_base, stat_base = self.base(False), self.base(True)
        hdr = (f"  {'walk':<44} {'entries/s':>11} {'x os.walk':>9} {'x +lstat':>8} {'CPU/100k a/c':>13} "
               f"{'x local a/c':>11} {'best s':>7} {'median s':>8}  {'CPU s client/agents/proxy':>25}")
        group = None
        p("Walks (entries/s of the best run; ratios to local os.walk, stat walks also to os.walk + lstat, the")
        p("  faster of their two timings (start and end of the run); the CPU ratios to the lower of their two;")
        p("  CPU/100k a/c: CPU seconds per 100,000 entries of the agents (whole process trees) and of the client,")
        p("  over all timed runs; x local a/c: those over local os.walk's CPU per entry, stat walks over")
        p("  os.walk + lstat's):")
        p(hdr)
        for r in self.b.rows:
            if r["group"] != group:
                group = r["group"]
                rtt = r.get("rtt")
                measured = f" (measured echo RTT {rtt['echo_rtt_ms']:.3f} ms)" if rtt and rtt.get(
                    "requested_ms") is not None else ""
                p(f" {group}{measured}")
            if "rate" not in r:
                p(f"  {r['name']:<44} {r.get('error') or r.get('note') or 'no result'}")
                continue
            x_walk = r["rate"] / walk_base if walk_base else None
            x_stat = r["rate"] / stat_base if (stat_base and r["stat"]) else None
            best = r["best"]
            cpu = f"{best['client_cpu']:.2f}/{best['agent_cpu']:.2f}/{best['proxy_cpu']:.2f}"
            per, rel = r["cpu_per_100k"], r.get("cpu_ratio")
            local = r["group"].startswith("local")  # no agent: only the client's (this process's) CPU
            per_s = ("-" if local else f"{per['agent']:.3f}") + f"/{per['client']:.3f}"
            rel_s = "-" if rel is None else ("-" if local else f"{rel['agent']:.2f}") + f"/{rel['client']:.2f}"
            p(f"  {r['name']:<44} {fmt_rate(r['rate']):>11} {fmt_ratio(x_walk):>9} {fmt_ratio(x_stat):>8} "
              f"{per_s:>13} {rel_s:>11} {r['seconds']:>7.3f} {r['median_seconds']:>8.3f}  {cpu:>25}")
            if r.get("kind") == "processes" and r["processes"] > 1:
                one = self.row(r["group"], r["name"].replace(f"{r['processes']} processes", "1 process"))
                if one is not None:
                    p(f"  {'':<44} {r['processes']} processes / 1 process: {r['rate'] / one['rate']:.2f} x "
                      f"entries/s")
            if best.get("connections_per_process"):
                p(f"  {'':<44} {best['requests']} requests; connections per agent process: "
                  + ", ".join(f"pid {pid}: {n}" for pid, n in best["connections_per_process"].items()))
            if r.get("kind") == "compress":
                p(f"  {'':<44} {best['proxy_bytes_written'] / 1e6:.1f} MB through the proxy")
            if "shares" in best:
                p(f"  {'':<44} directories served: "
                  + ", ".join(f"{s:.1%}" for s in best["shares"]))
        huge = res.get("huge")
        if huge:
            p()
            p(f"1,000,000-entry directory (best of {meta['runs']}; streamed msgpack listing read with http.client):")
            lb = huge["local_best"]
            p(f"  {'local os.scandir':<28} first entry {lb['first'] * 1000:8.3f} ms   total {lb['total']:.3f} s")
            for label, v in huge.get("remote_best", {}).items():
                p(f"  {'agent, ' + label:<28} first entry {v['first'] * 1000:8.3f} ms   total {v['total']:.3f} s "
                  f"({v['total'] / lb['total']:.2f} x local; median first {v['median_first'] * 1000:.1f} ms, "
                  f"total {v['median_total']:.3f} s)")
            kb = huge["agent_vmhwm_kb"]
            p(f"  agent peak RSS (VmHWM, fresh agent): {kb['before'] / 1024:.1f} MB before, "
              f"{kb['after_all'] / 1024:.1f} MB after: +{huge['rss_growth_mb']:.1f} MB")
        for issue in (3, 13):
            p()
            p(f"Targets (issue {issue}):")
            for t in res["targets"]:
                if t["issue"] != issue:
                    continue
                value = t["value"]
                shown = "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
                p(f"  [{t['status']:<4}] {t['target']:<84} {shown:>7}  ({t['want']}; {t['detail']})")
        if res["failures"]:
            p()
            p("EXACTNESS FAILURES:")
            for msg in res["failures"]:
                p("  " + msg)
        else:
            p()
            p("Every timed walk yielded exactly the os.walk result (entry count and digest; stat walks: lstat too).")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark walks through diskover storage agents (bench/README.md).")
    parser.add_argument("--big", action="store_true", help="1,000,000-entry tree instead of 100,000")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="JSON output file")
    parser.add_argument("--rtts", default="0,1,5", help="round trips to emulate, ms (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="one timed run per figure (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 5; 1 with --quick)")
    parser.add_argument("--workers", type=int, default=4,
                        help="parallel_walk workers for the subtree walks (default %(default)s; see bench/README.md)")
    parser.add_argument("--listdir-workers", type=int, default=40,
                        help="workers for the per-directory mode (default %(default)s, the library default)")
    parser.add_argument("--sweep-workers", default=None,
                        help="other workers settings timed at 1 ms (default 1,2,8,16,40; none with --quick)")
    parser.add_argument("--workdir", default="/tmp/diskover-bench", help="where the trees live (default %(default)s)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="link for the compression rows (Mbit/s)")
    parser.add_argument("--compress-rtt", type=float, default=1.0, help="round trip for the compression rows (ms)")
    parser.add_argument("--frontier-connections", type=int, default=8,
                        help="connections of the frontier client in the agent-processes rows (default %(default)s)")
    parser.add_argument("--skip", default="",
                        help="row groups to leave out, comma-separated: network, compression, processes, cli, huge")
    parser.add_argument("--fail-on-target", action="store_true", help="exit with status 2 when a target fails")
    args = parser.parse_args(argv)
    args.rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = args.skip - {"network", "compression", "processes", "cli", "huge"}
    if unknown:
        parser.error(f"--skip: unknown row groups {', '.join(sorted(unknown))}")
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.sweep_workers is None:
        args.sweep_workers = "" if args.quick else "1,2,8,16,40"
    args.sweep_workers = [int(x) for x in args.sweep_workers.split(",") if x.strip()]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
