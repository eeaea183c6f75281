"""The two lean distributions of this repository, each installed by pip into a fresh venv
(once per session): ``packages/node`` (the agent: no client, no msgspec, no tqdm) serves a
walk to this suite's client; ``packages/crawler`` (the client: no aiohttp, no
prometheus_client, no agent) walks through an agent of this suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import diskover_wire
from diskover_agent import parallel_walk

from conftest import REMOTE, Agent, as_bytes_rows, compiled_read_loop_built, reference_walk

ROOT = Path(diskover_wire.__file__).resolve().parents[2]


def install(kind: str, tmp: Path) -> Path:
    """A fresh venv with ``pip install ./packages/<kind>`` from a copy of the repository's
    sources (the build writes beside them): its ``bin`` directory."""
    repo = tmp / "repo"
    if not repo.exists():
        shutil.copytree(ROOT / "src", repo / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        shutil.copytree(ROOT / "packages", repo / "packages", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    env = tmp / f"venv-{kind}"
    venv.create(env, with_pip=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(repo / "packages" / kind)], check=True, capture_output=True)
    return env / "bin"


def installed(bin_dir: Path) -> set[str]:
    """The distributions in a venv, by normalised name."""
    code = "import importlib.metadata as m; print(' '.join(d.metadata['Name'] for d in m.distributions()))"
    out = subprocess.run([str(bin_dir / "python"), "-c", code], check=True, capture_output=True, text=True).stdout
    return {n.strip().lower().replace("_", "-") for n in out.split()}


def importable(bin_dir: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(bin_dir / "python"), "-c", code], check=False).returncode == 0


@pytest.fixture(scope="session")
def node_bin(tmp_path_factory) -> Path:
    return install("node", tmp_path_factory.mktemp("lean"))


@pytest.fixture(scope="session")
def crawler_bin(tmp_path_factory) -> Path:
    return install("crawler", tmp_path_factory.mktemp("lean"))


def test_node_install_holds_the_agent_alone(node_bin, awkward_tree):
    dists = installed(node_bin)
    assert {"diskover-storage-agent-node", "aiohttp", "prometheus-client", "msgpack"} <= dists
    assert not dists & {"msgspec", "tqdm", "diskover-storage-agent", "diskover-storage-agent-client"}
    for module in ("diskover_agent", "msgspec", "tqdm"):
        assert not importable(node_bin, module), module
    agent = Agent([(REMOTE, str(awkward_tree))], nocaps=True, command=[str(node_bin / "diskover-storage-agent")])
    try:
        log = "".join(agent.log)
        assert "codec: msgpack (compiled)" in log, log
        if compiled_read_loop_built():  # where this suite's install built it, the node's did too
            assert "read loop: compiled" in log, log
        expected, _ = reference_walk(awkward_tree)
        assert as_bytes_rows(parallel_walk(REMOTE, hosts=[agent.hostspec], onerror=lambda e: None)) == expected
    finally:
        assert agent.terminate() == 0


WALK = """
import json, os, sys
from diskover_agent import parallel_walk
rows = [[os.fsencode(r).hex(), sorted(os.fsencode(d).hex() for d in ds), sorted(os.fsencode(f).hex() for f in fs)]
        for r, ds, fs in parallel_walk(sys.argv[1], hosts=[sys.argv[2]], onerror=lambda e: None)]
print(json.dumps(rows))
"""


def test_crawler_install_holds_the_client_alone(crawler_bin, awkward_tree, start_agent):
    dists = installed(crawler_bin)
    assert {"diskover-storage-agent-client", "msgspec", "tqdm"} <= dists
    assert not dists & {"aiohttp", "prometheus-client", "msgpack", "diskover-storage-agent",
                        "diskover-storage-agent-node"}
    for module in ("diskover_storage_agent", "aiohttp", "prometheus_client"):
        assert not importable(crawler_bin, module), module
    agent = start_agent([(REMOTE, str(awkward_tree))], nocaps=True)
    done = subprocess.run([str(crawler_bin / "python"), "-c", WALK, REMOTE, agent.hostspec],
                          check=True, capture_output=True, text=True)
    rows = {(bytes.fromhex(r), tuple(bytes.fromhex(d) for d in ds), tuple(bytes.fromhex(f) for f in fs))
            for r, ds, fs in json.loads(done.stdout)}
    expected, _ = reference_walk(awkward_tree)
    assert rows == expected
    assert any(b"\xff" in r[0] for r in rows)
    cli = subprocess.run([str(crawler_bin / "diskover-agent"), "--hosts", agent.hostspec, "ls", REMOTE],
                         capture_output=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert cli.returncode == 0, cli.stderr
    assert b"top-file" in cli.stdout.splitlines()
    report = subprocess.run([str(crawler_bin / "diskover-agent"), "report", str(awkward_tree)],
                            capture_output=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert (report.returncode, report.stderr) == (2, b"diskover-agent: report needs duckdb, which is not installed "
                                                     b"here: pip install './packages/crawler[dask]' (in the "
                                                     b"diskover-storage-agent checkout)\n")


def test_the_three_distributions_share_one_version():
    """The root and both lean distributions take their version from diskover_wire."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    for path in (ROOT / "pyproject.toml", ROOT / "packages" / "node" / "pyproject.toml",
                 ROOT / "packages" / "crawler" / "pyproject.toml"):
        conf = tomllib.loads(path.read_text())
        assert conf["project"]["dynamic"] == ["version"], path
        assert conf["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diskover_wire.__version__"}, path
