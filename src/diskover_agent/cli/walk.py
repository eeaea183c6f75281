"""``diskover-agent walk``: every entry of a tree as NDJSON, CSV or a Parquet dataset, by one
process or (``--dask``) as Dask tasks."""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Any, Optional, Union

from ..dataset import DatasetWriter, prepare_output
from ..errors import AgentError
from ..protocol import KIND_DIR
from .common import (
    EXIT_PARTIAL,
    PROG,
    Context,
    UsageError,
    _join,
    _positive,
    remote_path,
    require_modules,
    size_text,
)
from .crawl import Crawl, Progress, _show_progress, finish, run_crawl
from .output import RecordWriter


def cmd_walk(args: argparse.Namespace, ctx: Context) -> int:
    if args.dask is not None:
        return cmd_walk_dask(args, ctx)
    top = remote_path(args.path)
    maxdepth: Optional[int] = args.max_depth
    to_stdout = args.output in (None, "-")
    if args.format == "parquet":
        if to_stdout:
            raise UsageError("--format parquet writes a dataset: give -o DIR")
        require_modules("--format parquet", ["pyarrow"])  # imported when the first partition is written
    ctx.check_reachable(top)
    out: Optional[IO[bytes]] = None
    sink: Union[RecordWriter, DatasetWriter]
    if args.format == "parquet":
        _prepare_dataset(args.output)
        sink = DatasetWriter(args.output, os.fsdecode(top))
    else:
        try:
            out = sys.stdout.buffer if to_stdout else open(args.output, "wb", buffering=1 << 20)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        sink = RecordWriter(out, args.format)
    crawl = Crawl(ctx, top, exclude_dirs=args.exclude_dirs, exclude_files=args.exclude_files,
                  one_fs=args.one_file_system, on_error=sink.add_error)

    def body(crawl: Crawl) -> None:
        for path, entries in crawl:
            depth = crawl.depth(path)
            if maxdepth is not None and depth + 1 >= maxdepth:
                for e in entries:
                    if e.kind == KIND_DIR:
                        crawl.prune(_join(path, e.name))
                if depth + 1 > maxdepth:
                    continue
            sink.add_dir(path, entries)

    try:
        run_crawl(ctx, crawl, body, output_is_terminal=to_stdout and sys.stdout.isatty())
        if isinstance(sink, DatasetWriter):
            sink.close(crawl.seconds)
        else:
            sink.flush()
            if out is not None and not to_stdout:
                out.close()  # its last write: a full disk says so here
        return finish(ctx, crawl)
    except (AgentError, BrokenPipeError):
        raise
    except OSError as exc:  # the output could not be written (the walk's own errors are AgentErrors)
        if to_stdout:
            raise  # the console script reports it, and drops what standard output still holds
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    finally:
        if out is not None and not to_stdout and not out.closed:
            try:
                out.close()
            except OSError:
                pass  # the error that stopped the walk is the one reported


class TaskCounts:
    """What the tasks of ``walk --dask`` counted so far, summed as their results arrive, for
    the same progress display as a walk by this process (:class:`~.crawl.Progress`)."""

    def __init__(self, hosts: list[str]) -> None:
        self.dirs = self.entries = self.bytes = self.errors = 0
        self._requests = dict.fromkeys(hosts, 0)

    def add(self, result: Any) -> None:
        """Count one task's :class:`~diskover_agent.distributed.PartResult`."""
        self.dirs += result.dirs
        self.entries += result.entries
        self.bytes += result.bytes
        self.errors += result.errors
        for host, n in result.requests.items():
            if host in self._requests:  # (the display's thread reads this dict: its keys stay as they are)
                self._requests[host] += n

    def served(self) -> dict[str, dict[str, int]]:
        return {host: {"requests": n} for host, n in self._requests.items()}


def _prepare_dataset(output: str) -> None:
    """Create, or check, the directory of a walk's dataset: a usage error when it cannot be one."""
    try:
        prepare_output(output)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None


def cmd_walk_dask(args: argparse.Namespace, ctx: Context) -> int:
    """``walk --dask``: the walk as Dask tasks, written as a dataset of partitions in ``-o DIR``."""
    require_modules("--dask", ["distributed", "pyarrow"] if args.format == "parquet" else ["distributed"])
    from ..distributed import dask_walk, local_cluster
    if args.output in (None, "-"):
        raise UsageError("--dask writes a dataset: give -o DIR")
    if args.format == "csv":
        raise UsageError("--dask writes parquet or ndjson partitions")
    if args.max_depth is not None:
        raise UsageError("--max-depth is not available with --dask")
    top = remote_path(args.path)
    ctx.check_reachable(top)
    _prepare_dataset(args.output)
    try:
        if args.dask.startswith("local:"):
            client = local_cluster(_positive(args.dask[6:]))
        else:
            from distributed import Client

            client = Client(args.dask)
    except (ValueError, OSError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler {args.dask}: {exc}") from None
    counts = TaskCounts(ctx.hosts)
    display = Progress(ctx, counts) if _show_progress(ctx) else None

    def progress(summary: Any, result: Any) -> None:
        if result.errors:
            ctx.warn(f"{result.errors} directories could not be listed (error rows in {result.file})")
        counts.add(result)

    try:
        summary = dask_walk(
            top, ctx.hosts, args.output, client=client, fmt=args.format, port=ctx.port, progress=progress,
            retry_for=ctx.retry_for, exclude_dirs=args.exclude_dirs, exclude_files=args.exclude_files,
            one_fs=args.one_file_system, **ctx.options,
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if display is not None:
            display.close()
        client.close()
        if args.dask.startswith("local:"):
            client.cluster.close()
    if not ctx.quiet:
        rate = summary.entries / summary.seconds if summary.seconds else 0.0
        print(f"{PROG}: {summary.dirs:,} directories, {summary.entries:,} entries, {size_text(summary.bytes)} in "
              f"files, {summary.errors} errors, {summary.tasks} tasks, {summary.seconds:.2f} s "
              f"({rate:,.0f} entries/s) -> {args.output}", file=sys.stderr)
    return EXIT_PARTIAL if summary.errors else 0
