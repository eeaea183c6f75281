"""``diskover-agent``: list, walk and size remote trees through storage agents, from a shell.

::

    diskover-agent [--hosts H1,H2] [--port N] [--token-file F] [--tls] [--cafile F] [--insecure]
                   [--workers N] [--timeout S] [--retry-for S] [-q] {ls,walk,du} ...

``ls PATH`` lists one directory, ``walk PATH`` writes every entry of a tree as NDJSON or CSV,
``du PATH`` totals a tree per directory. Exit status: 0 complete; 1 finished, but some
directories could not be listed (each one named on stderr); 2 could not run (bad arguments,
no agent reachable, refused by the agent); 130 interrupted (Ctrl-C); 141 output pipe closed.

The package: :mod:`.main` (the parser and the console script), :mod:`.common` (what every
command shares), :mod:`.crawl` (a walk's counters, progress display and summary line),
:mod:`.records` (walk output records) and one module per command (:mod:`.ls`, :mod:`.walk`,
:mod:`.du`, :mod:`.report`).
"""

from __future__ import annotations

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_PIPE,
    HOSTS_ENV,
    PROG,
    Context,
    UsageError,
    for_terminal,
    human,
    remote_path,
    shown,
    size_text,
)
from .crawl import Crawl, Progress, finish, run_crawl
from .du import Totals, cmd_du
from .ls import cmd_ls, ls_long, ls_time
from .main import build_parser, main
from .records import FIELDS, TYPES, Record, RecordWriter, records
from .report import cmd_report
from .walk import cmd_walk, cmd_walk_dask

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_PIPE", "FIELDS", "HOSTS_ENV", "PROG",
    "TYPES", "Context", "Crawl", "Progress", "Record", "RecordWriter", "Totals", "UsageError", "build_parser",
    "cmd_du", "cmd_ls", "cmd_report", "cmd_walk", "cmd_walk_dask", "finish", "for_terminal", "human", "ls_long",
    "ls_time", "main", "records", "remote_path", "run_crawl", "shown", "size_text",
]
