"""Worker processes: the agent on every core of the node.

The parent binds the port, then forks ``--processes`` children, each running the whole
agent (:func:`~.server.serve`). How new connections reach them:

* On Linux, each child listens on sockets of its own bound to the same addresses with
  ``SO_REUSEPORT`` (as nginx's ``reuseport``), and the kernel spreads new connections over
  them by a hash of each connection's addresses. The parent's sockets, bound with
  ``SO_REUSEPORT`` but not listening, only hold the port (``-p 0``: the one the kernel
  chose) for the children and for those that replace them; they take no connection.
* Elsewhere (no ``SO_REUSEPORT``, or one that does not balance, as FreeBSD's), the parent's
  sockets listen and the children accept on the inherited ones: a pre-forked accept, as
  gunicorn's and uvicorn's ``--workers``, where the process that waited least takes most.

The parent forks before any thread or event loop exists in it, and then only supervises: it
logs the start-up lines once, when every child listens (so that a client that waits for the
``listening on`` line is never refused), replaces a child that dies, forwards SIGTERM and
SIGINT to the children and waits for them (each stops gracefully, as one agent does), and
removes the directory in which the children keep their metrics. Children die with the parent
(``PR_SET_PDEATHSIG`` on Linux; elsewhere they check ``getppid`` every second).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from .config import METRICS_DIR_ENV, AgentConfig

log = logging.getLogger("diskover_storage_agent")

_PR_SET_PDEATHSIG = 1
#: A child that dies sooner than this after its start is replaced only after this long,
#: so that one failing at start cannot make the parent fork without pause.
_RESPAWN_PAUSE = 1.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Runner = Callable[[Coroutine[Any, Any, None]], None]


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, where the system tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reuseport() -> bool:
    """Whether each worker process listens on its own sockets (``SO_REUSEPORT``, balanced
    by the kernel: Linux) rather than on the parent's."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind(config: AgentConfig, reserve: bool = False) -> list[socket.socket]:
    """Sockets for ``-l`` and ``-p``, as asyncio's ``create_server`` binds them: one for
    every address the host resolves to (IPv6 ones IPv6 only), ``SO_REUSEADDR``. Listening
    (backlog 1024); or, with ``reserve``, bound with ``SO_REUSEPORT`` and not listening:
    the port held for the workers' own sockets (:func:`listen_like`). Raises OSError (the
    address named) when an address cannot be bound, a port in use by a listening socket
    included, even one that shares with ``SO_REUSEPORT``."""
    infos = socket.getaddrinfo(config.listen or None, config.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, _kind, _proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            if reserve:
                if addr[1]:
                    # A bind without SO_REUSEPORT first, so that a port another agent (of the
                    # same user) listens on is an error, not silently shared with it. (For
                    # -p 0 the kernel never picks a port that others share by SO_REUSEPORT.)
                    _socket(family, addr, reuseport=False).close()
                sockets.append(_socket(family, addr, reuseport=True))
            else:
                sockets.append(_socket(family, addr, reuseport=False))
                sockets[-1].listen(1024)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen_like(reserved: list[socket.socket]) -> list[socket.socket]:
    """A worker's own listening sockets (backlog 1024), bound with ``SO_REUSEPORT`` to the
    addresses of the parent's ``reserved`` sockets."""
    sockets: list[socket.socket] = []
    try:
        for sock in reserved:
            sockets.append(_socket(sock.family, sock.getsockname(), reuseport=True))
            sockets[-1].listen(1024)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _socket(family: int, addr: Any, reuseport: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise OSError(exc.errno, f"error while attempting to bind on address {addr!r}: "
                                     f"{exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    """The parent of the worker processes (see the module's docstring)."""

    def __init__(self, config: AgentConfig, sockets: list[socket.socket], runner: Runner, own: bool) -> None:
        self.config = config
        self.sockets = sockets
        #: Whether each child listens on sockets of its own (``sockets`` only hold the port).
        self.own = own
        self.runner = runner
        self.count = config.process_count
        self.pid = os.getpid()
        self.stopping = False
        #: pid -> (index, start time) of the running children.
        self.children: dict[int, tuple[int, float]] = {}
        #: The read ends of the pipes on which the first children say that they listen.
        self.starting: list[int] = []
        self.announced = False

    def run(self, ready: Callable[[], None] = lambda: None) -> int:
        """Fork the children, call ``ready`` once each listens (or has died trying), and
        supervise them until they have all stopped: 0."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._stop)
        for index in range(self.count):
            self._spawn(index)
        while self.starting:  # a child writes a byte once it listens, or exits first
            fd = self.starting.pop(0)
            os.read(fd, 1)
            os.close(fd)
        self.announced = True
        if not self.stopping:
            ready()
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # pragma: no cover - every child is in self.children
                break
            if pid not in self.children:
                continue
            index, started = self.children.pop(pid)
            _forget(pid)
            if self.stopping:
                continue
            log.error("process %d of %d (pid %d) %s: starting another", index + 1, self.count, pid,
                      _how_it_ended(status))
            if time.monotonic() - started < _RESPAWN_PAUSE:
                time.sleep(_RESPAWN_PAUSE)
            if not self.stopping:
                self._spawn(index)
        log.info("stopped")
        return 0

    def _stop(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.pid:  # pragma: no cover - a child resets the handlers at once
            return
        if not self.stopping:
            self.stopping = True
            log.info("stopping: finishing answers in flight")
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _spawn(self, index: int) -> None:
        # A first child says on a pipe when it listens; one that replaces another, not.
        listening, listens = (None, None) if self.announced else os.pipe()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in self.starting:
                os.close(fd)
            if listening is not None:
                os.close(listening)
            self._child(index, listens)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.children[pid] = (index, time.monotonic())
        if listening is not None and listens is not None:
            os.close(listens)
            self.starting.append(listening)

    def _child(self, index: int, listens: int | None) -> NoReturn:
        code = 1
        try:
            signalled = _die_with_parent(self.pid)
            from .server import serve

            sockets = self.sockets
            if self.own:
                sockets = listen_like(self.sockets)
                for sock in self.sockets:
                    sock.close()  # the parent's: it keeps them
            if listens is not None:
                os.write(listens, b"1")  # the kernel queues new connections from now on
                os.close(listens)
            self.runner(serve(self.config.share(index), sockets=sockets,
                              worker=f"process {index + 1} of {self.count}",
                              parent=None if signalled else self.pid))
            code = 0
        except BaseException:
            log.exception("process %d of %d failed", index + 1, self.count)
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)  # not the parent's exit handlers: it still runs


def _die_with_parent(parent: int) -> bool:
    """Have the kernel send SIGTERM to this process when its parent dies (Linux), and exit
    now if it already has. False where the kernel cannot: the child then watches ``getppid``."""
    signalled = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            signalled = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):  # pragma: no cover - the getppid check stands in
            pass
    if os.getppid() != parent:
        os._exit(0)
    return signalled


def _forget(pid: int) -> None:
    """Drop the gauges of a child that ended from the summed metrics (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def run(config: AgentConfig, runner: Runner, setup_logging: Callable[[], None]) -> int:
    """Serve with ``config.process_count`` worker processes until SIGTERM or SIGINT: 0.
    Raises OSError when the sockets cannot be bound."""
    shared = tempfile.mkdtemp(prefix="diskover-agent-metrics-")
    os.environ[METRICS_DIR_ENV] = shared  # before prometheus_client is imported, in every process
    try:
        setup_logging()
        own = reuseport()
        sockets = bind(config, reserve=own)
        try:
            from .server import announce, listen_url

            tls = config.tls_cert is not None
            log.info("%d worker processes, -c %d in all (%s each)", config.process_count, config.maxconnections,
                     ", ".join(str(config.share(i).maxconnections) for i in range(config.process_count)))
            urls = [listen_url(sock.getsockname(), tls) for sock in sockets]
            return Supervisor(config, sockets, runner, own).run(lambda: announce(config, urls))
        finally:
            for sock in sockets:
                sock.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
