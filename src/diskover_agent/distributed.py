"""A walk spread over many client machines as Dask tasks, written as a dataset.

Each task walks part of the frontier through the agents (a :class:`Walker` stopped by
an entry budget), writes what it listed to one partition file, and hands back the
directories it did not reach; the driver turns those into new tasks, so the work
spreads to every Dask worker early and no task grows without bound. A task that is
lost with its worker is run again by Dask; only the partition named in a task's
delivered result is kept, and partitions of lost runs are deleted at the end, so no
entry is written twice. Needs the ``dask`` extra (``pip install '.[dask]'``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from . import checkpoint as ckpt
from .checkpoint import Checkpoint, WalkSpec
from .dataset import (
    FORMATS,
    MANIFEST,
    PART_PREFIX,
    Rows,
    WalkSummary,
    discard_uncommitted,
    prepare_output,
    resume_point,
    write_manifest,
)
from .transport import DEFAULT_PORT, fsencode_path
from .walk import Walker

#: Entries the first task lists; each later one may list twice as many, up to ``part_entries``.
FIRST_PART_ENTRIES = 5_000

__all__ = ["MANIFEST", "PART_PREFIX", "PartResult", "PartSpec", "WalkSummary", "dask_walk", "local_cluster",
           "walk_part"]


@dataclass
class PartSpec:
    """One task: walk ``roots`` (remote paths) until ``max_entries``; write to ``output``."""

    stem: str
    roots: list[bytes]
    hosts: list[str]
    port: int
    output: str
    fmt: str
    max_entries: int
    threads: int
    options: dict[str, Any]
    #: Whether ``roots`` is the walk's top, opened following a symlink as ``os.walk(top)``
    #: opens it; every later root was found by the walk and is not walked if it is a symlink now.
    top: bool = False


@dataclass
class PartResult:
    """What a task did: its partition file and the directories it left."""

    file: str
    frontier: list[bytes]
    dirs: int
    entries: int
    bytes: int
    errors: int
    seconds: float
    #: Requests each host answered for this task (by its label).
    requests: dict[str, int] = field(default_factory=dict)


def walk_part(spec: PartSpec) -> PartResult:
    """Run one task (on a Dask worker): walk, write the partition, return the frontier."""
    start = time.monotonic()
    walker = Walker(spec.roots[0], spec.hosts, roots=spec.roots, follow_top=spec.top, port=spec.port,
                    workers=spec.threads, stat=True, max_entries=spec.max_entries, **spec.options)
    rows = Rows()
    for d in walker.dirs():
        if d.error is not None:
            rows.add_error(d.path, d.error)
        else:
            rows.add_dir(d.path, d.entries)
    frontier = walker.frontier()
    name = rows.write(spec.output, spec.stem, spec.fmt)
    requests = {host: s["requests"] for host, s in walker.served().items()}
    return PartResult(name, frontier, rows.dirs, rows.entries, rows.bytes, rows.errors, time.monotonic() - start,
                      requests)


def _split(paths: list[bytes], parts: int) -> list[list[bytes]]:
    parts = max(1, min(parts, len(paths)))
    return [paths[i::parts] for i in range(parts)]


def dask_walk(
    top: Union[str, bytes],
    hosts: Union[str, Sequence[str]],
    output: str,
    *,
    client: Any,
    fmt: str = "parquet",
    port: int = DEFAULT_PORT,
    part_entries: int = 200_000,
    part_paths: int = 256,
    threads: int = 8,
    retries: int = 3,
    progress: Optional[Callable[[WalkSummary, PartResult], None]] = None,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> WalkSummary:
    """Walk ``top`` through the agents as tasks on the Dask ``client``'s cluster, writing
    one ``fmt`` partition per finished task into the directory ``output`` (which every
    worker must be able to write, e.g. a shared file system).

    Each task's result is committed with the dataset's checkpoint (its partition, and the
    frontier: the roots of the tasks still running), so ``resume=True`` continues a walk
    whose driver was killed, as :func:`~diskover_agent.walk_to_dataset` does (with its
    refusals). ``options`` are the walk's (``exclude_dirs``, ``exclude_files``,
    ``one_fs``, ``token``, ``tls``, ``cafile``...). ``progress`` is called after every task.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    from distributed import as_completed

    raw_top = fsencode_path(top)
    host_list = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    spec = WalkSpec.of(os.fsdecode(raw_top), fmt, exclude_dirs=map(os.fsdecode, options.get("exclude_dirs", ())),
                       exclude_files=map(os.fsdecode, options.get("exclude_files", ())),
                       one_fs=bool(options.get("one_fs", False)))
    if resume:
        saved = resume_point(output, spec)
        discard_uncommitted(output, saved)
        summary = WalkSummary(**{**saved.summary, "output": output})
        frontier = sorted(saved.frontier)
    else:
        prepare_output(output, overwrite)
        summary = WalkSummary(top=spec.top, output=output, format=fmt)
        frontier = [raw_top]
    run = os.urandom(4).hex()
    slots = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
    start = time.monotonic()
    before = summary.seconds
    budget = min(FIRST_PART_ENTRIES, part_entries)
    #: Roots of each task submitted whose result has not been committed: the frontier.
    owed: dict[str, list[bytes]] = {}

    def submit(roots: list[bytes], top: bool = False) -> Any:
        spec_ = PartSpec(f"{PART_PREFIX}{summary.tasks:06d}", roots, host_list, port, output, fmt,
                         budget, threads, options, top)
        summary.tasks += 1
        key = f"diskover-walk-{run}-{summary.tasks}"
        owed[key] = roots
        return client.submit(walk_part, spec_, key=key, retries=retries, pure=False)

    def spread(paths: list[bytes]) -> list[Any]:
        chunks = max(math.ceil(len(paths) / part_paths), min(slots, len(paths)))
        return [submit(roots) for roots in _split(paths, chunks)]

    def commit() -> None:
        summary.seconds = before + time.monotonic() - start
        summary.complete = not owed
        ckpt.fsync_dir(output)  # the partitions' names are durable before the checkpoint names them
        ckpt.save(output, Checkpoint(spec, asdict(summary), {p for roots in owed.values() for p in roots},
                                     summary.complete))

    pending = as_completed([submit([raw_top], top=True)] if frontier == [raw_top] else spread(frontier))
    commit()
    for future in pending:
        result: PartResult = future.result()
        summary.files.append(result.file)
        summary.dirs += result.dirs
        summary.entries += result.entries
        summary.bytes += result.bytes
        summary.errors += result.errors
        budget = min(budget * 2, part_entries)
        if result.frontier:
            for f in spread(result.frontier):
                pending.add(f)
        del owed[future.key]
        commit()
        if progress is not None:
            progress(summary, result)
    kept = set(summary.files)
    for name in os.listdir(output):  # partitions of runs whose result never arrived
        if (name.startswith(PART_PREFIX) or name.startswith(f".{PART_PREFIX}")) and name not in kept:
            os.unlink(os.path.join(output, name))
    write_manifest(summary)
    return summary


def local_cluster(workers: int, threads_per_worker: int = 2) -> Any:
    """A Dask client on a local cluster of ``workers`` processes (``--dask local:N``)."""
    from distributed import Client, LocalCluster

    # The scheduler's HTTP server (health, metrics) on a free loopback port: the default,
    # 8787 on every address, warns on stderr when another cluster holds it.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None, host="127.0.0.1",
                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    return Client(cluster)
