"""What the agent tells its operators: Prometheus metrics, access log lines, log format.

With worker processes, every process writes its metrics to files in the directory that
``PROMETHEUS_MULTIPROC_DIR`` names (prometheus_client's multiprocess mode, chosen when
prometheus_client is imported: the variable must be set before this module is imported),
and a scrape of any process renders the sum over all of them.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from diskover_wire.codec import json_encode

from .config import METRICS_DIR_ENV

#: Bytes of a metrics file's header: a file shorter than this is being created this instant.
_HEADER = 8


class SummedCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, passing over the files it cannot read
    at this instant: one a worker is creating (still empty), or one removed as its
    worker ended (the gauges of a dead worker), instead of failing the scrape."""

    def collect(self) -> Iterable[Any]:
        while True:
            files = []
            for name in glob.glob(os.path.join(self._path, "*.db")):
                try:
                    if os.path.getsize(name) >= _HEADER:
                        files.append(name)
                except OSError:
                    pass
            try:
                return self.merge(files, accumulate=True)
            except FileNotFoundError:  # removed meanwhile: list them again
                continue

access_log = logging.getLogger("diskover_storage_agent.access")

METRICS_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The agent's Prometheus metrics, in a registry of its own; summed over the worker
    processes when prometheus_client runs in multiprocess mode. Gauges are moved with
    ``inc``/``dec`` (multiprocess mode has no ``set_function``) and summed over the live
    processes."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: node_exporter style
        r = self.registry = CollectorRegistry()
        shared = os.environ.get(METRICS_DIR_ENV)
        if shared:
            self.scraped = CollectorRegistry()
            SummedCollector(self.scraped, path=shared)
        else:
            self.scraped = r
        self.requests = Counter("diskover_agent_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("diskover_agent_request_duration_seconds",
                                 "Seconds from request to the last byte of the answer, by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.entries = Counter("diskover_agent_entries", "Directory entries served", registry=r)
        self.directories = Counter("diskover_agent_directories", "Directories listed", registry=r)
        self.bytes_sent = Counter("diskover_agent_response_bytes", "Bytes of answer bodies sent", registry=r)
        self.errors = Counter("diskover_agent_errors", "Failed requests and directories, by error code",
                              ["error"], registry=r)
        self.connections = Gauge("diskover_agent_open_connections", "Client connections open", registry=r,
                                 multiprocess_mode="livesum")
        self.in_flight = Gauge("diskover_agent_requests_in_flight", "Listings and walks being answered",
                               registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge("diskover_agent_requests_waiting", "Requests waiting for a listing slot", registry=r,
                             multiprocess_mode="livesum")
        if shared:  # every metrics file made now, before this process takes any request
            for endpoint in ("listing", "walk"):
                self.latency.labels(endpoint)
        self.timed_out = Counter("diskover_agent_connections_timed_out",
                                 "Connections the agent closed because a client took too long, by phase",
                                 ["phase"], registry=r)

    def render(self) -> bytes:
        """The text a scrape gets: this process's metrics, or the sum over all worker processes."""
        return generate_latest(self.scraped)


class RequestRecord:
    """What one request did, filled in as it is answered; logged and counted at the end."""

    __slots__ = ("bytes", "directories", "endpoint", "entries", "error", "start")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.endpoint = "listing"
        self.entries = 0
        self.directories = 0
        self.bytes = 0
        self.error: Optional[str] = None

    def finish(self, metrics: Metrics, client: Optional[str], method: str, target: str, status: int) -> None:
        seconds = time.perf_counter() - self.start
        metrics.requests.labels(self.endpoint, str(status)).inc()
        if self.endpoint in ("listing", "walk"):
            metrics.latency.labels(self.endpoint).observe(seconds)
        metrics.entries.inc(self.entries)
        metrics.directories.inc(self.directories)
        metrics.bytes_sent.inc(self.bytes)
        if self.error is not None:
            metrics.errors.labels(self.error).inc()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                '%s "%s %s" %d entries=%d bytes=%d %.3fs', client or "-", method, target, status,
                self.entries, self.bytes, seconds,
                extra={"access": {"client": client, "method": method, "path": target, "status": status,
                                  "entries": self.entries, "directories": self.directories,
                                  "bytes": self.bytes, "seconds": round(seconds, 6)}},
            )


class JSONFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            out.update(access)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json_encode(out).decode()


def setup_logging(verbose: int, fmt: str) -> None:
    """Log to stderr: warnings and start/stop lines; ``-v`` adds access lines, ``-vv`` debug."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    access_log.setLevel(logging.INFO if verbose >= 1 else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
