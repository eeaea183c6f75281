"""What the ``diskover-agent`` commands share: exit statuses, the run's settings (:class:`Context`),
argument types, and how sizes, names and paths are printed."""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
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


#: Seconds, in all, to find out whether hosts no request could reach disagree with us about TLS.
TLS_PROBE_SECONDS = 5.0

#: What installs the modules of ``walk --dask``, ``--format parquet`` and ``report``, by the
#: distribution this client came with (both are installed from the project's checkout).
DASK_INSTALL = {
    "diskover-storage-agent": "pip install '.[dask]'",
    "diskover-storage-agent-client": "pip install './packages/crawler[dask]'",
}


def dask_install() -> str:
    """The ``pip install`` that adds the ``dask`` extra to this install."""
    from importlib.metadata import packages_distributions

    for dist in packages_distributions().get("diskover_agent", ()):
        if dist in DASK_INSTALL:
            return f"{DASK_INSTALL[dist]} (in the diskover-storage-agent checkout)"
    return f"{DASK_INSTALL['diskover-storage-agent']} (in the diskover-storage-agent checkout)"


def require_modules(what: str, modules: Sequence[str]) -> None:
    """A :class:`UsageError` naming the ``pip install`` that fixes it when one of ``modules``
    (an optional extra's) cannot be imported here; checked before any work starts."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent that is not a package, or a module set to None
            found = False
        if not found:
            missing.append(name)
    if missing:
        are = "is" if len(missing) == 1 else "are"
        raise UsageError(f"{what} needs {' and '.join(missing)}, which {are} not installed here: {dask_install()}")


def buffer_stdout() -> None:
    """Give standard output a buffer when it has none (``PYTHONUNBUFFERED``, ``python -u``):
    a raw stream may write only part of what it is given (a full disk, a file size limit)
    and say so only in its return value, which would lose the rest silently; a buffered one
    writes it all or raises. The commands flush their output themselves."""
    raw = sys.stdout.buffer
    if isinstance(raw, io.RawIOBase):
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=sys.stdout.encoding,
                                      errors=sys.stdout.errors, line_buffering=sys.stdout.line_buffering)


def discard_stdout() -> None:
    """Point standard output at /dev/null: what could not be written (a closed pipe, a full
    disk) is dropped, and the interpreter's last flush at exit has nothing to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


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
        tls = args.tls or args.cafile is not None
        if args.insecure and not tls:
            raise UsageError("--insecure turns off the certificate checks of --tls: add --tls, or drop --insecure")
        #: Keyword options of ClientOptions, for AgentConnection and Walker.
        self.options: dict[str, Any] = {
            "timeout": args.timeout, "token": token, "tls": tls, "cafile": args.cafile, "verify": not args.insecure,
        }
        if args.cafile is not None:
            _check_cafile(args.cafile)
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

    def tls_mismatch(self) -> Optional[str]:
        """After no agent could be reached: why, when the reason is that this client and an
        agent disagree about TLS (the advice: add or remove ``--tls``); else None."""
        tls = bool(self.options["tls"])
        deadline = time.monotonic() + min(self.options["timeout"], TLS_PROBE_SECONDS)
        for address in self.addresses:
            left = deadline - time.monotonic()
            if left <= 0:  # hosts that hang: the reason stays the one the request gave
                break
            if tls and _speaks_plain_http(address, left):
                return f"{address.label} serves plain HTTP, not HTTPS: remove --tls (and --cafile, --insecure)"
            if not tls and _speaks_tls(address, left):
                return f"{address.label} serves HTTPS: add --tls (with --cafile FILE for a private CA)"
        return None


def _check_cafile(path: str) -> None:
    """A :class:`UsageError` unless ``path`` holds at least one certificate (PEM)."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        raise UsageError(f"--cafile {path}: no certificate in it (a PEM file of CA certificates is expected)") \
            from None
    except OSError as exc:
        raise UsageError(f"--cafile {path}: {exc.strerror or exc}") from None


def _speaks_plain_http(address: HostAddress, timeout: float) -> bool:
    """Whether the agent at ``address`` answers a plain HTTP request."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
            sock.sendall(b"GET /_agent/health HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def _speaks_tls(address: HostAddress, timeout: float) -> bool:
    """Whether the agent at ``address`` completes a TLS handshake (its certificate unchecked:
    this only tells which protocol it speaks)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=address.host):
            return True
    except OSError:
        return False


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


def _port(text: str) -> int:
    n = _positive(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535: {n}")
    return n


def _seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, and finite: {text}")
    return v
