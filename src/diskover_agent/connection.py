"""``AgentConnection``: list remote directories through one agent at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, AnyStr, Optional, TypeVar, Union

from .entry import AgentDirEntry
from .errors import AgentConnectionError, AgentProtocolError
from .protocol import KIND_DIR, KIND_SYMLINK, Entry, Exclusions
from .transport import (
    DEFAULT_PORT,
    TRANSIENT_ERRORS,
    AgentHTTP,
    ClientOptions,
    HostAddress,
    RemoteListing,
    fsencode_path,
    parse_host,
)

T = TypeVar("T")


def parse_hosts(hosts: Union[str, Sequence[str]], port: int) -> list[HostAddress]:
    """Host specs from a list, or from one comma-separated string."""
    specs = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    addresses = [parse_host(h, port) for h in specs if h.strip()]
    if not addresses:
        raise ValueError("no agent hosts given")
    return addresses


def is_walk_dir(entry: Entry) -> bool:
    """True for what ``os.walk`` puts in ``dirs``: directories and symlinks to them."""
    return entry.kind == KIND_DIR or (entry.kind == KIND_SYMLINK and entry.target == KIND_DIR)


def split_names(path: AnyStr, entries: list[Entry]) -> tuple[list[AnyStr], list[AnyStr]]:
    """``(dirs, files)`` names as ``os.walk`` splits them, typed like ``path``."""
    dirs: list[Any] = []
    files: list[Any] = []
    decode = (lambda b: b) if isinstance(path, bytes) else os.fsdecode
    for e in entries:
        (dirs if is_walk_dir(e) else files).append(decode(e.name))
    return dirs, files


class AgentConnection:
    """A connection to one of several agents; :meth:`connect` moves to the next one.

    ``options`` are :class:`~diskover_agent.transport.ClientOptions`' (``timeout``,
    ``connect_timeout``, ``token``, ``tls``, ``cafile``, ``verify``, ``compress``).

    >>> c = AgentConnection(hosts=["stornode1", "stornode2"])
    >>> c.connect(); c.conn_host()
    'stornode1'
    >>> c.listdir("/mnt/isilon/somedir")
    ('/mnt/isilon/somedir', ['subdir1', 'subdir2'], ['file1.ext', 'file2.ext'])
    """

    def __init__(
        self,
        hosts: Union[str, Sequence[str]],
        port: int = DEFAULT_PORT,
        **options: Any,
    ) -> None:
        self._addresses = parse_hosts(hosts, port)
        self._options = ClientOptions(**options)
        self._next = 0
        self._http: Optional[AgentHTTP] = None
        self._response_time: Optional[float] = None

    def hostlist(self) -> list[str]:
        """The hosts, as given."""
        return [a.label for a in self._addresses]

    def connect(self) -> None:
        """Connect to the next host in turn (skipping those that do not answer)."""
        self.close()
        errors = []
        for _ in range(len(self._addresses)):
            address = self._addresses[self._next % len(self._addresses)]
            self._next += 1
            http = AgentHTTP(address, self._options)
            try:
                http.connect()
            except OSError as exc:
                errors.append(f"{address.label}: {exc}")
                continue
            self._http = http
            return
        raise AgentConnectionError("no agent reachable: " + "; ".join(errors))

    def conn_host(self) -> Optional[str]:
        """The host of the current connection, None before :meth:`connect`."""
        return self._http.address.label if self._http is not None else None

    def response_time(self) -> Optional[float]:
        """Seconds the last listing took, request to last byte."""
        return self._response_time

    def listdir(self, path: AnyStr) -> tuple[AnyStr, list[AnyStr], list[AnyStr]]:
        """``(path, dirs, files)`` of a remote directory, split as ``os.walk`` does,
        each sorted by name as the original returned them."""
        listing = self._list(path, want_stat=False)
        dirs, files = split_names(path, listing.entries)
        dirs.sort()
        files.sort()
        return path, dirs, files

    def scandir(self, path: AnyStr) -> Iterator[AgentDirEntry[AnyStr]]:
        """Entries of a remote directory, like ``os.scandir``, each with its stat."""
        listing = self._list(path, want_stat=True)
        decode = (lambda b: b) if isinstance(path, bytes) else os.fsdecode
        return iter([AgentDirEntry(path, decode(e.name), e) for e in listing.entries])

    def statvfs(self, path: AnyStr) -> dict[str, int]:
        """The sizes of the file system holding a remote directory: ``os.statvfs``'s
        fields (``f_frsize``, ``f_blocks``...) and ``total``, ``free``, ``available`` bytes."""
        result = self._ask(lambda http: http.statvfs(fsencode_path(path), path))
        if isinstance(result, OSError):
            raise result
        return result

    def info(self) -> dict[str, Any]:
        """The answering agent's ``/_agent/v1/info`` (its version, features and exports)."""
        return self._ask(lambda http: http.info())

    def listing(self, path: AnyStr, stat: bool = True, exclusions: Optional[Exclusions] = None) -> RemoteListing:
        """One directory as the agent answered it: its entries (wire form), its own stat
        record, or in ``error`` the ``OSError`` that kept it from being listed."""
        start = time.perf_counter()
        listing = self._ask(lambda http: http.listdir(fsencode_path(path), stat, path, exclusions))
        self._response_time = time.perf_counter() - start
        return listing

    def _list(self, path: AnyStr, want_stat: bool) -> RemoteListing:
        listing = self.listing(path, want_stat)
        if listing.error is not None:
            raise listing.error
        return listing

    def _ask(self, request: Callable[[AgentHTTP], T]) -> T:
        """Run a request on the current host, moving on to the next ones when it fails:
        :class:`AgentProtocolError` when one of them answered invalidly, else
        :class:`AgentConnectionError`."""
        errors = []
        invalid = False
        for _ in range(len(self._addresses)):
            if self._http is None:
                self.connect()
            assert self._http is not None
            try:
                return request(self._http)
            except TRANSIENT_ERRORS as exc:
                errors.append(f"{self._http.address.label}: {exc}")
                invalid = invalid or isinstance(exc, AgentProtocolError)
                self.close()
        if invalid:
            raise AgentProtocolError("no agent gave a valid answer: " + "; ".join(errors))
        raise AgentConnectionError("no agent could answer: " + "; ".join(errors))

    def close(self) -> None:
        """Close the current connection."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
