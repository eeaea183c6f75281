"""What one connection may hold, and for how long: timeouts like nginx's, and a budget
for the request bodies being received.

aiohttp has no timeout for a client that sends a request slowly, nor for one that stops
reading its answer, so the agent's connections are :class:`GuardedConnection`: one
deadline for each phase of a request, the connection aborted when it passes.

- A new connection, or the first byte of a request on a kept-alive one, starts the
  header deadline (``header_timeout``): the whole header must arrive by then.
- A request with a body must send all of it within ``body_timeout`` of its header.
- Between requests, a connection may stay idle ``keepalive_timeout``.
- While the answer cannot be written (the client does not read and the buffers are
  full), the bytes waiting to go out must shrink every ``send_timeout``.

An aborted connection cancels what its request waits for (its body, a write), so the
request lets go of its listing slot and its descriptors, and its memory is freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

access_log = logging.getLogger("diskover_storage_agent.access")

#: Largest request body (a walk request), as aiohttp's default ``client_max_size``.
MAX_BODY = 2**20
#: aiohttp's own keep-alive timer is not used (the phases below do its job): far away.
_NEVER = 10.0 * 365 * 24 * 3600

_IDLE, _HEADER, _BODY, _ANSWER = "keepalive", "header", "body", "answer"


@dataclass(frozen=True)
class Timeouts:
    """Seconds a connection may spend in each phase (see the module's docstring)."""

    header: float
    body: float
    keepalive: float
    send: float


class BodyTooLarge(ValueError):
    """A request body above :data:`MAX_BODY` (413)."""


class BudgetFull(Exception):
    """The bodies being received already hold the agent's whole budget (503)."""


class BodyBudget:
    """Bytes of request bodies the agent holds in all, received or promised by a
    ``Content-Length``, until their requests are admitted or refused."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.total:
            raise BudgetFull
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


class Body:
    """One request's body, read within its share of the :class:`BodyBudget`; the share
    is held until :meth:`release`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    async def read(self, request: web.BaseRequest) -> bytes:
        """The whole body. Raises :class:`BodyTooLarge`, :class:`BudgetFull`, or what
        aiohttp raises for a broken body or a connection that went away."""
        length = request.content_length
        if length is not None:
            if length > MAX_BODY:
                raise BodyTooLarge
            self._take(length)  # refused before any byte is read
        data = bytearray()
        async for chunk in request.content.iter_any():
            if len(data) + len(chunk) > MAX_BODY:
                raise BodyTooLarge
            if length is None:  # chunked: counted as it comes
                self._take(len(chunk))
            data += chunk
        return bytes(data)

    def _take(self, size: int) -> None:
        self.budget.take(size)
        self.held += size

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


class GuardedConnection(RequestHandler):
    """aiohttp's connection handler with a deadline for each phase of a request."""

    __slots__ = ("_body", "_closed_by", "_phase", "_send_mark", "_send_timer", "_timeouts", "_timer")

    def __init__(self, manager: web.Server, *, timeouts: Timeouts, closed_by: Callable[[str], None],
                 **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=_NEVER, **kwargs)
        self._timeouts = timeouts
        self._closed_by = closed_by
        self._phase = _IDLE
        self._timer: Optional[asyncio.TimerHandle] = None
        self._send_timer: Optional[asyncio.TimerHandle] = None
        self._send_mark = 0
        self._body: Any = None

    # -- phases -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(_HEADER, self._timeouts.header)

    def data_received(self, data: bytes) -> None:
        if self._phase == _IDLE and data:
            self._arm(_HEADER, self._timeouts.header)
        super().data_received(data)

    def request_started(self, request: web.BaseRequest) -> None:
        """The request's header is in: its body, if any, is due within ``body``."""
        if request.content.is_eof():
            self._arm(_ANSWER, None)
        else:
            self._body = request.content
            self._arm(_BODY, self._timeouts.body)

    def request_finished(self) -> None:
        """The handler is done: the connection may now idle for ``keepalive``."""
        self._arm(_IDLE, self._timeouts.keepalive)

    def _arm(self, phase: str, seconds: Optional[float]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if phase != _BODY:
            self._body = None
        self._phase = phase
        if seconds is not None and self.transport is not None:
            self._timer = self._loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        if phase == _BODY and self._body is not None and self._body.is_eof():
            self._arm(_ANSWER, None)  # all in, though the handler has not read it all yet
            return
        seconds = {_HEADER: self._timeouts.header, _BODY: self._timeouts.body,
                   _IDLE: self._timeouts.keepalive}[phase]
        what = {_HEADER: "no complete request header", _BODY: "no complete request body",
                _IDLE: "no new request"}[phase]
        self._abort(phase, f"{what} within {seconds:g} s")

    # -- writing ------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_mark = self._buffered()
        self._send_timer = self._loop.call_later(self._timeouts.send, self._check_send)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _check_send(self) -> None:
        self._send_timer = None
        if not self._paused:
            return
        size = self._buffered()
        if size < self._send_mark:  # slow, but moving
            self._send_mark = size
            self._send_timer = self._loop.call_later(self._timeouts.send, self._check_send)
            return
        self._abort("send", f"the answer made no progress for {self._timeouts.send:g} s")

    def _buffered(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    # -- closing ------------------------------------------------------------------------

    def _abort(self, reason: str, why: str) -> None:
        transport = self.transport
        if transport is None:
            return
        self._closed_by(reason)
        access_log.info("closed the connection of %s: %s", _peer(transport), why)
        transport.abort()  # not close(): that would wait for the unread answer to drain

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        for timer in (self._timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = None
        self._body = None
        super().connection_lost(exc)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "a client"


class GuardedServer(web.Server):
    """aiohttp's low-level server, whose connections are :class:`GuardedConnection`;
    ``counted`` is told +1 and -1 as connections open and close."""

    def __init__(self, handler: Any, *, timeouts: Timeouts, closed_by: Callable[[str], None],
                 counted: Optional[Callable[[int], None]] = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._timeouts = timeouts
        self._closed_by = closed_by
        self._counted = counted or (lambda _n: None)
        self._open: set[RequestHandler] = set()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._open.add(handler)
        self._counted(1)

    def connection_lost(self, handler: RequestHandler, exc: Optional[BaseException] = None) -> None:
        if handler in self._open:
            self._open.discard(handler)
            self._counted(-1)
        super().connection_lost(handler, exc)

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self, loop=self._loop, timeouts=self._timeouts, closed_by=self._closed_by,
                                 **self._kwargs)


def connection_of(request: web.BaseRequest) -> Optional[GuardedConnection]:
    """The guarded connection a request came on (None outside :class:`GuardedServer`)."""
    proto = request.protocol
    return proto if isinstance(proto, GuardedConnection) else None
