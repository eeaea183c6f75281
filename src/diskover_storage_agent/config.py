"""The agent's settings, checked once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .exports import CONTROL_PREFIX, BadPath, Export, split_path

DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_PORT = 9999
DEFAULT_MAXCONNECTIONS = 50


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
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.exports:
            raise ConfigError("at least one export (-r REMOTE LOCAL) is required")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not between 0 and 65535")
        if self.maxconnections < 1:
            raise ConfigError("--maxconnections must be at least 1")
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


def make_export(remote: str, local: str) -> Export:
    """An export from command-line strings."""
    return Export(remote=os.fsencode(remote), local=os.fsencode(local))
