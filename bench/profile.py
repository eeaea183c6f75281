"""Profile a walk through one agent: where the agent and the client spend their CPU.

::

    python bench/profile.py                      # 20 names walks of the 100k tree, direct
    python bench/profile.py --stat --rtt 1       # stat walks through a 1 ms delay proxy
    python bench/profile.py --client frontier    # the agent under the frontier client (bench/frontier.py)
    python bench/profile.py --agent-option=--processes --agent-option=2

Starts one agent (as ``bench/run.py`` does: same tree, same export), checks one warm-up walk
against ``os.walk``, then runs ``--walks`` walks while ``py-spy record`` samples the agent
(with ``--subprocesses``: its worker processes too) and this process (the client), and
prints the top entries of each side: *self* (samples whose innermost Python frame is
the function) and *inclusive* (samples with the function anywhere on the stack), in % of
that side's samples. Idle threads (waiting in ``select``, on a lock...) are not sampled
(py-spy's default), so the percentages are of the CPU each side spent. Needs py-spy
(``pip install py-spy``); the raw stacks are kept with ``--keep DIR``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from cpu import tree_cpu
from frontier import FrontierWalk, check_dirs
from procs import REMOTE, Procs, log
from walks import Reference, remote_walk, remote_walk_stat

from tree import build_tree


def find_py_spy() -> Optional[str]:
    """py-spy on ``PATH``, beside this Python, or in ``$PY_SPY``."""
    for candidate in (os.environ.get("PY_SPY"), os.path.join(os.path.dirname(sys.executable), "py-spy"),
                      shutil.which("py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Sampler:
    """``py-spy record`` of one process (and its subprocesses), raw collapsed stacks."""

    def __init__(self, py_spy: str, pid: int, out: str, rate: int, subprocesses: bool, gil: bool) -> None:
        # --nonblocking: a paused process's threads all look busy to py-spy's idle test.
        cmd = [py_spy, "record", "-p", str(pid), "-f", "raw", "-F", "--nonblocking", "-r", str(rate), "-o", out]
        if subprocesses:
            cmd.append("--subprocesses")
        if gil:
            cmd.append("--gil")
        self.out = out
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        started = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                if "Sampling process" in line:
                    started.set()
            started.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not started.wait(30) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("py-spy did not start sampling:\n" + "".join(self.lines))

    def stop(self) -> dict[str, int]:
        """Stop sampling (py-spy writes its file on SIGINT); the stacks and their sample counts."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(5)
        stacks: dict[str, int] = {}
        if os.path.exists(self.out):
            with open(self.out, encoding="utf-8", errors="replace") as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if stack and count.isdigit():
                        stacks[stack] = stacks.get(stack, 0) + int(count)
        return stacks


#: The frame of the benchmark's own threads in the client process (reading the agent's and
#: py-spy's output), left out of the client's samples.
_OWN_THREAD = ".<locals>.pump ("


#: Frames on every stack of a thread or of this script, left out of the inclusive list.
_FRAMING = ("Thread._bootstrap (threading.py:", "Thread._bootstrap_inner (threading.py:",
            "Thread.run (threading.py:", "<module> (", "_run_module_as_main (<frozen runpy>",
            "_run_code (<frozen runpy>", "main (profile.py:")


def top_entries(stacks: dict[str, int], n: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """``(samples, self top n, inclusive top n)`` of collapsed stacks (``process ...`` frames dropped)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in stacks.items():
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames or any(_OWN_THREAD in f for f in frames):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not frame.startswith(_FRAMING):
                incl[frame] += count
    return total, own.most_common(n), incl.most_common(n)


def print_side(title: str, stacks: dict[str, int], n: int) -> None:
    total, own, incl = top_entries(stacks, n)
    print(f"\n{title}: {total} samples")
    if not total:
        return
    for label, rows in (("self", own), ("inclusive", incl)):
        print(f"  top {len(rows)}, {label}:")
        for frame, count in rows:
            print(f"    {count / total:6.1%}  {frame}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Profile walks through one agent with py-spy (bench/README.md).")
    p.add_argument("--stat", action="store_true", help="stat walks (parallel_walk_entries + stat) instead of names")
    p.add_argument("--walks", type=int, default=20, help="walks while sampling (default %(default)s)")
    p.add_argument("--rtt", type=float, default=None, help="through a delay proxy of this round trip, ms "
                   "(default: direct)")
    p.add_argument("--workers", type=int, default=4, help="parallel_walk workers (default %(default)s, as run.py)")
    p.add_argument("--client", choices=("library", "frontier"), default="library",
                   help="library: parallel_walk (default); frontier: the frontier client of bench/frontier.py")
    p.add_argument("--agent-option", action="append", default=[], metavar="OPT",
                   help="an extra agent command-line argument (repeatable: --agent-option=--processes "
                        "--agent-option=2)")
    p.add_argument("--samples", choices=("gil", "active"), default="gil",
                   help="gil (default): samples of the thread holding the GIL, i.e. Python's CPU (system calls "
                        "that release it, such as lstat and getdents, are not in them); active: every thread "
                        "py-spy does not find idle (also threads runnable but waiting for a core or the GIL)")
    p.add_argument("--top", type=int, default=15, help="entries shown per list (default %(default)s)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default %(default)s)")
    p.add_argument("--big", action="store_true", help="the 1,000,000-entry tree")
    p.add_argument("--workdir", default="/tmp/diskover-bench", help="where the trees live (default %(default)s)")
    p.add_argument("--keep", metavar="DIR", help="keep py-spy's raw stacks (agent.txt, client.txt) in DIR")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    py_spy = find_py_spy()
    if py_spy is None:
        print("profile.py needs py-spy: pip install py-spy (or set PY_SPY to its path)", file=sys.stderr)
        return 2
    workdir = os.path.abspath(args.workdir)
    entries, tree_name = (1_000_000, "tree-1m") if args.big else (100_000, "tree-100k")
    local_top = os.path.join(workdir, tree_name)
    build_tree(local_top, entries, seed=1)
    remote_top = REMOTE + "/" + tree_name
    ref = Reference(local_top, remote_top)
    out_dir = args.keep or tempfile.mkdtemp(prefix="bench-profile-")
    os.makedirs(out_dir, exist_ok=True)
    procs = Procs()
    samplers: list[Sampler] = []
    try:
        agent = procs.agent(workdir, tuple(args.agent_option))
        port = agent.port
        if args.rtt is not None:
            port = procs.proxy(agent.port, args.rtt).port
        hosts = [f"127.0.0.1:{port}"]
        walk, check = walk_and_check(args, ref, hosts, port, remote_top)
        check(walk())  # warm-up, checked against os.walk
        log(f"agent pid {agent.pid}; sampling {args.walks} {'stat' if args.stat else 'names'} walks "
            f"({args.client} client, {'direct' if args.rtt is None else f'RTT {args.rtt:g} ms'})")
        gil = args.samples == "gil"
        samplers = [Sampler(py_spy, agent.pid, os.path.join(out_dir, "agent.txt"), args.rate, True, gil),
                    Sampler(py_spy, os.getpid(), os.path.join(out_dir, "client.txt"), args.rate, False, gil)]
        a0, c0, t0 = tree_cpu(agent.pid), time.process_time(), time.perf_counter()
        for _ in range(args.walks):
            walk()
        wall, client_cpu, agent_cpu = time.perf_counter() - t0, time.process_time() - c0, tree_cpu(agent.pid) - a0
        agent_stacks, client_stacks = (s.stop() for s in samplers)
        samplers = []
    finally:
        for s in samplers:
            s.stop()
        procs.stop_all()
    n = ref.names[0] * args.walks
    print(f"{args.walks} walks of {ref.names[0]:,} entries in {wall:.2f} s ({n / wall:,.0f} entries/s, sampled); "
          f"CPU s per 100k entries: agent {agent_cpu / n * 1e5:.3f}, client {client_cpu / n * 1e5:.3f}")
    what = "holding the GIL" if args.samples == "gil" else "not idle"
    print_side(f"agent (pid {agent.pid} and its subprocesses), samples {what}", agent_stacks, args.top)
    print_side(f"client ({args.client} client), samples {what}", client_stacks, args.top)
    if args.keep:
        print(f"\nraw stacks in {out_dir}")
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def walk_and_check(args: argparse.Namespace, ref: Reference, hosts: list[str], port: int,
                   remote_top: str) -> tuple[Any, Any]:
    """The walk to repeat and the check of its result."""
    if args.client == "frontier":
        top = os.fsencode(remote_top)
        return (lambda: FrontierWalk("127.0.0.1", port, top, stat=args.stat).run(),
                lambda w: check_dirs(w, ref.dir_paths, ref.names[0]))
    options = {"workers": args.workers, "mode": "subtree", "compress": False}
    if args.stat:
        return lambda: remote_walk_stat(remote_top, hosts, **options), ref.check_remote_stat
    return lambda: remote_walk(remote_top, hosts, **options), ref.check_remote


if __name__ == "__main__":
    sys.exit(main())
