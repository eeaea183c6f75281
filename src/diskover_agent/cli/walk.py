"""``diskover-agent walk``: every entry of a tree as NDJSON, CSV or a Parquet dataset, by one
process or (``--dask``) as Dask tasks."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import IO, Any, Optional

from ..dataset import prepare_output
from ..errors import AgentError
from ..protocol import KIND_DIR
from .common import (
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    PROG,
    Context,
    UsageError,
    _join,
    _positive,
    remote_path,
    require_modules,
    shown,
    size_text,
)
from .crawl import Crawl, Progress, _show_progress, finish, host_watcher, run_crawl, summary_text
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
    if is_dataset(args):
        return walk_dataset(args, ctx, top)
    if args.resume or args.overwrite:
        raise UsageError(f"{'--resume' if args.resume else '--overwrite'} is for a walk's dataset: "
                         "give -o DIR with --format parquet, or --format ndjson and -o DIR/")
    ctx.check_reachable(top)
    out: Optional[IO[bytes]] = None
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


def is_dataset(args: argparse.Namespace) -> bool:
    """Whether ``walk`` writes a dataset directory: ``--format parquet``, or ``ndjson`` into
    ``-o DIR`` given as a directory (one that exists, or a path ending in ``/``, or ``--resume``)."""
    if args.output in (None, "-") or args.format == "csv":
        return False
    return args.format == "parquet" or bool(args.resume) or args.output.endswith("/") or os.path.isdir(args.output)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this walk: the same one, with ``--resume`` (and without ``--overwrite``)."""
    argv = [a for a in args.argv if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join([PROG, *argv])


def _not_resumed(ctx: Context, exc: Exception) -> int:
    """A ``--resume`` refused (a usage error), or of a walk already complete (said; status 0)."""
    from ..dataset import AlreadyComplete

    if not isinstance(exc, AlreadyComplete):
        raise UsageError(str(exc)) from None
    if not ctx.quiet:
        print(f"{PROG}: {exc} ({_totals(exc.summary)})", file=sys.stderr)
    return 0


def walk_dataset(args: argparse.Namespace, ctx: Context, top: bytes) -> int:
    """``walk -o DIR`` as a dataset with its checkpoint (new, ``--overwrite`` or ``--resume``):
    :class:`~diskover_agent.dataset_walk.DatasetWalk`, with the progress display and summary line."""
    from ..dataset import AlreadyComplete, ResumeRefused
    from ..dataset_walk import DatasetWalk, WalkInterrupted

    if not args.resume:  # (a resume is checked against its checkpoint first: a refusal needs no agent)
        ctx.check_reachable(top)
    output = args.output.rstrip("/") or "/"

    def on_error(path: bytes, err: OSError) -> None:
        ctx.warn(f"{shown(path)}: {err.strerror or err}")

    try:
        job = DatasetWalk(
            ctx.hosts, top, output, resume=args.resume, overwrite=args.overwrite, fmt=args.format,
            max_depth=args.max_depth, exclude_dirs=[os.fsencode(p) for p in args.exclude_dirs],
            exclude_files=[os.fsencode(p) for p in args.exclude_files], one_fs=args.one_file_system,
            part_entries=args.partition_rows, port=ctx.port, on_error=on_error, on_host=host_watcher(ctx),
            workers=ctx.workers, retry_for=ctx.retry_for, **ctx.options)
    except (ResumeRefused, AlreadyComplete) as exc:
        return _not_resumed(ctx, exc)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    if args.resume:
        ctx.check_reachable(top)
    display = Progress(ctx, job) if _show_progress(ctx) else None
    try:
        summary = job.run()
    except WalkInterrupted as exc:
        if display is not None:
            display.close()
            display = None
        print(f"{PROG}: interrupted ({signal.Signals(exc.signum).name}); committed in {output}: "
              f"{_totals(exc.summary)}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except AgentError:
        ctx.warn(f"what is complete is committed in {output}; resume with: {resume_command(args)}")
        raise
    except OSError as exc:  # the dataset could not be written (a full disk): what was committed stays
        ctx.warn(f"cannot write {output}: {exc.strerror or exc}")
        raise UsageError(f"what is complete is committed in {output}; resume with: {resume_command(args)}") from None
    finally:
        if display is not None:
            display.close()
    if not ctx.quiet:
        print(f"{PROG}: {summary_text(job)} -> {output}: complete, {_totals(summary)}", file=sys.stderr, flush=True)
    return EXIT_PARTIAL if summary.errors else 0


def _totals(summary: Any) -> str:
    """A dataset's totals (all runs): entries, and directories that could not be listed."""
    failed = "directory" if summary.errors == 1 else "directories"
    return f"{summary.entries:,} entries in all, {summary.errors:,} {failed} failed"


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


def _prepare_dataset(output: str, overwrite: bool = False) -> None:
    """Create, or check, the directory of a walk's dataset: a usage error when it cannot be one."""
    try:
        prepare_output(output, overwrite)
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
    output = args.output.rstrip("/") or "/"
    if args.resume:  # refused, or complete, before any agent or cluster is asked
        from ..checkpoint import WalkSpec
        from ..dataset import AlreadyComplete, ResumeRefused, resume_point

        try:
            resume_point(output, WalkSpec.of(os.fsdecode(top), args.format, exclude_dirs=args.exclude_dirs,
                                             exclude_files=args.exclude_files, one_fs=args.one_file_system))
        except (ResumeRefused, AlreadyComplete) as exc:
            return _not_resumed(ctx, exc)
    ctx.check_reachable(top)
    if not args.resume:
        _prepare_dataset(output, args.overwrite)
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
            top, ctx.hosts, output, client=client, fmt=args.format, port=ctx.port, progress=progress,
            retry_for=ctx.retry_for, exclude_dirs=args.exclude_dirs, exclude_files=args.exclude_files,
            one_fs=args.one_file_system, resume=args.resume, part_entries=args.partition_rows, **ctx.options,
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:  # each task's result is committed as it arrives: resume from there
        print(f"{PROG}: interrupted; committed in {output}: what the finished tasks wrote; resume with: "
              f"{resume_command(args)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
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
              f"({rate:,.0f} entries/s) -> {output}: complete, {_totals(summary)}", file=sys.stderr)
    return EXIT_PARTIAL if summary.errors else 0
