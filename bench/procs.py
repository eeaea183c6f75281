"""The processes a benchmark run starts: agents on loopback (and delay proxies), stopped by PID."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from cpu import tree_pids

import delayproxy

REMOTE = "/mnt/isilon"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def proc_io_bytes(pid: int) -> int:
    """Bytes a process has written with write()/send() so far (``wchar``)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Agent:
    """A ``diskover-storage-agent`` process on loopback exporting ``local`` as REMOTE."""

    def __init__(self, local: str, timeout: float = 30.0, options: tuple[str, ...] = ()) -> None:
        cmd = [sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, local,
               *options]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self.log: list[str] = []
        self.port = 0
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.log.append(line)
                del self.log[:-200]
                if " listening on " in line and not ready.is_set():
                    url = line.rsplit(" listening on ", 1)[1].split()[0]
                    self.port = int(url.rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, name=f"agent-log-{self.proc.pid}", daemon=True)
        self._pump.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("agent did not start:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def hostspec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; worker processes that outlive the agent (each
        should stop with it) are named in a warning and killed by PID."""
        workers = tree_pids(self.proc.pid)[1:] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 5
        left = [p for p in workers if _running(p)]
        while left and time.monotonic() < deadline:  # the workers' own graceful stop, bounded
            time.sleep(0.05)
            left = [p for p in left if _running(p)]
        if left:
            log(f"WARNING: agent {self.proc.pid}'s worker processes {left} outlived it: killing them")
            for p in left:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
        self._pump.join(5)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2] not in "ZX"


def agent_accepts(option: str) -> bool:
    """Whether the agent's command line has ``option`` (per its ``--help``)."""
    out = subprocess.run([sys.executable, "-m", "diskover_storage_agent", "--help"], capture_output=True, text=True,
                         timeout=60)
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", out.stdout) is not None


class Procs:
    """Every process this run started, stopped by PID at the end."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def agent(self, local: str, options: tuple[str, ...] = ()) -> Agent:
        a = Agent(local, options=options)
        self.items.append(a)
        return a

    def proxy(self, target_port: Optional[int], rtt_ms: float, rate_mbit: Optional[float] = None):
        p = delayproxy.run_in_process(
            "127.0.0.1", 0, "echo" if target_port is None else "127.0.0.1", target_port, rtt_ms, rate_mbit=rate_mbit
        )
        self.items.append(p)
        return p

    def stop(self, item: Any) -> None:
        item.stop()
        with contextlib.suppress(ValueError):
            self.items.remove(item)

    def stop_all(self) -> None:
        while self.items:
            item = self.items.pop()
            with contextlib.suppress(Exception):
                item.stop()
