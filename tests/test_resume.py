"""``walk -o DIR`` checkpoints and ``--resume``: the CLI (the installed console script) is
killed (SIGKILL, SIGINT, SIGTERM) during a walk through three real agents, resumed, and the
dataset compared with ``os.walk`` + ``lstat`` of the tree: every entry exactly once.

The walk is held at a known point without sleeps: part of the tree is a FUSE file system
(``tests/slowfs.py``) whose one slow directory cannot be listed until a gate file exists,
so the walk cannot end before the test opens the gate; the test waits for the state it
wants in the dataset directory's checkpoint (the first partition committed, half the
entries committed) and then sends the signal."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_client_cli import SCRIPT, cli, hosts_of
from walk_records import TYPES

from conftest import REMOTE, cli_env, slowfs_mounted

pq = pytest.importorskip("pyarrow.parquet")

import diskover_agent  # noqa: E402
from diskover_agent.checkpoint import CHECKPOINT  # noqa: E402
from diskover_agent.dataset import MANIFEST  # noqa: E402

RB = REMOTE.encode()
ROWS = 40  # rows per partition: many partitions in a small tree
DEADLINE = 60.0  # failure bound of every wait


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A tree of ~900 entries whose ``gate/slow0`` (FUSE) lists only once ``gate_file`` exists."""
    top = tmp_path_factory.mktemp("resume-tree")
    for i in range(150):
        d = top / f"d{i:03d}"
        d.mkdir()
        for j in range(4):
            (d / f"f{j}").write_bytes(b"x" * j)
        if i < 50:
            (d / "sub").mkdir()
            (d / "sub" / "g0").write_bytes(b"")
            (d / "sub" / "g1").symlink_to("../f1")
    (top / "bad\xff".encode("latin-1").decode("utf-8", "surrogateescape")).mkdir()
    (top / "link-to-dir").symlink_to("d000")
    (top / "gate").mkdir()
    gate_file = tmp_path_factory.mktemp("resume-gate") / "open"
    with slowfs_mounted(top / "gate", SLOWFS_GATE=str(gate_file), SLOWFS_COUNT="1"):
        yield SimpleNamespace(top=top, gate_file=gate_file)


@pytest.fixture
def agents(gated, start_agent):
    gated.gate_file.unlink(missing_ok=True)  # closed: the walk cannot end until the test opens it
    yield [start_agent([(REMOTE, str(gated.top))]) for _ in range(3)]
    gated.gate_file.touch()  # a listing still held ends (a FUSE request under way outlives SIGKILL)


def reference(top: Path) -> dict[tuple[bytes, bytes], tuple[str, int | None]]:
    """(remote parent, name) -> (type, inode) of every entry below ``top``: os.walk + lstat."""
    out = {}
    lb = os.fsencode(top)
    for root, dirs, files in os.walk(lb):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[(RB + root[len(lb):], name)] = (TYPES.get(stat.S_IFMT(st.st_mode), "unknown"), st.st_ino)
    return out


def checkpoint(out: Path) -> dict:
    try:
        return json.loads((out / CHECKPOINT).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}


def wait_for(out: Path, committed_entries: int, proc: subprocess.Popen | SimpleNamespace) -> dict:
    """The checkpoint once it names at least one partition and ``committed_entries`` entries
    (``proc``: the walk, which must not end first)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        doc = checkpoint(out)
        s = doc.get("summary", {})
        if s.get("files") and s["entries"] >= committed_entries:
            assert not doc["complete"], "the gate holds the walk: it cannot be complete"
            return doc
        assert proc.poll() is None, proc.stderr.read() if getattr(proc, "stderr", None) else "the walk ended"
        assert time.monotonic() < deadline, f"the walk did not commit {committed_entries} entries"
        time.sleep(0.01)


def rows_of(out: Path, files: list[str]) -> list[tuple[bytes, bytes, str, int | None]]:
    """(parent, name, type, ino) of every row of these partitions (Parquet or NDJSON)."""
    rows = []
    for name in files:
        if name.endswith(".ndjson"):
            records = [json.loads(line) for line in (out / name).read_bytes().splitlines()]
            for r in records:
                for col in ("parent_raw", "name_raw"):
                    r[col] = None if r[col] is None else base64.b64decode(r[col])
        else:
            records = pq.read_table(out / name).to_pylist()
        for r in records:
            rows.append((r["parent_raw"] or r["parent"].encode(), r["name_raw"] or r["name"].encode(),
                         r["type"], r["ino"]))
    return rows


def assert_exactly_once(out: Path, want: dict) -> dict:
    """The complete dataset in ``out`` holds each entry of ``want`` once, and nothing else
    (no partition it does not name, no temporary file)."""
    doc = checkpoint(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert doc["complete"] and manifest["complete"] and doc["frontier"] == []
    assert manifest["files"] == doc["summary"]["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], MANIFEST, CHECKPOINT])
    rows = rows_of(out, manifest["files"])
    keys = [(p, n) for p, n, _t, _i in rows]
    assert len(keys) == len(set(keys)), "an entry written twice"
    assert set(keys) == set(want)
    fuse = RB + b"/gate"
    for p, n, t, ino in rows:
        assert t == want[(p, n)][0], (p, n)
        if not (p + b"/" + n).startswith(fuse + b"/"):  # (FUSE inodes are the kernel's, per lookup)
            assert ino == want[(p, n)][1], (p, n)
    assert manifest["entries"] == len(want) and manifest["errors"] == 0
    # each directory listed once (an empty one too): the top and every directory below it
    assert manifest["dirs"] == 1 + sum(t == "dir" for t, _ino in want.values())
    return manifest


def start_walk(agents, out: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    argv = ["--hosts", hosts_of(*agents), "-q", "walk", REMOTE, "-o", str(out), "--format", "parquet",
            "--partition-rows", str(ROWS), *extra]
    proc = subprocess.Popen([str(SCRIPT), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())
    return proc, argv


@pytest.mark.parametrize("point", ["first-partition", "middle"])
def test_sigkill_then_resume_lists_every_entry_once(gated, agents, tmp_path, point):
    want = reference_after_gate(gated)
    out = tmp_path / "ds"
    proc, argv = start_walk(agents, out)
    wait_for(out, 1 if point == "first-partition" else len(want) // 2, proc)
    proc.kill()
    proc.wait(DEADLINE)
    proc.stdout.close()
    proc.stderr.close()
    saved = checkpoint(out)
    committed = rows_of(out, saved["summary"]["files"])
    assert committed and len(committed) < len(want)
    # what a crash while writing a partition leaves: a temporary and a partition the checkpoint does not name
    (out / ".part-000999-0123456789ab.parquet.tmp").write_bytes(b"half a parquet file")
    stray = out / "part-000999-0123456789ab.parquet"
    stray.write_bytes((out / saved["summary"]["files"][0]).read_bytes())
    # report reads what is committed, and says the dataset is incomplete
    rep = cli("report", str(out), "totals")
    assert rep.returncode == 0, rep.stderr
    assert rep.stderr.decode() == (f"diskover-agent: {out}: INCOMPLETE (interrupted: walk ... --resume continues "
                                   f"it), {len(committed):,} entries, 0 directories failed\n")
    header, values = rep.stdout.decode().splitlines()[1:3]
    totals = dict(zip(header.split("\t"), map(int, values.split("\t")), strict=True))
    assert (totals["files"], totals["dirs"]) == (sum(t == "file" for *_k, t, _i in committed),
                                                 sum(t == "dir" for *_k, t, _i in committed))
    gated.gate_file.touch()
    r = cli(*argv, "--resume", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    assert not stray.exists()
    manifest = assert_exactly_once(out, want)
    assert manifest["files"][:len(saved["summary"]["files"])] == saved["summary"]["files"]
    # a resume of the complete walk says so, and changes nothing (no agent needed: none listens on port 9)
    again = cli(*["127.0.0.1:9" if a == argv[1] else a for a in argv if a != "-q"], "--resume")
    assert again.returncode == 0 and b"is already complete" in again.stderr, again.stderr
    assert json.loads((out / MANIFEST).read_text()) == manifest


def reference_after_gate(gated) -> dict:
    """os.walk + lstat of the whole tree (the gate opened for it, then closed again)."""
    assert os.path.ismount(gated.top / "gate"), "the FUSE file system is mounted"
    gated.gate_file.touch()
    try:
        return reference(gated.top)
    finally:
        gated.gate_file.unlink()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_commits_and_says_how_to_resume(gated, agents, tmp_path, sig):
    want = reference_after_gate(gated)
    out = tmp_path / "ds"
    proc, argv = start_walk(agents, out)
    wait_for(out, 1, proc)
    proc.send_signal(sig)
    _stdout, stderr = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 128 + sig, stderr
    line = stderr.decode().strip().splitlines()[-1]
    assert line.startswith(f"diskover-agent: interrupted ({sig.name}); committed in {out}: "), stderr
    command = line.split("resume with: ", 1)[1]
    assert command == " ".join(["diskover-agent", *argv, "--resume"])  # (no character here needs quoting)
    saved = checkpoint(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert not saved["complete"] and not manifest["complete"] and saved["frontier"]
    # everything complete was committed: nothing but the named partitions, the manifest and the checkpoint
    assert sorted(p.name for p in out.iterdir()) == sorted([*saved["summary"]["files"], MANIFEST, CHECKPOINT])
    gated.gate_file.touch()
    r = cli(*argv, "--resume", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    manifest = assert_exactly_once(out, want)
    rep = cli("report", str(out), "totals")
    assert rep.stderr.decode() == (f"diskover-agent: {out}: complete, {manifest['entries']:,} entries, "
                                   "0 directories failed\n")


def test_disk_full_while_a_partition_is_written_then_resume(gated, agents, tmp_path):
    """A partition's write fails half-way (the file size limit, as a full disk): exit 2, the
    line that says how to resume, the committed state kept; --resume discards the half-written
    partition and ends the walk: every entry once."""
    gated.gate_file.touch()
    want = reference(gated.top)
    out = tmp_path / "nd"
    argv = ["--hosts", hosts_of(*agents), "walk", REMOTE, "-o", f"{out}/", "--format", "ndjson",
            "--partition-rows", "300"]
    # files of 32 KiB at most: above the checkpoint's size, below a partition's (300 NDJSON rows)
    limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768)); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", limited, str(SCRIPT), *argv], capture_output=True,
                       stdin=subprocess.DEVNULL, env=cli_env(), timeout=DEADLINE)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().splitlines()[-2:] == [
        f"diskover-agent: cannot write {out}: File too large",
        f"diskover-agent: what is complete is committed in {out}; resume with: "
        + " ".join(["diskover-agent", *argv, "--resume"])]
    assert [p for p in out.iterdir() if p.name.endswith(".tmp")], "a partition was being written"
    assert not checkpoint(out)["complete"]
    r = cli(*argv, "--resume", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, want)


def test_resume_refusals(gated, agents, tmp_path):
    hosts = hosts_of(*agents)
    out = tmp_path / "ds"
    base = ["--hosts", hosts, "walk", REMOTE, "-o", str(out), "--format", "parquet", "--partition-rows", "50"]
    proc, argv = start_walk(agents, out, "--exclude", "sub")
    wait_for(out, 1, proc)
    proc.kill()
    proc.communicate()
    cases = [
        (["--hosts", hosts, "walk", REMOTE + "/d001", "-o", str(out), "--resume"], 2,
         f"{out} holds the walk of {REMOTE}, not of {REMOTE}/d001"),
        ([*base, "--resume"], 2, f"{out} holds a walk with other options (exclude_dirs: [sub] then, none now; "
                                 "exclude_files: [sub] then, none now)"),
        ([*base, "--exclude", "sub", "--max-depth", "2", "--resume"], 2, "(max_depth: none then, 2 now)"),
        ([*base, "--exclude", "sub", "-x", "--resume"], 2, "(one_fs: False then, True now)"),
        (["--hosts", hosts, "walk", REMOTE, "-o", str(out) + "/", "--format", "ndjson", "--exclude", "sub",
          "--resume"], 2, "(format: parquet then, ndjson now)"),
        (base, 2, f"{out} already holds a walk's dataset: --resume continues an interrupted walk, --overwrite "
                  "replaces a walk's dataset, or use an empty directory"),
        (["--hosts", hosts, "walk", REMOTE, "-o", str(tmp_path / "empty"), "--format", "parquet", "--resume"], 2,
         f"{tmp_path / 'empty'} is not a directory: nothing to resume"),
        (["--hosts", hosts, "walk", REMOTE, "-o", str(tmp_path), "--format", "parquet", "--resume"], 2,
         f"{tmp_path} holds no walk checkpoint: nothing to resume"),
        (["--hosts", hosts, "walk", REMOTE, "-o", str(tmp_path / "x.ndjson"), "--overwrite"], 2,
         "--overwrite is for a walk's dataset"),
        (["--hosts", hosts, "walk", REMOTE, "-o", str(out), "--dask", "local:1", "--resume"], 2,
         f"{out} holds a walk with other options (exclude_dirs: [sub] then, none now; "),
    ]
    for args, status, message in cases:
        r = cli(*args)
        assert r.returncode == status and message.encode() in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr
    gated.gate_file.touch()
    r = cli(*argv, "--resume", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    # --overwrite replaces it: a new walk, with other options
    r = cli(*base, "-q", "--overwrite", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, reference(gated.top))


def test_ndjson_dataset_and_max_depth_resume(gated, agents, tmp_path):
    """A dataset of NDJSON partitions (-o DIR/), with --max-depth: interrupted, resumed, the
    entries at most two levels down, each once."""
    want = {k: v for k, v in reference_after_gate(gated).items() if k[0].count(b"/") - RB.count(b"/") <= 1}
    out = tmp_path / "nd"
    argv = ["--hosts", hosts_of(*agents), "-q", "walk", REMOTE, "-o", f"{out}/", "--format", "ndjson",
            "--partition-rows", str(ROWS), "--max-depth", "2"]
    proc = subprocess.Popen([str(SCRIPT), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=cli_env())
    wait_for(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(DEADLINE) == 130
    proc.stderr.close()
    gated.gate_file.touch()
    r = cli(*argv, "--resume", timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and all(f.endswith(".ndjson") for f in manifest["files"])
    keys = []
    for name in manifest["files"]:
        for line in (out / name).read_bytes().splitlines():
            row = json.loads(line)
            assert row["parent_raw"] is None or row["parent"].startswith(REMOTE)
            keys.append((os.fsencode(row["parent"]) if row["parent_raw"] is None else None, row["name"]))
    assert len(keys) == len(want) and len(set(keys)) == len(keys)


def test_python_api_walks_and_resumes(gated, agents, tmp_path):
    """walk_to_dataset: a walk that no agent answers any more (all stopped) keeps what is
    complete, and resume=True ends it; the refusals as exceptions."""
    want = reference_after_gate(gated)
    out = tmp_path / "api"
    failed: list[BaseException] = []

    def walk() -> None:
        try:
            diskover_agent.walk_to_dataset([a.hostspec for a in agents], REMOTE, str(out), part_entries=ROWS,
                                           retry_for=1.0, timeout=2.0)
        except BaseException as exc:  # the test looks at it
            failed.append(exc)

    thread = threading.Thread(target=walk)
    thread.start()
    saved = wait_for(out, 1, SimpleNamespace(poll=lambda: None if thread.is_alive() else "ended"))
    for a in agents:
        os.kill(a.pid, signal.SIGSTOP)
    try:
        thread.join(DEADLINE)
    finally:
        for a in agents:
            os.kill(a.pid, signal.SIGCONT)
    assert not thread.is_alive() and isinstance(failed[0], diskover_agent.AgentError), failed
    assert checkpoint(out)["summary"]["files"][:len(saved["summary"]["files"])] == saved["summary"]["files"]
    gated.gate_file.touch()
    hosts = [a.hostspec for a in agents]
    summary = diskover_agent.walk_to_dataset(hosts, REMOTE, str(out), resume=True, part_entries=ROWS)
    assert summary.complete
    assert_exactly_once(out, want)
    out = tmp_path / "api2"
    summary = diskover_agent.walk_to_dataset(hosts, REMOTE, str(out), part_entries=ROWS, max_depth=1)
    assert summary.complete and summary.entries == sum(1 for p, _n in want if p == RB)
    with pytest.raises(FileExistsError):
        diskover_agent.walk_to_dataset(hosts, REMOTE, str(out))
    with pytest.raises(diskover_agent.AlreadyComplete):
        diskover_agent.walk_to_dataset(hosts, REMOTE, str(out), resume=True, max_depth=1)
    with pytest.raises(diskover_agent.ResumeRefused, match="max_depth: 1 then, none now"):
        diskover_agent.walk_to_dataset(hosts, REMOTE, str(out), resume=True)
    summary = diskover_agent.walk_to_dataset(hosts, REMOTE, str(out), overwrite=True, part_entries=ROWS)
    assert summary.complete
    assert_exactly_once(out, want)


def test_dask_driver_killed_then_resumed(gated, agents, tmp_path):
    """walk --dask local:2: the driver (and its local cluster) killed after a task's result was
    committed; --resume (a new cluster) ends the walk: every entry once."""
    pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    want = reference_after_gate(gated)
    out = tmp_path / "dask"
    argv = ["--hosts", hosts_of(*agents), "-q", "walk", REMOTE, "-o", str(out), "--dask", "local:2",
            "--partition-rows", str(ROWS)]
    proc = subprocess.Popen([str(SCRIPT), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=cli_env())
    try:
        saved = wait_for(out, 1, proc)
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        for child in family:  # the local cluster's processes, which outlive their driver
            child.kill()
        psutil.wait_procs(family, timeout=DEADLINE)
        proc.wait(DEADLINE)
        proc.stderr.close()
    assert not saved["complete"] and saved["frontier"]
    gated.gate_file.touch()
    r = cli(*argv, "--resume", timeout=120)
    assert r.returncode == 0, r.stderr
    manifest = assert_exactly_once(out, want)
    assert manifest["files"][:len(saved["summary"]["files"])] == saved["summary"]["files"]
