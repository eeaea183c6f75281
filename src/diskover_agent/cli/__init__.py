"""``diskover-agent``: list, walk and size remote trees through storage agents, from a shell.

::

    diskover-agent [--hosts H1,H2] [--port N] [--token-file F] [--tls] [--cafile F] [--insecure]
                   [--workers N] [--timeout S] [--retry-for S] [-q] [-V] {ls,walk,du,report} ...

(the global options also after the subcommand; what they leave out comes from the scanner's
``DISKOVER_AGENT_*`` settings). ``ls PATH...`` lists directories, ``walk PATH`` writes every
entry of a tree as NDJSON or CSV, ``du PATH...`` prints disk usage as GNU du.
Exit status: 0 complete; 1 finished, but some directories could not be listed (each one
named on stderr); 2 could not run (bad arguments, no agent reachable, refused by the agent);
130 interrupted (Ctrl-C); 141 output pipe closed; 143 terminated (SIGTERM: a walk into a
dataset commits what is complete, for ``--resume``).

The package: :mod:`.main` (the parser and the console script), :mod:`.common` (what every
command shares), :mod:`.crawl` (a walk's counters, progress display and summary line),
:mod:`.output` (walk output records) and one module per command (:mod:`.ls`, :mod:`.walk`,
:mod:`.du`, :mod:`.report`).
"""

from __future__ import annotations

import importlib
from typing import Any

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
from .main import build_parser, main

#: Names of the command modules, imported on first use (``import diskover_agent.cli`` stays cheap).
_LAZY = {
    "Crawl": "crawl", "Progress": "crawl", "finish": "crawl", "run_crawl": "crawl",
    "FIELDS": "output", "TYPES": "output", "Record": "output", "RecordWriter": "output", "records": "output",
    "cmd_ls": "ls", "ls_long": "ls", "ls_time": "ls", "cmd_walk": "walk", "cmd_walk_dask": "walk",
    "Totals": "du", "cmd_du": "du", "cmd_report": "report",
}

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_PIPE", "HOSTS_ENV", "PROG", "Context",
    "UsageError", "build_parser", "for_terminal", "human", "main", "remote_path", "shown", "size_text", *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
