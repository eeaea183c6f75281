"""The ``diskover-agent`` client command line (ls, walk, du), run as the installed console
script against real agents on loopback, its output checked against the local file system
(``os.walk`` + ``os.lstat``, and GNU ``ls``/``du`` where they apply)."""

from __future__ import annotations

import errno
import fnmatch
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from walk_records import expected_row, key, read_csv, read_ndjson
from walk_records import path as raw_path

from conftest import (
    HAVE_SETPRIV,
    IS_ROOT,
    NO_SETPRIV,
    REMOTE,
    cli_env,
    drain_pty,
    make_awkward_tree,
    make_wide_tree,
    open_pty,
    reference_walk,
    settle_atimes,
    vary_owners_and_times,
    write_tls_files,
)

SCRIPT = Path(sys.executable).with_name("diskover-agent")
RB = REMOTE.encode()


@pytest.fixture(autouse=True, scope="module")
def _script_installed() -> None:
    if not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} is not installed (pip install -e .)")


def cli(*args: str, env: Optional[dict[str, str]] = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the console script with exactly these arguments; stdout and stderr as bytes."""
    return subprocess.run([str(SCRIPT), *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env if env is not None else cli_env())


def hosts_of(*agents) -> str:
    return ",".join(a.hostspec for a in agents)


# -- trees and the local reference ----------------------------------------------------------------

def readable_tree(tmp_path: Path) -> Path:
    """The awkward tree (every kind of name and entry) with everything readable, plus hard links,
    a sparse file and an old file."""
    tmp_path.chmod(0o755)
    top = make_awkward_tree(tmp_path)
    for sub in ("locked", "noexec"):
        os.chmod(top / sub, 0o755)
    (top / "plain" / "hl1").write_bytes(b"h" * 3000)
    os.link(top / "plain" / "hl1", top / "plain" / "hl2")
    with open(top / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"data")
    (top / "old").write_bytes(b"o")
    vary_owners_and_times(top)  # the new entries too
    os.utime(top / "old", (978307200, 978307200))
    settle_atimes(top)
    return top


def remote_of(local_top: Path, path: bytes) -> bytes:
    lb = os.fsencode(local_top)
    assert path.startswith(lb)
    return RB + path[len(lb):]


def excluded(name: bytes, remote: bytes, patterns: list[str]) -> bool:
    for p in map(os.fsencode, patterns):
        if fnmatch.fnmatchcase(remote if b"/" in p else name, p):
            return True
    return False


def local_walk(top: Path, maxdepth: Optional[int] = None, exclude: tuple[str, ...] = ()) -> dict[bytes, dict]:
    """What ``walk`` must print: os.walk of the local tree, pruned the same way, by remote path."""
    lb = os.fsencode(top)
    out: dict[bytes, dict] = {}
    for root, dirs, files in os.walk(lb):
        rel = root[len(lb):].strip(b"/")
        depth = rel.count(b"/") + 1 if rel else 0
        rroot = remote_of(top, root)
        dirs[:] = [d for d in dirs if not excluded(d, rroot + b"/" + d, list(exclude))]
        names = dirs + [f for f in files if not excluded(f, rroot + b"/" + f, list(exclude))]
        if maxdepth is not None and depth + 1 >= maxdepth:
            dirs[:] = []
            if depth + 1 > maxdepth:
                continue
        for name in names:
            remote = rroot + b"/" + name
            out[remote] = expected_row(rroot, name, os.path.join(root, name))
    return out


def parse_ndjson(data: bytes) -> dict[bytes, dict]:
    """NDJSON walk records by the exact path of their entry (every key in the documented order)."""
    records = read_ndjson(data)
    by_path = {raw_path(r): r for r in records}
    assert len(by_path) == len(records), "an entry was written twice"
    return by_path


# -- ls --------------------------------------------------------------------------------------

@pytest.fixture
def ls_dir(tmp_path: Path) -> Path:
    d = tmp_path / "lsdir"
    d.mkdir()
    (d / "file").write_bytes(b"x" * 1234)
    (d / "sub").mkdir()
    os.symlink("file", d / "link")
    os.mkfifo(d / "fifo")
    (d / "old").write_bytes(b"")
    os.utime(d / "old", (978307200, 978307200))
    with open(os.path.join(os.fsencode(d), b"bad\xffname"), "wb") as f:
        f.write(b"y" * 70000)
    if IS_ROOT:
        os.chown(d / "file", 4242, 4343)  # no such user here: shown as numbers
    return d


def test_ls_names_sorted_by_bytes(ls_dir, start_agent):
    agent = start_agent([(REMOTE, str(ls_dir))])
    r = cli("--hosts", agent.hostspec, "ls", REMOTE)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(os.fsencode(ls_dir)))
    assert r.stdout == b"".join(n + b"\n" for n in names)
    assert r.stderr == b""


def ls_time(mtime: float) -> str:
    lt = time.localtime(mtime)
    recent = time.time() - 31_556_952 // 2 < mtime <= time.time()
    return time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", lt)


@pytest.mark.parametrize("numeric", [False, True])
def test_ls_long_matches_lstat(ls_dir, start_agent, numeric):
    agent = start_agent([(REMOTE, str(ls_dir))])
    r = cli("--hosts", agent.hostspec, "ls", "-l", *(["-n"] if numeric else []), REMOTE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split(b"\n")
    assert lines[-1] == b""
    names = sorted(os.listdir(os.fsencode(ls_dir)))
    sts = {n: os.lstat(os.path.join(os.fsencode(ls_dir), n)) for n in names}
    assert lines[0] == f"total {-(-sum(st.st_blocks for st in sts.values()) * 512 // 1024)}".encode()
    assert len(lines) == len(names) + 2
    for line, name in zip(lines[1:-1], names, strict=True):
        fields = line.split(None, 8)
        st = sts[name]
        mode, nlink, owner, group, size, mon, day, hhmm_or_year, shown = fields
        assert mode.decode() == stat.filemode(st.st_mode)
        assert int(nlink) == st.st_nlink
        if numeric:
            assert (int(owner), int(group)) == (st.st_uid, st.st_gid)
        else:
            try:
                want = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                want = str(st.st_uid)
            assert owner.decode() == want
        assert int(size) == st.st_size
        assert b" ".join([mon, day, hhmm_or_year]).decode() == " ".join(ls_time(st.st_mtime).split())
        assert shown == name  # exact bytes; a symlink's target is not shown (the agent does not send it)


def test_ls_long_like_gnu_ls(ls_dir, start_agent):
    """Column for column what ``LC_ALL=C ls -l`` (``-n``, ``-h``) prints, but for a symlink's ``-> target``."""
    if shutil.which("ls") is None:
        pytest.skip("no ls")
    agent = start_agent([(REMOTE, str(ls_dir))])
    env = cli_env(LC_ALL="C")
    env.pop("TIME_STYLE", None)
    env.pop("QUOTING_STYLE", None)
    env.pop("BLOCK_SIZE", None)
    env.pop("LS_BLOCK_SIZE", None)
    for options in (["-l"], ["-l", "-n"], ["-l", "-h"]):
        ours = cli("--hosts", agent.hostspec, "ls", *options, REMOTE, env=env)
        theirs = subprocess.run(["ls", *options, "-N", str(ls_dir)], capture_output=True, env=env, check=True).stdout
        theirs = b"\n".join(line.split(b" -> ")[0] if line.startswith(b"l") else line for line in theirs.split(b"\n"))
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs, options


def test_ls_error_and_env_hosts(ls_dir, start_agent):
    agent = start_agent([(REMOTE, str(ls_dir))])
    env = cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec)
    assert cli("ls", REMOTE, env=env).returncode == 0
    r = cli("-q", "walk", REMOTE, env=env)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == len(os.listdir(ls_dir))  # "sub" is empty
    r = cli("ls", REMOTE + "/nope", env=env)
    assert r.returncode == 1
    assert r.stderr == f"diskover-agent: {REMOTE}/nope: No such file or directory\n".encode()
    r = cli("ls", REMOTE + "/file", env=env)
    assert (r.returncode, r.stderr) == (1, f"diskover-agent: {REMOTE}/file: Not a directory\n".encode())


def test_names_escaped_on_a_terminal_exact_otherwise(tmp_path, start_agent):
    top = tmp_path / "names"
    top.mkdir()
    for raw in (b"new\nline", b"esc\x1b[31mred", b"bad\xff", "ünï".encode()):
        (top / os.fsdecode(raw)).mkdir()
    agent = start_agent([(REMOTE, str(top))])
    names = sorted(os.listdir(os.fsencode(top)))
    assert cli("--hosts", agent.hostspec, "ls", REMOTE).stdout == b"".join(n + b"\n" for n in names)
    rc, seen = run_on_terminal("--hosts", agent.hostspec, "ls", REMOTE, stream="stdout")
    assert rc == 0
    assert seen.split(b"\r\n") == [b"bad\\xff", b"esc\\x1b[31mred", b"new\\nline", "ünï".encode(), b""]
    rc, seen = run_on_terminal("--hosts", agent.hostspec, "-q", "du", REMOTE, stream="stdout")
    assert rc == 0 and b"\t/mnt/isilon/new\\nline\r\n" in seen and b"\x1b" not in seen


# -- walk ------------------------------------------------------------------------------------

def test_walk_ndjson_equals_local_walk(tmp_path, start_agent):
    top = readable_tree(tmp_path)
    a, b = start_agent([(REMOTE, str(top))]), start_agent([(REMOTE, str(top))])
    r = cli("--hosts", hosts_of(a, b), "walk", REMOTE)
    assert r.returncode == 0, r.stderr
    got = parse_ndjson(r.stdout)
    want = local_walk(top)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path] == want[path], path
    bad = got[RB + b"/bad\xff\xfename/inner\xff"]
    assert (bad["parent"], bad["name"]) == (f"{REMOTE}/bad\ufffd\ufffdname", "inner\ufffd")
    assert (bad["parent_raw"], bad["name_raw"]) == (RB + b"/bad\xff\xfename", b"inner\xff")
    assert got[RB + b"/link-to-dir"]["target_type"] == "dir"
    assert got[RB + b"/dangling"]["target_type"] is None
    assert '"name_raw":"aW5uZXL/"' in r.stdout.decode("utf-8")  # the exact bytes, base64
    # the summary line
    assert r.stderr.count(b"\n") == 1
    assert r.stderr.startswith(f"diskover-agent: {1 + sum(r['type'] == 'dir' for r in want.values())} directories, "
                               f"{len(want):,} entries, ".encode()), r.stderr


def test_walk_csv_to_file_equals_local_walk(tmp_path, start_agent):
    top = readable_tree(tmp_path)
    agent = start_agent([(REMOTE, str(top))])
    out = tmp_path / "walk.csv"
    r = cli("--hosts", agent.hostspec, "-q", "walk", "--format", "csv", "-o", str(out), REMOTE)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    rows = read_csv(out.read_bytes())  # the header is the documented columns
    got = {raw_path(row): row for row in rows}
    assert len(got) == len(rows)
    assert got == local_walk(top)
    assert b",aW5uZXL/," in out.read_bytes()  # a name that is not UTF-8: its exact bytes, base64


@pytest.mark.parametrize(("maxdepth", "exclude"), [
    (None, ("plain", "*.txt", f"{REMOTE}/deep/a/*")),
    (0, ()),
    (1, ()),
    (2, ("with space", "#")),
    (3, ("[eh]*",)),
])
def test_walk_maxdepth_and_exclude_like_os_walk_pruning(tmp_path, start_agent, maxdepth, exclude):
    top = readable_tree(tmp_path)
    agent = start_agent([(REMOTE, str(top))])
    args = [] if maxdepth is None else ["--maxdepth", str(maxdepth)]
    for pattern in exclude:
        args += ["--exclude", pattern]
    r = cli("--hosts", agent.hostspec, "walk", *args, REMOTE)
    assert r.returncode == 0, r.stderr
    got = parse_ndjson(r.stdout)
    want = local_walk(top, maxdepth, exclude)
    assert got.keys() == want.keys()
    assert got == want
    if maxdepth == 1:
        assert want.keys() == {RB + b"/" + n for n in os.listdir(os.fsencode(top))}


@pytest.mark.skipif(IS_ROOT and not HAVE_SETPRIV, reason=NO_SETPRIV)
def test_walk_unreadable_directories_exit_1(awkward_tree, start_agent):
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    r = cli("--hosts", agent.hostspec, "walk", REMOTE)
    assert r.returncode == 1, r.stderr
    walked, errors = reference_walk(awkward_tree)
    assert errors, "the tree has unreadable directories"
    lines = r.stderr.decode().splitlines()
    for num, path in errors:
        assert f"diskover-agent: {path.decode()}: {os.strerror(num)}" in lines
    assert lines[-1].startswith("diskover-agent: ") and f"{len(errors)} error" in lines[-1]
    rows = read_ndjson(r.stdout)
    got = {raw_path(row): row for row in rows if row["type"] != "error"}
    assert len(got) + len(errors) == len(rows)
    assert got.keys() == {os.path.join(root, n) for root, dirs, files in walked for n in dirs + files}
    # each directory that failed is a row too, as in the dataset
    failed = sorted((row["error_errno"], key(row)[0]) for row in rows if row["type"] == "error")
    assert failed == sorted(errors)
    for row in rows:
        if row["type"] == "error":
            assert (row["name"], row["error_code"], row["error_message"]) == (
                "", errno.errorcode[row["error_errno"]], os.strerror(row["error_errno"]))
    # entries of a directory that can be read but not searched are listed without their stat
    child = got[RB + b"/noexec/child"]
    assert child["type"] == "dir" and child["size"] is None and child["mtime_ns"] is None


# -- du --------------------------------------------------------------------------------------

@pytest.fixture
def du_tree(tmp_path: Path) -> Path:
    top = tmp_path / "du"
    for d in ("a/b/c", "a/empty", "big", "links", "other"):
        (top / d).mkdir(parents=True)
    (top / "a" / "f1").write_bytes(b"1" * 10_000)
    (top / "a" / "b" / "f2").write_bytes(b"2" * 300)
    (top / "a" / "b" / "c" / "f3").write_bytes(b"3" * 5_000_000)
    with open(top / "big" / "sparse", "wb") as f:
        f.truncate(50_000_000)
        f.write(b"s" * 8192)
    (top / "links" / "one").write_bytes(b"L" * 70_000)
    os.link(top / "links" / "one", top / "links" / "two")  # same inode twice in one directory
    os.symlink("../a", top / "links" / "sym")
    os.mkfifo(top / "other" / "fifo")
    with open(os.path.join(os.fsencode(top), b"other", b"n\xe9e"), "wb") as f:
        f.write(b"x" * 4097)
    settle_atimes(top)
    return top


def local_du(top: Path) -> dict[bytes, tuple[int, int, int, int]]:
    """Per-directory ``(files, apparent, allocated, dirs)`` totals, everything below included, each
    inode counted once (in the directory of its first path in byte order), each directory itself too."""
    lb = os.fsencode(top)
    own: dict[bytes, list[int]] = {}
    inodes: dict[tuple[int, int], tuple[bytes, bytes, os.stat_result]] = {}
    for root, dirs, files in os.walk(lb):
        r = remote_of(top, root)
        st = os.lstat(root)
        own.setdefault(r, [0, 0, 0])[1:] = [st.st_size, st.st_blocks * 512]
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISDIR(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            if key not in inodes or r + b"/" + name < inodes[key][0]:
                inodes[key] = (r + b"/" + name, r, st)
    for _path, r, st in inodes.values():
        own[r][0] += 1
        own[r][1] += st.st_size
        own[r][2] += st.st_blocks * 512
    return {d: (*(sum(own[x][i] for x in own if x == d or x.startswith(d + b"/")) for i in range(3)),
                sum(1 for x in own if x == d or x.startswith(d + b"/")))
            for d in own}


def du_order(top: Path, files: bool = False) -> list[bytes]:
    """The remote paths in the order du prints them: each directory after everything below it,
    siblings in byte order (GNU du takes them in readdir order)."""
    out: list[bytes] = []

    def visit(local: bytes, remote: bytes) -> None:
        for name in sorted(os.listdir(local)):
            st = os.lstat(os.path.join(local, name))
            if stat.S_ISDIR(st.st_mode):
                visit(os.path.join(local, name), remote + b"/" + name)
            elif files:
                out.append(remote + b"/" + name)
        out.append(remote)

    visit(os.fsencode(top), RB)
    return out


def parse_du(out: bytes) -> list[tuple[bytes, bytes]]:
    """``(size, path)`` of each line of du output, in order."""
    return [tuple(line.split(b"\t", 1)) for line in out.splitlines()]  # type: ignore[misc]


def gnu_du(top: Path, *args: str) -> dict[bytes, bytes]:
    if shutil.which("du") is None:
        pytest.skip("no du")
    out = subprocess.run(["du", *args, str(top)], capture_output=True, check=True, env=cli_env(LC_ALL="C")).stdout
    return {remote_of(top, path): size for size, path in (line.split(b"\t", 1) for line in out.splitlines())}


@pytest.mark.parametrize("options", [(), ("--apparent-size",), ("-h",), ("-h", "--apparent-size"), ("-b",),
                                     ("-k",), ("-a", "-b"), ("-a",), ("-b", "-k"), ("-ak", "--apparent-size")])
def test_du_prints_as_gnu_du(du_tree, start_agent, options):
    """Each line is GNU du's for the same tree and options (SIZE, a tab, the path), in du's
    order: a directory after everything below it."""
    agent = start_agent([(REMOTE, str(du_tree))])
    r = cli("--hosts", agent.hostspec, "-q", "du", *options, REMOTE)
    assert (r.returncode, r.stderr) == (0, b"")
    rows = parse_du(r.stdout)
    gnu = gnu_du(du_tree, *options)
    all_files = any("a" in o for o in options if not o.startswith("--"))
    links = {RB + b"/links/one", RB + b"/links/two"}  # one inode: GNU du -a prints the name readdir gives first
    if all_files:
        ours = dict((p, s) for s, p in rows)
        assert RB + b"/links/two" not in ours and [ours[RB + b"/links/one"]] == [gnu[p] for p in links if p in gnu]
    rows = [(s, p) for s, p in rows if p not in links]
    assert {p: s for s, p in rows} == {p: s for p, s in gnu.items() if p not in links}
    assert [p for _s, p in rows] == [p for p in du_order(du_tree, all_files) if p not in links]


def test_du_counts_max_depth_summarize_total_and_cross_directory_hard_link(du_tree, start_agent):
    os.link(du_tree / "links" / "one", du_tree / "a" / "b" / "three")  # now also in another directory
    settle_atimes(du_tree)
    agent = start_agent([(REMOTE, str(du_tree))])
    want = local_du(du_tree)
    du = ("--hosts", agent.hostspec, "-q", "du")
    r = cli(*du, "-b", "--counts", "--max-depth", "1", REMOTE)
    assert r.returncode == 0, r.stderr
    rows = [line.split(b"\t") for line in r.stdout.splitlines()]
    depth1 = [p for p in du_order(du_tree) if p == RB or p.count(b"/") == RB.count(b"/") + 1]
    assert [p for *_, p in rows] == depth1  # no total line
    assert {p: (int(f), int(d), int(s)) for s, f, d, p in rows} == {p: (want[p][0], want[p][3], want[p][1])
                                                                   for p in depth1}
    assert want[RB + b"/a"][0] == 4 and want[RB + b"/links"][0] == 1  # "a/b/three" < "links/one": counted in a
    assert gnu_du(du_tree, "-b", "-s")[RB] == rows[-1][0]  # the top's total is GNU du's, however it splits links
    # -s: the top only, once; -c: a grand total line; both: the two lines
    assert cli(*du, "-s", "-h", REMOTE).stdout == gnu_du(du_tree, "-h", "-s")[RB] + b"\t" + RB + b"\n"
    r = cli(*du, "-c", REMOTE)
    assert r.stdout.splitlines()[-1] == gnu_du(du_tree, "-s")[RB] + b"\ttotal"
    assert r.stdout.splitlines(keepends=True)[:-1] == cli(*du, REMOTE).stdout.splitlines(keepends=True)
    top = gnu_du(du_tree, "-s")[RB]
    assert cli(*du, "-sc", REMOTE).stdout == top + b"\t" + RB + b"\n" + top + b"\ttotal\n"
    r = cli(*du, "-s", "--max-depth", "1", REMOTE)
    assert r.returncode == 2 and b"conflicts with --max-depth 1" in r.stderr
    assert cli("--hosts", agent.hostspec, "du", "--help").stdout.startswith(b"usage: diskover-agent du")


# -- exit status 2: nothing to talk to, refused, bad arguments ------------------------------------

@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", [["ls", REMOTE], ["walk", REMOTE], ["du", REMOTE]])
def test_no_reachable_agent_exit_2(dead_port, command):
    started = time.monotonic()
    r = cli("--hosts", f"127.0.0.1:{dead_port}", *command)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"diskover-agent: no agent reachable: 127.0.0.1:{dead_port}: ".encode()), r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert r.stdout == b""
    assert time.monotonic() - started < 10


def test_token(tmp_path, start_agent):
    top = tmp_path / "t"
    (top / "d").mkdir(parents=True)
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    agent = start_agent([(REMOTE, str(top))], extra=("--token-file", str(token)))
    for command in (["ls", REMOTE], ["walk", REMOTE], ["du", REMOTE]):
        for creds, env in (([], cli_env()), (["--token-file", str(wrong)], cli_env())):
            r = cli("--hosts", agent.hostspec, *creds, *command, env=env)
            assert r.returncode == 2, (command, r.stderr)
            assert r.stderr.startswith(f"diskover-agent: {agent.hostspec}: HTTP 401 unauthorized".encode())
            assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
        assert cli("--hosts", agent.hostspec, "--token-file", str(token), "-q", *command).returncode == 0
        assert cli("--hosts", agent.hostspec, "-q", *command,
                   env=cli_env(DISKOVER_AGENT_TOKEN="s3cret-token")).returncode == 0


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    import diskover_agent

    want = version("diskover-storage-agent")
    r = cli("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"diskover-agent {want}\n".encode(), b"")
    assert diskover_agent.__version__ == want  # looked up on first use, then kept
    with pytest.raises(AttributeError):
        diskover_agent.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("args", [
    ["walk", REMOTE],                                   # no hosts at all
    ["--hosts", "h:99999", "walk", REMOTE],             # bad port
    ["--hosts", "h", "--workers", "0", "walk", REMOTE],
    ["--hosts", "h", "walk"],                           # no PATH
    ["--hosts", "h", "walk", "relative/path"],
    ["--hosts", "h", "walk", "--maxdepth", "-1", REMOTE],
    ["--hosts", "h", "--token-file", "/nonexistent/token", "ls", REMOTE],
    ["--hosts", "h", "frobnicate"],
])
def test_bad_arguments_exit_2(args):
    r = cli(*args)
    assert r.returncode == 2, r
    assert b"Traceback" not in r.stderr and r.stderr.strip()


# -- progress display, summary, interruption ---------------------------------------------------------

def run_on_terminal(*args: str, stream: str = "stderr") -> tuple[int, bytes]:
    """Run the script with stderr (or stdout) on a pseudo-terminal, the other stream to /dev/null;
    what the terminal got."""
    master, slave = open_pty(160)
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, stream: slave}
    proc = subprocess.Popen([str(SCRIPT), *args], stdin=subprocess.DEVNULL, env=cli_env(), **streams)
    os.close(slave)
    seen = drain_pty(master)
    return proc.wait(30), seen


@pytest.fixture
def wide_tree(tmp_path: Path) -> Path:
    return make_wide_tree(tmp_path / "wide")


def test_progress_on_a_terminal_only(wide_tree, tmp_path, start_agent):
    a, b = start_agent([(REMOTE, str(wide_tree))]), start_agent([(REMOTE, str(wide_tree))])
    hosts = hosts_of(a, b)
    out = str(tmp_path / "out.ndjson")
    rc, seen = run_on_terminal("--hosts", hosts, "walk", "-o", out, REMOTE)
    assert rc == 0, seen
    text = seen.decode()
    assert "\r" in text and " dirs/s" in text  # tqdm's live line, rewritten in place
    assert "21 dirs (" in text and "5.02k entries" in text and "hosts 2/2" in text and "0 errors" in text
    assert text.rstrip().splitlines()[-1].split("\r")[-1].startswith("diskover-agent: 21 directories, 5,020 entries")
    # stderr a pipe: only the summary line
    r = cli("--hosts", hosts, "walk", "-o", out, REMOTE)
    assert r.returncode == 0
    assert b"\r" not in r.stderr and b"dirs/s" not in r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"diskover-agent: 21 directories, 5,020 entries, ")
    # -q: neither the display nor the summary, on a terminal or not
    assert run_on_terminal("--hosts", hosts, "-q", "walk", "-o", out, REMOTE) == (0, b"")
    r = cli("--hosts", hosts, "-q", "du", REMOTE)
    assert (r.returncode, r.stderr) == (0, b"")
    rc, seen = run_on_terminal("--hosts", hosts, "du", "-s", REMOTE)
    assert rc == 0 and b" dirs/s" in seen and b"diskover-agent: 21 directories" in seen


def test_ctrl_c_exits_130_cleanly(wide_tree, start_agent):
    """SIGINT while the walk is held up writing (nobody reads its stdout): 130, no traceback."""
    agent = start_agent([(REMOTE, str(wide_tree))])
    # run with SIGINT at its default even when these tests run with it ignored (a background job)
    shim = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", shim, str(SCRIPT), "--hosts", agent.hostspec, "walk", REMOTE],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout is not None
    first = proc.stdout.readline()  # it is walking; ~1.8 MB more to write is more than a pipe holds
    assert first.startswith(b'{"parent":')
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert len(first) + len(out) < 1_000_000


def test_closed_output_pipe_exits_quietly(wide_tree, start_agent):
    agent = start_agent([(REMOTE, str(wide_tree))])
    proc = subprocess.Popen([str(SCRIPT), "--hosts", agent.hostspec, "walk", REMOTE], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"parent":')
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    assert proc.wait(20) == 141
    assert err == b""


# -- TLS ---------------------------------------------------------------------------------------

def test_tls_options(tmp_path, start_agent):
    write_tls_files(tmp_path, "127.0.0.1", "localhost")
    top = tmp_path / "t"
    (top / "sub").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(top))],
                        extra=("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")))
    h = agent.hostspec
    for command in (["ls", REMOTE], ["walk", REMOTE], ["du", REMOTE]):
        r = cli("--hosts", h, "--cafile", str(tmp_path / "ca.pem"), "-q", *command)
        assert r.returncode == 0, r.stderr
        assert cli("--hosts", h, "--tls", "--insecure", "-q", *command).returncode == 0
        r = cli("--hosts", h, "--tls", *command)  # the system's CAs do not know this one
        assert r.returncode == 2 and b"CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
        assert r.stderr.count(b"\n") == 1
