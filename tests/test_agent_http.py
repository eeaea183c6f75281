"""The agent over real HTTP: listing formats, errors, keep-alive, exports, big directories,
bounded concurrency, signals and IPv6. Every test talks to a real agent process on loopback."""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import gzip
import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import psutil
import pytest

import diskover_storage_agent
from diskover_agent import parallel_walk
from diskover_agent.protocol import STAT_FIELDS, DirFrame, EndFrame, EntriesFrame, ErrorFrame, read_frames
from diskover_agent.protocol import VERSION as PROTOCOL_VERSION

from conftest import HAVE_SETPRIV, IS_ROOT, NO_SETPRIV, REMOTE, as_bytes_rows, reference_walk, wait_for

# -- helpers -----------------------------------------------------------------------------

_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
          stat.S_IFSOCK: "s", stat.S_IFCHR: "c", stat.S_IFBLK: "b"}


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.headers.get('Content-Type')} {self.body[:200]!r}>"


def url_path(path: bytes) -> str:
    return quote_from_bytes(path, safe="/")


def request(agent, target: str, method: str = "GET", *, host: str | None = None,
            timeout: float = 60.0) -> Reply:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection(host or agent.host, agent.port, timeout=timeout)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, resp.headers, body)
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 30.0) -> bytes:
    """Send raw bytes, read everything until the agent closes the connection."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(out)
            out.append(chunk)


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "?")


def stat_tuple(st: os.stat_result) -> tuple[int, ...]:
    return tuple(getattr(st, f) for f in STAT_FIELDS)


def text_listing(local: bytes) -> bytes:
    """What the text format must answer for a local directory: sorted by name bytes,
    real directories as ``name/``."""
    with os.scandir(local) as it:
        items = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    return b"".join(name + (b"/\n" if is_dir else b"\n") for name, is_dir in items)


def expected_entries(local: bytes, want_stat: bool, export_root: bytes) -> dict[bytes, tuple]:
    """name -> (kind, target kind, lstat fields, target stat fields) from the local directory.
    A symlink's target stat is given only when the target lies inside the export."""
    out = {}
    for name in os.listdir(local):
        path = os.path.join(local, name)
        st = os.lstat(path)
        kind = kind_of(st.st_mode)
        target = tst = None
        if kind == "l":
            try:
                tst = os.stat(path)
            except OSError:
                tst = None
            target = kind_of(tst.st_mode) if tst is not None else None
        real = os.path.realpath(path)
        inside = real == export_root or real.startswith(export_root.rstrip(b"/") + b"/")
        out[name] = (kind, target, stat_tuple(st) if want_stat else None,
                     stat_tuple(tst) if want_stat and tst is not None and inside else None)
    return out


def decode_msgpack(body: bytes) -> tuple[bytes, list[tuple]]:
    """(dir path, entries) of a msgpack answer; checks the frame sequence."""
    frames = list(read_frames(io.BytesIO(body).read))
    assert frames, "empty answer"
    assert isinstance(frames[0], DirFrame), frames[0]
    assert isinstance(frames[-1], EndFrame), frames[-1]
    entries = []
    for f in frames[1:-1]:
        assert isinstance(f, EntriesFrame), f
        entries.extend((e.name, e.kind, e.target, e.stat, e.target_stat) for e in f.entries)
    return frames[0].path, entries


def json_name(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    assert isinstance(value, dict) and set(value) == {"b64"}, value
    raw = base64.b64decode(value["b64"], validate=True)
    with pytest.raises(UnicodeDecodeError):  # base64 only for names that are not UTF-8
        raw.decode("utf-8")
    return raw


def decode_ndjson(body: bytes) -> tuple[bytes, list[tuple]]:
    assert body.endswith(b"\n")
    frames = [json.loads(line) for line in body[:-1].split(b"\n")]
    assert frames[0][0] == "dir", frames[0]
    assert frames[-1][0] == "end", frames[-1]
    entries = []
    for f in frames[1:-1]:
        assert f[0] == "entries", f
        for name, kind, target, st, tst in f[1]:
            entries.append((json_name(name), kind, target, tuple(st) if st is not None else None,
                            tuple(tst) if tst is not None else None))
    return json_name(frames[0][1]), entries


def as_entry_map(entries: list[tuple]) -> dict[bytes, tuple]:
    names = [e[0] for e in entries]
    assert len(names) == len(set(names)), "an entry was sent twice"
    return {e[0]: tuple(e[1:]) for e in entries}


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")



def settle_atimes(top: Path) -> None:
    """Read every directory and follow every symlink once, so that later reads (the agent's
    and the test's) leave access times alone (relatime updates only the first one)."""
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                os.readlink(path)
                try:
                    os.stat(path)
                except OSError:
                    pass


def no_traceback(agent) -> None:
    log = "".join(agent.log)
    assert "Traceback" not in log, log


# -- text format -------------------------------------------------------------------------

def test_text_listing_equals_local_scandir(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    local_top = os.fsencode(awkward_tree)
    subdirs = [b"", b"/plain", b"/bad\xff\xfename", b"/empty", b"/new\nline", b"/q?mark", b"/hash#tag",
               b"/pct%41%2e%2F", "/ünïcødé-日本".encode(), b"/deep/a/b/c/d/e/f/g", b"/tail."]
    for sub in subdirs:
        r = request(agent, url_path(REMOTE.encode() + sub))
        assert r.status == 200, (sub, r)
        assert r.headers["Content-Type"].split(";")[0].strip() == "text/plain"
        assert r.body == text_listing(local_top + sub), sub
    top = request(agent, REMOTE).body.split(b"\n")
    # the tree holds what the format is about: dirs with a slash, links/fifos/files without
    for line in (b"plain/", b"empty/", b"locked/", b"link-to-dir", b"link-to-file", b"dangling", b"loop",
                 b"top-file", b"bad\xff\xfename/"):
        assert line in top, line
    assert b"fifo" in request(agent, REMOTE + "/plain").body.split(b"\n")
    assert request(agent, REMOTE + "/empty").body == b""


def test_text_sorted_by_name_bytes_not_by_line(tmp_path, start_agent):
    top = tmp_path / "order"
    top.mkdir()
    for d in ("a", "B", "a.d", "Z"):
        (top / d).mkdir()
    for f in ("a.b", "a-", "a0", "\u00e9", "b"):
        (top / f).touch()
    with open(os.path.join(os.fsencode(top), b"\xff"), "wb"):
        pass
    os.symlink("a", top / "a+")
    agent = start_agent([(REMOTE, str(top))])
    r = request(agent, REMOTE)
    assert r.status == 200
    # "a" (dir) sorts before "a-"/"a.b" by name even though "a/" sorts after them as a line
    assert r.body == b"B/\nZ/\na/\na+\na-\na.b\na.d/\na0\nb\n\xc3\xa9\n\xff\n"
    assert r.body == text_listing(os.fsencode(top))


def test_head(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    r = request(agent, REMOTE, "HEAD")
    assert r.status == 200 and r.body == b""
    assert r.headers["Content-Type"].startswith("text/plain")
    assert request(agent, REMOTE + "/nope", "HEAD").status == 404
    assert request(agent, REMOTE + "/top-file", "HEAD").status == 404
    # on the wire: headers, then nothing
    for target, status in ((REMOTE, b"200"), (REMOTE + "/nope", b"404")):
        raw = raw_exchange(agent.port, f"HEAD {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep and head.split(b" ")[1] == status, raw
        assert rest == b"", raw


# -- structured formats ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["msgpack", "ndjson"])
@pytest.mark.parametrize("want_stat", [False, True])
def test_structured_listing_exact(awkward_tree, start_agent, fmt, want_stat):
    settle_atimes(awkward_tree)
    agent = start_agent([(REMOTE, str(awkward_tree))])
    local_top = os.fsencode(awkward_tree)
    query = f"?format={fmt}" + ("&stat=1" if want_stat else "")
    seen_kinds = set()
    for sub in (b"", b"/plain", b"/bad\xff\xfename", b"/empty", b"/new\nline", b"/deep"):
        remote = REMOTE.encode() + sub
        r = request(agent, url_path(remote) + query)
        assert r.status == 200, (sub, r)
        assert fmt in r.headers["Content-Type"]
        path, entries = (decode_msgpack if fmt == "msgpack" else decode_ndjson)(r.body)
        assert path == remote
        got = as_entry_map(entries)
        want = expected_entries(local_top + sub, want_stat, os.path.realpath(local_top))
        assert got == want, sub
        seen_kinds |= {v[0] for v in got.values()}
    assert seen_kinds == {"d", "f", "l", "p"}
    # symlink targets, by name
    r = request(agent, REMOTE + query)
    top = as_entry_map((decode_msgpack if fmt == "msgpack" else decode_ndjson)(r.body)[1])
    assert top[b"link-to-dir"][:2] == ("l", "d")
    assert top[b"link-to-file"][:2] == ("l", "f")
    assert top[b"dangling"][:2] == ("l", None)
    assert top[b"loop"][:2] == ("l", None)
    assert top[b"bad\xff\xfename"][0] == "d"
    assert top[b"new\nline"][0] == "d"
    if want_stat:
        assert top[b"link-to-dir"][3] == stat_tuple(os.stat(awkward_tree / "plain"))
        assert top[b"dangling"][3] is None
    else:
        assert all(v[2] is None and v[3] is None for v in top.values())


def test_structured_non_utf8_path_and_names(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    r = request(agent, REMOTE + "/bad%FF%FEname?format=ndjson")
    assert r.status == 200
    lines = r.body.split(b"\n")
    assert json.loads(lines[0])[:2] == ["dir", {"b64": base64.b64encode(b"/mnt/isilon/bad\xff\xfename").decode()}]
    names = [e[0] for e in decode_ndjson(r.body)[1]]
    assert names == [b"inner\xff"]
    r = request(agent, REMOTE + "/plain?format=msgpack")
    names = {e[0] for e in decode_msgpack(r.body)[1]}
    assert b"bad\x80\x81" in names and b"nl\nname" in names


# -- errors ------------------------------------------------------------------------------

DOTDOT_TARGETS = [
    "/mnt/isilon/..", "/mnt/isilon/../isilon", "/mnt/isilon/plain/..", "/mnt/isilon/plain/../..",
    "/mnt/isilon/%2e%2e", "/mnt/isilon/%2E%2e", "/mnt/isilon/%2E%2E", "/mnt/isilon/.%2e", "/mnt/isilon/%2e.",
    "/mnt/isilon/plain/%2e%2e/%2E%2E/%2e%2e/etc", "/mnt/isilon/%2e%2e%2f%2e%2e%2fetc",
    "/mnt/isilon/plain%2f..%2f..%2f..%2fetc", "/mnt/isilon//..//..//etc", "/mnt/isilon/./../../etc",
    "/../etc", "/mnt/isilon/..?format=msgpack",
]
NUL_TARGETS = ["/mnt/isilon/%00", "/mnt/isilon/plain%00", "/mnt/isilon%00/plain", "/mnt/isilon/plain/%00/x"]
QUERY_TARGETS = ["/mnt/isilon?x=1", "/mnt/isilon?format=xml", "/mnt/isilon?format=", "/mnt/isilon?stat=2",
                 "/mnt/isilon?format=msgpack&stat=maybe", "/mnt/isilon?format=ndjson&bogus=",
                 "/mnt/isilon?FORMAT=msgpack"]
NOT_EXPORTED = ["/etc", "/mnt/isilon2", "/mnt/isilon2/plain", "/mnt", "/", "/mnt/isilo", "/mnt/isilonx/plain",
                "/isilon", "/tmp"]


def test_error_answers(awkward_tree, start_agent):
    if IS_ROOT and not HAVE_SETPRIV:
        pytest.skip(NO_SETPRIV)
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    cases: list[tuple[str, str, int, str, int | None]] = [
        ("GET", REMOTE + "/nope", 404, "ENOENT", errno.ENOENT),
        ("GET", REMOTE + "/plain/nope/deeper", 404, "ENOENT", errno.ENOENT),
        ("GET", REMOTE + "/top-file", 404, "ENOTDIR", errno.ENOTDIR),
        ("GET", REMOTE + "/plain/f1/", 404, "ENOTDIR", errno.ENOTDIR),
        ("GET", REMOTE + "/top-file?format=msgpack", 404, "ENOTDIR", errno.ENOTDIR),
        ("GET", REMOTE + "/locked", 403, "EACCES", errno.EACCES),
        ("GET", REMOTE + "/locked?format=ndjson&stat=1", 403, "EACCES", errno.EACCES),
        ("GET", REMOTE + "/locked/subdir", 403, "EACCES", errno.EACCES),
    ]
    cases += [("GET", t, 403, "not_exported", errno.EACCES) for t in NOT_EXPORTED]
    cases += [("GET", t, 400, "bad_path", errno.EACCES) for t in DOTDOT_TARGETS]
    cases += [("GET", t, 400, "bad_path", errno.EINVAL) for t in NUL_TARGETS]
    cases += [("GET", t, 400, "bad_request", None) for t in QUERY_TARGETS]
    problems = []
    for method, target, status, code, num in cases:
        r = request(agent, target, method)
        if r.status != status:
            problems.append(f"{method} {target}: status {r.status}, want {status}: {r.body[:200]!r}")
            continue
        if b"Traceback" in r.body:
            problems.append(f"{method} {target}: traceback in body")
        if r.headers.get("Content-Type", "").split(";")[0] != "application/json":
            problems.append(f"{method} {target}: Content-Type {r.headers.get('Content-Type')}")
            continue
        body = r.json()
        if body.get("error") != code:
            problems.append(f"{method} {target}: error {body.get('error')!r}, want {code!r}")
        if num is not None and body.get("errno") != num:
            problems.append(f"{method} {target}: errno {body.get('errno')!r}, want {num}")
        if b"secret" in r.body:
            problems.append(f"{method} {target}: leaks a name")
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for target in (REMOTE, REMOTE + "/nope", "/etc"):
            r = request(agent, target, method)
            allow = {m.strip() for m in r.headers.get("Allow", "").split(",")}
            if r.status != 405 or not {"GET", "HEAD"} <= allow or "Traceback" in r.body.decode("latin-1"):
                problems.append(f"{method} {target}: {r.status} Allow={r.headers.get('Allow')!r} {r.body!r}")
            elif "error" not in r.json():
                problems.append(f"{method} {target}: no error code in {r.body!r}")
    assert not problems, "\n".join(problems)
    assert agent.proc.poll() is None
    assert agent.terminate() == 0
    no_traceback(agent)


def test_keep_alive_many_requests_one_socket(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))])
    want_top = text_listing(os.fsencode(awkward_tree))
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=30)
    conn.connect()
    sock = conn.sock
    local = sock.getsockname()
    plan = [("GET", REMOTE, 200), ("GET", REMOTE + "?format=msgpack&stat=1", 200),
            ("GET", REMOTE + "/plain?format=ndjson", 200), ("GET", REMOTE + "/nope", 404),
            ("GET", "/etc", 403), ("HEAD", REMOTE, 200), ("HEAD", REMOTE + "/nope", 404),
            ("GET", REMOTE + "/%2e%2e", 400), ("GET", REMOTE + "?x=1", 400), ("DELETE", REMOTE, 405)]
    try:
        for i in range(60):
            method, target, status = plan[i % len(plan)]
            conn.request(method, target)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == status, (method, target, body)
            if method == "GET" and target == REMOTE:
                assert body == want_top
            assert not resp.will_close, (method, target)
            assert conn.sock is sock and sock.getsockname() == local, f"reconnected after {method} {target}"
        peers = [c for c in psutil.Process(agent.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_ESTABLISHED and c.raddr]
        assert [c.raddr[1] for c in peers] == [local[1]]
    finally:
        conn.close()


# -- a big directory -----------------------------------------------------------------------

BIG_FILES = 299_990
BIG_DIRS = 10


@pytest.fixture(scope="session")
def big_dir(tmp_path_factory) -> Iterator[tuple[Path, bytes, set]]:
    """A directory of 300,000 entries (299,990 empty files, 10 empty dirs), its expected
    text listing and its set of names. Made once per session, in RAM (tmpfs) when there is
    one: on a disk, creating and deleting 300k inodes can take half a minute."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        base = Path(tempfile.mkdtemp(prefix="diskover-test-big-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("big")
    top = base / "big"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(BIG_FILES):  # creation order unrelated to name order
            name = f"f{(i * 7919) % BIG_FILES:06d}"
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=fd))
        for i in range(BIG_DIRS):
            os.mkdir(f"f{i * 29_999:06d}.d", dir_fd=fd)
    finally:
        os.close(fd)
    local = os.fsencode(top)
    names = set(os.listdir(local))
    assert len(names) == BIG_FILES + BIG_DIRS
    yield top, text_listing(local), names
    shutil.rmtree(base, ignore_errors=True)


def stream_msgpack_names(resp: http.client.HTTPResponse) -> tuple[list[bytes], int]:
    """Names of a msgpack listing read frame by frame from the response; (names, entry frames)."""
    names, nframes = [], 0
    frames = read_frames(resp.read)
    first = next(frames)
    assert isinstance(first, DirFrame)
    ended = False
    for f in frames:
        assert not ended, "frame after the end frame"
        if isinstance(f, EntriesFrame):
            names.extend(e.name for e in f.entries)
            nframes += 1
        elif isinstance(f, EndFrame):
            ended = True
        else:
            raise AssertionError(f"unexpected frame {f!r}")
    assert ended, "no end frame"
    return names, nframes


def test_big_directory_streamed_exact_and_bounded(big_dir, start_agent):
    top, want_text, want_names = big_dir
    agent = start_agent([(REMOTE, str(top))])
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=120)
    try:
        # warm up every code path once, on small directories
        for target in (REMOTE + "/f000000.d?format=msgpack", REMOTE + "/f000000.d", REMOTE + "/nope"):
            conn.request("GET", target)
            conn.getresponse().read()
        before = vm_hwm_kb(agent.pid)

        conn.request("GET", REMOTE + "?format=msgpack")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding", "").lower() == "chunked"
        assert resp.getheader("Content-Length") is None
        names, nframes = stream_msgpack_names(resp)
        assert resp.read() == b""
        assert len(names) == len(want_names)
        assert set(names) == want_names
        assert nframes > 1

        conn.request("GET", REMOTE)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding", "").lower() == "chunked"
        body = resp.read()
        assert body.count(b"\n") == len(want_names)
        assert body == want_text  # complete and sorted, past the in-memory sort run
        after = vm_hwm_kb(agent.pid)
    finally:
        conn.close()
    grown_mb = (after - before) / 1024
    assert grown_mb < 40, f"agent peak RSS grew by {grown_mb:.1f} MB serving a 300k-entry directory"


def slow_reader(port: int, target: str, rcvbuf: int = 16384) -> tuple[socket.socket, http.client.HTTPResponse]:
    """A connection with a small receive buffer that has sent ``target`` and read the headers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(120)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    resp = http.client.HTTPResponse(sock, method="GET")
    resp.begin()
    return sock, resp


def test_sigterm_finishes_streamed_listing(big_dir, start_agent):
    top, _, want_names = big_dir
    agent = start_agent([(REMOTE, str(top))])
    # ~18 MB of answer: far more than socket buffers hold, so the agent is mid-stream
    sock, resp = slow_reader(agent.port, REMOTE + "?format=msgpack&stat=1")
    try:
        assert resp.status == 200
        frames = read_frames(resp.read)
        assert isinstance(next(frames), DirFrame)
        first = next(frames)
        assert isinstance(first, EntriesFrame)
        names = [e.name for e in first.entries]
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("stopping" in line for line in agent.log), what="the agent to start stopping")
        assert agent.proc.poll() is None, "agent exited with an answer in flight"
        ended = False
        for f in frames:  # read the rest, frame by frame
            assert not ended
            if isinstance(f, EntriesFrame):
                names.extend(e.name for e in f.entries)
                assert all(e.stat is not None for e in f.entries)
            else:
                assert isinstance(f, EndFrame), f
                ended = True
        assert ended
        assert len(names) == len(want_names) and set(names) == want_names
    finally:
        sock.close()
    assert agent.proc.wait(30) == 0
    agent.terminate()
    no_traceback(agent)


def test_sigint_on_idle_agent_exits_zero(tmp_path, start_agent):
    agent = start_agent([(REMOTE, str(tmp_path))])
    assert request(agent, REMOTE).status == 200
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(30) == 0
    agent.terminate()
    no_traceback(agent)
    assert "KeyboardInterrupt" not in "".join(agent.log)


def test_sigterm_right_after_the_listening_line_exits_zero(tmp_path, start_agent):
    """Once the agent says it is listening, a SIGTERM is a clean stop, never a kill."""
    for _ in range(5):
        agent = start_agent([(REMOTE, str(tmp_path))])
        agent.proc.send_signal(signal.SIGTERM)  # at once: the agent has only just said it is listening
        assert agent.proc.wait(30) == 0
        agent.terminate()
        no_traceback(agent)


def test_sigterm_cuts_answers_in_flight_after_the_shutdown_timeout(big_dir, start_agent):
    """SIGTERM lets answers in flight finish for --shutdown-timeout at most: an answer its
    client has stopped reading is cut then, and the agent exits with status 0."""
    top, _, _ = big_dir
    agent = start_agent([(REMOTE, str(top))], extra=("--shutdown-timeout", "10"))
    sock, resp = slow_reader(agent.port, REMOTE + "?format=msgpack&stat=1")  # ~18 MB, never read
    try:
        assert resp.status == 200
        frames = read_frames(resp.read)
        assert isinstance(next(frames), DirFrame)
        assert isinstance(next(frames), EntriesFrame)  # under way; the client reads no more
        signalled = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("stopping" in line for line in agent.log), what="the agent to start stopping")
        try:
            rc = agent.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the agent still waited for the stalled answer 60 s after SIGTERM") from None
        took = time.monotonic() - signalled
        ended = False
        try:
            for f in frames:
                ended = isinstance(f, EndFrame)
        except (OSError, http.client.HTTPException, ValueError):
            pass  # cut short
        assert not ended, "the stalled answer was not cut"
    finally:
        sock.close()
    print(f"exited {took:.1f} s after SIGTERM")
    assert rc == 0
    # not before the 10 s it was given; well before twice that (aiohttp's own wait after it, when
    # the stalled answer is not cut) and the 30 s default (an option ignored)
    assert 10 <= took < 17, f"the agent exited {took:.1f} s after SIGTERM, not after the 10 s it was given"
    agent.terminate()
    no_traceback(agent)


# -- subtree walks and the agent's information -------------------------------------------

def walk_answer(agent, paths: list[bytes], max_entries: int) -> tuple[list[bytes], list[bytes]]:
    """The directories a walk answer lists (``dir`` frames, in order) and its frontier."""
    body = json.dumps({"paths": [p.decode() for p in paths], "max_entries": max_entries}).encode()
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=60)
    try:
        conn.request("POST", "/_agent/v1/walk?format=ndjson", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, data[:300]
    frames = [json.loads(line) for line in data.splitlines()]
    assert frames[-1][0] == "end" and all(f[0] != "end" for f in frames[:-1])
    return [json_name(f[1]) for f in frames if f[0] == "dir"], [json_name(p) for p in frames[-1][1]]


@pytest.mark.parametrize("max_entries", [1, 7, 1000])
def test_walk_frontier_keeps_every_requested_path(tmp_path, start_agent, max_entries):
    """However small the budget, every requested path is either listed or in the ``end``
    frontier, exactly once; walking the frontier again and again lists every directory
    below them exactly once, as ``os.walk`` finds them."""
    top = tmp_path / "share"
    for i in range(12):
        (top / f"d{i:02d}" / "sub" / "deeper").mkdir(parents=True)
        for j in range(3):
            (top / f"d{i:02d}" / f"f{j}").touch()
        (top / f"d{i:02d}" / "sub" / "g").touch()
    agent = start_agent([(REMOTE, str(top))])
    requested = [f"{REMOTE}/d{i:02d}".encode() for i in range(12)] + [REMOTE.encode() + b"/missing"]
    listed, frontier = walk_answer(agent, requested, max_entries)
    for path in requested:
        assert listed.count(path) + frontier.count(path) == 1, (path, listed, frontier)
    if max_entries == 1:
        assert len(listed) == 1 and len(frontier) == len(requested)  # one directory, the rest left
    seen = list(listed)
    answers = 1
    while frontier:
        listed, frontier = walk_answer(agent, frontier, max_entries)
        seen += listed
        answers += 1
        assert answers < 200, "the walk does not end"
    want = [REMOTE.encode() + os.fsencode(root)[len(os.fsencode(top)):]
            for root, _, _ in os.walk(top) if root != str(top)] + [REMOTE.encode() + b"/missing"]
    assert sorted(seen) == sorted(want)


def test_info_names_features_and_exports(tmp_path, start_agent):
    """``/_agent/v1/info`` names the agent, its version and protocol, the features it serves
    (each one checked to work) and the exports given on the command line."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    agent = start_agent([(REMOTE, str(tmp_path / "a")), ("/data/other", str(tmp_path / "b"))])
    r = request(agent, "/_agent/v1/info")
    assert r.status == 200 and r.headers.get("Content-Type", "").startswith("application/json")
    info = r.json()
    assert info["agent"] == "diskover-storage-agent"
    assert info["version"] == diskover_storage_agent.__version__
    assert info["protocol"] == PROTOCOL_VERSION
    assert sorted(info["exports"]) == sorted([REMOTE, "/data/other"])
    assert sorted(info["features"]) == sorted(["listing", "walk", "stat", "gzip"])
    served = {
        "listing": request(agent, REMOTE).body == b"sub/\n",
        "stat": decode_ndjson(request(agent, REMOTE + "?format=ndjson&stat=1").body)[1][0][3] is not None,
        "walk": walk_answer(agent, [REMOTE.encode()], 100) == ([REMOTE.encode(), REMOTE.encode() + b"/sub"], []),
    }
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=30)
    try:
        conn.request("GET", REMOTE, headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        served["gzip"] = resp.getheader("Content-Encoding") == "gzip" and gzip.decompress(resp.read()) == b"sub/\n"
    finally:
        conn.close()
    assert served == dict.fromkeys(info["features"], True)


# -- bounded concurrency -----------------------------------------------------------------

def test_maxconnections_one_serves_twenty_concurrent_clients(tmp_path, start_agent):
    top = tmp_path / "many"
    top.mkdir()
    for i in range(3000):
        (top / f"file-{i:05d}").touch()
    (top / "subdir").mkdir()
    agent = start_agent([(REMOTE, str(top))], extra=("-c", "1"))
    want_text = text_listing(os.fsencode(top))
    want_entries = expected_entries(os.fsencode(top), True, os.path.realpath(os.fsencode(top)))
    barrier = threading.Barrier(20)

    def client(i: int) -> bool:
        conn = http.client.HTTPConnection(agent.host, agent.port, timeout=60)
        try:
            conn.connect()
            barrier.wait(30)
            target = REMOTE if i % 2 else REMOTE + "?format=msgpack&stat=1"
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (i, resp.status, body[:200])
            if i % 2:
                assert body == want_text
            else:
                assert as_entry_map(decode_msgpack(body)[1]) == want_entries
            return True
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(client, range(20)))
    assert results == [True] * 20


def test_a_reader_that_stalls_holds_no_slot(big_dir, tmp_path, start_agent):
    """With -c 1, a listing whose client stops reading midway does not hold the only
    slot: the slot bounds file-system work, not the time answers spend on the wire. A
    second client is served at once, and the first answer still completes intact."""
    top, _, want_names = big_dir
    small = tmp_path / "small"
    small.mkdir()
    (small / "x").touch()
    agent = start_agent([(REMOTE, str(top)), ("/mnt/small", str(small))], extra=("-c", "1"))
    sock_a, resp_a = slow_reader(agent.port, REMOTE + "?format=msgpack&stat=1")
    try:
        assert resp_a.status == 200
        frames = read_frames(resp_a.read)
        assert isinstance(next(frames), DirFrame)
        names = [e.name for e in next(frames).entries]  # A is now mid-stream, and stops reading
        with socket.create_connection(("127.0.0.1", agent.port), timeout=60) as sock_b:
            sock_b.sendall(b"GET /mnt/small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            readable, _, _ = select.select([sock_b], [], [], 2.0)
            assert readable, "the stalled reader kept the only slot"
            resp_b = http.client.HTTPResponse(sock_b, method="GET")
            resp_b.begin()
            assert resp_b.status == 200
            assert resp_b.read() == b"x\n"
        for f in frames:
            if isinstance(f, EntriesFrame):
                names.extend(e.name for e in f.entries)
            elif isinstance(f, ErrorFrame):
                raise AssertionError(f)
        assert len(names) == len(want_names) and set(names) == want_names
    finally:
        sock_a.close()


# -- IPv6 --------------------------------------------------------------------------------

def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.skipif(not os.path.exists("/usr/bin/curl"), reason="needs curl (apt-get install curl)")
def test_ipv6_loopback(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], listen="::1")
    assert agent.url.startswith("http://[::1]:")
    assert agent.hostspec == f"[::1]:{agent.port}"
    want = text_listing(os.fsencode(awkward_tree))
    r = request(agent, REMOTE, host="::1")
    assert r.status == 200 and r.body == want
    out = subprocess.run(["/usr/bin/curl", "-sS", "--max-time", "20", f"http://[::1]:{agent.port}{REMOTE}"],
                         capture_output=True, check=True).stdout
    assert out == want
    with pytest.raises(OSError):  # it listens on ::1 only
        socket.create_connection(("127.0.0.1", agent.port), timeout=5).close()


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback")
def test_listen_on_ipv6_any(awkward_tree, start_agent):
    """``-l ::`` listens on every IPv6 address: a client reaches it at [::1]."""
    agent = start_agent([(REMOTE, str(awkward_tree))], listen="::", nocaps=True)
    assert agent.url.startswith("http://[::]:")
    want = text_listing(os.fsencode(awkward_tree))
    r = request(agent, REMOTE, host="::1")
    assert r.status == 200 and r.body == want
    rows = parallel_walk(REMOTE, hosts=[f"[::1]:{agent.port}"])
    assert as_bytes_rows(rows) == reference_walk(awkward_tree)[0]
