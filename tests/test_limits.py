"""Connection limits and CPU bounds: clients that stall (half-sent headers or bodies, idle
keep-alive, answers nobody reads) are disconnected after the configured timeouts and
everything their requests held (descriptors, memory, the listing slot) is freed; request
bodies are bounded in total; exclusion patterns are compiled off the event loop, so health
stays answered. Real agent processes on loopback, raw sockets, timeouts of a second or two
set in a config file. Every wait is on a state (a socket's EOF, the agent's descriptors or
metrics), with generous deadlines only as failure bounds."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from diskover_agent import parallel_walk
from diskover_storage_agent.cli import build_parser
from diskover_storage_agent.config import AgentConfig, make_export

from conftest import REMOTE, Agent, as_bytes_rows, http_get, reference_walk, wait_for

ROOT = Path(__file__).resolve().parent.parent
#: The timeouts of the test agents (seconds): short, so that the tests are fast.
TINY = {"header-timeout": 1, "body-timeout": 1, "keepalive-timeout": 1, "send-timeout": 2}
#: How long a test waits for what a timeout of a second or two must cause (a failure bound).
BOUND = 20.0
DEPTH = 30
WIDE = 22_000


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss



def closed_by_peer(sock: socket.socket, timeout: float = BOUND) -> bool:
    """Read (and drop) what the agent sent until it closes or resets the connection."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def metric(agent: Agent, name: str) -> float:
    """A metric's value, summed over its labels matching ``name`` (a regex on the line)."""
    body = http_get(agent.port, "/_agent/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if not line.startswith("#") and re.match(name, line))


def timed_out(agent: Agent, phase: str) -> float:
    return metric(agent, rf'diskover_agent_connections_timed_out_total\{{phase="{phase}"\}}')


def config_file(tmp_path: Path, **values) -> str:
    path = tmp_path / "agent.toml"
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))
    return str(path)


def walk_body(paths: list[bytes], **extra) -> bytes:
    return msgspec.msgpack.encode({"paths": paths, "max_entries": 1_000_000, "max_seconds": 60, **extra})


def post_walk(sock: socket.socket, body: bytes) -> None:
    sock.sendall(b"POST /_agent/v1/walk?format=ndjson HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)


@pytest.fixture(scope="module")
def deep_tree(tmp_path_factory) -> Iterator[Path]:
    """A chain of DEPTH directories, the last holding WIDE files with long names: a walk answer
    (ndjson, with stat) of about 8 MB, twice what socket buffers hold (Linux's default
    ``tcp_wmem`` grows a socket's send buffer to 4 MB), read while DEPTH descriptors are open.
    Made in /dev/shm when there is one: 22,000 files take 0.4 s there, up to 17 s on a busy disk."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="limits-", dir=shm)) if os.access(shm, os.W_OK) else None
    top = (base or tmp_path_factory.mktemp("limits")) / "tree"
    bottom = top.joinpath(*(f"d{i:02d}" for i in range(DEPTH)))
    bottom.mkdir(parents=True)
    fd = os.open(bottom, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(WIDE):
            os.close(os.open(f"f{i:06d}" + "x" * 233, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    (top / "small").mkdir()
    (top / "small" / "f").write_bytes(b"x")
    yield top
    if base is not None:
        shutil.rmtree(base)


@pytest.fixture
def tiny_agent(deep_tree, tmp_path, start_agent) -> Agent:
    """An agent with one listing slot and the tiny timeouts, from its config file."""
    return start_agent([(REMOTE, str(deep_tree))],
                       extra=("--config", config_file(tmp_path, **TINY), "-c", "1", "-v"))


def stalled_reader(agent: Agent) -> socket.socket:
    """A client that asks for the deep walk (with stat) and reads nothing of the answer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", agent.port))
    post_walk(s, walk_body([REMOTE.encode()], stat=True))
    return s


def assert_slot_free_and_walk_exact(agent: Agent, tree: Path) -> None:
    """With -c 1, a walk that completes proves the slot was given back."""
    rows = as_bytes_rows(parallel_walk(REMOTE + "/small", hosts=[agent.hostspec], retry_for=5))
    assert rows == reference_walk(tree / "small", REMOTE + "/small", nocaps=False)[0]


# -- each phase of a stalled client ------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"GET /mnt/isil", b"GET /mnt/isilon HTTP/1.1\r\nHost: x\r\n"])
def test_half_sent_header_is_closed(tiny_agent, sent):
    before = timed_out(tiny_agent, "header")
    with socket.create_connection(("127.0.0.1", tiny_agent.port)) as s:
        s.sendall(sent)
        assert closed_by_peer(s), "the agent kept a half-sent header open"
    assert timed_out(tiny_agent, "header") == before + 1


def test_header_sent_drop_by_drop_is_closed(tiny_agent):
    """The header deadline runs from the first byte: progress does not extend it (Slowloris)."""
    with socket.create_connection(("127.0.0.1", tiny_agent.port)) as s:
        s.sendall(b"GET /mnt/isilon HTTP/1.1\r\n")
        s.settimeout(0.2)
        deadline = time.monotonic() + BOUND
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                s.sendall(b"X-Drop: x\r\n")
                closed = s.recv(100) == b""
            except TimeoutError:
                continue  # nothing from the agent yet: send the next drop
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        assert closed, "a header sent drop by drop kept its connection open"


def test_half_sent_body_is_closed_and_its_budget_freed(deep_tree, tmp_path, start_agent):
    """A body stuck half-way holds its share of the body budget (here the whole of it: 1 MiB)
    until the body timeout closes its connection."""
    conf = config_file(tmp_path, **{**TINY, "body-timeout": 2, "body-memory": 1})
    agent = start_agent([(REMOTE, str(deep_tree))], extra=("--config", conf))
    body = walk_body([REMOTE.encode() + b"/small"])
    with socket.create_connection(("127.0.0.1", agent.port)) as s:
        s.sendall(b"POST /_agent/v1/walk HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**20 + body)
        status, headers, _ = http_get(agent.port, "/_agent/v1/walk", method="POST", body=body)
        assert status == 503 and headers["Retry-After"] == "1"
        assert closed_by_peer(s), "the agent kept a half-sent body open"
    assert timed_out(agent, "body") == 1
    assert http_get(agent.port, "/_agent/v1/walk", method="POST", body=body)[0] == 200


def test_idle_keepalive_is_closed(tiny_agent, deep_tree):
    with socket.create_connection(("127.0.0.1", tiny_agent.port)) as s:
        for _ in range(2):  # used twice (keep-alive works), then left idle
            s.sendall(b"GET /mnt/isilon/small HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"\r\n0\r\n\r\n"):
                chunk = s.recv(4096)
                assert chunk, f"closed before the answer: {reply!r}"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
        assert closed_by_peer(s), "the agent kept an idle keep-alive connection open"
    assert timed_out(tiny_agent, "keepalive") >= 1


def test_walk_answer_nobody_reads_is_cut_and_frees_everything(tiny_agent, deep_tree):
    agent = tiny_agent
    assert_slot_free_and_walk_exact(agent, deep_tree)
    list(parallel_walk(REMOTE, hosts=[agent.hostspec]))  # the whole walk once: the allocator's working set
    fds, mem = fd_count(agent.pid), rss(agent.pid)
    s = stalled_reader(agent)
    try:
        held = wait_for(lambda: (n := fd_count(agent.pid)) >= fds + DEPTH and n, BOUND,
                        "the stalled walk to reach the bottom of the tree")
        freed = wait_for(lambda: (n := fd_count(agent.pid)) <= fds and n, BOUND,
                         "the agent to drop the client that does not read")
        mem_after = rss(agent.pid)
        assert closed_by_peer(s)
    finally:
        s.close()
    print(f"stalled walk: descriptors {fds} -> {held} while stalled -> {freed} after; "
          f"RSS {mem / 2**20:.1f} MB -> {mem_after / 2**20:.1f} MB")
    assert timed_out(agent, "send") == 1
    assert mem_after <= mem + 16 * 2**20
    assert_slot_free_and_walk_exact(agent, deep_tree)


def test_stalled_readers_cannot_exhaust_descriptors(deep_tree, tmp_path, start_agent):
    """With the agent's descriptor limit lowered (prlimit), two clients that do not read hold
    all but a few descriptors: a normal walk of the deep tree fails with EMFILE meanwhile, and
    walks exactly once the send timeout has dropped them."""
    agent = start_agent([(REMOTE, str(deep_tree))], extra=("--config", config_file(tmp_path, **TINY)))
    list(parallel_walk(REMOTE, hosts=[agent.hostspec]))
    base = fd_count(agent.pid)
    limit = base + 2 * (DEPTH + 2) + 12
    subprocess.run(["prlimit", f"--pid={agent.pid}", f"--nofile={limit}:{limit}"], check=True)
    readers = []
    try:
        for k in (1, 2):
            readers.append(stalled_reader(agent))
            wait_for(lambda k=k: fd_count(agent.pid) >= base + k * (DEPTH + 1), BOUND, f"stalled reader {k}")
        status, _, raw = http_get(agent.port, "/_agent/v1/walk?format=ndjson", method="POST",
                                  body=b'{"paths": ["/mnt/isilon"], "max_seconds": 60}',
                                  headers={"Content-Type": "application/json"}, timeout=BOUND)
        assert status == 200 and b'"EMFILE"' in raw, "the stalled readers did not exhaust the descriptors"
        wait_for(lambda: fd_count(agent.pid) <= base, BOUND, "the agent to drop the readers")
    finally:
        for s in readers:
            s.close()
    errors: list[OSError] = []
    rows = as_bytes_rows(parallel_walk(REMOTE, hosts=[agent.hostspec], onerror=errors.append))
    assert not errors
    assert rows == reference_walk(deep_tree, nocaps=False)[0]


def test_bodies_are_bounded_in_total(deep_tree, tmp_path, start_agent):
    """40 clients that each send 1 MiB of walk body but its last byte: with a budget of 2 MiB,
    all but two get 503 at once (with Retry-After), and the agent's memory stays bounded."""
    conf = config_file(tmp_path, **{"body-memory": 2})
    agent = start_agent([(REMOTE, str(deep_tree))], extra=("--config", conf))
    http_get(agent.port, REMOTE + "/small")
    mem = rss(agent.pid)
    size = 2**20
    chunked = {i for i in range(40) if i % 2}
    socks: list[socket.socket] = []
    refused = []

    def send(i: int, s: socket.socket) -> None:
        try:
            if i in chunked:
                s.sendall(b"POST /_agent/v1/walk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(16):
                    s.sendall(b"%x\r\n" % (size // 16) + b"x" * (size // 16) + b"\r\n")
            else:
                s.sendall(b"POST /_agent/v1/walk HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                          + b"x" * (size - 1))
        except OSError:
            pass  # refused and closed before all was sent
        try:
            s.settimeout(BOUND)
            head = s.recv(4096)
        except OSError:
            return
        if head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head:
            refused.append(i)

    threads = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", agent.port))
            socks.append(s)
            t = threading.Thread(target=send, args=(i, s), daemon=True)
            t.start()
            threads.append(t)
        wait_for(lambda: len(refused) >= 38, BOUND + 20, "all but two bodies to be refused")
        grown = rss(agent.pid) - mem
    finally:
        for s in socks:
            s.shutdown(socket.SHUT_RDWR)  # wakes the threads still waiting for an answer
            s.close()
        for t in threads:
            t.join(BOUND)
    print(f"40 half-sent 1 MiB bodies: RSS {mem / 2**20:.1f} MB, grown by {grown / 2**20:.1f} MB")
    assert grown <= 16 * 2**20, f"the agent grew by {grown / 2**20:.0f} MB for a 2 MiB body budget"
    wait_for(lambda: http_get(agent.port, "/_agent/v1/walk", method="POST",
                              body=walk_body([REMOTE.encode() + b"/small"]))[0] == 200,
             BOUND, "the body budget to be free again")


def test_a_listing_with_a_body_is_refused(tiny_agent):
    status, headers, _ = http_get(tiny_agent.port, REMOTE, body=b"x" * 1000)
    assert status == 400 and headers["Connection"] == "close"


# -- defaults and settings ---------------------------------------------------------------------

OPTIONS = {"header-timeout": "header_timeout", "body-timeout": "body_timeout",
           "keepalive-timeout": "keepalive_timeout", "send-timeout": "send_timeout", "body-memory": "body_memory"}


def test_defaults_are_the_documented_ones(tmp_path, start_agent):
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "contrib" / "diskover-storage-agent.toml").read_text()
    parser = build_parser()
    config = AgentConfig(exports=[make_export(REMOTE, str(tmp_path))])
    documented = {}
    for option, dest in OPTIONS.items():
        row = re.search(rf"^\| `--{option} [A-Z]+` \| `([0-9.]+)` \|", readme, re.M)
        assert row, f"README documents no default for --{option}"
        documented[option] = float(row.group(1))
        assert float(parser.get_default(dest)) == documented[option]
        in_example = re.search(rf"^#\s*{option} = ([0-9.]+)$", example, re.M)
        assert in_example and float(in_example.group(1)) == documented[option], option
        value = getattr(config, dest)
        assert (value / 2**20 if dest == "body_memory" else value) == documented[option]
    assert documented == {"header-timeout": 60, "body-timeout": 60, "keepalive-timeout": 75,
                          "send-timeout": 60, "body-memory": 64}
    agent = start_agent([(REMOTE, str(tmp_path))])
    line = wait_for(lambda: next((x for x in agent.log if " limits: " in x), None), BOUND, "the limits line")
    assert ("header-timeout 60 s, body-timeout 60 s, keepalive-timeout 75 s, send-timeout 60 s, "
            "body-memory 64 MiB") in line


@pytest.mark.parametrize("value", ["0", "-1", '"soon"', "true"])
def test_bad_timeout_in_the_config_file_is_a_startup_error(tmp_path, value):
    conf = config_file(tmp_path, **{"send-timeout": value})
    r = subprocess.run([sys.executable, "-m", "diskover_storage_agent", "--config", conf, "-r", REMOTE,
                        str(tmp_path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "send-timeout" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- CPU work off the event loop ---------------------------------------------------------------

def heavy_patterns(seed: int, count: int, length: int) -> list[str]:
    """Patterns that cost the most to compile (many ``*``), distinct so that no cache helps."""
    return [("*a" * length)[: length - 8] + f"{seed:04d}{i:04d}" for i in range(count)]


def health_latencies(agent: Agent, done: threading.Event) -> list[float]:
    """How long health took, asked again and again until ``done``."""
    took = []
    while not done.is_set():
        start = time.monotonic()
        assert http_get(agent.port, "/_agent/health", timeout=BOUND)[0] == 200
        took.append(time.monotonic() - start)
    return took


def send_walks(agent: Agent, bodies: list[bytes], answers: list, done: threading.Event) -> list[threading.Thread]:
    def one(body: bytes) -> None:
        try:
            answers.append(http_get(agent.port, "/_agent/v1/walk?format=ndjson", method="POST", body=body,
                                    headers={"Content-Type": "application/json"}, timeout=60)[0])
        finally:
            if len(answers) == len(bodies):
                done.set()

    threads = [threading.Thread(target=one, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    return threads


def walks_beside_health(agent, bodies: list[bytes]) -> list:
    """Send the walks ``bodies`` at once while asking for health; health must answer within a
    second throughout. Returns the walks' statuses."""
    answers: list = []
    done = threading.Event()
    threads = send_walks(agent, bodies, answers, done)
    took = health_latencies(agent, done)
    for t in threads:
        t.join(60)
    assert max(took) < 1.0, f"health took {max(took):.1f} s"
    return answers


def test_oversized_patterns_do_not_stall_health(deep_tree, start_agent):
    """256 patterns of 1 KiB of each kind took 4 s to compile on the loop; now refused (400)."""
    agent = start_agent([(REMOTE, str(deep_tree))])
    bodies = [msgspec.json.encode({"paths": [REMOTE + "/small"], "exclude_dirs": heavy_patterns(k, 256, 1024),
                                   "exclude_files": heavy_patterns(k + 100, 256, 1024)}) for k in range(3)]
    assert walks_beside_health(agent, bodies) == [400] * 3


def test_heavy_patterns_compile_off_the_loop(deep_tree, start_agent):
    """Walks with the most patterns allowed (32 KiB of each kind), compiled in the pool:
    health keeps answering within a second meanwhile, and the walks are exact."""
    agent = start_agent([(REMOTE, str(deep_tree))], extra=("-c", "2"))
    bodies = [msgspec.json.encode({"paths": [REMOTE + "/small"], "exclude_dirs": heavy_patterns(k, 32, 1024),
                                   "exclude_files": heavy_patterns(k + 100, 32, 1024)}) for k in range(4)]
    assert walks_beside_health(agent, bodies) == [200] * 4
