"""Which agent to ask: busy and unreachable agents set aside and retried, shared by every thread."""

from __future__ import annotations

import threading
import time
from typing import Optional

from ..backoff import Backoff
from ..errors import AgentBusyError, AgentError
from ..transport import HostAddress
from .logs import logger, warn_logger


class AgentsUnavailableError(AgentError):
    """No agent answered for ``retry-for`` seconds: the crawl cannot be complete.

    Neither an ``OSError`` nor a ``RuntimeError``, which diskover would log and skip:
    diskover treats it as fatal, deletes the partial index and exits 1.
    """


class Hosts:
    """The agents' health, shared by every thread: an agent that answered 503 is set aside
    for its ``Retry-After``, one that did not answer for a backoff (0.2 s doubling to 5 s);
    a request goes to the first usable agent from its thread's own, and waits when none is.
    An answer from an agent makes it usable again at once (it has room now) and wakes one
    waiting thread."""

    def __init__(self, addresses: list[HostAddress], retry_for: float) -> None:
        self.addresses = addresses
        self.retry_for = retry_for
        self.cond = threading.Condition()
        self.backoff = Backoff(len(addresses))
        self.unreachable = [False] * len(addresses)
        self.last_ok = time.monotonic()
        self.last_error: Optional[str] = None
        self.closed = False
        self._gave_up = False

    def take(self, home: int, started: float) -> int:
        """The first usable agent from ``home``, waiting for one while some agent answered
        (or this request started) less than ``retry_for`` seconds ago; else
        :class:`AgentsUnavailableError`."""
        n = len(self.addresses)
        with self.cond:
            while True:
                if self.closed:
                    raise AgentsUnavailableError("the diskover agent scanner was closed")
                now = time.monotonic()
                down_until = self.backoff.down_until
                for i in range(n):
                    idx = (home + i) % n
                    if down_until[idx] <= now:
                        return idx
                left = max(started, self.last_ok) + self.retry_for - now
                if left <= 0:
                    raise self._unavailable()
                self.cond.wait(min(min(down_until) - now, left))

    def _unavailable(self) -> AgentsUnavailableError:
        hosts = ", ".join(a.label for a in self.addresses)
        message = (f"no diskover storage agent answered for {self.retry_for:g} s (hosts {hosts}); "
                   f"last error: {self.last_error}")
        if not self._gave_up:
            self._gave_up = True
            warn_logger.error("diskover agent scanner: %s; the crawl cannot be complete", message)
        return AgentsUnavailableError(message)

    def failed(self, idx: int, exc: BaseException) -> None:
        busy = isinstance(exc, AgentBusyError)
        label = self.addresses[idx].label
        with self.cond:
            now = time.monotonic()
            self.last_error = f"{label}: {exc}"
            if self.backoff.down_until[idx] > now:
                return  # set aside already, by a request that failed at the same time
            delay = self.backoff.set_aside(idx, now, exc.retry_after if busy else None)
            if not busy and not self.unreachable[idx]:
                self.unreachable[idx] = True
                warn_logger.warning("diskover agent scanner: %s does not answer (%s); other agents first, "
                                    "retrying while some agent answered in the last %g s", label, exc, self.retry_for)
            else:
                logger.debug("diskover agent scanner: %s set aside for %.1f s: %s", label, delay, exc)

    def succeeded(self, idx: int) -> None:
        with self.cond:
            self.backoff.reset(idx)
            self.backoff.down_until[idx] = 0.0  # it has room now: usable again at once
            self.last_ok = time.monotonic()
            if self.unreachable[idx]:
                self.unreachable[idx] = False
                logger.info("diskover agent scanner: %s answers again", self.addresses[idx].label)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
