"""``diskover-agent report``: what a walk's dataset says (the queries of :mod:`diskover_agent.report`)."""

from __future__ import annotations

import argparse
import sys

from .common import PROG, UsageError, require_modules


def cmd_report(args: argparse.Namespace) -> int:
    """``report OUTPUT``: what a walk's dataset (or ``walk -o FILE`` output) says, through DuckDB."""
    require_modules("report", ["duckdb"])
    from .. import report

    names = [args.query] if args.query else list(report.QUERIES)
    found = report.status(args.dataset)
    if found is not None and not getattr(args, "quiet", False):
        failed = found.get("errors", 0)
        state = "complete" if found.get("complete") else "INCOMPLETE (interrupted: walk ... --resume continues it)"
        print(f"{PROG}: {args.dataset}: {state}, {found.get('entries', 0):,} entries, {failed:,} "
              f"{'directory' if failed == 1 else 'directories'} failed", file=sys.stderr, flush=True)
    for name in names:
        try:
            columns, rows = report.run(args.dataset, name, args.limit)
        except (ValueError, ImportError) as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:  # reading it (writing the output is the command's, below)
            raise UsageError(f"cannot read {args.dataset}: {exc.strerror or exc}") from None
        print(f"# {name}")
        print("\t".join(columns))
        for row in rows:
            print("\t".join("" if v is None else str(v) for v in row))
    sys.stdout.flush()  # a write error surfaces here, as the command's, not at exit
    return 0
