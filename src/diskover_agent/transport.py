"""HTTP to one agent: host specs, a keep-alive connection, one listing request.

Built on the standard library's ``http.client``: per request it costs the least
client CPU of the stacks measured (see ``bench/README.md``), and a walk's rate is
bound by client CPU.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import os
import socket
import ssl
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgspec

from diskover_wire.protocol import DEFAULT_PORT
from diskover_wire.tokens import MAX_TOKEN_BYTES, read_token_file, token_problem  # noqa: F401 (re-exported)

from .errors import AgentBusyError, AgentError, AgentHTTPError, AgentProtocolError
from .protocol import (
    MAX_PATH,
    MSGPACK_TYPE,
    PROTOCOL_HEADER,
    DirFrame,
    EndFrame,
    EntriesFrame,
    Entry,
    ErrorFrame,
    Exclusions,
    Frame,
    NamesFrame,
    ProtocolError,
    SkipFrame,
    StatFields,
    WalkRequest,
    check_names,
    decode_error,
    decode_names,
    encode_walk_request,
    quote_path,
    read_frame_blocks,
)

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: The bearer token, when none is given in code.
TOKEN_ENV = "DISKOVER_AGENT_TOKEN"
WALK_PATH = "/_agent/v1/walk"
STATVFS_PATH = "/_agent/v1/statvfs"
INFO_PATH = "/_agent/v1/info"
#: Errors that mean "this host, this time": retry elsewhere or later.
TRANSIENT_ERRORS = (OSError, http.client.HTTPException, ProtocolError, AgentProtocolError, AgentBusyError)


@dataclass(frozen=True)
class HostAddress:
    """An agent's address: ``label`` is the spec as the user wrote it."""

    host: str
    port: int
    label: str


def parse_host(spec: str, default_port: int = DEFAULT_PORT) -> HostAddress:
    """Parse ``"name"``, ``"name:port"``, ``"[v6addr]:port"``, ``"[v6addr]"`` or a bare IPv6 address."""
    text = spec.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or not addr or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {spec!r}: expected [ipv6]:port")
        return HostAddress(addr, _port(rest[1:], spec) if rest else default_port, spec)
    if any(c.isspace() for c in text):
        raise ValueError(f"bad host {spec!r}: separate hosts with commas (a,b), not spaces")
    if text.count(":") > 1:  # a bare IPv6 address
        return HostAddress(text, default_port, spec)
    name, sep, port = text.partition(":")
    if not name:
        raise ValueError(f"bad host {spec!r}")
    return HostAddress(name, _port(port, spec) if sep else default_port, spec)


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in host {spec!r}")
    return int(text)


@dataclass
class RemoteListing:
    """One directory as an agent listed it: its entries, or the error that stopped it."""

    path: bytes
    entries: list[Entry]
    error: Optional[OSError] = None
    #: The directory's own stat record, when stat was asked for.
    stat: Optional[StatFields] = None
    #: Asked with ``nofollow``, the path is a symlink now: not listed, not an error.
    skipped: bool = False


class ClientOptions:
    """How the client talks to agents; shared by every connection of a walk.

    ``timeout``: seconds to wait for an answer's next bytes; ``connect_timeout``: for a
    connection. ``token``: the bearer token (default: the ``DISKOVER_AGENT_TOKEN``
    environment variable). ``tls``: HTTPS, verifying the agent's certificate against
    the system's CAs or ``cafile``; ``verify=False`` turns verification off (explicitly).
    ``compress``: ask for gzip answers (default: except on loopback).
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        token: Optional[str] = None,
        tls: bool = False,
        cafile: Optional[str] = None,
        verify: bool = True,
        compress: Optional[bool] = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        problem = token_problem(self.token) if self.token is not None else None
        if problem:
            raise ValueError(problem)
        self.compress = compress
        self.ssl_context: Optional[ssl.SSLContext] = None
        if tls or cafile is not None:
            ctx = ssl.create_default_context(cafile=cafile)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl_context = ctx


class AgentHTTP:
    """One keep-alive HTTP connection to one agent, reopened when it breaks."""

    def __init__(self, address: HostAddress, options: ClientOptions) -> None:
        self.address = address
        self.options = options
        self.compress = (not is_loopback(address.host)) if options.compress is None else options.compress
        self._headers = {"Accept": MSGPACK_TYPE, "Accept-Encoding": "gzip" if self.compress else "identity"}
        if options.token:
            self._headers["Authorization"] = f"Bearer {options.token}"
        self._conn: Optional[http.client.HTTPConnection] = None
        #: Connections opened so far (one, as long as the agent keeps it alive).
        self.opened = 0

    def connect(self) -> None:
        if self._conn is None or self._conn.sock is None:
            opts = self.options
            conn: http.client.HTTPConnection
            if opts.ssl_context is not None:
                conn = http.client.HTTPSConnection(
                    self.address.host, self.address.port, timeout=opts.connect_timeout, context=opts.ssl_context
                )
            else:
                conn = http.client.HTTPConnection(self.address.host, self.address.port, timeout=opts.connect_timeout)
            try:
                conn.connect()
            except OSError:
                conn.close()
                raise
            conn.sock.settimeout(opts.timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            self.opened += 1

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        """Break off a request in flight from another thread."""
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def listdir(self, path: bytes, want_stat: bool, filename: object,
                exclusions: Optional[Exclusions] = None, nofollow: bool = False) -> RemoteListing:
        """List one remote directory. File-system errors come back in ``error``
        (with ``filename`` set); transport errors raise. A path longer than
        ``MAX_PATH`` is ``ENAMETOOLONG`` without asking. With ``nofollow``, a path
        that is a symlink is not listed (``skipped``); an agent that predates it
        raises :class:`WalkFieldsRefused`."""
        if len(path) > MAX_PATH:
            return RemoteListing(path, [], OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), filename))
        target = quote_path(path) + ("?format=msgpack&stat=1" if want_stat else "?format=msgpack")
        if exclusions:
            target += exclusions.query()
        if nofollow:
            target += "&nofollow=1"
        try:
            resp = self._request("GET", target)
            if resp.status != 200:
                try:
                    error = self._error(resp, filename)
                except AgentHTTPError as exc:
                    if nofollow and exc.status == 400 and "nofollow" in exc.message:
                        raise WalkFieldsRefused(f"{self.address.label} refused the listing parameter nofollow") \
                            from None
                    raise
                return RemoteListing(path, [], error)
            result = _collect(path, _frames(resp), filename)
            if result.skipped and not nofollow:
                raise AgentProtocolError(f"{self.address.label} skipped a listing asked to follow symlinks")
            self._finish(resp)
            return result
        except BaseException:
            self.close()
            raise

    def statvfs(self, path: bytes, filename: object) -> Union[dict[str, int], OSError]:
        """The sizes of the file system holding a remote path (``os.statvfs`` fields
        and ``total``/``free``/``available`` bytes), or the file-system error; transport
        errors raise."""
        return self._get_json(STATVFS_PATH + quote_path(path), dict[str, int], "statvfs", filename)

    def info(self) -> dict[str, Any]:
        """The agent's ``/_agent/v1/info``: ``agent``, ``version``, ``protocol``, ``features``,
        ``exports`` (the remote paths it serves); errors raise."""
        data = self._get_json(INFO_PATH, dict[str, Any], "info", None)
        if isinstance(data, OSError):
            raise data
        return data

    def _get_json(self, target: str, kind: Any, what: str, filename: object) -> Any:
        """A small JSON answer of type ``kind``, or the error an error answer carries."""
        try:
            resp = self._request("GET", target)
            if resp.status != 200:
                return self._error(resp, filename)
            data = msgspec.json.decode(resp.read(65536), type=kind)
            self._finish(resp)
            return data
        except msgspec.DecodeError as exc:
            self.close()
            raise AgentProtocolError(f"bad {what} answer: {exc}") from None
        except BaseException:
            self.close()
            raise

    def walk(self, req: WalkRequest, text: bool = False) -> Iterator[Union[Frame, Names, None]]:
        """Frames of a subtree walk as they arrive, their names checked (the caller
        checks which directories they are): ``names`` frames come as :class:`Names`
        (names as ``str`` when ``text``, else ``bytes``), and ``None`` after the frames
        of each block read. Raises :class:`SubtreeUnsupported` when the agent has no
        walk endpoint, :class:`WalkFieldsRefused` when it refuses the request's newer
        fields, :class:`AgentProtocolError` on an invalid answer."""
        try:
            resp = self._request("POST", WALK_PATH + "?format=msgpack", encode_walk_request(req))
            if resp.status in (404, 405):
                resp.read(65536)
                self.close()
                raise SubtreeUnsupported(f"{self.address.label} does not offer the subtree walk")
            if resp.status == 400 and (req.frontier_frames or req.nofollow or req.names_frames):
                resp.read(65536)
                self.close()
                raise WalkFieldsRefused(f"{self.address.label} refused the walk request's newer fields")
            if resp.status != 200:
                error = self._error(resp, None)
                raise AgentProtocolError(f"{self.address.label}: walk request failed: {error}")
            names_ok = req.names_frames and not req.stat
            ended = False  # whether the end frame came
            current = b""  # the directory being listed
            seen: Optional[set[Any]] = None  # its names so far
            bulk = False  # whether its entries came in names frames
            try:
                for frame in read_frame_blocks(_body_reader(resp)):
                    if isinstance(frame, NamesFrame):
                        if not names_ok or (seen is not None and not bulk):
                            raise ProtocolError("a names frame the request did not ask for")
                        names, seen = decode_names(frame, text, seen)
                        bulk = True
                        yield Names(names, frame.kinds, frame.targets)
                        continue
                    if isinstance(frame, EntriesFrame):
                        if bulk:
                            raise ProtocolError("entries and names frames in one directory")
                        if seen is None:
                            seen = set()
                        problem = check_names(frame.entries, seen)
                        if problem:
                            raise ProtocolError(problem)
                    elif isinstance(frame, DirFrame):
                        current, seen, bulk = frame.path, None, False
                    elif isinstance(frame, EndFrame):
                        ended = True
                    yield frame
            except ProtocolError as exc:
                raise AgentProtocolError(f"{exc} (listing of {current!r})") from None
            self._finish(resp)
        except GeneratorExit:
            # The caller stops at the end frame: what follows it is the end of the body,
            # read here so that the connection stays open for the next request.
            if ended and not resp.read(1):
                self._finish(resp)
            else:
                self.close()
            raise
        except BaseException:
            self.close()
            raise

    def _request(self, method: str, target: str, body: Optional[bytes] = None) -> http.client.HTTPResponse:
        """Send a request and read its status line and headers. A kept-alive connection the
        agent closed meanwhile (its keep-alive timeout, a restart) fails before any answer:
        the request, which changes nothing, is sent once more on a new connection, so that
        an idle connection is not taken for an agent that stopped answering."""
        reused = self._conn is not None and self._conn.sock is not None
        self.connect()
        assert self._conn is not None
        headers = self._headers
        if body is not None:
            headers = {**headers, "Content-Type": MSGPACK_TYPE}
        try:
            self._conn.request(method, target, body=body, headers=headers)
            resp = self._conn.getresponse()
        except ConnectionError:  # reset, closed without an answer (RemoteDisconnected), broken pipe
            if not reused:
                raise
            self.close()
            self.connect()
            assert self._conn is not None
            self._conn.request(method, target, body=body, headers=headers)
            resp = self._conn.getresponse()
        if resp.getheader(PROTOCOL_HEADER) is None:
            raise AgentProtocolError(f"{self.address.label} is not a diskover storage agent (HTTP {resp.status})")
        return resp

    def _finish(self, resp: http.client.HTTPResponse) -> None:
        if resp.will_close or not resp.isclosed():
            self.close()

    def _error(self, resp: http.client.HTTPResponse, filename: object) -> OSError:
        body = resp.read(65536)
        if resp.will_close or not resp.isclosed():
            self.close()
        err = decode_error(body)
        label = self.address.label
        if err is None:
            raise AgentHTTPError(label, resp.status, "http", resp.reason or "unexpected answer")
        if resp.status == 503:
            retry = resp.getheader("Retry-After")
            raise AgentBusyError(label, resp.status, err.error, err.message,
                                 float(retry) if retry and retry.isdigit() else None)
        if err.errno is not None and (resp.status in (403, 404, 500) or err.error == "bad_path"):
            return OSError(err.errno, err.message, filename)  # about the path: as the local call
        raise AgentHTTPError(label, resp.status, err.error, err.message)


class Names:
    """The entries of one ``names`` frame, checked: names (``str`` or ``bytes``) in
    agent order, one kind letter each, one target letter per symlink."""

    __slots__ = ("kinds", "names", "targets")

    def __init__(self, names: list[Any], kinds: str, targets: str) -> None:
        self.names = names
        self.kinds = kinds
        self.targets = targets


class SubtreeUnsupported(AgentError):
    """The agent only answers per-directory listings."""


class WalkFieldsRefused(AgentError):
    """The agent refused a walk request with ``names_frames``, ``frontier_frames`` or
    ``nofollow``, or a listing with ``nofollow`` (400): an agent older than these; ask
    it again with fewer of them."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (where compressing answers costs more than it saves)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _body_reader(resp: http.client.HTTPResponse) -> Callable[[int], bytes]:
    """``read1(n)`` over an answer's body (what is at hand, up to ``n`` bytes; ``b""`` at
    its end), inflating it when it came gzip-encoded."""
    encoding = (resp.getheader("Content-Encoding") or "identity").lower()
    if encoding == "identity":
        return resp.read1
    if encoding != "gzip":
        raise AgentProtocolError(f"unexpected Content-Encoding {encoding!r}")
    inflate = zlib.decompressobj(31)

    def read1(n: int) -> bytes:
        while not inflate.eof:
            if inflate.unconsumed_tail:
                out = inflate.decompress(inflate.unconsumed_tail, n)
            else:
                raw = resp.read1(65536)
                if not raw:
                    break
                out = inflate.decompress(raw, n)
            if out:
                return out
        return b""

    return read1


def _frames(resp: http.client.HTTPResponse) -> Iterator[Optional[Frame]]:
    """The frames of an answer, ``None`` after each block read; one that breaks the
    protocol raises :class:`AgentProtocolError`."""
    try:
        yield from read_frame_blocks(_body_reader(resp))
    except ProtocolError as exc:
        raise AgentProtocolError(str(exc)) from None


def _collect(path: bytes, frames: Iterator[Frame], filename: object) -> RemoteListing:
    """One listing's frames, checked: the directory asked for, valid names, no frontier."""
    entries: list[Entry] = []
    error: Optional[OSError] = None
    seen_dir = False
    skipped = False
    stat = None
    names: set[bytes] = set()
    for frame in frames:
        if isinstance(frame, EntriesFrame):
            if not seen_dir:
                raise AgentProtocolError("entries before the directory")
            problem = check_names(frame.entries, names)
            if problem:
                raise AgentProtocolError(f"{problem} (listing of {path!r})")
            entries.extend(frame.entries)
        elif isinstance(frame, DirFrame):
            if seen_dir:
                raise AgentProtocolError("several directories in a single listing")
            if frame.path != path:
                raise AgentProtocolError(f"asked for {path!r}, the agent listed {frame.path!r}")
            seen_dir = True
            stat = frame.stat
        elif isinstance(frame, ErrorFrame):
            error = OSError(frame.errno, frame.message, filename)
        elif isinstance(frame, SkipFrame):
            if seen_dir or skipped or frame.path != path:
                raise AgentProtocolError("a skip frame that does not answer the listing asked for")
            skipped = True
        elif isinstance(frame, EndFrame):
            if skipped and not frame.frontier:
                return RemoteListing(path, [], None, None, skipped=True)
            if not seen_dir:
                raise AgentProtocolError("listing without a directory")
            if frame.frontier:
                raise AgentProtocolError(f"a frontier in the listing of {path!r}")
            return RemoteListing(path, [] if error else entries, error, stat)
    raise AgentProtocolError("listing ended before its end frame")


def fsencode_path(path: object) -> bytes:
    """The bytes of a remote path given as str, bytes or path-like; must be absolute."""
    raw = os.fsencode(path)  # type: ignore[arg-type]
    if b"\0" in raw:
        raise ValueError("embedded null byte")  # as os.listdir says it
    if not raw.startswith(b"/"):
        raise ValueError(f"remote path must be absolute: {path!r}")
    return raw
