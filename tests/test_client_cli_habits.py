"""The ``diskover-agent`` command line as people type it: global options anywhere, suggestions
for typos, ``-V``, ``ls -la`` and several paths, ``python -m``, the scanner's environment
variables, ``du`` with several paths. Run as the installed console scripts against real agents
on loopback, compared with GNU ``ls``/``du`` on the same local trees where they apply."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import pytest

import walk_records

from conftest import IS_ROOT, REMOTE, cli_env, settle_atimes, tmpfs_mounted, write_tls_files

SCRIPT = Path(sys.executable).with_name("diskover-agent")
AGENT_SCRIPT = Path(sys.executable).with_name("diskover-storage-agent")
RB = REMOTE.encode()
VERSION = version("diskover-storage-agent")


def cli(*args: str, env: Optional[dict[str, str]] = None, cmd: Optional[list[str]] = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the console script (or ``cmd``) with exactly these arguments; stdout and stderr as bytes."""
    return subprocess.run([*(cmd or [str(SCRIPT)]), *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env if env is not None else cli_env())


def last_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.decode().splitlines()
    assert lines, r
    return lines[-1]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small tree: two directories with files (one a dot file), one nested, one empty."""
    top = tmp_path / "tree"
    for d in ("a/sub", "b", "empty", "skip/deep"):
        (top / d).mkdir(parents=True)
    (top / "a" / "one.txt").write_bytes(b"1" * 3000)
    (top / "a" / ".hidden").write_bytes(b"h" * 10)
    (top / "a" / "sub" / "two.dat").write_bytes(b"2" * 70_000)
    (top / "b" / "three.bak").write_bytes(b"3" * 100)
    (top / "b" / "four").write_bytes(b"4" * 5000)
    (top / "skip" / "deep" / "x").write_bytes(b"x")
    settle_atimes(top)  # walks read directories: their atimes stay as they are now
    return top


@pytest.fixture
def agent(tree, start_agent):
    return start_agent([(REMOTE, str(tree)), ("/mnt/other", str(tree / "b"))])


def gnu(*args: str, cwd: Path) -> bytes:
    """GNU ls or du run on the local tree (C locale), paths given relative to ``cwd``."""
    if shutil.which(args[0]) is None:
        pytest.skip(f"no {args[0]}")
    env = {k: v for k, v in os.environ.items() if "BLOCK" not in k and k not in ("TIME_STYLE", "QUOTING_STYLE")}
    return subprocess.run(list(args), capture_output=True, cwd=cwd, env={**env, "LC_ALL": "C"}).stdout


# -- 1. global options before or after the subcommand ------------------------------------------------

def test_global_options_after_the_subcommand(agent):
    h = agent.hostspec
    before = cli("--hosts", h, "-q", "walk", REMOTE)
    assert before.returncode == 0 and before.stderr == b"" and before.stdout.count(b"\n") == 12
    for args in (["walk", REMOTE, "--hosts", h, "-q"], ["walk", "--hosts", h, REMOTE, "-q"],
                 ["-q", "walk", REMOTE, "--hosts", h], ["--hosts", h, "walk", "-q", REMOTE]):
        r = cli(*args)
        assert (r.returncode, r.stderr) == (0, b""), args
        assert sorted(r.stdout.splitlines()) == sorted(before.stdout.splitlines()), args
    # --hosts takes one value: the PATH after it stays the PATH
    assert cli("ls", "--hosts", h, REMOTE).stdout == b"a\nb\nempty\nskip\n"
    # a value given before the subcommand is kept when the subcommand does not give it again
    port = str(agent.port)
    assert cli("--port", port, "ls", "--hosts", "127.0.0.1", REMOTE).stdout == b"a\nb\nempty\nskip\n"
    assert cli("ls", REMOTE, "--hosts", "127.0.0.1", "--port", port).stdout == b"a\nb\nempty\nskip\n"
    # given after the subcommand, an option wins over the same option given before
    assert cli("--hosts", "127.0.0.1:1", "ls", "--hosts", h, REMOTE).returncode == 0


@pytest.mark.parametrize(("option", "bad", "message"), [
    ("--port", "0", "must be at least 1"), ("--port", "70000", "a port is 1 to 65535"),
    ("--workers", "0", "must be at least 1"),
    ("--timeout", "0", "must be more than 0 seconds"), ("--retry-for", "-1", "must be more than 0 seconds"),
])
def test_each_global_option_is_checked_the_same_after_the_subcommand(agent, option, bad, message):
    good = {"--port": str(agent.port), "--workers": "3", "--timeout": "20", "--retry-for": "5"}[option]
    for where in ("before", "after"):
        def run(value: str, where: str = where) -> subprocess.CompletedProcess:
            opt = [option, value]
            args = ["--hosts", "127.0.0.1", *(opt if where == "before" else []), "-q", "du", "-s",
                    *(opt if where == "after" else []), REMOTE]
            if option != "--port":
                args += ["--port", str(agent.port)]
            return cli(*args)
        r = run(bad)
        assert r.returncode == 2 and message in last_error(r), (where, r.stderr)
        r = run(good)
        assert (r.returncode, r.stderr) == (0, b""), (where, r.stderr)


def test_token_and_tls_options_after_the_subcommand(tmp_path, start_agent):
    write_tls_files(tmp_path)
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "t" / "d").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(tmp_path / "t"))], extra=(
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
        "--token-file", str(tmp_path / "token")))
    r = cli("ls", REMOTE, "--hosts", agent.hostspec, "--cafile", str(tmp_path / "ca.pem"),
            "--token-file", str(tmp_path / "token"))
    assert (r.returncode, r.stdout) == (0, b"d\n"), r.stderr
    r = cli("ls", REMOTE, "--hosts", agent.hostspec, "--tls", "--insecure", "--token-file", str(tmp_path / "token"))
    assert (r.returncode, r.stdout) == (0, b"d\n"), r.stderr
    r = cli("ls", REMOTE, "--hosts", agent.hostspec, "--tls", "--token-file", str(tmp_path / "token"))
    assert r.returncode == 2 and b"CERTIFICATE_VERIFY_FAILED" in r.stderr


# -- 2. suggestions -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "hint"), [
    (["--hosts", "h", "du", "--exlude", "x", REMOTE], "(did you mean --exclude?)"),
    (["--hosts", "h", "walk", REMOTE, "--max-detph", "2"], "(did you mean --max-depth?)"),
    (["--hsots", "h", "ls", REMOTE], "(did you mean --hosts?)"),
    (["ls", "--hsots", "h", REMOTE], "(did you mean --hosts?)"),
    (["--hosts", "h", "lss", REMOTE], "(did you mean ls?)"),
    (["--hosts", "h", "wakl", REMOTE], "(did you mean walk?)"),
    (["--hosts", "h", "walk", "--format", "ndjsn", REMOTE], "(did you mean ndjson?)"),
    (["--hosts", "h", "-s", "du", REMOTE], "-s is an option of du: give it after the subcommand"),
    (["--hosts", "h", "--exclude", "x", "du", REMOTE], "--exclude is an option of walk and du: give it after "
                                                        "the subcommand"),
    (["-d", "1", "walk", REMOTE], "-d is an option of walk and du: give it after the subcommand"),
    (["--exlude", "x", "--hosts", "h", "walk", REMOTE], "(did you mean --exclude?)"),
])
def test_mistyped_options_and_commands_get_a_suggestion(args, hint):
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == b""
    assert last_error(r).endswith(hint), r.stderr
    assert "Traceback" not in r.stderr.decode()


# -- 3. -V, --version; 5. python -m ----------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [
    [str(SCRIPT)], [sys.executable, "-m", "diskover_agent"], [str(AGENT_SCRIPT)],
    [sys.executable, "-m", "diskover_storage_agent"],
])
def test_version_option(cmd):
    name = "diskover-storage-agent" if "storage" in " ".join(cmd) else "diskover-agent"
    for option in ("-V", "--version"):
        r = cli(option, cmd=cmd)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{name} {VERSION}\n".encode(), b"")
    if name == "diskover-agent":  # a global option: after the subcommand too
        assert cli("ls", "-V", cmd=cmd).stdout == f"{name} {VERSION}\n".encode()
        for option in ("-V", "--help"):  # output that cannot be written: one line, status 2
            with open("/dev/full", "wb") as full:
                r = subprocess.run([*cmd, option], stdout=full, stderr=subprocess.PIPE, timeout=60)
            assert (r.returncode, r.stderr) == (
                2, b"diskover-agent: cannot write the output: No space left on device\n")


def test_python_m_diskover_agent_runs_the_cli(agent):
    via_m = cli("--hosts", agent.hostspec, "du", "-a", REMOTE, "-q", cmd=[sys.executable, "-m", "diskover_agent"])
    script = cli("--hosts", agent.hostspec, "du", "-a", REMOTE, "-q")
    assert (via_m.returncode, via_m.stdout, via_m.stderr) == (0, script.stdout, b"")
    assert via_m.stdout.count(b"\n") == 13
    r = cli("--help", cmd=[sys.executable, "-m", "diskover_agent"])
    assert r.returncode == 0 and r.stdout.startswith(b"usage: diskover-agent ")


# -- 4. ls -la, and what ls does not have ------------------------------------------------------------

def test_ls_combined_short_flags(agent, tree):
    h = ["--hosts", agent.hostspec]
    long_form = cli(*h, "ls", "-l", REMOTE + "/a")
    assert long_form.returncode == 0 and long_form.stdout.startswith(b"total ")
    for flags in (["-la"], ["-al"], ["-l", "-a"], ["-lA"], ["-l1"], ["-1la"]):
        assert cli(*h, "ls", *flags, REMOTE + "/a").stdout == long_form.stdout, flags
    assert cli(*h, "ls", "-lh", REMOTE + "/a").stdout == cli(*h, "ls", "-l", "-h", REMOTE + "/a").stdout
    assert b"69K" in cli(*h, "ls", "-lah", REMOTE + "/a/sub").stdout  # 70,000 bytes, as ls -lh: 69K
    # every entry, dot files too (as ls -A): -a changes nothing
    names = gnu("ls", "-A", "-1", "a", cwd=tree)
    assert cli(*h, "ls", REMOTE + "/a").stdout == cli(*h, "ls", "-a", REMOTE + "/a").stdout == names
    for flags, bad in ((["-lt"], "-t"), (["-t"], "-t"), (["-laR"], "-R")):
        r = cli(*h, "ls", *flags, REMOTE)
        assert r.returncode == 2 and r.stdout == b""
        error = last_error(r)
        assert f"{bad} is not an option of diskover-agent ls; its short options: -l, -n, -h, -a, -A, -1" in error


# -- 6. the scanner's environment variables --------------------------------------------------------

def test_env_port_hosts_and_option_wins(agent):
    env = cli_env(DISKOVER_AGENT_HOSTS="127.0.0.1", DISKOVER_AGENT_PORT=str(agent.port))
    assert cli("ls", REMOTE, env=env).stdout == b"a\nb\nempty\nskip\n"
    r = cli("ls", REMOTE, "--port", "1", env=env)  # the option wins: nothing listens on port 1
    assert r.returncode == 2 and "127.0.0.1" in last_error(r)
    r = cli("ls", REMOTE, env={**env, "DISKOVER_AGENT_PORT": "http"})
    assert r.returncode == 2 and last_error(r) == "diskover-agent: DISKOVER_AGENT_PORT='http': expected an integer"
    assert cli("ls", REMOTE, env={**env, "DISKOVER_AGENT_PORT": ""}).returncode == 2  # empty: unset, 9999


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DISKOVER_AGENT_WORKERS", "0", "diskover-agent: DISKOVER_AGENT_WORKERS='0': workers must be at least 1"),
    ("DISKOVER_AGENT_WORKERS", "many", "DISKOVER_AGENT_WORKERS='many': expected an integer"),
    ("DISKOVER_AGENT_RETRY_FOR", "0",
     "diskover-agent: DISKOVER_AGENT_RETRY_FOR='0': retry-for must be more than 0 seconds"),
    ("DISKOVER_AGENT_PORT", "70000", "diskover-agent: DISKOVER_AGENT_PORT='70000': the port must be 1 to 65535"),
    ("DISKOVER_AGENT_TLS", "maybe", "DISKOVER_AGENT_TLS='maybe': expected 1 or 0"),
    ("DISKOVER_AGENT_INSECURE", "maybe", "DISKOVER_AGENT_INSECURE='maybe': expected 1 or 0"),
    ("DISKOVER_AGENT_ONE_FS", "maybe", "DISKOVER_AGENT_ONE_FS='maybe': expected 1 or 0"),
])
def test_env_values_checked_as_the_scanner_checks_them(agent, name, value, message):
    env = cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec)
    r = cli("-q", "du", "-s", REMOTE, env={**env, name: value})
    assert r.returncode == 2 and last_error(r).endswith(message), r.stderr
    good = {"DISKOVER_AGENT_WORKERS": "2", "DISKOVER_AGENT_RETRY_FOR": "3", "DISKOVER_AGENT_TLS": "0",
            "DISKOVER_AGENT_INSECURE": "no", "DISKOVER_AGENT_ONE_FS": "1", "DISKOVER_AGENT_PORT": str(agent.port)}[name]
    r = cli("-q", "du", "-s", REMOTE, env={**env, name: good})
    assert (r.returncode, r.stderr) == (0, b"")


def test_env_token_file_and_tls(tmp_path, start_agent):
    write_tls_files(tmp_path)
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "wrong").write_text("wrong-token\n")
    (tmp_path / "t" / "d").mkdir(parents=True)
    agent = start_agent([(REMOTE, str(tmp_path / "t"))], extra=(
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
        "--token-file", str(tmp_path / "token")))
    env = cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec, DISKOVER_AGENT_TOKEN_FILE=str(tmp_path / "token"),
                    DISKOVER_AGENT_CAFILE=str(tmp_path / "ca.pem"))
    assert cli("ls", REMOTE, env=env).stdout == b"d\n"
    assert cli("ls", REMOTE, env={**env, "DISKOVER_AGENT_CAFILE": "", "DISKOVER_AGENT_TLS": "1",
                                  "DISKOVER_AGENT_INSECURE": "1"}).stdout == b"d\n"
    r = cli("ls", REMOTE, env={**env, "DISKOVER_AGENT_CAFILE": "", "DISKOVER_AGENT_TLS": "1"})
    assert r.returncode == 2 and b"CERTIFICATE_VERIFY_FAILED" in r.stderr  # TLS, verified: the system's CAs
    r = cli("ls", REMOTE, "--token-file", str(tmp_path / "wrong"), env=env)  # the option wins
    assert r.returncode == 2 and "401" in last_error(r)
    # the token itself wins over the token file, as for the scanner
    r = cli("ls", REMOTE, env={**env, "DISKOVER_AGENT_TOKEN": "wrong-token"})
    assert r.returncode == 2 and "401" in last_error(r)


def test_env_exclusions_add_to_the_options(agent, tree):
    env = cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec, DISKOVER_AGENT_EXCLUDE_DIRS="skip,sub",
                    DISKOVER_AGENT_EXCLUDE_FILES="*.bak")

    def walked(*args: str, env: dict[str, str] = env) -> set[bytes]:
        r = cli("-q", "walk", "--format", "csv", REMOTE, *args, env=env)
        assert r.returncode == 0, r.stderr
        return {walk_records.path(row) for row in walk_records.read_csv(r.stdout)}

    everything = walked(env=cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec))
    assert len(everything) == 12
    gone = {RB + p for p in (b"/skip", b"/skip/deep", b"/skip/deep/x", b"/a/sub", b"/a/sub/two.dat", b"/b/three.bak")}
    assert walked() == everything - gone
    assert walked("--exclude", "four") == everything - gone - {RB + b"/b/four"}
    r = cli("-q", "du", "-s", "-b", REMOTE, env=env)
    want = gnu("du", "-s", "-b", "--exclude=skip", "--exclude=sub", "--exclude=*.bak", "tree", cwd=tree.parent)
    assert r.stdout == want.replace(b"tree", RB)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_env_one_fs(tree, start_agent):
    with tmpfs_mounted(tree / "b" / "mnt") as mnt:
        (mnt / "inside").write_bytes(b"i")
        agent = start_agent([(REMOTE, str(tree))])
        env = cli_env(DISKOVER_AGENT_HOSTS=agent.hostspec)
        inside = RB + b"/b/mnt/inside"

        def walked(*args: str, **extra: str) -> set[bytes]:
            out = cli("-q", "walk", *args, REMOTE, env={**env, **extra}).stdout
            return {walk_records.path(row) for row in walk_records.read_ndjson(out)}

        assert inside in walked()
        assert inside not in walked(DISKOVER_AGENT_ONE_FS="1") and RB + b"/b/four" in walked(DISKOVER_AGENT_ONE_FS="1")
        assert inside not in walked("-x")


def test_env_config_file(agent, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'hosts = ["127.0.0.1"]\nport = {agent.port}\nexclude-dirs = ["skip"]\n')
    env = cli_env(DISKOVER_AGENT_CONFIG=str(config))
    assert cli("ls", REMOTE, env=env).stdout == b"a\nb\nempty\nskip\n"
    out = cli("-q", "walk", REMOTE, env=env).stdout
    assert out.count(b"\n") == 9 and b"/skip" not in out
    config.write_text("hosts = 3\n")
    r = cli("ls", REMOTE, env=env)
    assert r.returncode == 2 and last_error(r).endswith("hosts must be a list of strings")


def test_help_names_every_variable():
    from diskover_agent.scanner.config import ENV

    text = " ".join(cli("--help").stdout.decode().split())
    for name in [*ENV.values(), "DISKOVER_AGENT_TOKEN", "DISKOVER_AGENT_CONFIG"]:
        assert name in text.replace("-\n", ""), name
    du_help = " ".join(cli("du", "--help").stdout.decode().split())
    for name in ("DISKOVER_AGENT_HOSTS", "DISKOVER_AGENT_PORT", "DISKOVER_AGENT_EXCLUDE_DIRS",
                 "DISKOVER_AGENT_ONE_FS", "DISKOVER_AGENT_TLS"):
        assert name in du_help, name


# -- 7. ls: several paths, and a path outside every export ---------------------------------------------

def test_ls_several_paths_as_ls(agent, tree):
    h = ["--hosts", agent.hostspec]
    for flags in ([], ["-l"]):
        r = cli(*h, "ls", *flags, REMOTE + "/a", REMOTE + "/b", REMOTE + "/empty")
        assert (r.returncode, r.stderr) == (0, b"")
        want = gnu("ls", "-A", "-N", *(flags or ["-1"]), "a", "b", "empty", cwd=tree)
        assert r.stdout == want.replace(b"a:\n", RB + b"/a:\n").replace(b"b:\n", RB + b"/b:\n").replace(
            b"empty:\n", RB + b"/empty:\n"), flags
    # paths after an option are paths too: `ls a -l b` lists a and b
    both = cli(*h, "ls", "-l", REMOTE + "/a", REMOTE + "/b")
    assert cli(*h, "ls", REMOTE + "/a", "-l", REMOTE + "/b").stdout == both.stdout
    assert both.stdout.count(b":\n") == 2
    # one path that fails: its error on stderr, the others printed, exit status 1 at the end
    r = cli(*h, "ls", REMOTE + "/a", REMOTE + "/nope", REMOTE + "/b")
    assert r.returncode == 1
    assert r.stdout == (RB + b"/a:\n.hidden\none.txt\nsub\n\n" + RB + b"/b:\nfour\nthree.bak\n")
    assert r.stderr.decode() == f"diskover-agent: {REMOTE}/nope: No such file or directory\n"


def test_ls_outside_every_export_names_the_exports(agent):
    for path in ("/etc", "/mnt", "/mnt/isilonx"):
        r = cli("--hosts", agent.hostspec, "ls", path)
        assert (r.returncode, r.stdout) == (1, b"")
        assert r.stderr.decode().splitlines() == [
            f"diskover-agent: {path}: Not inside an export of this agent (outside every export: /mnt/isilon, "
            "/mnt/other)"]
    r = cli("--hosts", agent.hostspec, "ls", REMOTE + "/nope")  # inside an export: only the error
    assert r.stderr.decode() == f"diskover-agent: {REMOTE}/nope: No such file or directory\n"


# -- 8. du: several paths, a path that fails, --max-depth spelt the same as walk's ----------------------

def test_du_several_paths_like_gnu_du(agent, tree):
    h = ["--hosts", agent.hostspec, "-q"]
    for options in (["-s", "-c"], ["-c", "-b"], ["-s"], ["-a", "-k"]):
        r = cli(*h, "du", *options, REMOTE + "/a", REMOTE + "/b")
        assert (r.returncode, r.stderr) == (0, b""), options
        want = gnu("du", *options, "tree/a", "tree/b", cwd=tree.parent)
        assert sorted(r.stdout.splitlines()) == sorted(want.replace(b"tree/", RB + b"/").splitlines()), options
        assert r.stdout.endswith(b"\ttotal\n") == ("-c" in options)
    # a path that fails: its error, no line (no zero), the others as usual; exit status 1
    r = cli(*h, "du", "-s", "-c", "-b", REMOTE + "/a", REMOTE + "/nope", REMOTE + "/b")
    assert r.returncode == 1
    assert r.stderr.decode() == f"diskover-agent: {REMOTE}/nope: No such file or directory\n"
    want = gnu("du", "-s", "-c", "-b", "tree/a", "tree/b", cwd=tree.parent)
    assert r.stdout == want.replace(b"tree/", RB + b"/")
    r = cli(*h, "du", "/etc")
    assert (r.returncode, r.stdout) == (1, b"")


def test_max_depth_spelt_alike_in_walk_and_du(agent):
    h = ["--hosts", agent.hostspec, "-q"]
    walked = sorted(cli(*h, "walk", "--max-depth", "1", REMOTE).stdout.splitlines())
    assert len(walked) == 4
    for spelling in (["--maxdepth", "1"], ["-d", "1"], ["--max-depth=1"], ["--max", "1"]):
        assert sorted(cli(*h, "walk", *spelling, REMOTE).stdout.splitlines()) == walked, spelling
    sized = cli(*h, "du", "--max-depth", "1", REMOTE).stdout
    assert sized.count(b"\n") == 5
    for spelling in (["--maxdepth", "1"], ["-d", "1"], ["-d1"]):
        assert cli(*h, "du", *spelling, REMOTE).stdout == sized, spelling
    for command in ("walk", "du"):
        text = cli(command, "--help").stdout.decode()
        assert "--max-depth N" in text and "--maxdepth" not in text
