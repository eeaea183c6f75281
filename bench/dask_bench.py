"""The walk on Dask against the walk in one process: same tree, same agents, same round trip.

One command::

    python bench/dask_bench.py                     # 1,000,000-entry tree, 1 ms, 3 agents
    python bench/dask_bench.py --entries 100000    # quicker

In one run it builds (or reuses) the deterministic tree (``bench/tree.py``), starts three
agents and a delaying proxy per agent (``bench/delayproxy.py``), and times:

* ``parallel_walk_entries`` in this one process (the stat walk: what the dataset holds);
* ``dask_walk`` on a local cluster of **one** worker process: the Dask path's overhead
  (tasks, Parquet writing) against the line above;
* ``dask_walk`` on a local cluster of **two** worker processes: the scale-out, as a ratio
  to one process.

Each walk is checked: the entry count equals ``os.walk``'s, and the dataset holds every
entry exactly once. It prints a table and writes JSON (``bench/results/dask.json``).
On a 2-core machine the agents, the proxies and the workers share the same two cores, so
the 2-worker figure shows what the Dask path costs more than what a cluster would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from diskover_agent import parallel_walk_entries
from procs import REMOTE, Procs

import delayproxy
from tree import build_tree


def local_count(top: str) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(top))


def one_process(top: str, hosts: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    n = 0
    for _root, dirs, files in parallel_walk_entries(top, hosts=hosts):
        n += len(dirs) + len(files)
    return {"entries": n, "seconds": time.perf_counter() - start}


def on_dask(top: str, hosts: list[str], workers: int, out: str) -> dict[str, Any]:
    import duckdb

    from diskover_agent.distributed import dask_walk, local_cluster

    client = local_cluster(workers, threads_per_worker=2)
    try:
        start = time.perf_counter()
        summary = dask_walk(top, hosts, out, client=client)
        seconds = time.perf_counter() - start
    finally:
        client.close()
        client.cluster.close()
    ((rows, distinct),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (coalesce(parent_raw, encode(parent)), coalesce(name_raw, encode(name)))) "
        f"FROM read_parquet('{out}/part-*.parquet')"
    ).fetchall()
    return {"entries": summary.entries, "rows": rows, "distinct": distinct, "tasks": summary.tasks,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--rtt", type=float, default=1.0, help="round trip to emulate, ms (default 1)")
    ap.add_argument("--workdir", default="/tmp/diskover-bench")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "dask.json"))
    args = ap.parse_args(argv)

    name = "tree-1m" if args.entries == 1_000_000 else f"tree-{args.entries}"
    local = os.path.join(args.workdir, name)
    print(f"tree {local}: {build_tree(local, args.entries, seed=1)['entries']:,} entries", file=sys.stderr)
    expected = local_count(local)
    procs = Procs()
    results: dict[str, Any] = {"entries": expected, "rtt_requested_ms": args.rtt}
    try:
        agents = [procs.agent(local) for _ in range(3)]
        proxies = [procs.proxy(a.port, args.rtt) for a in agents]
        hosts = [f"127.0.0.1:{p.port}" for p in proxies]
        results["rtt_measured_ms"] = delayproxy.measure_proxy_rtt(args.rtt, in_process=True)
        one_process(REMOTE, hosts)  # warm caches
        results["one_process"] = one_process(REMOTE, hosts)
        for workers in (1, 2):
            out = tempfile.mkdtemp(prefix=f"dask-{workers}-", dir=args.workdir)
            try:
                results[f"dask_{workers}"] = on_dask(REMOTE, hosts, workers, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        procs.stop_all()

    bad = [k for k in ("one_process", "dask_1", "dask_2") if results[k]["entries"] != expected]
    bad += [k for k in ("dask_1", "dask_2") if not results[k]["rows"] == results[k]["distinct"] == expected]
    base = results["one_process"]["seconds"]
    print(f"\n{expected:,} entries, 3 agents, RTT {results['rtt_measured_ms']:.3f} ms measured "
          f"({args.rtt:g} ms asked)")
    print(f"{'walk':<34}{'seconds':>9}{'entries/s':>12}{'vs 1 process':>14}")
    for key, label in (("one_process", "parallel_walk_entries, 1 process"),
                       ("dask_1", "dask_walk, 1 worker process"),
                       ("dask_2", "dask_walk, 2 worker processes")):
        r = results[key]
        print(f"{label:<34}{r['seconds']:>9.2f}{expected / r['seconds']:>12,.0f}{base / r['seconds']:>13.2f}x")
    results["ratio_dask2_vs_dask1"] = results["dask_1"]["seconds"] / results["dask_2"]["seconds"]
    results["overhead_dask1_vs_one_process"] = results["dask_1"]["seconds"] / base
    print(f"2 workers vs 1 worker: {results['ratio_dask2_vs_dask1']:.2f}x; "
          f"Dask path overhead (1 worker vs 1 process): {results['overhead_dask1_vs_one_process']:.2f}x time")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    if bad:
        print(f"\nMISMATCH: {bad} did not give exactly the os.walk entries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
