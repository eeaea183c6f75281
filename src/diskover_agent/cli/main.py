"""The ``diskover-agent`` argument parser and the console script: parse, run one subcommand,
return the exit status."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from ..errors import AgentConnectionError, AgentError
from ..transport import DEFAULT_PORT
from ..walk import DEFAULT_RETRY_FOR
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PIPE,
    HOSTS_ENV,
    PROG,
    Context,
    UsageError,
    _count,
    _positive,
    _seconds_arg,
    buffer_stdout,
    discard_stdout,
)


class _Version(argparse.Action):
    """``--version``, looking the version up only when asked (the lookup costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from .. import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


#: Each subcommand's module and function. A command's module is imported when it runs, as pip
#: does: start-up loads the parser and what every command shares, not every command.
COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("ls", "cmd_ls"), "walk": ("walk", "cmd_walk"), "du": ("du", "cmd_du"), "report": ("report", "cmd_report"),
}


def command(name: str) -> Callable[..., int]:
    """The function that runs subcommand ``name`` (importing its module)."""
    module, func = COMMANDS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), func)


_PATH_HELP = "a remote path, as the agents export it (e.g. /mnt/isilon/projects)"


def build_parser() -> argparse.ArgumentParser:
    """The ``diskover-agent`` argument parser (global options, then a subcommand)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="List, walk and size trees on storage nodes through diskover storage agents.",
        epilog="Exit status: 0 complete; 1 some directories could not be listed (named on stderr); "
               "2 could not run (bad arguments, no agent reachable, refused); 130 interrupted.",
    )
    p.add_argument("--version", action=_Version, help="show program's version number and exit")
    g = p.add_argument_group("agents")
    g.add_argument("--hosts", metavar="H1,H2,...",
                   help=f"agents as name, name:port or [v6addr]:port, comma-separated (default: ${HOSTS_ENV})")
    g.add_argument("--port", type=_positive, default=DEFAULT_PORT, help="port of hosts given without one (%(default)s)")
    g.add_argument("--token-file", metavar="FILE",
                   help="bearer token for agents that require one (default: $DISKOVER_AGENT_TOKEN)")
    g.add_argument("--tls", action="store_true", help="HTTPS, verifying the agents' certificates")
    g.add_argument("--cafile", metavar="FILE", help="CA bundle to verify the agents' certificates (implies --tls)")
    g.add_argument("--insecure", action="store_true", help="with --tls: do not verify certificates")
    g.add_argument("--workers", type=_positive, default=40, metavar="N",
                   help="requests in flight at once, spread over the hosts (%(default)s)")
    g.add_argument("--timeout", type=_seconds_arg, default=60.0, metavar="SECONDS",
                   help="silence from an agent before its request goes to another (%(default)g)")
    g.add_argument("--retry-for", type=_seconds_arg, default=DEFAULT_RETRY_FOR, metavar="SECONDS",
                   help="how long a walk goes on retrying while no agent answers (%(default)g)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no summary line on stderr")
    sub = p.add_subparsers(dest="command", metavar="{ls,walk,du,report}", required=True)

    ls = sub.add_parser("ls", add_help=False, help="list one directory",
                        description="List one remote directory, sorted by name (bytes, as LC_ALL=C ls).")
    ls.add_argument("path", metavar="PATH", help=_PATH_HELP)
    ls.add_argument("-l", dest="long", action="store_true", help="long form: mode, links, owner, group, size, mtime")
    ls.add_argument("-n", dest="numeric", action="store_true", help="with -l: numeric user and group IDs")
    ls.add_argument("-h", "--human-readable", dest="human", action="store_true", help="with -l: sizes like 1.5K")
    ls.add_argument("--help", action="help", help="show this help and exit")

    walk = sub.add_parser("walk", help="every entry of a tree, as NDJSON or CSV",
                          description="Write every entry below PATH (not PATH itself), one record per entry: "
                                      "path, path_b64 (the exact bytes, base64, when the path is not UTF-8), name, "
                                      "type, target_type, size, allocated, blocks, mode, uid, gid, inode, nlink, "
                                      "dev, atime, mtime, ctime and their *_ns.")
    walk.add_argument("path", metavar="PATH", help=_PATH_HELP)
    walk.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE instead of stdout (with --format parquet or --dask: the dataset directory)")
    walk.add_argument("--format", choices=("ndjson", "csv", "parquet"), default=None,
                      help="ndjson (default), csv, or parquet: a dataset of Parquet partitions in -o DIR, as "
                           "with --dask; with --dask: parquet (default) or ndjson partitions")
    walk.add_argument("--dask", metavar="SCHEDULER",
                      help="run the walk as Dask tasks on this scheduler (tcp://host:8786), or on a local "
                           "cluster of N worker processes (local:N); -o DIR receives the dataset")
    walk.add_argument("--maxdepth", type=_count, metavar="N",
                      help="as find -mindepth 1 -maxdepth N: entries at most N levels below PATH (1: PATH's own)")
    _add_selection(walk)

    du = sub.add_parser("du", add_help=False, help="per-directory totals, largest first",
                        description="Totals per directory, each including everything below it, largest first: "
                                    "SIZE<tab>FILES<tab>PATH, then a total line. SIZE is allocated bytes "
                                    "(st_blocks*512), or apparent bytes (st_size) with --apparent-size; FILES "
                                    "counts what is not a directory. Hard links are counted once.")
    du.add_argument("path", metavar="PATH", help=_PATH_HELP)
    du.add_argument("-d", "--max-depth", type=_count, metavar="N",
                    help="print directories at most N levels below PATH (totals still include everything)")
    du.add_argument("-s", "--summarize", action="store_true", help="only PATH (--max-depth 0)")
    du.add_argument("-h", "--human-readable", action="store_true", help="sizes like 1.0K 234M 2.1G")
    du.add_argument("--apparent-size", action="store_true", help="show and sort by apparent sizes (st_size)")
    _add_selection(du)
    du.add_argument("--help", action="help", help="show this help and exit")

    rep = sub.add_parser("report", help="totals, largest directories, oldest files, owners of a walk's dataset",
                         description="Query a dataset written by walk --dask (DuckDB): totals, largest_dirs, "
                                     "oldest_files, owners. Tab-separated, one section per query.")
    rep.add_argument("dataset", metavar="DIR", help="the directory walk --dask -o wrote")
    rep.add_argument("query", nargs="?", choices=("totals", "largest_dirs", "oldest_files", "owners"),
                     help="one query (default: all)")
    rep.add_argument("--limit", type=_positive, default=10, help="rows per query (%(default)s)")
    return p


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out entries whose name matches GLOB (or whose path does, when GLOB has a '/'); "
                        "excluded directories are not read at all. Repeatable")
    p.add_argument("-x", "--one-file-system", action="store_true", help="stay on PATH's file system")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: parse, run one subcommand, return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "format", "") is None:
        args.format = "parquet" if args.dask is not None else "ndjson"
    ctx: Optional[Context] = None
    buffer_stdout()
    try:
        run = command(args.command)
        if args.command == "report":
            return run(args)
        ctx = Context(args)
        return run(args, ctx)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except AgentError as exc:  # no agent reachable, a refusal (401...), an agent that is not one
        mismatch = ctx.tls_mismatch() if ctx is not None and isinstance(exc, AgentConnectionError) else None
        print(f"{PROG}: {mismatch or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        discard_stdout()  # so that the exit's flush does not complain again
        return EXIT_PIPE
    except OSError as exc:  # what the commands write (their file-system errors are theirs to report)
        print(f"{PROG}: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        discard_stdout()
        return EXIT_FAILED
