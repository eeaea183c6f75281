"""The agent in one file (``contrib/build-pyz``): built once per session, run by bare
interpreters (``-I``, an empty venv made ``--without-pip``) of every supported Python found
here, and walked by this suite's client: the result is ``os.walk``'s, names and stat. Also:
the agent and ``diskover_wire`` import without the client, msgspec and tqdm; the client
imports without aiohttp and prometheus_client."""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diskover_wire
from diskover_agent import parallel_walk, parallel_walk_entries

from conftest import REMOTE, Agent, as_bytes_rows, http_get, reference_walk

#: The Python versions the project supports (requires-python >= 3.10) that exist today.
VERSIONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"
#: The repository the imported packages come from (under tests/mutations.py: its scratch copy).
ROOT = Path(diskover_wire.__file__).resolve().parents[2]
BUILD_PYZ = ROOT / "contrib" / "build-pyz"


def find_python(version: str) -> str | None:
    """A CPython ``version`` interpreter here: this one's base for the current version, else
    ``python3.X`` on PATH (if it runs: pyenv shims of versions not selected do not), else
    pyenv's install of it."""
    if version == CURRENT:
        return getattr(sys, "_base_executable", sys.executable)
    candidates = [shutil.which(f"python{version}")]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv, "versions", f"{version}.*", "bin", f"python{version}")))
    for exe in filter(None, candidates):
        done = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == version:
            return exe
    return None


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Path:
    """``contrib/build-pyz`` run once (pip's cache makes it quick)."""
    out = tmp_path_factory.mktemp("pyz")
    subprocess.run([sys.executable, str(BUILD_PYZ), "--output", str(out)], check=True, capture_output=True)
    return out / "diskover-storage-agent.pyz"


#: Empty venvs made this session, by version.
_bare: dict[str, str] = {}


def bare_python(version: str, tmp_path_factory) -> str:
    """The python of an empty venv (``--without-pip``) of ``version``; skips when it is not here."""
    if version not in _bare:
        exe = find_python(version)
        if exe is None:
            assert version != CURRENT
            pytest.skip(f"no Python {version} on this machine")
        venv = tmp_path_factory.mktemp(f"bare-{version}")
        subprocess.run([exe, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        _bare[version] = str(venv / "bin" / "python")
    return _bare[version]


def test_pyz_holds_no_compiled_module_and_runs_the_agent(pyz):
    names = zipfile.ZipFile(pyz).namelist()
    assert "__main__.py" in names
    assert {"diskover_wire/codec.py", "diskover_storage_agent/cli.py", "msgpack/fallback.py",
            "aiohttp/web.py", "prometheus_client/multiprocess.py"} <= set(names)
    compiled = [n for n in names if re.search(r"\.(so|pyd|dylib|dll|c|pyx)$|\.so\.", n)]
    assert compiled == []
    assert not [n for n in names if n.startswith(("diskover_agent/", "msgspec/", "tqdm/", "uvloop/"))]


def test_build_fails_on_a_compiled_module(tmp_path):
    """The build refuses a compiled module in what it packs (here one beside diskover_wire)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    shutil.copytree(ROOT / "contrib", repo / "contrib")
    (repo / "src" / "diskover_wire" / "_speedups.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    done = subprocess.run([sys.executable, str(repo / "contrib" / "build-pyz"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "compiled modules found" in done.stderr and "diskover_wire/_speedups" in done.stderr
    assert not (tmp_path / "out" / "diskover-storage-agent.pyz").exists()


def test_build_dependencies_are_the_node_distributions(tmp_path):
    """build-pyz packs what packages/node/pyproject.toml requires (msgpack built apart)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    node = tomllib.loads((ROOT / "packages" / "node" / "pyproject.toml").read_text())["project"]["dependencies"]
    script = (BUILD_PYZ).read_text()
    packed = set(ast.literal_eval(re.search(r"^DEPENDENCIES = (\(.*\))$", script, re.M).group(1)))
    assert {d.split(";")[0].strip() for d in node if not d.startswith("msgpack")} == packed
    assert any(d.startswith("msgpack") for d in node)


def _walk_and_compare(agent: Agent, tree: Path) -> None:
    expected, expected_errors = reference_walk(tree)
    errors: list[OSError] = []
    rows = list(parallel_walk(REMOTE, hosts=[agent.hostspec], workers=4, onerror=errors.append))
    assert as_bytes_rows(rows) == expected and len(rows) == len(expected)
    assert sorted((e.errno, os.fsencode(e.filename)) for e in errors) == expected_errors
    assert any(b"\xff" in r[0] for r in expected)  # the tree holds non-UTF-8 names
    top, checked = os.fsencode(tree), 0
    for _root, dirs, files in parallel_walk_entries(REMOTE, hosts=[agent.hostspec], workers=4):
        for entry in dirs + files:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # below noexec/: the agent (without root's capabilities) cannot stat it
                assert b"/noexec/" in os.fsencode(entry.path)
                continue
            want = os.lstat(os.fsencode(entry.path).replace(REMOTE.encode(), top, 1))
            for field in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns"):
                assert getattr(st, field) == getattr(want, field), (entry.path, field)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("version", VERSIONS)
def test_client_walks_through_the_pyz_agent_on_a_bare_python(version, pyz, awkward_tree, tmp_path_factory):
    """A stock interpreter with nothing installed runs the .pyz with two worker processes
    (forked from the zip), the pure codec and read loop; names and stat walks are os.walk's,
    and the metrics of both processes are summed (prometheus_client's multiprocess mode)."""
    python = bare_python(version, tmp_path_factory)
    agent = Agent([(REMOTE, str(awkward_tree))], nocaps=True, processes=2, command=[python, "-I", str(pyz)])
    try:
        _walk_and_compare(agent, awkward_tree)
        log = "".join(agent.log)
        assert len(re.findall(r"process \d of 2 \(pid \d+, -c \d+\): codec: msgpack \(pure Python\)", log)) == 2, log
        assert len(re.findall(r"process \d of 2 .*: read loop: pure Python", log)) == 2, log
        assert len(re.findall(r"process \d of 2 .*: event loop: asyncio\.", log)) == 2, log
        assert "Traceback" not in log
        status, _, body = http_get(agent.port, "/_agent/metrics")
        assert status == 200 and b'diskover_agent_requests_total{endpoint="walk",status="200"}' in body
    finally:
        assert agent.terminate() == 0


def test_pyz_uses_the_accelerators_it_finds(pyz, tree_small):
    """Run by a Python that has msgspec and uvloop (this suite's), the .pyz agent uses them."""
    agent = Agent([(REMOTE, str(tree_small))], command=[sys.executable, "-I", str(pyz)])
    try:
        log = "".join(agent.log)
        assert "codec: msgspec" in log and "event loop: uvloop" in log, log
        status, _, body = http_get(agent.port, REMOTE)
        assert (status, body) == (200, b"a\nsub/\n")
    finally:
        assert agent.terminate() == 0


@pytest.fixture
def tree_small(tmp_path) -> Path:
    top = tmp_path / "small"
    (top / "sub").mkdir(parents=True)
    (top / "a").write_bytes(b"x")
    return top


# -- what imports what ----------------------------------------------------------------------------

BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, Blocker())
"""

IMPORT_ALL = """
import importlib, pkgutil, sys
for top in TOPS:
    pkg = importlib.import_module(top)
    for mod in pkgutil.walk_packages(pkg.__path__, top + "."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _import_all(python: list[str], tops: list[str], blocked: list[str], path: list[str] | None = None) -> set[str]:
    code = f"BLOCKED = {blocked!r}\nTOPS = {tops!r}\n" + (
        f"import sys\nsys.path[:0] = {path!r}\n" if path else "") + BLOCKER + IMPORT_ALL
    done = subprocess.run([*python, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_agent_imports_without_the_client_msgspec_and_tqdm():
    loaded = _import_all([sys.executable], ["diskover_wire", "diskover_storage_agent"],
                         ["diskover_agent", "msgspec", "tqdm"])
    assert {"diskover_wire", "diskover_storage_agent", "aiohttp", "msgpack"} <= loaded
    assert not loaded & {"diskover_agent", "msgspec", "tqdm"}


def test_pyz_modules_import_on_a_bare_python(pyz, tmp_path_factory):
    """Every module in the .pyz imports on an empty venv's Python (-I): nothing is missing."""
    python = bare_python(CURRENT, tmp_path_factory)
    loaded = _import_all([python, "-I"], ["diskover_wire", "diskover_storage_agent"], [], [str(pyz)])
    assert {"diskover_wire", "diskover_storage_agent", "aiohttp", "msgpack", "prometheus_client"} <= loaded
    assert not loaded & {"diskover_agent", "msgspec", "tqdm", "uvloop"}


def test_client_imports_without_aiohttp_and_prometheus_client():
    loaded = _import_all([sys.executable], ["diskover_wire", "diskover_agent"],
                         ["aiohttp", "prometheus_client", "diskover_storage_agent"])
    assert {"diskover_wire", "diskover_agent", "msgspec"} <= loaded
    assert not loaded & {"aiohttp", "prometheus_client", "diskover_storage_agent"}
