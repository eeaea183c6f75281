"""The command line as users run it: ``diskover-agent walk PATH -o OUT`` against a local
``os.walk`` + ``lstat`` of the same tree, both timed as whole processes.

::

    .venv/bin/python bench/cli_walk.py                          # NDJSON, 100k tree, best of 5
    .venv/bin/python bench/cli_walk.py --format parquet         # the Parquet dataset, one process
    .venv/bin/python bench/cli_walk.py --format parquet --dask local:2
    .venv/bin/python bench/cli_walk.py --tree tree-1m --runs 3  # the tree run.py --big builds

One agent on 127.0.0.1 exports ``--workdir`` as /mnt/isilon (the tree must exist: run.py or
tree.py build it). Each figure is the best of ``--runs`` after one warm-up run: wall seconds of
the whole process (start-up and imports included), its CPU seconds (``os.wait4``: every thread,
and the worker processes it reaped), the agent's CPU seconds (``/proc/PID/stat``). The command runs with its bytecode
cached (``PYTHONPYCACHEPREFIX`` in a scratch directory, written by the warm-up run), as an
installed one does, whatever ``PYTHONDONTWRITEBYTECODE`` says. Every output
is checked against ``lstat`` of every local entry (path bytes, mode, ino, dev, nlink, uid, gid,
size, mtime_ns, ctime_ns): a difference is exit status 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_rows import output_pairs
from walks import Mismatch, path_stat_digest, stat_key

from run import REMOTE, Agent, proc_cpu

LOCAL_WALK = """
import os, sys
n = 0
for root, dirs, files in os.walk(sys.argv[1]):
    for name in dirs + files:
        os.lstat(root + "/" + name)
        n += 1
print(n)
"""


def timed(cmd: list[str], env: dict[str, str], agent_pid: Optional[int] = None) -> tuple[float, float, float]:
    """Run ``cmd`` to its end: (wall seconds, CPU seconds of it and its reaped children, agent CPU)."""
    agent0 = proc_cpu(agent_pid) if agent_pid else 0.0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} exited {proc.returncode}: {' '.join(cmd)}")
    agent = proc_cpu(agent_pid) - agent0 if agent_pid else 0.0
    return wall, usage.ru_utime + usage.ru_stime, agent


def local_digest(local_top: str, remote_top: str) -> tuple[int, str]:
    """Entries and digest of ``(remote path, lstat fields)`` of every entry below ``local_top``."""
    lb, rb = os.fsencode(local_top), os.fsencode(remote_top)
    pairs = []
    for root, dirs, files in os.walk(lb):
        for name in dirs + files:
            st = os.lstat(root + b"/" + name)
            pairs.append((rb + root[len(lb):] + b"/" + name, stat_key(
                st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                st.st_ctime_ns)))
    return path_stat_digest(pairs)


def output_digest(out: str) -> tuple[int, str]:
    """The same digest of what ``walk -o out`` wrote (any format: ``cli_rows``' reader)."""
    return path_stat_digest(output_pairs(out))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/diskover-bench")
    p.add_argument("--tree", default="tree-100k", help="a tree below --workdir (tree-100k, tree-1m)")
    p.add_argument("--format", choices=("ndjson", "csv", "parquet"), default="ndjson")
    p.add_argument("--dask", metavar="SCHEDULER", help="walk --dask SCHEDULER (e.g. local:2)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="do not compare the outputs with lstat")
    args = p.parse_args(argv)

    local_top = os.path.join(args.workdir, args.tree)
    remote_top = f"{REMOTE}/{args.tree}"
    if not os.path.isdir(local_top):
        raise SystemExit(f"{local_top}: no such tree (build it with bench/tree.py or bench/run.py)")
    script = shutil.which("diskover-agent", path=os.path.dirname(sys.executable))
    scratch = tempfile.mkdtemp(prefix="cli-walk-")
    agent = Agent(os.path.abspath(args.workdir))
    # As an installed command runs: with compiled bytecode (cached by the warm-up run, outside the tree).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(scratch, "pycache")
    failed = False
    try:
        want = None if args.no_check else local_digest(local_top, remote_top)
        rows = []
        local_cmd = [sys.executable, "-c", LOCAL_WALK, local_top]
        cli_base = [script, "-q", "--hosts", agent.hostspec, "walk", remote_top, "--format", args.format]
        if args.dask:
            cli_base += ["--dask", args.dask]
        for label, cmd, agent_pid in (("local os.walk + lstat", local_cmd, None),
                                      (f"walk -o ({args.format}{', --dask ' + args.dask if args.dask else ''})",
                                       cli_base, agent.pid)):
            runs = []
            for i in range(args.runs + 1):
                out = os.path.join(scratch, f"out-{i}")
                run_cmd = [*cmd, "-o", out] if cmd is cli_base else cmd
                runs.append(timed(run_cmd, env, agent_pid))
                if cmd is cli_base and want is not None:
                    try:
                        got = output_digest(out)
                    except Mismatch as exc:
                        got = exc
                    if got != want:
                        print(f"!!! run {i}: {got} != lstat {want}", file=sys.stderr)
                        failed = True
                if os.path.isdir(out):
                    shutil.rmtree(out)
                elif os.path.exists(out):
                    os.unlink(out)
            rows.append((label, runs[1:]))
        entries = want[0] if want else 0
        base = min(r[0] for r in rows[0][1])
        print(f"{args.tree}: {entries:,} entries; wall: best and median of {args.runs}; CPU: median (min..max)")
        for label, timed_runs in rows:
            wall = sorted(r[0] for r in timed_runs)
            cpu = sorted(r[1] for r in timed_runs)
            agent_cpu = sorted(r[2] for r in timed_runs)
            line = (f"  {label:<34} {wall[0]:6.2f} s (median {statistics.median(wall):.2f})  x{base / wall[0]:5.2f} "
                    f"local  CPU {statistics.median(cpu):.2f} ({cpu[0]:.2f}..{cpu[-1]:.2f}) s")
            if agent_cpu[-1]:
                line += f"  agent CPU {statistics.median(agent_cpu):.2f} ({agent_cpu[0]:.2f}..{agent_cpu[-1]:.2f}) s"
            print(line)
        print("  outputs " + ("DIFFER from lstat" if failed else "exact (every run = lstat of every entry)"
                              if want else "not checked"))
    finally:
        agent.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
