"""User-space TCP proxy that adds network round-trip latency (no ``tc netem`` needed).

Every chunk read from one side is time-stamped on arrival and written to the
other side ``rtt/2`` later (one-way delay).  Each direction is a FIFO drained
by a timer, so there is no per-chunk sleep: a steady stream keeps its
throughput and only gains latency.  A new connection is accepted at once, but
its data is held back as if the TCP handshake had taken place over the
emulated link: the client's first bytes reach the server ``1.5 * rtt`` after
the client connected (handshake round trip + one-way delay), and the server's
first bytes reach the client no earlier than ``2 * rtt`` after it connected.
EOF (half-close) travels in order behind the data; when one side's socket
dies or is fully closed the other side is closed once the data in flight has
been delivered.

Optionally (``rate_mbit`` / ``--rate-mbit``) each direction is also a link of
limited bandwidth, shared by all the proxy's connections like one network
link: a token bucket (``burst_bytes`` deep, 16 KiB by default) refilled at
``rate_mbit`` Mbit/s.  A chunk leaves the link once the bucket has paid for
it (big chunks are cut into 8 KiB slices that leave one after another), then
arrives ``rtt/2`` later, so a transfer runs at the link rate and a small
message on an idle link only gains the delay.  Unset, nothing is limited.

Timers use a Linux ``timerfd`` (through ``ctypes`` before Python 3.13), so
sub-millisecond delays are honoured; the event loop's own timers only have
millisecond resolution.  Elsewhere the proxy falls back to ``loop.call_later``.

Ways to run it:

* in a separate process (preferred for benchmarks: its CPU does not compete
  for the client's GIL)::

      python bench/delayproxy.py --listen 127.0.0.1:0 --target 127.0.0.1:9999 --rtt-ms 1
      python bench/delayproxy.py --target 127.0.0.1:9999 --rtt-ms 1 --rate-mbit 100

  prints ``listening 127.0.0.1:PORT`` and serves until SIGTERM/SIGINT.  From
  Python: ``with run_in_process("127.0.0.1", 0, "127.0.0.1", 9999, 1.0) as p:``
  then connect to ``p.port``.
* in a thread of the current process: ``run_in_thread(...)`` (same arguments).
* inside a running event loop: ``async with DelayProxy(...) as proxy:``.

``--target echo`` (or ``target_port=None``) makes the proxy front an
internal echo server; ``measure_proxy_rtt(rtt_ms)`` uses that to report the
round trip really obtained, and ``measure_throughput(host, port)`` the
bandwidth of such a proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import heapq
import itertools
import json
import math
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    uvloop = None

__all__ = [
    "DelayProxy",
    "EchoServer",
    "ProxyProcess",
    "ServiceThread",
    "measure_first_request",
    "measure_proxy_rtt",
    "measure_rtt",
    "measure_throughput",
    "new_event_loop",
    "run_echo_server_in_thread",
    "run_in_process",
    "run_in_thread",
]

WRITE_BUFFER_HIGH = 1 << 20  # transport write-buffer high-water mark
DEFAULT_MAX_BUFFER = 8 << 20  # bytes "in flight" per direction before reading pauses
DEFAULT_BURST = 16 << 10  # token-bucket depth of a rate-limited link, in bytes
_SLICE = 8 << 10  # a rate-limited link sends big chunks in slices of this many bytes
_EARLY = 20e-6  # chunks due within this many seconds are sent in the same batch


class _Marker:
    """A non-data item in a direction's queue."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_EOF = _Marker("EOF")  # the source half-closed: shut down writing to the destination
_CLOSE = _Marker("CLOSE")  # the source went away: close the destination
_RESET = _Marker("RESET")  # the source was reset: reset the destination

_monotonic = time.monotonic


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a new uvloop loop when uvloop is installed, else an asyncio one."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Abort ``transport`` so that the peer sees a TCP reset, not a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[V6HOST]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


# --------------------------------------------------------------------------
# Precise timers
# --------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd armed with absolute ``time.monotonic()`` values."""

    _TFD_TIMER_ABSTIME = 1
    _CLOCK_MONOTONIC = 1

    def __init__(self) -> None:
        if time.get_clock_info("monotonic").implementation != "clock_gettime(CLOCK_MONOTONIC)":
            raise OSError("time.monotonic() is not CLOCK_MONOTONIC")
        if hasattr(os, "timerfd_create"):  # Python 3.13+
            self.fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)
            self._libc = None
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.timerfd_create.restype = ctypes.c_int
            libc.timerfd_settime.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(_Itimerspec),
                ctypes.c_void_p,
            ]
            libc.timerfd_settime.restype = ctypes.c_int
            flags = os.O_NONBLOCK | os.O_CLOEXEC  # == TFD_NONBLOCK | TFD_CLOEXEC
            fd = libc.timerfd_create(self._CLOCK_MONOTONIC, flags)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            self.fd = fd
            self._libc = libc
            self._spec = _Itimerspec()
            self._spec_ref = ctypes.byref(self._spec)

    def arm(self, due: float) -> None:
        ns = max(1, int(due * 1e9))  # 0 would disarm
        if self._libc is None:
            os.timerfd_settime_ns(self.fd, flags=os.TFD_TIMER_ABSTIME, initial=ns)
            return
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, self._TFD_TIMER_ABSTIME, self._spec_ref, None):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def consume(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class _Scheduler:
    """Run callbacks at ``time.monotonic()`` deadlines with sub-millisecond precision.

    Waking up from epoll takes some tens of microseconds, so the timer is
    armed ``lead`` seconds early, ``lead`` tracking the observed wake-up
    latency (an exponential moving average capped at ``max_lead``); every
    callback whose deadline is within ``lead`` is then run.  On average the
    callbacks run on time instead of consistently late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_lead: float = 0.0) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._armed = math.inf  # absolute time the timer is armed for
        self._running = False
        self._handle: asyncio.TimerHandle | None = None
        self._timerfd: _TimerFd | None = None
        self.max_lead = max_lead
        self.lead = 0.0
        if sys.platform.startswith("linux"):
            try:
                self._timerfd = _TimerFd()
            except (OSError, AttributeError):
                self._timerfd = None
        if self._timerfd is not None:
            loop.add_reader(self._timerfd.fd, self._fire)

    @property
    def precise(self) -> bool:
        return self._timerfd is not None

    def call_at(self, due: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), callback))
        if due - self.lead < self._armed and not self._running:
            self._arm(due - self.lead)

    def _arm(self, when: float) -> None:
        self._armed = when
        if self._timerfd is not None:
            self._timerfd.arm(when)
        else:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_later(max(0.0, when - _monotonic()), self._fire)

    def _fire(self) -> None:
        if self._timerfd is not None:
            self._timerfd.consume()
        now = _monotonic()
        if self.max_lead > 0.0 and self._armed != math.inf:
            late = min(max(now - self._armed, 0.0), 4 * self.max_lead)
            self.lead = min(self.lead + 0.05 * (late - self.lead), self.max_lead)
        self._handle = None
        self._armed = math.inf
        heap = self._heap
        self._running = True
        try:
            limit = now + self.lead + _EARLY
            while heap and heap[0][0] <= limit:
                callback = heapq.heappop(heap)[2]
                try:
                    callback()
                except Exception as exc:  # keep the timer alive whatever happens
                    self._loop.call_exception_handler({"message": "delayproxy timer callback failed", "exception": exc})
        finally:
            self._running = False
        if heap:
            self._arm(heap[0][0] - self.lead)

    def close(self) -> None:
        self._heap.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._timerfd is not None:
            self._loop.remove_reader(self._timerfd.fd)
            self._timerfd.close()
            self._timerfd = None


# --------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------


class _Link:
    """One direction of an emulated link of limited bandwidth: a token bucket.

    Written as virtual time (GCRA): ``free_at`` is when the link will have
    sent everything accepted so far; the bucket lets a sender be at most
    ``burst`` bytes ahead of the rate.  Shared by every connection of a proxy,
    so concurrent transfers share the bandwidth.
    """

    __slots__ = ("burst_time", "bytes", "free_at", "rate")

    def __init__(self, rate_mbit: float, burst_bytes: int) -> None:
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")
        self.rate = rate_mbit * 1e6 / 8  # bytes per second
        self.burst_time = max(0, burst_bytes) / self.rate
        self.free_at = 0.0
        self.bytes = 0

    def depart(self, size: int, now: float) -> float:
        """Reserve the link for ``size`` bytes offered at ``now``; when they have left."""
        start = self.free_at
        earliest = now - self.burst_time  # a full bucket: up to ``burst`` bytes go at once
        if start < earliest:
            start = earliest
        self.free_at = start + size / self.rate
        self.bytes += size
        return self.free_at if self.free_at > now else now


# --------------------------------------------------------------------------
# Proxied connections
# --------------------------------------------------------------------------


class _Endpoint(asyncio.Protocol):
    """One socket of a proxied connection (the client's or the upstream one)."""

    __slots__ = ("conn", "in_pipe", "lost", "out_pipe", "transport")

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.out_pipe: _Pipe  # data read from this socket
        self.in_pipe: _Pipe  # data written to this socket
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
        _set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.conn.endpoint_made(self)

    def data_received(self, data: bytes) -> None:
        self.out_pipe.push(data)

    def eof_received(self) -> bool:
        self.out_pipe.push_marker(_EOF)
        return True  # stay half-open: the other direction may still carry data

    def pause_writing(self) -> None:
        self.in_pipe.set_dst_paused(True)

    def resume_writing(self) -> None:
        self.in_pipe.set_dst_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.endpoint_lost(self, exc)


class _Pipe:
    """One direction of a connection: a FIFO of (due time, chunk or marker)."""

    __slots__ = (
        "bytes",
        "closed",
        "delay",
        "dst",
        "dst_paused",
        "eof_done",
        "immediate",
        "link",
        "max_buffer",
        "not_before",
        "queue",
        "queued",
        "ready",
        "scheduled",
        "scheduler",
        "src",
        "src_paused",
    )

    def __init__(
        self,
        src: _Endpoint,
        dst: _Endpoint,
        scheduler: _Scheduler,
        delay: float,
        not_before: float,
        max_buffer: int,
        link: _Link | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.scheduler = scheduler
        self.delay = delay
        self.not_before = not_before
        self.link = link
        self.immediate = delay <= 0.0 and not_before <= 0.0 and link is None
        self.max_buffer = max_buffer
        self.queue: collections.deque[tuple[float, Any]] = collections.deque()  # data or marker
        self.queued = 0  # payload bytes in the queue
        self.bytes = 0  # payload bytes accepted so far
        self.ready = False  # the destination socket is connected
        self.scheduled = False
        self.src_paused = False
        self.dst_paused = False
        self.closed = False  # nothing more can be delivered
        self.eof_done = False

    def push(self, data: bytes) -> None:
        """Accept a chunk read from the source."""
        if self.closed:
            return
        size = len(data)
        self.bytes += size
        queue = self.queue
        if self.immediate and self.ready and not queue:
            self.dst.transport.write(data)  # type: ignore[union-attr]
            return
        self.queued += size
        if self.queued >= self.max_buffer:
            self._pause_src()
        if self.link is not None:
            self._enqueue_limited(data)
        else:
            self._enqueue(data)

    def push_marker(self, marker: _Marker) -> None:
        """Queue _EOF (the source half-closed), _CLOSE or _RESET (the source is gone)."""
        if not self.closed:
            self._enqueue(marker)

    def _enqueue(self, item: object) -> None:
        now = _monotonic()
        due = (now if now > self.not_before else self.not_before) + self.delay
        queue = self.queue
        queue.append((due, item))
        if self.ready and not self.scheduled:
            self.scheduled = True
            self.scheduler.call_at(queue[0][0], self.flush)

    def _enqueue_limited(self, data: bytes) -> None:
        """Queue ``data`` behind the link: each slice arrives once sent, plus the delay."""
        now = _monotonic()
        offered = now if now > self.not_before else self.not_before
        link, delay, queue = self.link, self.delay, self.queue
        assert link is not None
        size = len(data)
        if size <= _SLICE:
            queue.append((link.depart(size, offered) + delay, data))
        else:
            view = memoryview(data)
            for start in range(0, size, _SLICE):
                piece = bytes(view[start : start + _SLICE])
                queue.append((link.depart(len(piece), offered) + delay, piece))
        if self.ready and not self.scheduled:
            self.scheduled = True
            self.scheduler.call_at(queue[0][0], self.flush)

    def set_ready(self) -> None:
        self.ready = True
        if self.queue and not self.scheduled and not self.closed:
            self.scheduled = True
            self.scheduler.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Deliver everything that is due (called by the scheduler)."""
        self.scheduled = False
        if self.closed:
            return
        queue = self.queue
        limit = _monotonic() + self.scheduler.lead + _EARLY
        chunks: list[bytes] = []
        while queue and queue[0][0] <= limit:
            item = queue.popleft()[1]
            if item.__class__ is not _Marker:
                chunks.append(item)
                continue
            self._write(chunks)
            chunks = []
            self._deliver_marker(item)
            if self.closed:
                return
        self._write(chunks)
        if queue:
            self.scheduled = True
            self.scheduler.call_at(queue[0][0], self.flush)
        if self.src_paused and not self.dst_paused and self.queued < self.max_buffer // 2:
            self._resume_src()

    def _write(self, chunks: list[bytes]) -> None:
        if not chunks:
            return
        transport = self.dst.transport
        assert transport is not None
        if len(chunks) == 1:
            self.queued -= len(chunks[0])
            transport.write(chunks[0])
        else:
            self.queued -= sum(map(len, chunks))
            transport.writelines(chunks)

    def _deliver_marker(self, marker: _Marker) -> None:
        transport = self.dst.transport
        assert transport is not None
        if marker is _EOF:
            self.eof_done = True
            try:
                if transport.can_write_eof():
                    transport.write_eof()
            except OSError:
                transport.abort()
            self.src.conn.eof_delivered()
        else:
            self.abandon()
            if marker is _RESET:
                _reset(transport)
            else:
                transport.close()

    def abandon(self) -> None:
        """Drop whatever is queued; nothing more will be delivered."""
        self.closed = True
        self.queue.clear()
        self.queued = 0

    def set_dst_paused(self, paused: bool) -> None:
        self.dst_paused = paused
        if paused:
            self._pause_src()
        elif self.src_paused and self.queued < self.max_buffer // 2:
            self._resume_src()

    def _pause_src(self) -> None:
        transport = self.src.transport
        if not self.src_paused and transport is not None and not self.src.lost:
            self.src_paused = True
            transport.pause_reading()

    def _resume_src(self) -> None:
        transport = self.src.transport
        self.src_paused = False
        if transport is not None and not self.src.lost:
            transport.resume_reading()


class _Conn:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.accepted = _monotonic()
        rtt = proxy.rtt
        handshake = proxy.handshake and rtt > 0.0
        self.client = _Endpoint(self)
        self.upstream = _Endpoint(self)
        sched, limit = proxy._scheduler, proxy.max_buffer
        up_link, down_link = proxy._links
        assert sched is not None
        # Client data leaves after the emulated handshake (one RTT after the
        # connect) and arrives one-way later; server data can only start once
        # the server has accepted (1.5 RTT after the connect).
        self.c2u = _Pipe(
            self.client,
            self.upstream,
            sched,
            rtt / 2,
            self.accepted + rtt if handshake else 0.0,
            limit,
            up_link,
        )
        self.u2c = _Pipe(
            self.upstream,
            self.client,
            sched,
            rtt / 2,
            self.accepted + 1.5 * rtt if handshake else 0.0,
            limit,
            down_link,
        )
        self.client.out_pipe = self.upstream.in_pipe = self.c2u
        self.client.in_pipe = self.upstream.out_pipe = self.u2c
        self.connect_task: asyncio.Future[Any] | None = None
        self.upstream_failed = False
        self.finished = False

    def endpoint_made(self, endpoint: _Endpoint) -> None:
        endpoint.in_pipe.set_ready()
        if endpoint is self.client:
            self.proxy._conns.add(self)
            self.proxy.stats["connections"] += 1
            loop = self.proxy._loop
            assert loop is not None
            host, port = self.proxy._upstream_address()
            self.connect_task = loop.create_task(loop.create_connection(lambda: self.upstream, host, port))
            self.connect_task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Future[Any]) -> None:
        self.connect_task = None
        if task.cancelled():
            self.upstream_failed = True
        elif task.exception() is not None:
            self.upstream_failed = True
            self.proxy.stats["upstream_failures"] += 1
            # The client would have seen its connect fail after one round trip.
            if self.proxy._scheduler is not None:
                due = self.accepted + self.proxy.rtt
                self.proxy._scheduler.call_at(due, self._abort_client)
        else:
            return
        self.c2u.abandon()
        self._maybe_finished()

    def _abort_client(self) -> None:
        if not self.client.lost and self.client.transport is not None:
            _reset(self.client.transport)

    def eof_delivered(self) -> None:
        if self.c2u.eof_done and self.u2c.eof_done:
            for endpoint in (self.client, self.upstream):
                if endpoint.transport is not None and not endpoint.lost:
                    endpoint.transport.close()

    def endpoint_lost(self, endpoint: _Endpoint, exc: Exception | None) -> None:
        endpoint.in_pipe.abandon()  # nothing can be written to it any more
        # Close (or reset) the other side once the data in flight has arrived.
        endpoint.out_pipe.push_marker(_CLOSE if exc is None else _RESET)
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        upstream_done = self.upstream.lost or (self.upstream_failed and self.connect_task is None)
        if self.client.lost and upstream_done and not self.finished:
            self.finished = True
            stats = self.proxy.stats
            stats["bytes_client_to_server"] += self.c2u.bytes
            stats["bytes_server_to_client"] += self.u2c.bytes
            self.proxy._conns.discard(self)

    def abort(self) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
        for endpoint in (self.client, self.upstream):
            endpoint.in_pipe.abandon()
            endpoint.out_pipe.abandon()
            if endpoint.transport is not None and not endpoint.lost:
                endpoint.transport.abort()


class _EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echoed data has been flushed


class EchoServer:
    """Minimal asyncio TCP echo server (``async with EchoServer() as echo: echo.port``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._server: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(_EchoProtocol, self.host, self._port, backlog=1024, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> EchoServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class DelayProxy:
    """TCP proxy adding ``rtt_ms`` of round-trip latency (``rtt_ms / 2`` each way).

    ``target_port=None`` (or ``target_host="echo"``) proxies to an internal
    echo server, which is handy for measuring the latency obtained.
    ``handshake=False`` disables the emulated connection set-up delay.
    ``max_buffer`` bounds the bytes held per direction before reading from
    the sender pauses (the emulated link's window).  ``rate_mbit`` limits
    each direction to that bandwidth, shared by all connections (a token
    bucket ``burst_bytes`` deep); None (the default) leaves it unlimited.
    """

    def __init__(
        self,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        target_host: str = "127.0.0.1",
        target_port: int | None = None,
        rtt_ms: float = 0.0,
        *,
        handshake: bool = True,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        rate_mbit: float | None = None,
        burst_bytes: int = DEFAULT_BURST,
    ) -> None:
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")
        self.rate_mbit = rate_mbit
        self.burst_bytes = burst_bytes
        # (client to server, server to client) links, or no limit.
        self._links: tuple[_Link | None, _Link | None] = (
            (_Link(rate_mbit, burst_bytes), _Link(rate_mbit, burst_bytes)) if rate_mbit else (None, None)
        )
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.echo = target_port is None or target_host == "echo"
        self.target_host = "127.0.0.1" if self.echo else target_host
        self.target_port = target_port
        self.rtt_ms = float(rtt_ms)
        self.rtt = self.rtt_ms / 1000.0
        self.handshake = handshake
        self.max_buffer = max(64 * 1024, max_buffer)
        self.stats = {
            "connections": 0,
            "upstream_failures": 0,
            "bytes_client_to_server": 0,
            "bytes_server_to_client": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: _Scheduler | None = None
        self._server: asyncio.AbstractServer | None = None
        self._echo: EchoServer | None = None
        self._conns: set[_Conn] = set()

    @property
    def port(self) -> int:
        """The port actually listened on."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def precise_timers(self) -> bool:
        """True when sub-millisecond delays are honoured (timerfd available)."""
        return self._scheduler is not None and self._scheduler.precise

    def _upstream_address(self) -> tuple[str, int]:
        if self.echo:
            assert self._echo is not None
            return "127.0.0.1", self._echo.port
        assert self.target_port is not None
        return self.target_host, self.target_port

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._loop = asyncio.get_running_loop()
        # Never deliver more than a fifth of the one-way delay early.
        self._scheduler = _Scheduler(self._loop, max_lead=min(200e-6, self.rtt / 10))
        try:
            if self.echo:
                self._echo = EchoServer("127.0.0.1", 0)
                await self._echo.start()
            self._server = await self._loop.create_server(
                self._new_connection,
                self.listen_host,
                self.listen_port,
                backlog=1024,
                reuse_address=True,
            )
        except BaseException:
            await self.stop()
            raise

    def _new_connection(self) -> _Endpoint:
        return _Conn(self).client

    async def stop(self) -> None:
        """Stop listening and abort every proxied connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        # connection_lost() callbacks run on the next loop iterations.
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.001)
        self._conns.clear()
        if self._echo is not None:
            await self._echo.stop()
            self._echo = None
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------
# Running a service in a thread or in a process
# --------------------------------------------------------------------------


class ServiceThread:
    """Handle on a DelayProxy or EchoServer running in its own event-loop thread."""

    def __init__(self, service: DelayProxy | EchoServer, name: str = "delayproxy") -> None:
        self.service = service
        self.host = service.host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout: float = 10.0) -> ServiceThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("service thread did not start")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() when it happens early
            if not self._started.is_set():
                self._error = exc
        finally:
            self._started.set()
            asyncio.set_event_loop(None)
            loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        await self.service.start()
        try:
            self.port = self.service.port
            self._started.set()
            await self._stop_event.wait()
        finally:
            await self.service.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the service and join its thread (idempotent)."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(event.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServiceThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(
    listen_host: str,
    listen_port: int,
    target_host: str,
    target_port: int | None,
    rtt_ms: float,
    **options: Any,
) -> ServiceThread:
    """Start a DelayProxy in a daemon thread; returns a handle with ``.port`` and ``.stop()``.

    ``options`` are passed to DelayProxy (``handshake``, ``max_buffer``,
    ``rate_mbit``, ``burst_bytes``).
    The proxy shares the GIL with the caller; see run_in_process().
    """
    proxy = DelayProxy(listen_host, listen_port, target_host, target_port, rtt_ms, **options)
    return ServiceThread(proxy).start()


def run_echo_server_in_thread(host: str = "127.0.0.1", port: int = 0) -> ServiceThread:
    """Start an echo server in a daemon thread; returns a handle with ``.port`` and ``.stop()``."""
    return ServiceThread(EchoServer(host, port), name="echo-server").start()


class ProxyProcess:
    """Handle on a proxy running as ``python delayproxy.py`` in a child process."""

    def __init__(self, args: list[str], timeout: float = 15.0) -> None:
        self.args = args
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdout is not None
        try:
            line = self._read_line(timeout)
            if not line.startswith("listening "):
                raise RuntimeError(f"unexpected output from delay proxy: {line!r}")
            self.host, self.port = _parse_address(line.split(None, 1)[1])
        except BaseException:
            self.stop()
            raise

    def _read_line(self, timeout: float) -> str:
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = _monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise TimeoutError("delay proxy did not report its port in time")
            ready, _, _ = select.select([stdout], [], [], remaining)
            if ready:
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"delay proxy exited early (status {self.proc.wait()}): {buf!r}")
                buf += chunk
        return buf.decode().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the proxy and wait for it (idempotent); returns its exit status."""
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_process(
    listen_host: str,
    listen_port: int,
    target_host: str,
    target_port: int | None,
    rtt_ms: float,
    *,
    handshake: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    rate_mbit: float | None = None,
    burst_bytes: int = DEFAULT_BURST,
    python: str = sys.executable,
) -> ProxyProcess:
    """Start the proxy as a child process; returns a handle with ``.port`` and ``.stop()``.

    The child exits on ``.stop()`` (SIGTERM) and also when this process dies
    (it watches its stdin pipe).
    """
    target = "echo" if target_port is None else _format_address(target_host, target_port)
    args = [
        python,
        os.path.abspath(__file__),
        "--listen",
        _format_address(listen_host, listen_port),
        "--target",
        target,
        "--rtt-ms",
        repr(float(rtt_ms)),
        "--max-buffer",
        str(max_buffer),
        "--exit-on-stdin-eof",
    ]
    if not handshake:
        args.append("--no-handshake")
    if rate_mbit is not None:
        args += ["--rate-mbit", repr(float(rate_mbit)), "--burst-bytes", str(burst_bytes)]
    return ProxyProcess(args)


# --------------------------------------------------------------------------
# Measuring latency
# --------------------------------------------------------------------------


def _roundtrip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    remaining = len(payload)
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError("echo connection closed")
        remaining -= len(chunk)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure_rtt(
    host: str,
    port: int,
    samples: int = 50,
    *,
    payload: bytes = b"ping-pong-ping-p",
    timeout: float = 10.0,
) -> float:
    """Median round trip in ms of small request/response exchanges with an echo service.

    ``host:port`` must echo what it receives (e.g. a DelayProxy with
    ``--target echo``, or one fronting run_echo_server_in_thread()).  One
    warm-up exchange absorbs the emulated handshake; every sample uses the
    same connection.
    """
    with _connect(host, port, timeout) as sock:
        _roundtrip(sock, payload)
        times = []
        for _ in range(max(1, samples)):
            start = time.perf_counter()
            _roundtrip(sock, payload)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_first_request(
    host: str,
    port: int,
    samples: int = 10,
    *,
    payload: bytes = b"hello",
    timeout: float = 10.0,
) -> float:
    """Median ms from ``connect()`` to the first echoed reply on a fresh connection.

    Through a DelayProxy this is about two RTTs: the emulated handshake plus
    the request's own round trip.
    """
    times = []
    for _ in range(max(1, samples)):
        start = time.perf_counter()
        with _connect(host, port, timeout) as sock:
            _roundtrip(sock, payload)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_proxy_rtt(
    rtt_ms: float,
    samples: int = 50,
    *,
    in_process: bool = False,
    handshake: bool = True,
    rate_mbit: float | None = None,
) -> float:
    """Start a proxy in echo mode with ``rtt_ms`` and return measure_rtt() through it.

    By default the proxy runs as a child process, like in a benchmark;
    ``in_process=True`` uses a thread instead.
    """
    starter = run_in_thread if in_process else run_in_process
    with starter("127.0.0.1", 0, "echo", None, rtt_ms, handshake=handshake, rate_mbit=rate_mbit) as proxy:
        return measure_rtt("127.0.0.1", proxy.port, samples)


def measure_throughput(host: str, port: int, nbytes: int = 4 << 20, *, timeout: float = 60.0) -> float:
    """Mbit/s of ``nbytes`` sent through an echo service and read back, both at once.

    Through a rate-limited DelayProxy in front of an echo target this is the
    link rate (each direction carries ``nbytes``), less the round trip.
    """
    block = b"x" * 65536
    with _connect(host, port, timeout) as sock:
        _roundtrip(sock, b"warm")
        error: list[BaseException] = []

        def send() -> None:
            try:
                left = nbytes
                while left > 0:
                    n = min(left, len(block))
                    sock.sendall(block[:n])
                    left -= n
            except BaseException as exc:  # reported by the reader
                error.append(exc)

        start = time.perf_counter()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = 0
        while received < nbytes:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"echo connection closed after {received} bytes")
            received += len(chunk)
        elapsed = time.perf_counter() - start
        sender.join(timeout)
        if error:
            raise error[0]
    return nbytes * 8 / elapsed / 1e6


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> dict:
    listen_host, listen_port = _parse_address(args.listen)
    if args.target == "echo":
        target_host, target_port = "echo", None
    else:
        target_host, target_port = _parse_address(args.target)
    proxy = DelayProxy(
        listen_host,
        listen_port,
        target_host,
        target_port,
        args.rtt_ms,
        handshake=not args.no_handshake,
        max_buffer=args.max_buffer,
        rate_mbit=args.rate_mbit,
        burst_bytes=args.burst_bytes,
    )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    if args.exit_on_stdin_eof:

        def on_stdin() -> None:
            try:
                data = os.read(0, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                done.set()

        loop.add_reader(0, on_stdin)
    await proxy.start()
    try:
        if not proxy.precise_timers and proxy.rtt > 0:
            print("delayproxy: no timerfd, delays have ~1 ms granularity", file=sys.stderr)
        print(f"listening {_format_address(listen_host, proxy.port)}", flush=True)
        await done.wait()
    finally:
        await proxy.stop()
    return proxy.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP proxy adding round-trip latency (rtt/2 each way).")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to, or 'echo' for an internal echo")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    parser.add_argument("--no-handshake", action="store_true", help="do not delay connection set-up")
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=DEFAULT_MAX_BUFFER,
        help="bytes in flight per direction before reading pauses (default %(default)s)",
    )
    parser.add_argument(
        "--rate-mbit",
        type=float,
        default=None,
        help="limit each direction to this bandwidth, shared by all connections (default: unlimited)",
    )
    parser.add_argument(
        "--burst-bytes",
        type=int,
        default=DEFAULT_BURST,
        help="token-bucket depth of the bandwidth limit (default %(default)s)",
    )
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="also exit when stdin is closed")
    parser.add_argument("--stats", action="store_true", help="print statistics to stderr at exit")
    parser.add_argument("--no-uvloop", action="store_true", help="use the asyncio event loop")
    args = parser.parse_args(argv)

    loop = asyncio.new_event_loop() if args.no_uvloop else new_event_loop()
    try:
        stats = loop.run_until_complete(_serve(args))
    finally:
        loop.close()
    if args.stats:
        print(f"delayproxy stats {json.dumps(stats)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
