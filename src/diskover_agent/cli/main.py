"""The ``diskover-agent`` argument parser and the console script: parse, run one subcommand,
return the exit status."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Optional

from ..errors import AgentConnectionError, AgentError
from ..scanner.config import DEFAULT_CONFIG, ENV, ScannerConfigError, configured
from ..transport import DEFAULT_PORT, TOKEN_ENV
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
    _port,
    _positive,
    _seconds_arg,
    buffer_stdout,
    discard_stdout,
)


class _Version(argparse.Action):
    """``-V``, ``--version``, looking the version up only when asked (the lookup costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.pop("default", None)
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from .. import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse, with a suggestion for a mistyped option or choice (``--exlude``: did you
    mean ``--exclude``?), and the unknown arguments of a subcommand's command line reported
    with that subcommand's usage."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None) -> tuple[argparse.Namespace, list[str]]:
        if self._subparsers is not None:
            self._check_before_command(sys.argv[1:] if args is None else list(args))
        ns, extras = super().parse_known_args(args, namespace)
        if extras and isinstance(getattr(ns, "paths", None), list):
            # argparse gives PATH... only the paths before the first option: `ls /a -l /b` lists both.
            ns.paths += [a for a in extras if not a.startswith("-")]
            extras = [a for a in extras if a.startswith("-")]
        if extras and self._subparsers is not None:  # the top parser: name the subcommand's options
            sub = self._subparsers._group_actions[0].choices.get(getattr(ns, "command", None))  # type: ignore[union-attr]
            (sub or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def _check_before_command(self, args: list[str]) -> None:
        """An option before the subcommand that is not a global one: its error now, saying
        which subcommand has it, or with a suggestion among every option (else argparse takes
        its value for the subcommand: "invalid choice")."""
        commands = self._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        top = self._option_string_actions
        words = iter(args)
        for arg in words:
            if arg in commands or arg == "--":
                return
            if not arg.startswith("-") or arg == "-":
                continue
            name = arg.split("=", 1)[0]
            long = name.startswith("--")
            ours = [o for o in top if o.startswith(name)] if long else [name[:2]] if name[:2] in top else []
            if ours:
                if top[ours[0]].nargs != 0 and arg == name and (long or len(arg) == 2):
                    next(words, None)  # its value, whatever it looks like (--retry-for -1)
                continue
            owners = [c for c, sub in commands.items() if (name if long else name[:2]) in sub._option_string_actions]
            if owners:
                self.error(f"{name[:2] if not name.startswith('--') else name} is an option of "
                           f"{' and '.join(owners)}: give it after the subcommand")
            self.error(f"unrecognized arguments: {arg}")

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        super().error(message + _suggestion(self, message))

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # An abbreviation that matches two spellings of one option (--max: --max-depth and the
        # hidden --maxdepth) is not ambiguous.
        found = super()._get_option_tuples(option_string)  # type: ignore[misc]
        return list({t[0].dest: t for t in reversed(found)}.values())[::-1]


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """``" (did you mean --exclude?)"`` for the first mistyped word of an argparse error, or ``""``."""
    options = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
    if parser._subparsers is not None and message.startswith("unrecognized arguments: "):
        # the top parser, before the subcommand: a subcommand's option may be what was meant
        subs = parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        options += [o for sub in subs for a in sub._actions if a.help != argparse.SUPPRESS for o in a.option_strings
                    if o not in options]
    found = re.search(r"invalid choice: '([^']*)'", message)
    if found:
        choices = [str(c) for a in parser._actions if a.choices for c in a.choices]
        words, candidates = [found.group(1)], choices
    elif message.startswith("unrecognized arguments: "):
        words = [w.split("=", 1)[0] for w in message.split(": ", 1)[1].split() if w.startswith("-")]
        candidates = options
    else:
        found = re.search(r"argument (\S+): ignored explicit argument '([^']*)'", message)
        if not found:
            return ""
        words, candidates = [f"-{found.group(2)[0]}"], options
    for word in words:
        close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6 if word.startswith("--") else 0.75)
        if close:
            return f" (did you mean {close[0]}?)"
        if not word.startswith("--") and word.startswith("-"):
            shorts = ", ".join(o for o in options if len(o) == 2)
            return f" ({word} is not an option of {parser.prog}; its short options: {shorts})"
    return ""


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
_PATHS_HELP = "remote paths, as the agents export them (e.g. /mnt/isilon/projects)"

#: What a global option is when neither it nor its environment variable (or config file) says.
DEFAULTS: dict[str, Any] = {
    "hosts": None, "port": DEFAULT_PORT, "token_file": None, "tls": False, "cafile": None, "insecure": False,
    "workers": 40, "timeout": 60.0, "retry_for": DEFAULT_RETRY_FOR, "quiet": False,
}


def _add_globals(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The global options, on the top parser (``suppress=False``: None when not given) and on
    each subcommand (``suppress=True``: absent when not given, so a value given before the
    subcommand stays), so that they work before and after it."""
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("-V", "--version", action=_Version, help="show the version and exit")
    g = p.add_argument_group("agents (options win over the environment and the config file)")
    g.add_argument("--hosts", metavar="H1,H2,...", default=d,
                   help=f"agents as name, name:port or [v6addr]:port, comma-separated (default: ${HOSTS_ENV})")
    g.add_argument("--port", type=_port, default=d,
                   help=f"port of hosts given without one (default: $DISKOVER_AGENT_PORT, else {DEFAULT_PORT})")
    g.add_argument("--token-file", metavar="FILE", default=d,
                   help="bearer token for agents that require one (default: $DISKOVER_AGENT_TOKEN, the token; "
                        "else $DISKOVER_AGENT_TOKEN_FILE)")
    g.add_argument("--tls", action="store_true", default=d,
                   help="HTTPS, verifying the agents' certificates (default: $DISKOVER_AGENT_TLS)")
    g.add_argument("--cafile", metavar="FILE", default=d,
                   help="CA bundle to verify the agents' certificates; implies --tls (default: $DISKOVER_AGENT_CAFILE)")
    g.add_argument("--insecure", action="store_true", default=d,
                   help="with --tls: do not verify certificates (default: $DISKOVER_AGENT_INSECURE)")
    g.add_argument("--workers", type=_positive, default=d, metavar="N",
                   help="requests in flight at once, spread over the hosts (default: $DISKOVER_AGENT_WORKERS, "
                        f"else {DEFAULTS['workers']})")
    g.add_argument("--timeout", type=_seconds_arg, default=d, metavar="SECONDS",
                   help=f"silence from an agent before its request goes to another ({DEFAULTS['timeout']:g})")
    g.add_argument("--retry-for", type=_seconds_arg, default=d, metavar="SECONDS",
                   help="how long a walk goes on retrying while no agent answers (default: "
                        f"$DISKOVER_AGENT_RETRY_FOR, else {DEFAULT_RETRY_FOR:g})")
    g.add_argument("-q", "--quiet", action="store_true", default=d,
                   help="no progress display and no summary line on stderr")


_ENV_EPILOG = (
    "What the options leave out comes from the scanner's settings: the environment variables "
    + ", ".join(ENV.values()) + ", DISKOVER_AGENT_TOKEN (the token itself), then the config file "
    "($DISKOVER_AGENT_CONFIG, else " + DEFAULT_CONFIG + "). "
)


def build_parser() -> argparse.ArgumentParser:
    """The ``diskover-agent`` argument parser: a subcommand, with the global options before or after it."""
    p = Parser(
        prog=PROG, description="List, walk and size trees on storage nodes through diskover storage agents.",
        epilog=_ENV_EPILOG + "Exit status: 0 complete; 1 some directories could not be listed (named on stderr); "
               "2 could not run (bad arguments, no agent reachable, refused); 130 interrupted; 143 terminated "
               "(a walk into a dataset commits first: --resume continues it).",
    )
    _add_globals(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="{ls,walk,du,report}", required=True)

    ls = sub.add_parser("ls", add_help=False, help="list directories",
                        description="List remote directories, each sorted by name (bytes, as LC_ALL=C ls), "
                                    "every entry (dot files too, as ls -A).")
    ls.add_argument("paths", nargs="+", metavar="PATH", help=_PATHS_HELP)
    ls.add_argument("-l", dest="long", action="store_true", help="long form: mode, links, owner, group, size, mtime")
    ls.add_argument("-n", dest="numeric", action="store_true", help="with -l: numeric user and group IDs")
    ls.add_argument("-h", "--human-readable", dest="human", action="store_true", help="with -l: sizes like 1.5K")
    ls.add_argument("-a", "--all", "-A", "--almost-all", dest="all", action="store_true",
                    help="accepted: every entry is always shown (but not . and ..)")
    ls.add_argument("-1", dest="one", action="store_true", help="accepted: one name per line is the only form")
    ls.add_argument("--help", action="help", help="show this help and exit")
    _add_globals(ls, suppress=True)

    walk = sub.add_parser("walk", help="every entry of a tree, as NDJSON or CSV",
                          description="Write every entry below PATH (not PATH itself), one record per entry, and "
                                      "one per directory that could not be listed (type error), in the columns "
                                      "of the README's table of the records: parent, parent_raw, name, name_raw "
                                      "(the exact bytes, base64, when not UTF-8), type, target_type, mode, ino, "
                                      "dev, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, blocks, "
                                      "error_errno, error_code, error_message.")
    walk.add_argument("path", metavar="PATH", help=_PATH_HELP)
    walk.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE instead of stdout (with --format parquet or --dask, or a DIR/ that ends "
                           "in / or exists: the dataset directory, checkpointed)")
    walk.add_argument("--format", choices=("ndjson", "csv", "parquet"), default=None,
                      help="ndjson (default), csv, or parquet: a dataset of Parquet partitions in -o DIR, as "
                           "with --dask (ndjson with -o DIR/: NDJSON partitions); with --dask: parquet (default) "
                           "or ndjson partitions")
    walk.add_argument("--resume", action="store_true",
                      help="continue the interrupted walk whose dataset is in -o DIR (from its checkpoint), "
                           "with the options it started with")
    walk.add_argument("--overwrite", action="store_true",
                      help="replace the walk's dataset in -o DIR (a non-empty DIR is refused without it)")
    walk.add_argument("--partition-rows", type=_positive, default=200_000, metavar="N",
                      help="rows per partition of a dataset, about (%(default)s): each one is committed "
                           "with the checkpoint")
    walk.add_argument("--dask", metavar="SCHEDULER",
                      help="run the walk as Dask tasks on this scheduler (tcp://host:8786), or on a local "
                           "cluster of N worker processes (local:N); -o DIR receives the dataset")
    _add_max_depth(walk, "as find -mindepth 1 -maxdepth N: entries at most N levels below PATH (1: PATH's own)")
    _add_selection(walk)
    _add_globals(walk, suppress=True)

    du = sub.add_parser("du", add_help=False, help="disk usage of trees, as GNU du",
                        description="Disk usage as GNU du prints it: SIZE<tab>PATH for each directory, "
                                    "after the directories below it, then each PATH. SIZE is allocated space "
                                    "(st_blocks*512) in 1024-byte blocks, rounded up. A hard-linked inode counts "
                                    "once per PATH.")
    du.add_argument("paths", nargs="+", metavar="PATH", help=_PATHS_HELP)
    du.add_argument("-a", "--all", action="store_true", help="files too, not only directories")
    du.add_argument("-b", "--bytes", action=_Bytes, help="apparent sizes in bytes (--apparent-size, unit 1)")
    du.add_argument("-k", dest="unit", action="store_const", const="k", help="1024-byte blocks (the default)")
    du.add_argument("-h", "--human-readable", dest="unit", action="store_const", const="h",
                    help="sizes like 1.0K 234M 2.1G")
    du.add_argument("--apparent-size", action="store_true", help="apparent sizes (st_size) instead of allocated")
    du.add_argument("-c", "--total", action="store_true", help="a grand total line at the end (total)")
    du.add_argument("-s", "--summarize", action="store_true", help="only each PATH (--max-depth 0)")
    _add_max_depth(du, "print directories at most N levels below PATH (totals still include everything)")
    du.add_argument("--counts", action="store_true",
                    help="SIZE<tab>FILES<tab>DIRS<tab>PATH: also the entries that are not directories (each "
                         "inode once) and the directories (itself included)")
    _add_selection(du)
    du.add_argument("--help", action="help", help="show this help and exit")
    _add_globals(du, suppress=True)

    rep = sub.add_parser("report", help="totals, largest directories, oldest files, owners of a walk's output",
                         description="Query a walk's output (DuckDB): a dataset (walk --format parquet or --dask "
                                     "-o DIR) or a walk -o FILE (NDJSON or CSV): totals, largest_dirs, "
                                     "oldest_files, owners. Tab-separated, one section per query.")
    rep.add_argument("dataset", metavar="OUTPUT", help="the directory or the file walk -o wrote")
    rep.add_argument("query", nargs="?", choices=("totals", "largest_dirs", "oldest_files", "owners"),
                     help="one query (default: all)")
    rep.add_argument("--limit", type=_positive, default=10, help="rows per query (%(default)s)")
    _add_globals(rep, suppress=True)
    return p


class _Bytes(argparse.Action):
    """du's ``-b``: apparent sizes, in bytes (a later ``-k`` or ``-h`` changes the unit only, as in GNU du)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *args: Any) -> None:
        namespace.apparent_size = True
        namespace.unit = "b"


def _add_max_depth(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("-d", "--max-depth", type=_count, metavar="N", help=help)
    p.add_argument("--maxdepth", dest="max_depth", type=_count, help=argparse.SUPPRESS)  # the older spelling


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out entries whose name matches GLOB (or whose path does, when GLOB has a '/'); "
                        "excluded directories are not read at all. Repeatable; adds to $DISKOVER_AGENT_EXCLUDE_DIRS "
                        "(directories) and $DISKOVER_AGENT_EXCLUDE_FILES (the rest)")
    p.add_argument("-x", "--one-file-system", action="store_true",
                   help="stay on PATH's file system (default: $DISKOVER_AGENT_ONE_FS)")


def apply_settings(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> None:
    """Fill in what the command line left out from the scanner's settings (environment
    variables over its config file), then from :data:`DEFAULTS`. Raises :class:`UsageError`
    when a setting is wrong."""
    env = os.environ if environ is None else environ
    try:
        values, _path = configured(env)
    except ScannerConfigError as exc:
        raise UsageError(str(exc)) from None
    if values.get("hosts"):
        values["hosts"] = ",".join(values["hosts"])
    if env.get(TOKEN_ENV):  # the token itself wins over a token file, as for the scanner
        values.pop("token-file", None)
    for dest, default in DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, values.get(dest.replace("_", "-"), default))
    if hasattr(args, "exclude"):
        args.exclude_dirs = [*args.exclude, *values.get("exclude-dirs", ())]
        args.exclude_files = [*args.exclude, *values.get("exclude-files", ())]
        args.one_file_system = args.one_file_system or values.get("one-fs", False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: parse, run one subcommand, return the exit status."""
    parser = build_parser()
    ctx: Optional[Context] = None
    buffer_stdout()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, -V: what they printed must reach stdout, or say why not
            if not exc.code:
                sys.stdout.flush()
            raise
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        if getattr(args, "format", "") is None:
            args.format = "parquet" if args.dask is not None else "ndjson"
        run = command(args.command)
        if args.command == "report":  # a dataset on this host: no agents, no settings
            return run(args)
        apply_settings(args)
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
