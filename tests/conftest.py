"""Shared fixtures: real agent processes on loopback and real temporary trees."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

#: Run a command without the capabilities that let root read everything, so that
#: unreadable directories are unreadable to the agent and to the reference os.walk.
NOCAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
HAVE_SETPRIV = shutil.which("setpriv") is not None
#: Why a test that must read as root without its DAC capabilities is skipped.
NO_SETPRIV = "needs setpriv (apt-get install util-linux) to drop root's read-everything capabilities"
#: Why a test of the compiled read loop is skipped (tests/test_read_loop.py fails in CI instead).
NOT_BUILT = "the compiled read loop was not built: needs gcc and python3-dev at install time, then pip install -e ."
IS_ROOT = os.geteuid() == 0
REMOTE = "/mnt/isilon"


class Agent:
    """A running ``diskover-storage-agent`` process: one process serving (``--processes 1``,
    as the agent was before it had worker processes) unless the test asks for more
    (``processes``; None: the agent's default, one per CPU). ``command``: how to run it
    (default: this Python, ``-m diskover_storage_agent``), e.g. a bare Python and the ``.pyz``."""

    def __init__(self, exports: list[tuple[str, str]], *, listen: str = "127.0.0.1", nocaps: bool = False,
                 extra: tuple[str, ...] = (), timeout: float = 20.0, processes: int | None = 1,
                 command: list[str] | None = None) -> None:
        cmd = [*(command or [sys.executable, "-m", "diskover_storage_agent"]), "-l", listen, "-p", "0"]
        if processes is not None:
            cmd += ["--processes", str(processes)]
        for remote, local in exports:
            cmd += ["-r", remote, local]
        cmd += list(extra)
        if nocaps and IS_ROOT:
            cmd = NOCAPS + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.log: list[str] = []
        ready = threading.Event()
        self.url = ""

        def pump() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.log.append(line)
                found = re.search(r" listening on (https?://[^\s\"]+)", line)
                if found and not ready.is_set():
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("agent did not start:\n" + "".join(self.log))
        hostport = self.url.split("://", 1)[1]
        self.hostspec = hostport
        self.port = int(hostport.rsplit(":", 1)[1])
        self.host = hostport.rsplit(":", 1)[0].strip("[]")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._pump.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        try:
            self.terminate(10)
        except subprocess.TimeoutExpired:
            self.kill()


def agent_starter() -> Iterator:
    """A function that starts agents; every one started is stopped (by its PID) at the end."""
    started: list[Agent] = []

    def start(exports: list[tuple[str, str]], **kwargs) -> Agent:
        agent = Agent(exports, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


start_agent = pytest.fixture(agent_starter, name="start_agent")

#: The agent reads directories in pure Python when this is set (see readloop.py).
PURE_ENV = "DISKOVER_AGENT_PURE"
READ_LOOPS = ("compiled", "pure")


def compiled_read_loop_built() -> bool:
    """Whether the install built the agent's optional compiled read loop (a C compiler was found)."""
    return importlib.util.find_spec("diskover_storage_agent._readdir") is not None


@pytest.fixture(params=READ_LOOPS)
def read_loop(request, monkeypatch) -> str:
    """Agents the test starts use this read loop (the environment they inherit says which);
    check it with :func:`assert_read_loop`. ``compiled`` is skipped where it was not built
    (tests/test_read_loop.py fails in CI then)."""
    if request.param == "compiled":
        if not compiled_read_loop_built():
            pytest.skip(NOT_BUILT)
        monkeypatch.delenv(PURE_ENV, raising=False)
    else:
        monkeypatch.setenv(PURE_ENV, "1")
    return request.param


def assert_read_loop(agent: Agent, read_loop: str) -> None:
    """The agent says at start which read loop and codec it uses: those the test asked for
    (the pure read loop comes with the pure-Python codec, the compiled one with msgspec)."""
    said = [line for line in agent.log if " read loop: " in line]
    assert len(said) == 1, agent.log
    assert said[0].rstrip().endswith("read loop: " + {"compiled": "compiled", "pure": "pure Python"}[read_loop])
    codec = [line for line in agent.log if " codec: " in line]
    assert len(codec) == 1, agent.log
    assert codec[0].rstrip().endswith("codec: " + {"compiled": "msgspec", "pure": "msgpack (pure Python)"}[read_loop])


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def http_get(port: int, target: str, *, method: str = "GET", headers: dict | None = None,
             body: bytes | None = None, context=None, timeout: float = 10.0):
    """One request on a new connection to 127.0.0.1:``port`` (HTTPS with an ``ssl``
    ``context``): ``(status, headers, body)``."""
    import http.client

    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class FrontServer:
    """A small HTTP server of the test's own (aiohttp, in a thread) that stands in front
    of a real agent: subclasses answer in ``handle``, or ``forward`` to the agent."""

    def __init__(self, upstream_port: int) -> None:
        import asyncio

        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.hostspec = f"127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        self.runner = web.ServerRunner(web.Server(self.handle))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def handle(self, request):  # pragma: no cover - subclasses answer
        raise NotImplementedError

    async def forward(self, request, body: bytes = b""):
        """The agent's answer to the same request."""
        import http.client

        from aiohttp import web

        def call() -> tuple[int, dict, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
            try:
                headers = {k: v for k, v in request.headers.items()
                           if k.lower() in ("content-type", "accept", "accept-encoding", "authorization")}
                conn.request(request.method, request.raw_path, body=body or None, headers=headers)
                resp = conn.getresponse()
                keep = {k: v for k, v in resp.getheaders()
                        if k.lower() in ("content-type", "content-encoding", "x-diskover-agent-protocol",
                                         "retry-after")}
                return resp.status, keep, resp.read()
            finally:
                conn.close()

        status, headers, data = await self.loop.run_in_executor(None, call)
        return web.Response(status=status, body=data, headers=headers)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- trees -----------------------------------------------------------------------------

#: Owners the tree builders give their entries in turn: two uids and two gids, all four
#: different, so that a stat field swapped or taken from the wrong place cannot pass.
OWNERS = ((1234, 5678), (2345, 6789))
_ATIME0 = 1_500_000_000_123_456_789
_MTIME0 = 1_550_000_000_987_654_321


def vary_owners_and_times(top: Path) -> None:
    """Give ``top`` and every entry below it (symlinks themselves, not their targets) an
    owner from :data:`OWNERS` in turn (when root) and an atime and mtime of its own, apart
    from each other. Call it on a complete tree: creating an entry moves its parent's times.

    Directories and symlinks, which walks read and follow, get atimes a day ahead: under
    ``relatime`` (or ``noatime``) reading them then leaves their atimes alone, where one
    in the past would move on the first read, and again on the next ones while it is not
    past the ctime that this very call sets (the kernel keeps ctime finer than atime)."""
    b = os.fsencode(top)
    paths = [b]
    for root, dirs, files in os.walk(b):
        paths += [os.path.join(root, n) for n in sorted(dirs) + sorted(files)]
    ahead = time.time_ns() + 86_400 * 10**9
    for i, p in enumerate(paths):
        if IS_ROOT:
            os.chown(p, *OWNERS[i % len(OWNERS)], follow_symlinks=False)
        read_by_walks = not atime_is_stable(os.lstat(p))
        atime = ahead + i * 7_000_000_011 if read_by_walks else _ATIME0 + i * 7_000_000_011
        os.utime(p, ns=(atime, _MTIME0 + i * 5_000_000_003), follow_symlinks=False)


def settle_atimes(top: Path) -> dict[bytes, os.stat_result]:
    """Read every directory and follow every symlink once, as walks will (under ``relatime``
    the first read moves atimes, later ones mostly do not); the ``lstat`` of every entry after."""
    out = {}
    for root, dirs, files in os.walk(os.fsencode(top)):
        out[root] = os.lstat(root)
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                os.stat(path)
            except OSError:
                pass
            out[path] = os.lstat(path)
    return out


STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize",
               "st_rdev", "st_mtime", "st_mtime_ns", "st_ctime", "st_ctime_ns")
ATIME_FIELDS = ("st_atime", "st_atime_ns")


def assert_same_stat(got, want: os.stat_result, where: object, *, atime: bool) -> None:
    """Every field of ``got`` (an ``os.stat_result`` or alike) equals ``want``'s, the indexed
    ones too; the access time only with ``atime`` (where nothing moved it in between)."""
    for field in STAT_FIELDS + (ATIME_FIELDS if atime else ()):
        assert getattr(got, field) == getattr(want, field), (where, field)
    for i in range(10):
        if atime or i != 7:
            assert got[i] == want[i], (where, i)


def atime_is_stable(st: os.stat_result) -> bool:
    """Whether nothing a walk does moves this entry's atime: regular files and fifos are
    only ``lstat``-ed (directories are read, symlinks followed)."""
    return stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)


def make_awkward_tree(root: Path) -> Path:
    """A tree with every kind of entry os.walk has to get right. Returns the tree root."""
    top = root / "tree"
    top.mkdir()
    b = os.fsencode(top)
    dirs = [b"plain", b"with space", b"pct%41%2e%2F", b"q?mark", b"hash#tag", "ünïcødé-日本".encode(),
            b"bad\xff\xfename", b"new\nline", b"empty", b"deep/a/b/c/d/e/f/g", b"plain/sub", b"-dash",
            b"\\backslash", b"..dots", b"tail.", b"+plus&amp;=eq;semi"]
    for d in dirs:
        os.makedirs(os.path.join(b, d), exist_ok=True)
    files = [b"plain/f1", b"plain/f 2", b"plain/bad\x80\x81", b"plain/nl\nname", b"with space/x",
             b"deep/a/b/c/d/e/f/g/leaf", "ünïcødé-日本/ß.txt".encode(), b"bad\xff\xfename/inner\xff",
             b"q?mark/%00", b"hash#tag/#", b"top-file", b"tail./..."]
    for f in files:
        with open(os.path.join(b, f), "wb") as fh:
            fh.write(b"x" * len(f))
    os.symlink(b"plain", os.path.join(b, b"link-to-dir"))
    os.symlink(b"top-file", os.path.join(b, b"link-to-file"))
    os.symlink(b"does-not-exist", os.path.join(b, b"dangling"))
    os.symlink(b"loop", os.path.join(b, b"loop"))
    os.symlink(b"../plain", os.path.join(b, b"deep/up-link"))
    os.symlink(b"/", os.path.join(b, b"plain/abs-link-out"))
    os.mkfifo(os.path.join(b, b"plain/fifo"))
    locked = os.path.join(b, b"locked")
    os.mkdir(locked)
    with open(os.path.join(locked, b"secret"), "wb") as fh:
        fh.write(b"s")
    os.mkdir(os.path.join(locked, b"subdir"))
    noexec = os.path.join(b, b"noexec")
    os.makedirs(os.path.join(noexec, b"child"))
    # Owners change nothing of what root without its DAC capabilities may read (as "other",
    # with the same bits as owner on every directory here), so the unreadable ones stay these two.
    vary_owners_and_times(top)
    os.chmod(locked, 0o000)
    os.chmod(noexec, 0o644)  # readable, not searchable: listed, children not
    return top


@pytest.fixture
def awkward_tree(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o755)
    top = make_awkward_tree(tmp_path)
    yield top
    for dirpath, _dirs, _files in os.walk(top):
        os.chmod(dirpath, 0o755)
    for sub in (b"locked", b"noexec"):
        p = os.path.join(os.fsencode(top), sub)
        if os.path.isdir(p):
            os.chmod(p, 0o755)


# -- a slow file system -----------------------------------------------------------------

def fuse_problem() -> str | None:
    """Why the slow file system cannot run here (naming what to install), or None."""
    try:
        import fuse  # noqa: F401  (fusepy raises OSError, not ImportError, without libfuse2)
    except ImportError:
        return "needs fusepy (pip install fusepy, in the test extra)"
    except OSError as exc:
        return f"needs libfuse2 (apt-get install libfuse2): {exc}"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount") is None:
        return "needs /dev/fuse and fusermount (apt-get install fuse)"
    return None


@contextmanager
def slowfs_mounted(mnt: Path, **env: str) -> Iterator[None]:
    """``tests/slowfs.py`` (FUSE) mounted at ``mnt`` with ``env`` (``SLOW``, ``SLOWFS_LOG``,
    ``SLOWFS_GATE``); the test is skipped where FUSE cannot mount."""
    problem = fuse_problem()
    if problem:
        pytest.skip(problem)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("slowfs.py")), str(mnt)],
                            env={**os.environ, **env}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.isdir(mnt / "fast"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"could not mount FUSE: {proc.stderr.read().decode(errors='replace')[-300:]}")
        time.sleep(0.02)
    try:
        yield
    finally:
        if subprocess.run(["fusermount", "-u", str(mnt)], check=False, capture_output=True).returncode:
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)  # still in use: detach it
        proc.terminate()
        proc.wait(10)


# -- the reference walk ------------------------------------------------------------------

_REF_SCRIPT = r"""
import os, sys, msgspec
top = os.fsencode(sys.argv[1])
errors = []
def onerror(e):
    errors.append((e.errno, os.fsencode(e.filename)))
rows = [(r, sorted(d), sorted(f)) for r, d, f in os.walk(top, onerror=onerror)]
sys.stdout.buffer.write(msgspec.msgpack.encode([rows, errors]))
"""


def reference_walk(local: Path, remote: str = REMOTE, nocaps: bool = True):
    """``os.walk`` of ``local`` (as bytes), run without DAC capabilities like the agent,
    with roots mapped to ``remote``: ``(set of (root, dirs, files), sorted errors)``."""
    cmd = [sys.executable, "-c", _REF_SCRIPT, os.fsdecode(local)]
    if nocaps and IS_ROOT:
        cmd = NOCAPS + cmd
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    rows, errors = msgspec.msgpack.decode(out)
    lb, rb = os.fsencode(local), os.fsencode(remote)

    def remap(p: bytes) -> bytes:
        assert p.startswith(lb)
        return rb + p[len(lb):]

    walked = {(remap(r), tuple(d), tuple(f)) for r, d, f in rows}
    errs = sorted((num, remap(name)) for num, name in errors)
    return walked, errs


def as_bytes_rows(rows) -> set:
    """Rows of a walk (str or bytes) as a set of ``(root, sorted dirs, sorted files)`` in bytes."""
    enc = os.fsencode
    return {(enc(r), tuple(sorted(map(enc, d))), tuple(sorted(map(enc, f)))) for r, d, f in rows}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a command-line test: no ``DISKOVER_AGENT_*`` setting and no
    scanner config file (neither the developer's nor the machine's), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISKOVER_AGENT_")}
    env["DISKOVER_AGENT_CONFIG"] = ""
    env["HOME"] = "/nonexistent"  # no ~/.config/diskover_scandir_agent/config.toml
    env.update(extra)
    return env


def open_pty(columns: int, rows: int = 40) -> tuple[int, int]:
    """A pseudo-terminal ``columns`` wide: ``(master, slave)`` file descriptors."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def drain_pty(master: int) -> bytes:
    """Everything written to a pseudo-terminal until every writer is gone; closes ``master``."""
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer is gone
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    return seen


def write_tls_files(directory: Path, *names: str) -> None:
    """``ca.pem``, and ``cert.pem`` + ``key.pem`` of a server certificate for ``names``
    (127.0.0.1 by default) signed by that CA, in ``directory`` (skips without trustme)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ca.issue_cert(*(names or ("127.0.0.1",)))
    server.private_key_pem.write_to_path(str(directory / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))


def make_wide_tree(top: Path) -> Path:
    """20 directories of 250 empty files: 5,020 entries (about 1.8 MB of NDJSON)."""
    for d in range(20):
        sub = top / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(250):
            (sub / f"file-{f:04}").write_bytes(b"")
    return top


@contextlib.contextmanager
def tmpfs_mounted(mountpoint: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of its own at ``mountpoint`` (created): a file system no other process writes
    to, or one the test needs apart from its parent's. Skips where it cannot be mounted (not root)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
