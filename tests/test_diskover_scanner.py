"""diskover's alternative scanner: the shim loaded as diskover loads it, crawls through real agents."""

from __future__ import annotations

import http.client
import importlib
import os
import re
import shutil
import stat as stat_mod
import sys
import threading
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import pytest

from diskover_agent import scanner

from conftest import (
    IS_ROOT,
    OWNERS,
    REMOTE,
    as_bytes_rows,
    assert_same_stat,
    atime_is_stable,
    settle_atimes,
    vary_owners_and_times,
)

SHIM = Path(__file__).resolve().parent.parent / "contrib" / "diskover" / "scandir_agent.py"


# -- the tree, the crawl, the agents' request counts ---------------------------------------------

def make_share(root: Path) -> tuple[Path, int]:
    """A share of many more files than directories: sizes from empty to sparse, hard links
    in one directory and across directories and threads, symlinks, a fifo, odd names, a
    directory of 1,500 entries. Returns the share and its number of directories."""
    top = root / "share"
    top.mkdir()
    (top / "top-file").write_bytes(b"t" * 10)
    sizes = [0, 1, 511, 512, 4095, 4096, 4097, 65536, 100_000]
    for t in range(6):
        proj = top / f"proj{t}"
        for a in range(3):
            for b in range(t % 3 + 1):
                d = proj / f"a{a}" / f"b {b}"
                d.mkdir(parents=True)
                for i in range(25):
                    (d / f"f{i}.dat").write_bytes(b"x" * sizes[(i + t + a + b) % len(sizes)])
            (proj / f"a{a}" / "note.txt").write_bytes(b"n" * (a + 1) * 1000)
    odd = top / "proj0" / "odd ünï"
    odd.mkdir()
    bad = os.path.join(os.fsencode(odd), b"bad\xff\xfe")
    with open(bad, "wb") as f:
        f.write(b"b" * 300)
    os.mkfifo(odd / "fifo")
    (top / "proj0" / "empty").mkdir()
    sparse = top / "proj1" / "a0" / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(5_000_000)
        f.seek(2_000_000)
        f.write(b"s" * 10_000)
    os.link(top / "proj1" / "a0" / "note.txt", top / "proj1" / "a0" / "note-link")  # same directory
    os.link(top / "proj1" / "a1" / "note.txt", top / "proj1" / "a2" / "note-link")  # across directories
    os.link(top / "proj2" / "a0" / "note.txt", top / "proj3" / "a0" / "from-proj2")  # across threads
    os.symlink("note.txt", top / "proj2" / "a1" / "link-to-file")
    os.symlink("../a0", top / "proj2" / "a1" / "link-to-dir")
    os.symlink("nowhere", top / "proj2" / "dangling")
    big = top / "proj4" / "big"
    big.mkdir()
    for i in range(1500):
        os.close(os.open(big / f"e{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    vary_owners_and_times(top)
    ndirs = sum(1 for _ in os.walk(top))
    return top, ndirs


def diskover_crawl(top: str, scandir, stat, du, maxthreads: int = 8) -> dict:
    """diskover's crawl, cut to what it computes from the file system: the top directory
    on its own, then a thread per level-1 subdirectory recursing with stat(dir), scandir,
    entry.is_symlink()/is_dir()/stat(); per directory its files and sums, hard links'
    allocated size counted once per inode over the whole crawl."""
    lock = threading.Lock()
    inodes: set[int] = set()
    dirs_out: dict[str, dict] = {}

    def tree(path: str, recurse: bool) -> tuple[int, int, int, int]:
        d_stat = stat(path)
        size = size_du = files = dirs = 0
        size_n = du_n = du_raw = files_n = dirs_n = 0
        records = []
        for entry in scandir(path):
            if entry.is_symlink():
                continue
            if entry.is_dir():
                dirs += 1
                dirs_n += 1
                if recurse:
                    s, sdu, fc, dc = tree(entry.path, True)
                    size, size_du, files, dirs = size + s, size_du + sdu, files + fc, dirs + dc
                continue
            f_stat = entry.stat()
            fsize, fsize_du = f_stat.st_size, du(f_stat)
            du_raw += fsize_du
            if f_stat.st_nlink > 1:
                with lock:
                    if f_stat.st_ino in inodes:
                        fsize_du = 0
                    else:
                        inodes.add(f_stat.st_ino)
            size, size_n, size_du, du_n = size + fsize, size_n + fsize, size_du + fsize_du, du_n + fsize_du
            files, files_n = files + 1, files_n + 1
            # every field diskover stores; a file's atime holds still (nothing reads the files)
            records.append((os.fsencode(entry.name), fsize, du(f_stat), f_stat.st_ino, f_stat.st_nlink,
                            f_stat.st_mode, f_stat.st_uid, f_stat.st_gid, f_stat.st_size, f_stat.st_dev,
                            f_stat.st_atime_ns, f_stat.st_atime, f_stat.st_mtime_ns, f_stat.st_mtime,
                            f_stat.st_ctime_ns, f_stat.st_ctime, entry.inode()))
        with lock:
            dirs_out[path] = {
                "stat": (d_stat.st_ino, d_stat.st_dev, d_stat.st_mode, d_stat.st_nlink, d_stat.st_uid,
                         d_stat.st_gid, d_stat.st_mtime_ns, d_stat.st_mtime, d_stat.st_ctime_ns, d_stat.st_ctime),
                "files": sorted(records), "files_norecurs": files_n, "size_norecurs": size_n,
                "dirs_norecurs": dirs_n, "size_du_raw": du_raw,
                # with hard links across directories this depends on the order threads meet them
                "size_du_norecurs": du_n,
            }
        return size, size_du, files, dirs

    subdirs = [e.path for e in scandir(top) if not e.is_symlink() and e.is_dir()]
    totals = {}
    with futures.ThreadPoolExecutor(max_workers=maxthreads) as executor:
        totals[top] = executor.submit(tree, top, False).result()
        jobs = {executor.submit(tree, sub, True): sub for sub in subdirs}
        for job in futures.as_completed(jobs):
            totals[jobs[job]] = job.result()
    size, size_du, files, dirs = (sum(t[i] for t in totals.values()) for i in range(4))
    return {"dirs": dirs_out, "size": size, "size_du": size_du, "files": files, "dirs_count": dirs}


def remap(result: dict, local: Path) -> dict:
    """A local crawl's directory keys as the agents' remote paths."""
    n = len(str(local))
    return {**result, "dirs": {REMOTE + k[n:]: v for k, v in result["dirs"].items()}}


def without_order_dependent(result: dict) -> dict:
    return {k: {f: v for f, v in d.items() if f != "size_du_norecurs"} for k, d in result["dirs"].items()}


def requests_served(agent) -> int:
    """Requests the agent answered, metrics and health scrapes left out."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", "/_agent/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    total = 0.0
    for labels, value in re.findall(r"^diskover_agent_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        if 'endpoint="metrics"' not in labels and 'endpoint="health"' not in labels:
            total += float(value)
    return int(total)


# -- loading the shim as diskover does --------------------------------------------------------

@pytest.fixture(autouse=True)
def scanner_env(tmp_path, monkeypatch):
    """No DISKOVER_AGENT_* from outside, an empty config file, and fresh scanner state."""
    for name in list(os.environ):
        if name.startswith("DISKOVER_AGENT_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty-config.toml"
    empty.write_text("")
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(empty))
    scanner.close()
    yield
    scanner.close()


@pytest.fixture
def shim(tmp_path, monkeypatch):
    """``scanners.scandir_agent`` imported from a diskover-like folder holding the contrib shim."""
    home = tmp_path / "diskover"
    (home / "scanners").mkdir(parents=True)
    shutil.copy(SHIM, home / "scanners" / "scandir_agent.py")
    for name in ("scanners", "scanners.scandir_agent"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(home))
    module = importlib.import_module("scanners.scandir_agent")
    yield module
    for name in ("scanners", "scanners.scandir_agent"):
        sys.modules.pop(name, None)


@contextmanager
def diskover_patched(alt_scanner):
    """``os.scandir`` and ``os.walk`` replaced by the scanner's, as diskover does; restored after."""
    real_scandir, real_walk = os.scandir, os.walk
    os.scandir, os.walk = alt_scanner.scandir, alt_scanner.walk
    try:
        yield
    finally:
        os.scandir, os.walk = real_scandir, real_walk


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> tuple[Path, int]:
    return make_share(tmp_path_factory.mktemp("dk"))


# -- 1. the crawl ------------------------------------------------------------------------------

@pytest.mark.parametrize("nagents", [1, 3], ids=["one-agent", "three-agents"])
def test_diskover_crawl_through_the_shim_equals_the_local_crawl(shim, share, start_agent, monkeypatch, nagents):
    local, ndirs = share
    agents = [start_agent([(REMOTE, str(local))]) for _ in range(nagents)]
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", ",".join(a.hostspec for a in agents))
    assert shim.scandir is scanner.scandir and set(scanner.__all__) <= set(dir(shim))

    with diskover_patched(shim):
        shim.log_setup(20, "%(message)s", False, None, None, None)
        shim.init({})
        ok, message = shim.check_dirpath(REMOTE + "/")
        assert (ok, message) == (True, None)
        top = shim.abspath(REMOTE + "/")
        assert any(True for _ in os.scandir(top))  # diskover's "is it empty" look
        total, free, available = shim.get_storage_size(top)
        remote = diskover_crawl(top, os.scandir, shim.stat, lambda st: st.st_sizedu)
        assert shim.add_meta(top, shim.stat(top, st=os.lstat(local))) is None  # st given: no request
        shim.close(None)
    assert os.scandir is not scanner.scandir and os.walk is not scanner.walk

    expected = remap(diskover_crawl(str(local), os.scandir, os.stat, lambda st: st.st_blocks * 512), local)
    assert total > 0 and 0 <= available <= free <= total
    assert len(remote["dirs"]) == ndirs
    assert without_order_dependent(remote) == without_order_dependent(expected)
    # totals, hard links' allocated size counted once over the whole crawl
    for key in ("size", "size_du", "files", "dirs_count"):
        assert remote[key] == expected[key], key
    # the tree holds what the test is about
    files = [r for d in expected["dirs"].values() for r in d["files"]]
    assert len(files) > 10 * ndirs
    assert all(r[10] != r[12] for r in files)  # atime_ns apart from mtime_ns
    if IS_ROOT:  # uid and gid apart, two of each
        assert {(r[6], r[7]) for r in files} == set(OWNERS)
    assert any(r[4] > 1 for r in files) and any(r[2] < r[1] for r in files) and any(r[2] > r[1] for r in files)
    assert expected["size_du"] < sum(d["size_du_raw"] for d in expected["dirs"].values())
    # one listing per directory and a few more (the top's), no request per entry
    served = [requests_served(a) for a in agents]
    assert ndirs <= sum(served) <= ndirs + 4, served
    assert all(n > 0 for n in served), served  # the threads spread over the hosts


# -- 4. storage size -----------------------------------------------------------------------------

def test_get_storage_size_is_the_exported_directorys_statvfs(shim, share, start_agent, monkeypatch):
    local, _ = share
    agent = start_agent([(REMOTE, str(local))])
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)

    def figures(st: os.statvfs_result) -> tuple[int, int, int]:
        return st.f_frsize * st.f_blocks, st.f_frsize * st.f_bfree, st.f_frsize * st.f_bavail

    # Other processes may write to this file system meanwhile: the answer must lie between what
    # statvfs said just before and just after it, field by field (free and available bytes differ
    # by the blocks reserved for root, so a swap of the two falls outside), once in 50 tries.
    for _ in range(50):
        before = figures(os.statvfs(local))
        got = shim.get_storage_size(REMOTE + "/proj0")
        after = figures(os.statvfs(local))
        if all(min(b, a) <= g <= max(b, a) for b, g, a in zip(before, got, after, strict=True)):
            break
    else:
        raise AssertionError(f"{got} is not between {before} and {after}")
    assert got[0] == before[0] == after[0] and got[1] >= got[2]
    assert all(isinstance(x, int) for x in got)
    with pytest.raises(FileNotFoundError):
        shim.get_storage_size(REMOTE + "/nope")


# -- the rest of the module surface ----------------------------------------------------------------

def test_check_dirpath_abspath_stat_and_scandir(shim, share, start_agent, monkeypatch):
    local, _ = share
    agent = start_agent([(REMOTE, str(local))])
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    assert shim.check_dirpath(REMOTE + "/proj1") == (True, None)
    assert shim.check_dirpath(REMOTE + "/nope") == (False, REMOTE + "/nope no such directory!")
    assert shim.check_dirpath(REMOTE + "/top-file") == (False, REMOTE + "/top-file is not a directory!")
    ok, message = shim.check_dirpath("/etc")
    assert not ok and "/etc" in message
    ok, message = shim.check_dirpath("relative/path")
    assert not ok and "absolute" in message
    assert shim.abspath(REMOTE + "/proj1/") == REMOTE + "/proj1"
    assert shim.abspath(REMOTE + "//proj1/./a0") == REMOTE + "/proj1/a0"
    assert shim.abspath("/") == "/"

    # stat() is os.stat(), field for field: of the top, of a directory, of files (from their
    # parent's listing), through symlinks; atime where nothing moves it (files are never read)
    settle_atimes(local)
    owners = set()
    for rel in ("", "/proj1/a0", "/top-file", "/proj1/a0/sparse", "/proj3/a0/from-proj2", "/proj0/odd ünï/fifo",
                "/proj2/a1/link-to-file", "/proj2/a1/link-to-dir"):
        st, want = shim.stat(REMOTE + rel), os.stat(str(local) + rel)
        assert_same_stat(st, want, rel, atime=atime_is_stable(want))
        assert st.st_sizedu == want.st_blocks * 512 and st[stat_mod.ST_MTIME] == want[stat_mod.ST_MTIME]
        # the share's owners and times tell every field apart
        assert st.st_atime_ns != st.st_mtime_ns
        owners.add((st.st_uid, st.st_gid))
    assert owners == (set(OWNERS) if IS_ROOT else {(os.geteuid(), os.getegid())})
    assert shim.stat(REMOTE, st=os.stat(local)).st_ino == os.stat(local).st_ino  # st given: no request
    with pytest.raises(FileNotFoundError):
        shim.stat(REMOTE + "/nope")
    with pytest.raises(FileNotFoundError):
        shim.stat(REMOTE + "/proj2/dangling")

    # scandir is os.scandir: a context manager too, entries typed like the path
    with shim.scandir(REMOTE + "/proj2/a1") as it:
        got = {e.name: (e.is_dir(), e.is_file(), e.is_symlink(), e.inode()) for e in it}
    want = {e.name: (e.is_dir(), e.is_file(), e.is_symlink(), e.inode()) for e in os.scandir(local / "proj2/a1")}
    assert got == want
    names = sorted(e.name for e in shim.scandir((REMOTE + "/proj0/odd ünï").encode()))
    assert names == sorted(os.listdir(os.fsencode(local / "proj0/odd ünï")))
    with pytest.raises(NotADirectoryError):
        shim.scandir(REMOTE + "/top-file")


def test_walk_equals_os_walk_and_applies_the_exclusions(shim, share, start_agent, monkeypatch):
    local, _ = share
    agents = [start_agent([(REMOTE, str(local))]) for _ in range(2)]
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", ",".join(a.hostspec for a in agents))
    n = len(str(local))
    expected = as_bytes_rows((REMOTE + r[n:], d, f) for r, d, f in os.walk(local))
    with diskover_patched(shim):
        walked = list(os.walk(REMOTE))
    assert as_bytes_rows(walked) == expected and len(walked) == len(expected)
    with pytest.raises(NotImplementedError):
        shim.walk(REMOTE, topdown=False)

    shim.close(None)
    monkeypatch.setenv("DISKOVER_AGENT_EXCLUDE_DIRS", "big, b 1")
    monkeypatch.setenv("DISKOVER_AGENT_EXCLUDE_FILES", "*.dat")
    pruned = []
    for root, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if d not in ("big", "b 1")]
        pruned.append((REMOTE + root[n:], dirs, [f for f in files if not f.endswith(".dat")]))
    assert as_bytes_rows(shim.walk(REMOTE)) == as_bytes_rows(pruned)
    # the listings scandir gets are pruned by the agent too
    assert sorted(e.name for e in shim.scandir(REMOTE + "/proj4")) == ["a0", "a1", "a2"]
    assert sorted(e.name for e in shim.scandir(REMOTE + "/proj4/a1")) == ["b 0", "note.txt"]
    assert [e.name for e in shim.scandir(REMOTE + "/proj4/a1/b 0")] == []


# -- settings ----------------------------------------------------------------------------------------

def test_settings_from_the_config_file_and_the_environment(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("from-file\n")
    config = tmp_path / "config.toml"
    config.write_text(f'hosts = ["n1", "n2:9000"]\nport = 9100\ntoken-file = "{token}"\ntls = true\n'
                      f'cafile = "/ca.pem"\ninsecure = true\nworkers = 7\nexclude-dirs = [".snapshot"]\n'
                      f'exclude-files = "*.tmp, *.swp"\none-fs = true\n')
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(config))
    s = scanner.load_settings()
    assert (s.hosts, s.port, s.token, s.tls, s.cafile, s.insecure, s.workers) == (
        ("n1", "n2:9000"), 9100, "from-file", True, "/ca.pem", True, 7)
    assert (s.exclude_dirs, s.exclude_files, s.one_fs, s.config_file) == (
        (".snapshot",), ("*.tmp", "*.swp"), True, str(config))
    assert "from-file" not in repr(s)

    env = {"DISKOVER_AGENT_CONFIG": str(config), "DISKOVER_AGENT_HOSTS": "e1, e2", "DISKOVER_AGENT_PORT": "9200",
           "DISKOVER_AGENT_TOKEN": "from-env", "DISKOVER_AGENT_TLS": "0", "DISKOVER_AGENT_INSECURE": "0",
           "DISKOVER_AGENT_WORKERS": "3", "DISKOVER_AGENT_EXCLUDE_DIRS": ".zfs,tmp*",
           "DISKOVER_AGENT_EXCLUDE_FILES": "*.bak", "DISKOVER_AGENT_ONE_FS": "0", "DISKOVER_AGENT_CAFILE": "/c2"}
    s = scanner.load_settings(env)
    assert (s.hosts, s.port, s.token, s.tls, s.insecure, s.workers, s.cafile) == (
        ("e1", "e2"), 9200, "from-env", False, False, 3, "/c2")
    assert (s.exclude_dirs, s.exclude_files, s.one_fs) == ((".zfs", "tmp*"), ("*.bak",), False)
    other = tmp_path / "other-token"
    other.write_text("other")
    assert scanner.load_settings({**env, "DISKOVER_AGENT_TOKEN": "", "DISKOVER_AGENT_TOKEN_FILE": str(other)}
                                 ).token == "other"
    # the default file, when DISKOVER_AGENT_CONFIG is not set
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config" / "diskover_scandir_agent").mkdir(parents=True)
    shutil.copy(config, tmp_path / ".config" / "diskover_scandir_agent" / "config.toml")
    assert scanner.load_settings({}).hosts == ("n1", "n2:9000")


@pytest.mark.parametrize(("content", "env", "expect"), [
    ("", {}, "DISKOVER_AGENT_HOSTS"),
    ('hosts = ["a"]\nbogus = 1\n', {}, "bogus"),
    ('hosts = ["a"]\nport = "x"\n', {}, "port"),
    ('hosts = ["a"]\ntls = "yes"\n', {}, "tls"),
    ("hosts = [", {}, "config"),
    ('hosts = ["a"]\n', {"DISKOVER_AGENT_PORT": "nine"}, "DISKOVER_AGENT_PORT"),
    ('hosts = ["a"]\n', {"DISKOVER_AGENT_TLS": "maybe"}, "DISKOVER_AGENT_TLS"),
    ('hosts = ["a"]\n', {"DISKOVER_AGENT_WORKERS": "0"}, "workers"),
    ('hosts = ["a:99999"]\n', {}, "port"),
    ('hosts = ["a"]\ntoken-file = "/nonexistent/token"\n', {}, "/nonexistent/token"),
])
def test_wrong_settings_are_clear_errors(tmp_path, content, env, expect):
    config = tmp_path / "config.toml"
    config.write_text(content)
    with pytest.raises(RuntimeError, match=re.escape(expect)):
        scanner.load_settings({"DISKOVER_AGENT_CONFIG": str(config), **env})


def test_no_hosts_configured_is_a_runtime_error_diskover_reports(shim, tmp_path, monkeypatch):
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(RuntimeError, match=r"missing\.toml"):
        shim.init({})
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(tmp_path / "empty-config.toml"))
    with pytest.raises(RuntimeError, match="DISKOVER_AGENT_HOSTS=") as info:
        shim.stat(REMOTE)  # what diskover calls first for every directory: logged as ALT SCANNER ERROR
    assert not isinstance(info.value, OSError)
    ok, message = shim.check_dirpath(REMOTE)
    assert not ok and "DISKOVER_AGENT_HOSTS" in message


def test_token_file_reaches_the_agents(shim, share, start_agent, tmp_path, monkeypatch):
    local, _ = share
    secret = tmp_path / "agent-token"
    secret.write_text("s3cret\n")
    agent = start_agent([(REMOTE, str(local))], extra=("--token-file", str(secret)))
    monkeypatch.setenv("DISKOVER_AGENT_HOSTS", agent.hostspec)
    ok, message = shim.check_dirpath(REMOTE)
    assert not ok and "401" in message
    shim.close(None)
    config = tmp_path / "with-token.toml"
    config.write_text(f'token-file = "{secret}"\n')
    monkeypatch.setenv("DISKOVER_AGENT_CONFIG", str(config))
    assert shim.check_dirpath(REMOTE) == (True, None)
    assert sorted(e.name for e in shim.scandir(REMOTE)) == sorted(os.listdir(local))
