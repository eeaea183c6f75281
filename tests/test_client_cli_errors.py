"""The ``diskover-agent`` console script where a run cannot go as asked: bad token and CA
files, hosts written with spaces, output that cannot be written, a missing extra, TLS on
one side only, a host that stops answering mid-walk, and the progress line of a run cut
short. Each gets one line on stderr (never a traceback) and the documented exit status;
real subprocesses against real agents on loopback."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import walk_records

from conftest import REMOTE, cli_env, drain_pty, make_wide_tree, open_pty, reference_walk, wait_for, write_tls_files

SCRIPT = Path(sys.executable).with_name("diskover-agent")
AGENT_SCRIPT = Path(sys.executable).with_name("diskover-storage-agent")
DASK_INSTALL = b"pip install '.[dask]' (in the diskover-storage-agent checkout)"


def cli(*args: str, env: dict[str, str] | None = None, stdout=subprocess.PIPE,
        timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], stdout=stdout, stderr=subprocess.PIPE, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env if env is not None else cli_env())


def one_line(r: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single line a failed run printed on stderr, checked: the status, no traceback."""
    assert r.returncode == status, r.stderr
    assert b"Traceback" not in r.stderr and b"Exception ignored" not in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"diskover-agent: "), r.stderr
    return r.stderr.decode()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_wide_tree(tmp_path / "wide")


@pytest.fixture
def dead_host() -> str:
    """A loopback port that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


# -- token and CA files ------------------------------------------------------------------------

SECRET = b"s3cretpart"


@pytest.mark.parametrize("content", [SECRET + b"-one\n" + SECRET + b"-two\n", b"\x00\xff" + SECRET + b"\x80\x01"],
                         ids=["multi-line", "binary"])
def test_token_file_that_is_not_one_token(tmp_path, dead_host, content):
    """Refused by the client and the agent alike, in one line that never quotes the file."""
    token = tmp_path / "token"
    token.write_bytes(content)
    said = []
    for command in (["ls", REMOTE], ["walk", REMOTE], ["du", REMOTE]):
        line = one_line(cli("--hosts", dead_host, "--token-file", str(token), *command))
        assert f"the token file {token}" in line and "one token" in line
        said.append(line.encode())
    r = subprocess.run([str(AGENT_SCRIPT), "-l", "127.0.0.1", "-p", "0", "-r", REMOTE, str(tmp_path),
                        "--token-file", str(token)], capture_output=True, timeout=30, env=cli_env())
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr, r.stderr
    assert f"--token-file: the token file {token}".encode() in r.stderr
    for shown in (r.stderr, *said):
        assert SECRET[:4] not in shown.replace(str(tmp_path).encode(), b"")


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"],
                         ids=["empty", "text", "broken-pem"])
def test_cafile_without_a_certificate(tmp_path, dead_host, content):
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(content)
    for command in (["ls", REMOTE], ["walk", REMOTE]):
        line = one_line(cli("--hosts", dead_host, "--cafile", str(cafile), *command))
        assert line == f"diskover-agent: --cafile {cafile}: no certificate in it (a PEM file of CA certificates " \
                       "is expected)\n"
    line = one_line(cli("--hosts", dead_host, "--cafile", str(tmp_path / "missing.pem"), "ls", REMOTE))
    assert "missing.pem: No such file or directory" in line


# -- hosts -----------------------------------------------------------------------------------

def test_hosts_are_separated_by_commas_not_spaces(tree, start_agent):
    a, b = start_agent([(REMOTE, str(tree))]), start_agent([(REMOTE, str(tree))])
    spaced = f"{a.hostspec} {b.hostspec}"
    for r in (cli("--hosts", spaced, "ls", REMOTE), cli("ls", REMOTE, env=cli_env(DISKOVER_AGENT_HOSTS=spaced))):
        assert one_line(r) == f"diskover-agent: bad host {spaced!r}: separate hosts with commas (a,b), not spaces\n"
        assert r.stdout == b""
    r = cli("--hosts", f"{a.hostspec}, {b.hostspec}", "ls", REMOTE)  # spaces around the commas are fine
    assert (r.returncode, r.stdout.split()) == (0, [f"d{d:02}".encode() for d in range(20)]), r.stderr


# -- output that cannot be written -------------------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_output_that_cannot_be_written_exits_2(tree, tmp_path, start_agent):
    agent = start_agent([(REMOTE, str(tree))])
    h = agent.hostspec
    for fmt in ("ndjson", "csv"):
        line = one_line(cli("--hosts", h, "walk", "--format", fmt, "-o", "/dev/full", REMOTE))
        assert line == "diskover-agent: cannot write /dev/full: No space left on device\n"
    dataset = tmp_path / "ds"
    assert cli("--hosts", h, "-q", "walk", "--format", "parquet", "-o", str(dataset), REMOTE).returncode == 0
    with open("/dev/full", "wb") as full:
        for command in (["walk", REMOTE], ["walk", "--format", "csv", REMOTE], ["ls", REMOTE], ["du", REMOTE],
                        ["report", str(dataset)]):
            r = cli("--hosts", h, "-q", *command, stdout=full)
            assert one_line(r) == "diskover-agent: cannot write the output: No space left on device\n", command


def _small_files() -> None:
    """In the child: files may not grow past 64 bytes, and writing past it fails with EFBIG
    (instead of killing the process), as on a file system that is full."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
def test_output_file_that_cannot_grow_exits_2(tree, tmp_path, start_agent, unbuffered):
    """Output to a regular file is buffered: what fails is the last flush, which must be the
    command's own (one line, status 2), not the interpreter's at exit. Unbuffered, a write
    that stops short at the limit must not lose the rest silently."""
    agent = start_agent([(REMOTE, str(tree))])
    dataset = tmp_path / "ds"
    r = cli("--hosts", agent.hostspec, "-q", "walk", "--format", "parquet", "-o", str(dataset), REMOTE)
    assert r.returncode == 0, r.stderr
    for command in (["walk", REMOTE], ["ls", REMOTE], ["du", REMOTE], ["report", str(dataset)]):
        with open(tmp_path / "out", "wb") as out:
            r = subprocess.run([str(SCRIPT), "--hosts", agent.hostspec, "-q", *command], stdout=out,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60,
                               env={k: v for k, v in cli_env(PYTHONUNBUFFERED=unbuffered).items() if v},
                               preexec_fn=_small_files)
        assert one_line(r) == "diskover-agent: cannot write the output: File too large\n", command


@pytest.mark.parametrize("command", [["walk", REMOTE], ["ls", REMOTE], ["du", REMOTE]])
def test_output_pipe_closed_before_the_first_write(tree, start_agent, command):
    """A pipe nobody reads any more (``| head`` gone): status 141, not a word on stderr."""
    agent = start_agent([(REMOTE, str(tree))])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = cli("--hosts", agent.hostspec, *command, stdout=write_end)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, b"")


# -- a missing extra -----------------------------------------------------------------------------

#: A ``sitecustomize`` that makes the [dask] extra's modules unimportable, as where it is not
#: installed: ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` says None.
_BLOCKER = """
import sys
for name in ("distributed", "dask", "pyarrow", "duckdb"):
    sys.modules[name] = None
"""


def test_missing_dask_extra_names_the_pip_install(tmp_path, dead_host):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(_BLOCKER)
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "block"), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import pyarrow"], capture_output=True, env=env)
    assert b"ModuleNotFoundError" in probe.stderr  # the blocker works
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "part-000000.ndjson").write_bytes(b"")
    out = str(tmp_path / "out")
    for args, what in (
        (["walk", "--dask", "local:1", "-o", out, REMOTE], "--dask needs distributed and pyarrow, which are"),
        (["walk", "--dask", "local:1", "--format", "ndjson", "-o", out, REMOTE], "--dask needs distributed, which is"),
        (["walk", "--format", "parquet", "-o", out, REMOTE], "--format parquet needs pyarrow, which is"),
        (["report", str(tmp_path / "ds")], "report needs duckdb, which is"),
    ):
        line = one_line(cli("--hosts", dead_host, *args, env=env)).encode()
        assert line.startswith(f"diskover-agent: {what} not installed here: ".encode()), line
        assert line.rstrip().endswith(DASK_INSTALL)  # before any agent is asked (this one is down)
    assert not os.path.exists(out)


# -- TLS on one side only -------------------------------------------------------------------------

def test_tls_on_one_side_only_says_add_or_remove_tls(tmp_path, start_agent):
    write_tls_files(tmp_path)
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)
    tls = start_agent([(REMOTE, str(top))], extra=("--tls-cert", str(tmp_path / "cert.pem"),
                                                   "--tls-key", str(tmp_path / "key.pem")))
    plain = start_agent([(REMOTE, str(top))])
    for command in (["ls", REMOTE], ["walk", REMOTE], ["du", REMOTE]):
        # at once, not after --retry-for: a client that kept retrying would outlast cli()'s timeout
        line = one_line(cli("--hosts", tls.hostspec, "--retry-for", "3600", *command))
        assert line == f"diskover-agent: {tls.hostspec} serves HTTPS: add --tls (with --cafile FILE for a " \
                       "private CA)\n"
        for client in (["--tls"], ["--cafile", str(tmp_path / "ca.pem")], ["--tls", "--insecure"]):
            line = one_line(cli("--hosts", plain.hostspec, "--retry-for", "3600", *client, *command))
            assert line == f"diskover-agent: {plain.hostspec} serves plain HTTP, not HTTPS: remove --tls " \
                           "(and --cafile, --insecure)\n"
        assert cli("--hosts", tls.hostspec, "--cafile", str(tmp_path / "ca.pem"), "-q", *command).returncode == 0


def test_insecure_without_tls(dead_host):
    line = one_line(cli("--hosts", dead_host, "--insecure", "ls", REMOTE))
    assert line == "diskover-agent: --insecure turns off the certificate checks of --tls: add --tls, or drop " \
                   "--insecure\n"


# -- a host that stops answering mid-walk -----------------------------------------------------------

def test_host_killed_mid_walk_is_named_when_set_aside_and_in_the_summary(tree, tmp_path, start_agent):
    """Two agents; the second is stopped (SIGSTOP) before the walk, so the walk requests it
    gets wait unanswered and the walk cannot end; once one is on its way, the agent is
    SIGKILLed. The walk goes on through the first agent and is exact; stderr names the
    killed host once, when it is set aside (before the walk ends), and the summary names it."""
    good = start_agent([(REMOTE, str(tree))])
    doomed = start_agent([(REMOTE, str(tree))])
    os.kill(doomed.pid, signal.SIGSTOP)
    out = tmp_path / "out.ndjson"
    # the first host answers the check before the walk; the walk spreads its requests over both
    proc = subprocess.Popen([str(SCRIPT), "--hosts", f"{good.hostspec},{doomed.hostspec}", "walk", "-o", str(out),
                             REMOTE], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stderr is not None
    try:
        def asking_doomed() -> bool:  # a walk connection to the stopped agent (the kernel accepted it)
            assert proc.poll() is None, "the walk ended while a request of it could not be answered"
            return any(c.raddr and c.raddr.port == doomed.port and c.status == psutil.CONN_ESTABLISHED
                       for c in psutil.Process(proc.pid).net_connections("tcp"))

        wait_for(asking_doomed, what="a walk request to the stopped agent")
        os.kill(doomed.pid, signal.SIGKILL)
        first = proc.stderr.readline().decode()  # said while the walk goes on
        assert re.fullmatch(rf"diskover-agent: {doomed.hostspec} is set aside, not answering: \S.*\n", first), first
        rest = proc.stderr.read().decode()
        assert proc.wait(60) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = rest.splitlines()
    assert len(summary) == 1 and summary[0].startswith("diskover-agent: 21 directories, 5,020 entries, "), rest
    assert summary[0].endswith(f"1/2 hosts, set aside (not answering): {doomed.hostspec})")
    walked, _ = reference_walk(tree, nocaps=False)
    paths = [walk_records.path(row) for row in walk_records.read_ndjson(out.read_bytes())]
    want = sorted(os.path.join(r, n) for r, d, f in walked for n in d + f)
    assert sorted(paths) == want  # every entry once


# -- the progress line of a run cut short, and of walk --dask ----------------------------------------------

def on_terminal(args: list[str], *, read_first_line: bool = False, columns: int = 60) -> tuple[int, bytes, bytes]:
    """Run the script with stderr on a pseudo-terminal ``columns`` wide and stdout a pipe;
    with ``read_first_line``, the pipe is closed after the first line (as ``| head -1``).
    ``(status, first stdout line, what the terminal got)``."""
    master, slave = open_pty(columns)
    proc = subprocess.Popen([str(SCRIPT), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=cli_env())
    os.close(slave)
    assert proc.stdout is not None
    first = b""
    if read_first_line:
        first = proc.stdout.readline()
        proc.stdout.close()
    seen = drain_pty(master)
    if not read_first_line:
        proc.stdout.read()
    return proc.wait(60), first, seen


def screen(raw: bytes, columns: int) -> list[str]:
    """The lines a terminal ``columns`` wide shows after ``raw`` (``\\r``, ``\\n``, wrapping)."""
    rows: list[list[str]] = [[]]
    col = 0
    for ch in raw.decode():
        if ch == "\r":
            col = 0
        elif ch == "\n":
            rows.append([])
            col = 0
        else:
            if col == columns:  # wrap
                rows.append([])
                col = 0
            row = rows[-1]
            row.extend(" " * (col + 1 - len(row)))
            row[col] = ch
            col += 1
    return ["".join(r).rstrip() for r in rows]


PROGRESS = re.compile(r"(\d+) dirs \([^)]+ dirs/s\), (\S+) entries \(\S+/s\), (\d+ B|[\d.]+ [KMG]iB) in files, "
                      r"hosts (\d+)/(\d+), (\d+) errors? \[\d\d:\d\d\]")


def test_progress_leaves_nothing_behind_when_the_output_is_closed_early(tree, start_agent):
    agent = start_agent([(REMOTE, str(tree))])
    rc, first, seen = on_terminal(["--hosts", agent.hostspec, "walk", REMOTE], read_first_line=True, columns=40)
    assert rc == 141
    assert first.startswith(b'{"parent":"/mnt/isilon')
    assert b"0 dirs (" in seen  # the line was shown
    assert b"Traceback" not in seen and b"Exception" not in seen
    assert all(line == "" for line in screen(seen, 40)), screen(seen, 40)


def test_dask_walk_shows_the_same_progress_line(tree, tmp_path, start_agent):
    pytest.importorskip("distributed")
    agent = start_agent([(REMOTE, str(tree))])
    finals = []
    for extra in ([], ["--dask", "local:1", "--format", "ndjson"]):
        out = str(tmp_path / f"out{len(finals)}")
        rc, _, seen = on_terminal(["--hosts", agent.hostspec, "walk", *extra, "-o", out, REMOTE], columns=160)
        assert rc == 0, seen
        shown = [m.groups() for m in PROGRESS.finditer(seen.decode())]
        assert shown, seen
        finals.append(shown[-1])
        left = "".join(screen(seen, 160))  # what stays on the terminal: the summary line alone
        assert left.startswith("diskover-agent: 21 directories, 5,020 entries"), left
        assert " dirs (" not in left and "[00:" not in left, left
    assert finals[0] == finals[1] == ("21", "5.02k", "0 B", "1", "1", "0")


def test_report_of_a_damaged_dataset_is_one_line(tmp_path):
    """A partition that is not Parquet: the dataset is named, status 2, no DuckDB traceback."""
    (tmp_path / "part-000000.parquet").write_bytes(b"not parquet at all\n" * 10)
    line = one_line(cli("report", str(tmp_path)))
    assert line.startswith(f"diskover-agent: {tmp_path}: not a walk's output ("), line
