"""The agent's settings, checked once at start-up."""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass
from typing import Optional

from diskover_wire.protocol import DEFAULT_PORT
from diskover_wire.tokens import read_token_file as _read_token_file
from diskover_wire.tokens import token_problem

from .exports import CONTROL_PREFIX, BadPath, Export, split_path
from .limits import MAX_BODY, Timeouts

DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_MAXCONNECTIONS = 50
DEFAULT_QUEUE = 1000
#: Connection limits, as nginx's client_header_timeout, client_body_timeout,
#: keepalive_timeout and send_timeout (seconds), and the request bodies held in all (MiB).
DEFAULT_HEADER_TIMEOUT = 60.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_BODY_MEMORY_MIB = 64
#: Seconds answers in flight get to finish on SIGTERM/Ctrl-C before they are cut.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
_MAX_TIMEOUT = 86400.0
#: Environment variable holding the bearer token (for containers), like --token-file.
TOKEN_ENV = "DISKOVER_AGENT_TOKEN"
#: prometheus_client's multiprocess mode: the directory where worker processes keep their metrics.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ConfigError(ValueError):
    """A setting that keeps the agent from starting."""


@dataclass
class AgentConfig:
    exports: list[Export]
    listen: str = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    maxconnections: int = DEFAULT_MAXCONNECTIONS
    verbose: int = 0
    #: Seconds in-flight answers get to finish on SIGTERM/Ctrl-C.
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: The bearer token every request must carry; None: no authentication.
    token: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    #: Requests that may wait for a listing slot; past that, 503 with Retry-After.
    max_queue: int = DEFAULT_QUEUE
    #: Seconds a request may wait for a slot before it gets a 503.
    max_wait: float = 30.0
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    #: Bytes of request bodies being received (or waiting for a slot) in all (per process).
    body_memory: int = DEFAULT_BODY_MEMORY_MIB * 2**20
    #: Worker processes asked for (``--processes``); see :attr:`process_count`.
    processes: int = 1

    def __post_init__(self) -> None:
        if not self.exports:
            raise ConfigError("at least one export (-r REMOTE LOCAL) is required")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not between 0 and 65535")
        if self.maxconnections < 1:
            raise ConfigError("--maxconnections must be at least 1")
        if self.processes < 1:
            raise ConfigError("--processes must be at least 1")
        if self.max_queue < 0:
            raise ConfigError("the queue length cannot be negative")
        if self.token is not None:
            problem = token_problem(self.token)
            if problem:
                raise ConfigError(problem)
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout", "shutdown_timeout"):
            if not 0 < getattr(self, name) <= _MAX_TIMEOUT:
                raise ConfigError(f"--{name.replace('_', '-')} must be above 0 and at most {_MAX_TIMEOUT:g} seconds")
        if self.body_memory < MAX_BODY:
            raise ConfigError(f"--body-memory must be at least {MAX_BODY // 2**20} MiB (one whole walk request)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        seen = set()
        for export in self.exports:
            for label, path in (("REMOTE", export.remote), ("LOCAL", export.local)):
                try:
                    split_path(path)
                except BadPath as exc:
                    raise ConfigError(f"-r {label} {os.fsdecode(path)!r}: {exc}") from None
            if export.remote_parts[:1] in ((), (CONTROL_PREFIX,)):
                raise ConfigError(
                    f"-r REMOTE {os.fsdecode(export.remote)!r}: REMOTE may not be / nor under "
                    "/_agent (reserved for the agent's own endpoints)"
                )
            if not os.path.isdir(export.local):
                what = "does not exist" if not os.path.lexists(export.local) else "is not a directory"
                raise ConfigError(f"-r LOCAL {os.fsdecode(export.local)!r} {what}")
            if export.remote_parts in seen:
                raise ConfigError(f"-r REMOTE {os.fsdecode(export.remote)!r} is given twice")
            seen.add(export.remote_parts)
        check_not_nested(self.exports)

    @property
    def process_count(self) -> int:
        """Worker processes to run: ``--processes``, but no more than ``-c``, the listings
        served at once in all, of which each process gets its share (at least one)."""
        return min(self.processes, self.maxconnections)

    def share(self, index: int) -> AgentConfig:
        """The settings of worker process ``index`` (from 0): its share of ``-c``."""
        n = self.process_count
        mine = self.maxconnections // n + (index < self.maxconnections % n)
        return dataclasses.replace(self, maxconnections=mine, processes=1)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(self.header_timeout, self.body_timeout, self.keepalive_timeout, self.send_timeout)


def check_not_nested(exports: list[Export]) -> None:
    """Refuse an export whose REMOTE lies inside another's: a path below both would mean
    two different directories depending on how it is reached."""
    for outer in exports:
        for inner in exports:
            o, i = outer.remote_parts, inner.remote_parts
            if len(i) > len(o) and i[: len(o)] == o:
                raise ConfigError(
                    f"-r REMOTE {os.fsdecode(inner.remote)!r} lies inside -r REMOTE {os.fsdecode(outer.remote)!r}: "
                    "nested exports are refused (give each tree a REMOTE of its own, outside the other)"
                )


def make_export(remote: str, local: str) -> Export:
    """An export from command-line strings."""
    return Export(remote=os.fsencode(remote), local=os.fsencode(local))


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped), read as the client reads it."""
    try:
        return _read_token_file(path)
    except ValueError as exc:
        raise ConfigError(f"--token-file: {exc}") from None


def tls_context(config: AgentConfig) -> Optional[ssl.SSLContext]:
    """The server-side TLS context, or None without --tls-cert."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert/--tls-key: {exc}") from None
    return ctx
