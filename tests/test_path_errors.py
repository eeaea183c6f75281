"""Paths an agent refuses reach the caller as the ``OSError`` the local call would raise
(``PermissionError`` for ``..`` and for what is outside every export, ``FileNotFoundError``,
``NotADirectoryError``), with ``filename`` set: raised by ``AgentConnection``, given to
``onerror`` in walks (the walk goes on), and named on stderr by the command line (exit 1).
``AgentHTTPError`` stays for refusals that are not about a path (a wrong token)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import walk_records
from diskover_agent import AgentConnection, parallel_walk, parallel_walk_entries
from diskover_agent.errors import AgentError

from conftest import REMOTE, as_bytes_rows, http_get, reference_walk

SCRIPT = Path(sys.executable).with_name("diskover-agent")
DOTDOT = [REMOTE + "/../../etc", REMOTE + "/a/..", REMOTE + "/a/../../isilon", "/../etc"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("patherr") / "tree"
    for d in ("a/x", "a/y", "b", "c/z"):
        (top / d).mkdir(parents=True)
    for f in ("a/f1", "b/f2", "c/z/f3", "top"):
        (top / f).write_bytes(b"data")
    return top


@pytest.fixture
def agent(tree, start_agent):
    return start_agent([(REMOTE, str(tree))])


def test_agent_names_the_path_refusal(agent):
    """A ``..`` path is still 400, now ``bad_path`` with the errno and the path; a bad
    query stays ``bad_request``."""
    status, _, body = http_get(agent.port, "/mnt/isilon/a/../../etc")
    assert status == 400
    assert body.startswith(b"{") and b'"error":"bad_path"' in body
    assert b'"errno":%d' % errno.EACCES in body and b'"path":"/mnt/isilon/a/../../etc"' in body
    status, _, body = http_get(agent.port, "/mnt/isilon?bogus=1")
    assert status == 400 and b'"error":"bad_request"' in body and b"errno" not in body


def test_walk_request_refuses_a_dotdot_path_alone(agent):
    """In a walk request, a ``..`` path gets a ``dir`` and an ``error`` frame (EACCES); the
    other paths of the request are walked."""
    body = json.dumps({"paths": [REMOTE + "/a/../../etc", REMOTE + "/b"], "max_entries": 1000}).encode()
    status, _, answer = http_get(agent.port, "/_agent/v1/walk", method="POST", body=body,
                                 headers={"Content-Type": "application/json"})
    assert status == 200, answer
    frames = [json.loads(line) for line in answer.splitlines()]
    assert frames[0] == ["dir", REMOTE + "/a/../../etc", None]
    assert frames[1][:3] == ["error", errno.EACCES, "EACCES"] and "'..'" in frames[1][3]
    assert frames[2] == ["dir", REMOTE + "/b", None]
    assert [e[0] for e in frames[3][1]] == ["f2"]
    assert frames[4] == ["end", []]


@pytest.mark.parametrize("path", DOTDOT)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_listdir_of_dotdot_is_permission_error(agent, path, as_bytes):
    arg = os.fsencode(path) if as_bytes else path
    with AgentConnection([agent.hostspec]) as conn:
        for call in (conn.listdir, lambda p: list(conn.scandir(p)), conn.statvfs):
            with pytest.raises(PermissionError) as info:
                call(arg)
            assert info.value.errno == errno.EACCES
            assert info.value.filename == arg
            assert "'..'" in info.value.strerror
        # the connection is still good for the next request
        assert sorted(conn.listdir(REMOTE)[1]) == ["a", "b", "c"]


@pytest.mark.parametrize("path, exc, num", [
    ("/etc", PermissionError, errno.EACCES),
    ("/mnt/isilon2/a", PermissionError, errno.EACCES),
    (REMOTE + "/nope", FileNotFoundError, errno.ENOENT),
    (REMOTE + "/top", NotADirectoryError, errno.ENOTDIR),
])
def test_listdir_refusals_are_os_errors(agent, path, exc, num):
    with AgentConnection([agent.hostspec]) as conn:
        with pytest.raises(exc) as info:
            conn.listdir(path)
    assert info.value.errno == num and info.value.filename == path


def test_nul_in_a_path_is_refused_as_locally(agent):
    """``os.listdir`` says ValueError for a NUL byte; so does the client, without asking."""
    with pytest.raises(ValueError, match="null byte"):
        os.listdir("/tmp/\0x")
    with AgentConnection([agent.hostspec]) as conn, pytest.raises(ValueError, match="null byte"):
        conn.listdir(REMOTE + "/a\0b")


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
@pytest.mark.parametrize("top", [REMOTE + "/a/../../etc", "/etc"])
def test_walk_of_a_refused_top_goes_to_onerror(agent, mode, top):
    errors: list[OSError] = []
    rows = list(parallel_walk(top, workers=2, hosts=[agent.hostspec], onerror=errors.append, mode=mode,
                              retry_for=5))
    assert rows == []
    assert len(errors) == 1
    assert isinstance(errors[0], PermissionError) and errors[0].filename == top
    errors.clear()
    assert list(parallel_walk_entries(os.fsencode(top), workers=2, hosts=[agent.hostspec],
                                      onerror=errors.append, mode=mode, retry_for=5)) == []
    assert [(type(e), e.filename) for e in errors] == [(PermissionError, os.fsencode(top))]


@pytest.mark.parametrize("mode", ["subtree", "listdir"])
def test_walk_with_a_dotdot_in_its_frontier_goes_on(agent, tree, mode):
    """A ``..`` name the loop body adds to ``dirs`` puts a ``..`` path among the walk's work,
    batched with valid ones: it goes to ``onerror``; every other directory is walked."""
    errors: list[OSError] = []
    rows = []
    for root, dirs, files in parallel_walk(REMOTE, workers=1, hosts=[agent.hostspec], onerror=errors.append,
                                           mode=mode, retry_for=5):
        rows.append((root, list(dirs), files))
        if root == REMOTE + "/a":
            dirs.append("..")
    assert [(type(e), e.errno, e.filename) for e in errors] == [(PermissionError, errno.EACCES, REMOTE + "/a/..")]
    assert as_bytes_rows(rows) == reference_walk(tree, nocaps=False)[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISKOVER_AGENT_HOSTS", "DISKOVER_AGENT_TOKEN")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize("path", [REMOTE + "/a/../../etc", "/etc"])
def test_cli_names_a_refused_path_and_exits_1(agent, path):
    for command in (["ls"], ["ls", "-l"], ["walk"], ["du", "-s"]):
        r = run_cli("-q", "--hosts", agent.hostspec, "--retry-for", "5", *command, path)
        assert r.returncode == 1, (command, r.stderr)
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"diskover-agent: {path}: "), (command, lines)
        assert "HTTP" not in lines[0] and "Traceback" not in lines[0]
        if command == ["walk"]:  # the top that failed is the walk's one record, an error record
            [row] = walk_records.read_ndjson(r.stdout)
            assert (row["type"], row["parent"], row["name"], row["error_code"]) == ("error", path, "", "EACCES"), row
        else:
            assert r.stdout.strip() in (b"", b"0\t0\t" + path.encode() + b"\n0\t0\ttotal")


def test_refusals_not_about_a_path_stay_agent_errors(tree, start_agent, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-tests\n")
    agent = start_agent([(REMOTE, str(tree))], extra=("--token-file", str(token_file)))
    with AgentConnection([agent.hostspec], token="wrong") as conn, pytest.raises(AgentError) as info:
        conn.listdir(REMOTE + "/../etc")  # the token is checked first: nothing said about the path
    assert not isinstance(info.value, OSError) and info.value.status == 401
