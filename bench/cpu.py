"""CPU seconds of processes and of process trees, from ``/proc`` (Linux).

An agent may run as a parent with forked worker children (``--processes N``), so its
cost is the CPU of its whole tree: every live process below it (``/proc/PID/task/*/children``,
recursively), each with its own CPU and the CPU of the children it has already reaped
(``cutime``/``cstime``: a child that exits is counted there only once its parent has
waited for it). Read before and after a timed run; the difference is what the run cost.
A child reaped between the two readings of one snapshot may be counted twice or not at
all: only processes ending *during* a snapshot, which the benchmark does not do.
"""

from __future__ import annotations

import contextlib
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, its own threads only."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (of all its threads)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(x) for x in f.read().split())
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree so far: every live process's own, plus what each
    has collected from the children it reaped (``cutime + cstime``)."""
    total = 0
    for p in tree_pids(pid):
        try:
            f = _stat_fields(p)
        except OSError:  # ended meanwhile: its parent's cutime will say it (next snapshot)
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def per_100k(seconds: float, entries: int) -> float:
    """CPU seconds per 100,000 entries."""
    return seconds / entries * 100_000 if entries else float("nan")
