"""The ``diskover-storage-agent`` command line, run as a real process: through
``python -m diskover_storage_agent`` and through the console script in the venv."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import REMOTE

SCRIPT = Path(sys.executable).with_name("diskover-storage-agent")
COMMANDS = {
    "module": [sys.executable, "-m", "diskover_storage_agent"],
    "script": [str(SCRIPT)],
}


@pytest.fixture(params=sorted(COMMANDS))
def agent_cmd(request) -> list[str]:
    if request.param == "script" and not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} is not installed")
    return COMMANDS[request.param]


def run(cmd: list[str], *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Running:
    """An agent process started with exactly the given arguments."""

    def __init__(self, cmd: list[str], *args: str) -> None:
        self.proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.log: list[str] = []
        self._ready = threading.Event()
        self._lines = threading.Condition()
        self.url = ""
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        if not self._ready.wait(20) or not self.url:
            self.stop()
            raise AssertionError("agent did not start:\n" + "".join(self.log))
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            with self._lines:
                self.log.append(line)
                self._lines.notify_all()
            if " listening on " in line and not self._ready.is_set():
                self.url = line.rsplit(" listening on ", 1)[1].split()[0]
                self._ready.set()
        self._ready.set()
        with self._lines:
            self._lines.notify_all()

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching ``pattern``, waiting for it up to ``timeout``."""
        rx = re.compile(pattern)

        def found():
            return next((line for line in self.log if rx.search(line)), None)

        with self._lines:
            self._lines.wait_for(lambda: found() is not None or not self._pump.is_alive(), timeout)
            line = found()
        assert line is not None, f"no log line matching {pattern!r} in:\n" + "".join(self.log)
        return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._pump.join(5)
        return rc


def get(port: int, target: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help entry (its lines joined), keyed by every one of its option strings."""
    blocks: dict[str, str] = {}
    names: list[str] = []
    for line in help_text.splitlines():
        if re.match(r"^ {1,4}-", line):
            head = re.split(r" {2,}", line.strip(), maxsplit=1)[0]
            names = re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", head)
            for name in names:
                blocks[name] = line.strip()
        elif names and line.startswith(" ") and line.strip():
            for name in names:
                blocks[name] += " " + line.strip()
        else:
            names = []
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items()}


def test_version(agent_cmd):
    r = run(agent_cmd, "--version")
    assert r.returncode == 0, r.stderr
    out = (r.stdout + r.stderr).strip()
    assert "diskover-storage-agent" in out
    assert version("diskover-storage-agent") in out.split()


def test_help_shows_original_options_and_defaults(agent_cmd):
    r = run(agent_cmd, "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: diskover-storage-agent")
    assert run(agent_cmd, "--help").stdout == r.stdout
    blocks = option_blocks(r.stdout)
    for short, long in (("-l", "--listen"), ("-p", "--port"), ("-c", "--maxconnections"),
                        ("-r", "--replacepath"), ("-v", "--verbose"), ("-h", "--help")):
        assert short in blocks and long in blocks, (short, long, r.stdout)
        assert blocks[short] == blocks[long], (short, long)  # one option, both names
    assert "--version" in blocks
    assert "(default: 0.0.0.0)" in blocks["--listen"]
    assert "(default: 9999)" in blocks["--port"]
    assert "(default: 50)" in blocks["--maxconnections"]
    # -r takes two paths: remote, then local
    assert re.search(r"-r \S+ \S+, --replacepath \S+ \S+", blocks["-r"]), blocks["-r"]


def test_missing_replacepath_is_a_usage_error(agent_cmd):
    r = run(agent_cmd, "-p", "0")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: diskover-storage-agent")
    assert "-r/--replacepath" in r.stderr and "required" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("what", ["missing", "file"])
def test_replacepath_local_must_be_a_directory(agent_cmd, tmp_path, what):
    local = tmp_path / "not-there"
    if what == "file":
        local = tmp_path / "a-file"
        local.write_text("x")
    r = run(agent_cmd, "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(local))
    assert r.returncode == 2, r.stderr
    assert str(local) in r.stderr
    assert ("does not exist" if what == "missing" else "is not a directory") in r.stderr
    assert "error" in r.stderr.lower()
    assert "Traceback" not in r.stderr
    assert "listening on" not in r.stderr


def test_second_export_checked_too(tmp_path):
    r = run(COMMANDS["module"], "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(tmp_path),
            "-r", "/mnt/other", str(tmp_path / "gone"))
    assert r.returncode == 2
    assert str(tmp_path / "gone") in r.stderr and "does not exist" in r.stderr


def test_busy_port_is_a_clear_error(agent_cmd, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        r = run(agent_cmd, "-l", "127.0.0.1", "-p", str(port), "-r", REMOTE, str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = r.stderr.lower()
    assert "error" in err
    assert "in use" in err, r.stderr
    assert str(port) in r.stderr  # names what it could not bind
    assert "listening on" not in r.stderr


def test_verbose_logs_request_lines(agent_cmd, tmp_path):
    (tmp_path / "somedir").mkdir()
    agent = Running(agent_cmd, "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(tmp_path), "-v")
    try:
        assert get(agent.port, REMOTE + "/somedir?format=ndjson")[0] == 200
        assert get(agent.port, REMOTE + "/not-here")[0] == 404
        line = agent.wait_log(r"GET /mnt/isilon/somedir\?format=ndjson\b.* 200\b")
        assert "127.0.0.1" in line
        agent.wait_log(r"GET /mnt/isilon/not-here\b.* 404\b")
    finally:
        rc = agent.stop()
    assert rc == 0


def test_quiet_without_verbose(tmp_path):
    agent = Running(COMMANDS["module"], "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(tmp_path))
    assert get(agent.port, REMOTE)[0] == 200
    assert agent.stop() == 0  # the log is complete once the process is gone
    assert not [line for line in agent.log if "GET /mnt/isilon" in line], agent.log


def test_default_port_is_9999(tmp_path):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 9999))
        except OSError:
            pytest.skip("port 9999 is in use on this machine")
    (tmp_path / "d").mkdir()
    agent = Running(COMMANDS["module"], "-l", "127.0.0.1", "-r", REMOTE, str(tmp_path))
    try:
        assert agent.url == "http://127.0.0.1:9999"
        assert get(9999, REMOTE) == (200, b"d/\n")
    finally:
        rc = agent.stop()
    assert rc == 0


def test_long_option_names_work(tmp_path):
    (tmp_path / "x").touch()
    agent = Running(COMMANDS["module"], "--listen", "127.0.0.1", "--port", "0", "--maxconnections", "3",
                    "--replacepath", REMOTE, str(tmp_path), "--verbose")
    try:
        assert get(agent.port, REMOTE) == (200, b"x\n")
        agent.wait_log(r"GET /mnt/isilon\b.* 200\b")
    finally:
        rc = agent.stop()
    assert rc == 0


def start_or_fail(cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    """Run the agent until it exits; one that starts serving instead is stopped, and the test fails."""
    proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " listening on " in line:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            raise AssertionError("the agent started serving:\n" + "".join(lines))
    return subprocess.CompletedProcess(proc.args, proc.wait(20), "", "".join(lines))


RESERVED = {"root": "/", "root-twice": "//", "agent": "/_agent", "agent-slash": "/_agent/",
            "agent-walk": "/_agent/v1/walk", "agent-other": "/_agent/x"}


@pytest.mark.parametrize("remote", list(RESERVED.values()), ids=list(RESERVED))
def test_reserved_remote_is_a_startup_error(tmp_path, remote):
    """REMOTE may be neither / (it would hide the agent's own endpoints) nor under /_agent:
    exit status 2 and one clear line naming it."""
    r = start_or_fail(COMMANDS["module"], "-l", "127.0.0.1", "-p", "0", "-r", remote, str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("diskover-storage-agent: error: -r REMOTE"), lines
    assert repr(remote) in lines[0] and "/_agent" in lines[0], lines


def test_not_reserved_look_alikes_are_accepted(tmp_path):
    agent = Running(COMMANDS["module"], "-l", "127.0.0.1", "-p", "0", "-r", "/_agents", str(tmp_path),
                    "-r", "/mnt/_agent", str(tmp_path))
    try:
        assert get(agent.port, "/_agents")[0] == 200
        assert get(agent.port, "/mnt/_agent")[0] == 200
    finally:
        assert agent.stop() == 0


def hide_uvloop(tmp_path: Path, monkeypatch) -> None:
    """Make ``import uvloop`` fail in the agents started from now on, as where the ``[fast]``
    extra is not installed (the scratch copy of a mutation check stays first on the path)."""
    shadow = tmp_path / "no-uvloop"
    (shadow / "uvloop").mkdir(parents=True)
    (shadow / "uvloop" / "__init__.py").write_text('raise ImportError("uvloop is not installed here")\n')
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", (path + os.pathsep if path else "") + str(shadow))


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop (the [fast] extra) does not run on Windows")
@pytest.mark.parametrize("installed", [True, False])
def test_event_loop_is_uvloop_when_installed(tmp_path, monkeypatch, installed):
    """With the ``[fast]`` extra (in the ``test`` extra too) the agent runs on uvloop, and says
    so; without it, on asyncio's own loop."""
    if installed:
        import uvloop  # noqa: F401  -- the test extra installs it: a failure here is a broken venv
    else:
        hide_uvloop(tmp_path, monkeypatch)
    agent = Running(COMMANDS["module"], "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(tmp_path))
    try:
        assert get(agent.port, REMOTE)[0] == 200
        line = agent.wait_log(r"event loop: ")
    finally:
        assert agent.stop() == 0
    loop = line.split("event loop: ", 1)[1].strip()
    if installed:
        assert loop == "uvloop.Loop", line
    else:
        assert loop.startswith("asyncio."), line
