"""One meaning per remote path: an export whose REMOTE lies inside another's is refused at
start-up (exit 2, one line), since a path below both would name two directories depending on
the route (a listing, or a walk descending from the outer export). Exports side by side,
even with names that share a prefix, still work, mapped by whole components."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diskover_agent import parallel_walk

from conftest import REMOTE, as_bytes_rows, http_get, reference_walk


def run_agent(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """The agent's command line, expected to exit at start-up (a hang fails the test)."""
    cmd = [sys.executable, "-m", "diskover_storage_agent", "-l", "127.0.0.1", "-p", "0", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent started with {args} instead of refusing them") from None


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "A", tmp_path / "B"
    (a / "sub" / "only-in-A-sub").mkdir(parents=True)
    (b / "only-in-B").mkdir(parents=True)
    return a, b


NESTED = {
    "inner-after": [(REMOTE, "A"), (REMOTE + "/sub", "B")],
    "inner-first": [(REMOTE + "/sub", "B"), (REMOTE, "A")],
    "two-levels": [(REMOTE, "A"), (REMOTE + "/x/y", "B")],
    "dot-and-slashes": [(REMOTE, "A"), (REMOTE + "//./sub/", "B")],
    "same-remote": [(REMOTE, "A"), (REMOTE + "/", "B")],
}


@pytest.mark.parametrize("case", NESTED)
def test_nested_exports_are_refused(trees, case):
    local = {"A": trees[0], "B": trees[1]}
    args = [x for remote, name in NESTED[case] for x in ("-r", remote, str(local[name]))]
    r = run_agent(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diskover-storage-agent: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert REMOTE in lines[0]
    assert ("nested" in lines[0]) or ("twice" in lines[0])


def test_nested_exports_in_the_config_file_are_refused(trees, tmp_path):
    a, b = trees
    conf = tmp_path / "agent.toml"
    conf.write_text(f'replacepath = [["{REMOTE}", "{a}"], ["{REMOTE}/sub", "{b}"]]\n')
    r = run_agent("--config", str(conf))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"'{REMOTE}/sub' lies inside -r REMOTE '{REMOTE}'" in r.stderr


def test_exports_side_by_side_are_whole_components(trees, start_agent):
    """``/mnt/isilon`` and ``/mnt/isilon2`` are not nested: each path has one meaning."""
    a, b = trees
    agent = start_agent([(REMOTE, str(a)), (REMOTE + "2", str(b))])
    assert http_get(agent.port, REMOTE)[2] == b"sub/\n"
    assert http_get(agent.port, REMOTE + "2")[2] == b"only-in-B/\n"
    assert http_get(agent.port, REMOTE + "/2")[0] == 404
    for remote, local in ((REMOTE, a), (REMOTE + "2", b)):
        rows = as_bytes_rows(parallel_walk(remote, hosts=[agent.hostspec]))
        assert rows == reference_walk(local, remote, nocaps=False)[0]
