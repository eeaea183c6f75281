"""The command line as users run it: ``diskover-agent walk PATH -o ...``, whole process timed.

Each walk is a child process (``python -c 'from diskover_agent.cli import main ...'``, what
the ``diskover-agent`` script runs, so a ``PYTHONPATH`` snapshot applies to it too) with its
default settings; its wall time is taken around the process, its CPU from ``os.wait4``
(user + system of the process and of the children it reaped: a ``--dask local:N``
cluster's worker processes). The output is read back and checked against ``lstat`` of
every entry (path bytes and every field but atime; every record must carry the stat fields).

Rows: NDJSON to a file; the Parquet dataset with ``--dask local:2`` (and without ``--dask``
when the command line accepts ``--format parquet -o DIR`` on its own).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Optional

import msgspec

from walks import Mismatch, Reference, path_stat_digest, stat_key

if TYPE_CHECKING:
    from run import Bench

CLI = [sys.executable, "-c", "import sys; from diskover_agent.cli import main; sys.exit(main())"]


class _Record(msgspec.Struct):
    """The fields of an NDJSON record the check reads (the stat fields are required: never null)."""

    path: str
    path_b64: Optional[str]
    mode: int
    inode: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def run_cli(args: list[str], stderr_path: str) -> dict:
    """Run the command line with ``args``; its exit status and CPU seconds (``wait4``)."""
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(stderr_path, "rb") as f:
        stderr = f.read()[-2000:].decode("utf-8", "replace")
    return {"status": proc.returncode, "cpu": usage.ru_utime + usage.ru_stime, "stderr": stderr}


class CliRows:
    """Times and checks the command-line rows through one agent (no proxy)."""

    group = "command line, 1 agent, no proxy (whole process)"

    def __init__(self, bench: Bench, ref: Reference, hostspec: str, remote_top: str, scratch: str) -> None:
        self.b, self.ref, self.remote_top = bench, ref, remote_top
        self.hosts = ["--hosts", hostspec, "-q"]
        self.scratch = tempfile.mkdtemp(prefix="cli-rows-", dir=scratch)
        self.stderr = os.path.join(self.scratch, "stderr")

    def rows(self) -> None:
        try:
            self.ndjson()
            self.parquet(["--dask", "local:2", "--format", "parquet"])
            if self.parquet_without_dask():
                self.parquet(["--format", "parquet"])
            else:
                self.b.rows.append({"group": self.group, "name": "Parquet dataset (no --dask)", "stat": True,
                                    "note": "n/a (walk --format parquet needs --dask here)", "runs": []})
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _walk(self, extra: list[str], out: str) -> dict:
        r = run_cli([*self.hosts, "walk", self.remote_top, *extra, "-o", out], self.stderr)
        r["out"] = out
        return r

    @staticmethod
    def _remove(path: str) -> None:
        """The output of a walk, once checked (outside the timed part)."""
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)

    def _status(self, r: dict) -> None:
        if r["status"] != 0:
            raise Mismatch(f"exit status {r['status']}: {r['stderr'].strip()[-500:]}")

    def _compare(self, what: str, pairs: list[tuple[bytes, bytes]]) -> int:
        got = path_stat_digest(pairs)
        if got != self.ref.stats:
            raise Mismatch(f"{what}: {got[0]} entries, path+stat digest {got[1][:16]}; lstat: "
                           f"{self.ref.stats[0]}, {self.ref.stats[1][:16]}")
        return got[0]

    # -- NDJSON ------------------------------------------------------------------------------

    def ndjson(self) -> None:
        out = os.path.join(self.scratch, "walk.ndjson")
        self.b.measure(self.group, "walk -o FILE (NDJSON)", lambda: self._walk([], out), self.check_ndjson,
                       stat=True, client_cpu_of=lambda r: r["cpu"], kind="cli", fmt="ndjson")

    def check_ndjson(self, r: dict) -> int:
        try:
            self._status(r)
            with open(r["out"], "rb") as f:
                data = f.read()
        finally:
            self._remove(r["out"])
        key = stat_key
        try:
            records = msgspec.json.Decoder(_Record).decode_lines(data)
        except msgspec.DecodeError as exc:
            raise Mismatch(f"walk -o FILE: a record without every stat field: {exc}") from None
        pairs = [(base64.b64decode(x.path_b64) if x.path_b64 is not None else x.path.encode("utf-8"),
                  key(x.mode, x.inode, x.dev, x.nlink, x.uid, x.gid, x.size, x.mtime_ns, x.ctime_ns))
                 for x in records]
        return self._compare("walk -o FILE", pairs)

    # -- Parquet -----------------------------------------------------------------------------

    def parquet_without_dask(self) -> bool:
        """Whether ``walk --format parquet -o DIR`` runs without ``--dask`` (tried on an empty directory)."""
        r = run_cli([*self.hosts, "walk", self.ref.tiny_dir, "--format", "parquet", "-o",
                     os.path.join(self.scratch, "probe")], self.stderr)
        return r["status"] == 0

    def parquet(self, extra: list[str]) -> None:
        out = os.path.join(self.scratch, "dataset")
        self.b.measure(self.group, f"walk {' '.join(extra)} -o DIR", lambda: self._walk(extra, out),
                       self.check_parquet, stat=True, client_cpu_of=lambda r: r["cpu"], kind="cli", fmt="parquet",
                       dask="--dask" in extra)

    def check_parquet(self, r: dict) -> int:
        import pyarrow.dataset as ds

        cols = ["parent", "parent_raw", "name", "name_raw", "type", "mode", "ino", "dev", "nlink", "uid", "gid", "size",
                "mtime_ns", "ctime_ns", "atime_ns", "blocks"]
        try:
            self._status(r)
            table = ds.dataset(r["out"], format="parquet").to_table(columns=cols).to_pydict()
        finally:
            self._remove(r["out"])
        if "error" in table["type"]:
            raise Mismatch("Parquet dataset: rows of type 'error'")
        stat_cols = ("mode", "ino", "dev", "nlink", "uid", "gid", "size", "mtime_ns", "ctime_ns", "atime_ns", "blocks")
        if any(v is None for c in stat_cols for v in table[c]):
            raise Mismatch("Parquet dataset: a row without every stat field")
        key = stat_key
        pairs = []
        for parent, parent_raw, name, name_raw, mode, ino, dev, nlink, uid, gid, size, mtime, ctime in zip(
                table["parent"], table["parent_raw"], table["name"], table["name_raw"], table["mode"], table["ino"],
                table["dev"], table["nlink"], table["uid"], table["gid"], table["size"], table["mtime_ns"],
                table["ctime_ns"], strict=True):
            p = parent_raw if parent_raw is not None else parent.encode("utf-8")
            n = name_raw if name_raw is not None else name.encode("utf-8")
            pairs.append((p + n if p.endswith(b"/") else p + b"/" + n,
                          key(mode, ino, dev, nlink, uid, gid, size, mtime, ctime)))
        return self._compare("Parquet dataset", pairs)

