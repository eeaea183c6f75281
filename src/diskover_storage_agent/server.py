"""The HTTP side of the agent: aiohttp handlers, the thread pool, start and stop.

Every file-system call runs in the agent's own thread pool (``-c`` threads), never on
the event loop, and at most ``-c`` listings are served at once: more wait in line.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from diskover_wire.codec import CODEC, json_encode
from diskover_wire.protocol import (
    ERROR_TYPE,
    FORMATS,
    MSGPACK_TYPE,
    NDJSON_TYPE,
    PROTOCOL_HEADER,
    TEXT_TYPE,
    VERSION,
    ErrorBody,
    WalkRequest,
    encode_error,
    encode_frame,
    errno_name,
    unquote_path,
)

from . import __version__
from .admission import Hold, Slots
from .config import AgentConfig, tls_context
from .exports import CONTROL_PREFIX, MAX_PATH, BadPath, ExportTable, IsSymlink, OutsideExport, split_path
from .filters import MAX_PATTERNS, Filter
from .limits import Body, BodyBudget, BodyTooLarge, BudgetFull, GuardedServer, connection_of
from .listing import GzipReader, Listing, Reader, TextListing, accepts_gzip
from .observability import METRICS_TYPE, Metrics, RequestRecord, access_log
from .readloop import READ_LOOP
from .subtree import SubtreeWalk, decode_request, validate

log = logging.getLogger("diskover_storage_agent")
T = TypeVar("T")

_CONTENT_TYPES = {"text": TEXT_TYPE, "msgpack": MSGPACK_TYPE, "ndjson": NDJSON_TYPE}
_NOT_FOUND = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
_FORBIDDEN = {errno.EACCES, errno.EPERM}
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_MAX_QUERY_FIELDS = 2 * MAX_PATTERNS + 8
_HEADERS = {PROTOCOL_HEADER: str(VERSION)}
#: Longest request line: a listing of a MAX_PATH path, every byte percent-encoded, and its query.
MAX_LINE = 4 * MAX_PATH


class BadRequest(ValueError):
    """A request the agent cannot make sense of (400)."""


def error_response(
    status: int, code: str, message: str, *, num: Optional[int] = None, path: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
) -> web.Response:
    """A small JSON error answer; never a traceback."""
    body = ErrorBody(
        error=code, message=message, errno=num,
        path=path.decode("utf-8", "backslashreplace") if path is not None else None,
    )
    resp = web.Response(
        status=status, body=encode_error(body), content_type=ERROR_TYPE,
        headers={PROTOCOL_HEADER: str(VERSION), **(headers or {})},
    )
    resp["error"] = code  # for the metrics
    return resp


def os_error_response(exc: OSError, path: bytes) -> web.Response:
    num = exc.errno or errno.EIO
    if isinstance(exc, OutsideExport):
        return error_response(403, "not_exported", exc.strerror, num=num, path=path)
    status = 404 if num in _NOT_FOUND else 403 if num in _FORBIDDEN else 500
    return error_response(status, errno_name(num), exc.strerror or os.strerror(num), num=num, path=path)


def skip_response(fmt: str, path: bytes) -> web.Response:
    """A listing asked with ``nofollow`` of a path that is a symlink now: not listed, not an error."""
    body = encode_frame(("skip", path), fmt) + encode_frame(("end", []), fmt)
    return web.Response(body=body, headers={**_HEADERS, "Content-Type": _CONTENT_TYPES[fmt]})


def parse_target(raw: str) -> tuple[bytes, dict[str, list[str]]]:
    """The remote path (bytes) and query parameters of a request target.

    Values are text in which bytes that are not UTF-8 are surrogate-escaped, so that
    ``value.encode("utf-8", "surrogateescape")`` gives back the exact bytes sent.
    """
    target, _, query = raw.partition("?")
    path = unquote_path(target)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS, errors="surrogateescape")
    except ValueError as exc:
        raise BadRequest(f"bad query string: {exc}") from None
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return path, out


def single(params: dict[str, list[str]], key: str, default: str) -> str:
    """The one value of a query parameter that may not repeat."""
    values = params.pop(key, None)
    if values is None:
        return default
    if len(values) > 1:
        raise BadRequest(f"query parameter {key!r} given twice")
    return values[0]


def flag(params: dict[str, list[str]], key: str) -> bool:
    value = single(params, key, "0").lower()
    if value not in _BOOL:
        raise BadRequest(f"{key} must be 0 or 1")
    return _BOOL[value]


def no_more(params: dict[str, list[str]]) -> None:
    if params:
        raise BadRequest(f"unknown query parameter {sorted(params)[0]!r}")


class ListingRequest:
    """What one listing request asks for, validated."""

    __slots__ = ("exclusions", "fmt", "nofollow", "parts", "path", "want_stat")

    def __init__(self, path: bytes, parts: tuple[bytes, ...], params: dict[str, list[str]]) -> None:
        self.path = path
        self.parts = parts
        self.fmt = single(params, "format", "text")
        if self.fmt not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}")
        self.want_stat = flag(params, "stat")
        if self.want_stat and self.fmt == "text":
            raise BadRequest("stat needs format=msgpack or format=ndjson")
        dirs = [v.encode("utf-8", "surrogateescape") for v in params.pop("exclude_dir", [])]
        files = [v.encode("utf-8", "surrogateescape") for v in params.pop("exclude_file", [])]
        one_fs = flag(params, "one_fs")
        problem = Filter.check(dirs) or Filter.check(files)
        if problem:
            raise BadRequest(problem)
        #: Compiled into a Filter in the thread pool (:func:`_open_lister`), not on the loop.
        self.exclusions = (dirs, files, one_fs)
        if (dirs or files or one_fs) and self.fmt == "text":
            raise BadRequest("exclusions need format=msgpack or format=ndjson")
        #: The path was found by a walk: a symlink in its last component is not followed.
        self.nofollow = flag(params, "nofollow")
        if self.nofollow and self.fmt == "text":
            raise BadRequest("nofollow needs format=msgpack or format=ndjson")
        no_more(params)


def busy_response() -> web.Response:
    return error_response(503, "busy", "the agent is at its limit; retry later", headers={"Retry-After": "1"})


#: The agent's own endpoints (below ``/_agent/``), by their path there: the ``endpoint``
#: label of their requests' metrics.
_CONTROL_ENDPOINTS = {(b"health",): "health", (b"v1", b"walk"): "walk", (b"v1", b"info"): "info",
                      (b"metrics",): "metrics"}


def endpoint_of(parts: tuple[bytes, ...]) -> str:
    """What a request path asks for (its metrics' ``endpoint`` label): ``listing`` for an
    exported path, else the agent endpoint below ``/_agent/``, or ``unknown``."""
    if parts[:1] != (CONTROL_PREFIX,):
        return "listing"
    if parts[1:3] == (b"v1", b"statvfs"):
        return "statvfs"
    return _CONTROL_ENDPOINTS.get(parts[1:], "unknown")


def unauthorized_response(given: bool) -> web.Response:
    challenge = 'Bearer realm="diskover-storage-agent"' + (', error="invalid_token"' if given else "")
    return error_response(401, "unauthorized", "a valid bearer token is required",
                          headers={"WWW-Authenticate": challenge})


class Agent:
    """The state of one running agent: exports, thread pool, listing slots."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.exports = ExportTable(config.exports)
        self.pool = ThreadPoolExecutor(max_workers=config.maxconnections, thread_name_prefix="diskover-fs")
        self._token = config.token.encode("ascii") if config.token else None
        self._slots: Optional[Slots] = None
        self.metrics = Metrics()
        self.bodies = BodyBudget(config.body_memory)

    @property
    def slots(self) -> Slots:
        if self._slots is None:  # made on first use, inside the running loop
            c = self.config
            self._slots = Slots(c.maxconnections, c.max_queue or 0, c.max_wait, self.metrics.waiting.inc)
        return self._slots

    def authorized(self, request: web.BaseRequest) -> Optional[web.Response]:
        """None when the request may proceed, else the 401 answer. The header is
        compared as the bytes sent, in constant time: any other bytes are a 401."""
        if self._token is None:
            return None
        values = [v for k, v in request.raw_headers if k.lower() == b"authorization"]
        ok = False
        if len(values) == 1:
            scheme, _, given = values[0].partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(b" \t"), self._token)
        return None if ok else unauthorized_response(bool(values))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking file-system call in the agent's pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        record = request["record"] = RequestRecord()
        status = 500
        conn = connection_of(request)
        if conn is not None:
            conn.request_started(request)
        try:
            resp = await self._handle(request)
            status = resp.status
            record.error = resp.get("error")
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        except ConnectionError as exc:
            status = 499
            access_log.info("client went away during %s %s: %s", request.method, request.raw_path, exc)
            raise asyncio.CancelledError from exc  # aiohttp closes the connection without a traceback
        except Exception:  # a bug: log it here, answer without details
            log.exception("internal error on %s %r", request.method, request.raw_path)
            record.error = "internal"
            return error_response(500, "internal", "internal error, see the agent's log")
        finally:
            record.finish(self.metrics, request.remote, request.method, request.raw_path, status)
            if conn is not None:
                conn.request_finished()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        record: RequestRecord = request["record"]
        if request.version < (1, 0):
            return error_response(400, "bad_request", "HTTP/1.0 or newer is required", headers={"Connection": "close"})
        if request.body_exists and request.method != "POST":
            # Only a walk request has a body: no other may make the agent hold one.
            return error_response(400, "bad_request", f"a {request.method} request takes no body",
                                  headers={"Connection": "close"})
        try:
            path, params = parse_target(request.raw_path)
        except BadRequest as exc:
            return self.authorized(request) or error_response(400, "bad_request", str(exc))
        try:
            parts = split_path(path)
        except BadPath as exc:  # about the path: the client raises the OSError ``errno`` names
            return self.authorized(request) or error_response(400, "bad_path", str(exc), num=exc.errno, path=path)
        record.endpoint = endpoint_of(parts)  # before the token check: a 401 counts as what it asked for
        if record.endpoint == "health":
            return self._health(request)
        denied = self.authorized(request)
        if denied is not None:
            return denied
        if parts[:1] == (CONTROL_PREFIX,):
            return await self._control(request, parts[1:], params)
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed(request, "GET, HEAD")
        try:
            req = ListingRequest(path, parts, params)
        except BadRequest as exc:
            return error_response(400, "bad_request", str(exc))
        if len(path) > MAX_PATH:
            return os_error_response(OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), path)
        found = self.exports.lookup(parts)
        if found is None:
            return error_response(
                403, "not_exported", "Not inside an export of this agent", num=errno.EACCES, path=path
            )
        hold = Hold(self.slots)
        if not await hold.admit():
            return busy_response()
        try:
            if request.method == "HEAD":
                try:
                    await self.run(_probe, self.exports, found, path, not req.nofollow)
                except IsSymlink:
                    return skip_response(req.fmt, path)
                except OSError as exc:
                    return os_error_response(exc, path)
                return web.Response(headers={**_HEADERS, "Content-Type": _CONTENT_TYPES[req.fmt]})
            make = functools.partial(_open_lister, self.exports, found, req)
            return await self._stream(request, make, req.fmt, path, hold)
        finally:
            hold.release()

    async def _control(
        self, request: web.BaseRequest, parts: tuple[bytes, ...], params: dict[str, list[str]]
    ) -> web.StreamResponse:
        """The agent's own endpoints, under ``/_agent/``: never an exported path."""
        endpoint = request["record"].endpoint
        if endpoint == "walk":
            if request.method != "POST":
                return _method_not_allowed(request, "POST")
            return await self._walk(request, params)
        if endpoint == "statvfs":
            if request.method not in ("GET", "HEAD"):
                return _method_not_allowed(request, "GET, HEAD")
            return await self._statvfs(b"/" + b"/".join(parts[2:]))
        if endpoint in ("info", "metrics"):
            if request.method not in ("GET", "HEAD"):
                return _method_not_allowed(request, "GET, HEAD")
            if endpoint == "metrics":
                return web.Response(body=self.metrics.render(), headers={**_HEADERS, "Content-Type": METRICS_TYPE})
            return web.Response(body=encode_info(self.config), content_type=ERROR_TYPE, headers=_HEADERS)
        return error_response(404, "unknown_endpoint", "no such agent endpoint")

    async def _statvfs(self, path: bytes) -> web.Response:
        """``GET /_agent/v1/statvfs/<remote path>``: the file system's sizes, for capacity reports."""
        found = self.exports.lookup(split_path(path))
        if found is None:
            return error_response(
                403, "not_exported", "Not inside an export of this agent", num=errno.EACCES, path=path
            )
        try:
            st = await self.run(_statvfs, self.exports, found[0], found[1], path)
        except OSError as exc:
            return os_error_response(exc, path)
        return web.Response(body=json_encode(st), content_type=ERROR_TYPE, headers=_HEADERS)

    def _health(self, request: web.BaseRequest) -> web.Response:
        """Liveness for load balancers and service managers: no token needed, nothing revealed."""
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed(request, "GET, HEAD")
        return web.Response(body=b'{"status":"ok"}', content_type=ERROR_TYPE, headers=_HEADERS)

    async def _walk(self, request: web.BaseRequest, params: dict[str, list[str]]) -> web.StreamResponse:
        is_json = request.content_type.startswith("application/json")
        try:
            fmt = single(params, "format", "ndjson" if is_json else "msgpack")
            no_more(params)
        except BadRequest as exc:
            return error_response(400, "bad_request", str(exc))
        if fmt not in ("msgpack", "ndjson"):
            return error_response(400, "bad_request", "format must be msgpack or ndjson")
        body = Body(self.bodies)
        try:  # the body counts against the agent's budget until the walk has a slot
            try:
                data = await body.read(request)
            except BodyTooLarge:
                return error_response(413, "too_large", "walk request body too large", headers={"Connection": "close"})
            except BudgetFull:
                return error_response(503, "busy", "the agent holds as many request bodies as it may; retry later",
                                      headers={"Retry-After": "1", "Connection": "close"})
            except (HttpProcessingError, RequestPayloadError, ValueError, OSError) as exc:
                if isinstance(exc, ConnectionError):
                    raise
                return error_response(400, "bad_request", f"unreadable request body: {exc}",
                                      headers={"Connection": "close"})
            # Decoding and checking a body of at most 1 MiB takes about a millisecond: on the
            # loop, so that a pool whose threads all wait for a hung file system cannot keep
            # a walk from its 503. (Compiling patterns costs more: in the pool, in the slot.)
            req = _decode_walk(data, request.content_type)
            del data
            if isinstance(req, str):
                return error_response(400, "bad_request", req)
            hold = Hold(self.slots)
            admitted = await hold.admit()
        finally:
            body.release()
        if not admitted:
            return busy_response()
        try:
            # Compiling the exclusions (SubtreeWalk's Filter) is CPU work too: in the pool, in the slot.
            make = functools.partial(SubtreeWalk, self.exports, req, fmt)
            return await self._stream(request, make, fmt, None, hold)
        finally:
            hold.release()

    async def _stream(
        self, request: web.BaseRequest, make: Callable[[], Reader], fmt: str, path: Optional[bytes], hold: Hold,
    ) -> web.StreamResponse:
        """Send what the reader that ``make`` opens produces: in one piece when it fits one
        chunk, else streamed. The reader is made and its first chunk read in one call to the
        pool. The slot is held only while a chunk is read: a hung directory holds its own
        thread and slot, and every other answer goes on."""
        guard = threading.Lock()
        gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))

        def start() -> tuple[Reader, bytes]:
            reader = make()
            if gzip:
                reader = GzipReader(reader)
            try:
                with guard:
                    return reader, reader.read()
            except BaseException:
                reader.close()
                raise

        record: RequestRecord = request["record"]
        reader: Optional[Reader] = None
        self.metrics.in_flight.inc()
        try:
            try:
                reader, chunk = await self.submit(start)
            except IsSymlink:
                return skip_response(fmt, path or b"")
            except OSError as exc:
                return os_error_response(exc, path or b"")
            finally:
                hold.release()
            headers = {**_HEADERS, "Content-Type": _CONTENT_TYPES[fmt], **reader.headers}
            record.bytes += len(chunk)
            if reader.done:
                return web.Response(body=chunk, headers=headers)
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            await resp.write(chunk)
            while not reader.done:
                await hold.take()
                try:
                    chunk = await self.submit(functools.partial(_locked, guard, reader.read))
                except OSError as exc:
                    chunk = reader.error_chunk(exc)
                    if chunk is None:
                        # Plain text cannot say so in-band: cut the answer short.
                        log.warning("listing of %r failed midway: %s", path, exc)
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                finally:
                    hold.release()
                record.bytes += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            self.metrics.in_flight.dec()
            if reader is not None:
                record.entries, record.directories = reader.entries, reader.directories
                if reader.done:  # nothing left open, no read under way: closed here
                    reader.close()
                else:  # never block the loop on a close, nor race a read still running in the pool
                    self.pool.submit(_locked, guard, reader.close)

    async def submit(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the pool. Cancelled while it runs, a reader it returns (alone or
        first in a tuple) is closed when it ends, in the pool: nothing it opened is left."""
        done = self.pool.submit(fn)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            done.add_done_callback(_close_abandoned)
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _decode_walk(body: bytes, content_type: str) -> WalkRequest | str:
    """The walk request in ``body``, or why it is unacceptable."""
    try:
        req = decode_request(body, content_type)
    except ValueError as exc:
        return str(exc)
    return validate(req) or req


def _method_not_allowed(request: web.BaseRequest, allow: str) -> web.Response:
    return error_response(405, "method_not_allowed", f"{request.method} is not allowed", headers={"Allow": allow})


def encode_info(config: AgentConfig) -> bytes:
    return json_encode({
        "agent": "diskover-storage-agent", "version": __version__, "protocol": VERSION,
        "features": ["listing", "walk", "stat", "gzip"],
        "exports": [os.fsdecode(e.remote) for e in config.exports],
    })


def _probe(exports: ExportTable, found: tuple[Any, tuple[bytes, ...]], path: bytes, follow: bool) -> None:
    """Open the directory a HEAD request names and close it: raises what a listing would."""
    os.close(exports.open_found(found[0], found[1], path, follow))


def _open_lister(exports: ExportTable, found: tuple[Any, tuple[bytes, ...]], req: ListingRequest) -> Reader:
    """The reader of a listing: opens the directory (raises ``OSError``, or ``IsSymlink``)."""
    fd = exports.open_found(found[0], found[1], req.path, not req.nofollow)
    try:
        if req.fmt == "text":
            return TextListing(fd, req.path)

        def inside(name: bytes) -> Optional[os.stat_result]:
            return exports.stat_inside(req.path.rstrip(b"/") + b"/" + name)

        return Listing(fd, req.path, req.fmt, req.want_stat, Filter.of(*req.exclusions), inside)
    except BaseException:
        os.close(fd)
        raise


def _close_abandoned(done: Any) -> None:
    """Close the reader a pool call made for a request that went away meanwhile."""
    if done.cancelled() or done.exception() is not None:
        return
    reader = done.result()
    if isinstance(reader, tuple):  # (reader, first chunk)
        reader = reader[0]
    if hasattr(reader, "close"):
        reader.close()


def _statvfs(exports: ExportTable, export: Any, rel: tuple[bytes, ...], path: bytes) -> dict[str, int]:
    fd = exports.open_beneath(export, rel, path)
    try:
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    fields = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
              "f_flag", "f_namemax")
    out = {f: getattr(st, f) for f in fields}
    out.update(total=st.f_frsize * st.f_blocks, free=st.f_frsize * st.f_bfree, available=st.f_frsize * st.f_bavail)
    return out


def _locked(lock: threading.Lock, fn: Callable[[], T]) -> T:
    with lock:
        return fn()


class ProtocolLog(logging.LoggerAdapter):
    """aiohttp's own log: a malformed request, or a client that went away, is one line
    (at -v), never a traceback; anything else is logged in full."""

    def _quiet(self, msg: object, args: tuple, exc_info: Any) -> bool:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            what = f"rejected a malformed request: {getattr(exc, 'message', None) or exc}"
        elif isinstance(exc, ConnectionError):
            what = f"client went away: {exc}"
        else:
            return False
        text = str(msg) % args if args else str(msg)
        access_log.info("%s (%s)", what, text)
        return True

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if not self._quiet(msg, args, exc_info):
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if exc_info and self._quiet(msg, args, exc_info):
            return
        self.logger.debug(msg, *args, exc_info=exc_info, **kwargs)


def listen_url(sockname: Any, tls: bool) -> str:
    """The URL of a listening address (as ``getsockname()`` gives it)."""
    host, port = sockname[0], sockname[1]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def announce(config: AgentConfig, urls: list[str]) -> None:
    """The start-up lines: exports, the ``listening on`` line (which tests and the benchmark
    read), limits, warnings. Logged once, by the one process or by the parent of several."""
    for export in config.exports:
        log.info("exporting %s as %s", os.fsdecode(export.local), os.fsdecode(export.remote))
    log.info("diskover-storage-agent %s listening on %s", __version__, " ".join(urls))
    log.info("limits: header-timeout %g s, body-timeout %g s, keepalive-timeout %g s, send-timeout %g s, "
             "body-memory %g MiB", config.header_timeout, config.body_timeout, config.keepalive_timeout,
             config.send_timeout, config.body_memory / 2**20)
    if config.token is None:
        log.warning("no --token-file: any client that can reach %s can list the exports", " ".join(urls))
    if config.tls_cert is None:
        log.warning("no --tls-cert: listings%s travel unencrypted", " and the token" if config.token else "")


async def serve(
    config: AgentConfig, ready: Optional[Callable[[list[str]], None]] = None, *,
    sockets: Optional[list[Any]] = None, worker: Optional[str] = None, parent: Optional[int] = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight answers finish and return.

    Alone, the agent binds ``config.listen`` and logs its start-up lines. As one of several
    worker processes (``worker`` names it in the log), it serves on the ``sockets`` its
    parent bound and announced, and also stops when that parent (PID ``parent``) is gone.
    """
    agent = Agent(config)
    # aiohttp's low-level server: no router, so that any path (newlines, invalid
    # UTF-8...) reaches the handler as the raw bytes the client sent.
    server = GuardedServer(agent.handle, access_log=None, logger=ProtocolLog(log, {}), timeouts=config.timeouts,
                           closed_by=lambda phase: agent.metrics.timed_out.labels(phase).inc(),
                           counted=agent.metrics.connections.inc, max_line_size=MAX_LINE)
    runner = web.ServerRunner(server, shutdown_timeout=config.shutdown_timeout)
    ssl_context = tls_context(config)
    await runner.setup()
    try:
        sites: list[web.BaseSite]
        if sockets is None:
            sites = [web.TCPSite(runner, config.listen, config.port, reuse_address=True, backlog=1024,
                                 ssl_context=ssl_context)]
        else:
            sites = [web.SockSite(runner, sock, ssl_context=ssl_context) for sock in sockets]
        for site in sites:
            await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        urls = [listen_url(addr, ssl_context is not None) for addr in runner.addresses]
        where = f"{type(loop).__module__}.{type(loop).__qualname__}"
        if worker is None:
            log.info("event loop: %s", where)
            log.info("read loop: %s", READ_LOOP)
            log.info("codec: %s", CODEC)
            announce(config, urls)
        else:
            log.info("%s (pid %d, -c %d): read loop: %s", worker, os.getpid(), config.maxconnections, READ_LOOP)
            log.info("%s (pid %d, -c %d): event loop: %s", worker, os.getpid(), config.maxconnections, where)
            log.info("%s (pid %d, -c %d): codec: %s", worker, os.getpid(), config.maxconnections, CODEC)
        orphaned = None if parent is None else asyncio.ensure_future(_orphaned(parent, stop))
        if ready is not None:
            ready(urls)
        await stop.wait()
        if orphaned is not None:
            orphaned.cancel()
        if worker is None:
            log.info("stopping: finishing answers in flight")
    finally:
        await _cleanup(runner, server, config.shutdown_timeout)
        agent.close()
    if worker is None:
        log.info("stopped")


async def _orphaned(parent: int, stop: asyncio.Event) -> None:
    """Stop once the parent process is gone (where the kernel does not signal it)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the parent process %d is gone: stopping", parent)
    stop.set()


async def _cleanup(runner: web.ServerRunner, server: web.Server, grace: float) -> None:
    """Stop listening and let answers in flight finish, for ``grace`` seconds at most: then
    cut the connections still answering (a client that stopped reading) and return."""
    cleanup = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=grace)
    if not done:
        # aiohttp would wait ``grace`` once more for a handler stuck on a client that reads
        # nothing; cutting the connection ends it at once.
        connections = list(server.connections)
        log.warning("cutting %d connections still answering after %g s", len(connections), grace)
        for conn in connections:
            if conn.transport is not None:
                conn.transport.abort()
    await cleanup
