"""What the ``diskover-agent`` commands share: exit statuses, the run's settings (:class:`Context`),
argument types, and how sizes, names and paths are printed."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Optional

from ..connection import AgentConnection, parse_hosts
from ..entry import make_stat
from ..errors import AgentConnectionError, AgentError, AgentHTTPError
from ..protocol import Exclusions
from ..transport import (
    TOKEN_ENV,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    read_token_file,
    token_problem,
)

if TYPE_CHECKING:  # tqdm is imported when a progress display is shown (it costs start-up time)
    from tqdm import tqdm

PROG = "diskover-agent"
HOSTS_ENV = "DISKOVER_AGENT_HOSTS"

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141


class UsageError(Exception):
    """A command line that cannot run (exit status 2)."""


# -- formatting ----------------------------------------------------------------------------

def human(n: int) -> str:
    """A size as ``du -h`` prints it: powers of 1024, rounded up, one decimal below 10."""
    if n < 1024:
        return str(n)
    units = "KMGTPEZY"
    for i, unit in enumerate(units):
        scale = 1024 ** (i + 1)
        tenths = -(-n * 10 // scale)
        if tenths < 100:
            return f"{tenths // 10}.{tenths % 10}{unit}"
        whole = -(-n // scale)
        if whole < 1024 or i == len(units) - 1:
            return f"{whole}{unit}"
    raise AssertionError("unreachable")


def size_text(n: int) -> str:
    """A byte count for the progress display and the summary line: ``36 B``, ``1.1 GiB``."""
    h = human(n)
    return f"{n} B" if n < 1024 else f"{h[:-1]} {h[-1]}iB"


def shown(path: bytes) -> str:
    """A path for a message on stderr (see :func:`for_terminal`)."""
    return for_terminal(path).decode("utf-8")


def _escape_control(ch: str) -> str:
    return ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")


def for_terminal(raw: bytes) -> bytes:
    """A name or path as ``ls``/``du`` print it to a terminal: bytes that are not UTF-8 as
    ``\\xNN`` and control characters escaped, so that no name can move the cursor or
    break a line. (To a pipe or a file they print the exact bytes, as ls and du do.)"""
    text = raw.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(map(_escape_control, text))
    return text.encode("utf-8")


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name


# -- the run's settings ----------------------------------------------------------------------

class Context:
    """What every subcommand needs: the agents, how to talk to them, where to report."""

    def __init__(self, args: argparse.Namespace) -> None:
        hosts = args.hosts if args.hosts is not None else os.environ.get(HOSTS_ENV, "")
        if not hosts.strip():
            raise UsageError(f"no agents: give --hosts HOST[,HOST...] or set {HOSTS_ENV}")
        try:
            self.addresses: list[HostAddress] = parse_hosts(hosts, args.port)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.hosts = [a.label for a in self.addresses]
        self.port: int = args.port
        self.workers: int = args.workers
        self.retry_for: float = args.retry_for
        self.quiet: bool = args.quiet
        token = None
        if args.token_file is not None:
            try:
                token = read_token_file(args.token_file)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        elif os.environ.get(TOKEN_ENV):
            problem = token_problem(os.environ[TOKEN_ENV])
            if problem:
                raise UsageError(f"${TOKEN_ENV}: {problem}")
        #: Keyword options of ClientOptions, for AgentConnection and Walker.
        self.options: dict[str, Any] = {
            "timeout": args.timeout, "token": token, "tls": args.tls or args.cafile is not None,
            "cafile": args.cafile, "verify": not args.insecure,
        }
        #: The live progress display while there is one (messages are written around it).
        self.bar: Optional[tqdm] = None

    def warn(self, message: str) -> None:
        """One line on stderr, prefixed with the program's name; around the progress display."""
        line = f"{PROG}: {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def check_reachable(self, path: bytes) -> None:
        """Fail early, with the reasons, when no agent answers a request (down, refused, TLS
        or token trouble), rather than after a walk's ``--retry-for``. The request is the
        cheapest an agent has (``statvfs`` of PATH); whether PATH can be listed is the walk's
        business."""
        with AgentConnection(self.hosts, self.port, **self.options) as conn:
            try:
                conn.statvfs(path)
            except AgentHTTPError as exc:
                if exc.status != 404:  # 404: an agent without that endpoint, which answered all the same
                    raise
            except AgentError:
                raise
            except OSError:
                pass

    def directory_stat(self, path: bytes) -> Optional[os.stat_result]:
        """The stat record of a remote directory itself (``du`` counts its size), or None
        when it cannot be listed (the walk reports that). The library keeps a directory's
        own stat from a walk to itself, so this asks a listing with every entry excluded."""
        everything = Exclusions.of([b"*"], [b"*"])
        reasons = []
        options = ClientOptions(**self.options)
        for address in self.addresses:
            conn = AgentHTTP(address, options)
            try:
                listing = conn.listdir(path, True, os.fsdecode(path), everything)
            except TRANSIENT_ERRORS as exc:
                reasons.append(f"{address.label}: {exc}")
                continue
            finally:
                conn.close()
            if listing.error is not None or listing.stat is None:
                return None
            return make_stat(listing.stat)
        raise AgentConnectionError("no agent reachable: " + "; ".join(reasons))


def remote_path(text: str) -> bytes:
    raw = os.fsencode(text)
    if not raw.startswith(b"/"):
        raise UsageError(f"{text}: the remote path must be absolute (as the agents export it, e.g. /mnt/isilon)")
    return raw


# -- argument types -----------------------------------------------------------------------------

def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {n}")
    return n


def _positive(text: str) -> int:
    n = _count(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return v
