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
import csv
import glob
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import msgspec
import msgspec.structs

from walks import Mismatch, Reference, path_stat_digest, stat_key

if TYPE_CHECKING:
    from run import Bench

CLI = [sys.executable, "-c", "import sys; from diskover_agent.cli import main; sys.exit(main())"]


class _Record(msgspec.Struct):
    """The columns of an NDJSON record the check reads (the stat columns are required: never null;
    msgspec decodes the base64 of the ``*_raw`` columns)."""

    parent: str
    parent_raw: Optional[bytes]
    name: str
    name_raw: Optional[bytes]
    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int


#: The columns :func:`output_pairs` reads, in order: the exact path's, then :func:`stat_key`'s.
PAIR_COLUMNS = ("parent", "parent_raw", "name", "name_raw", "mode", "ino", "dev", "nlink", "uid", "gid", "size",
                "mtime_ns", "ctime_ns")


def _pairs(rows: Iterable[Sequence[Any]]) -> list[tuple[bytes, bytes]]:
    """``(exact path, stat_key)`` of rows of :data:`PAIR_COLUMNS` values."""
    key = stat_key
    out = []
    for parent, parent_raw, name, name_raw, *fields in rows:
        if any(v is None for v in fields):
            raise Mismatch(f"a record without every stat field: {parent!r} {name!r}")
        p = parent_raw if parent_raw is not None else parent.encode("utf-8")
        n = name_raw if name_raw is not None else name.encode("utf-8")
        out.append((p + b"/" + n, key(*fields)))
    return out


def _ndjson_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    try:
        records = msgspec.json.Decoder(_Record).decode_lines(data)
    except msgspec.DecodeError as exc:
        raise Mismatch(f"a record without every stat field, or an error record: {exc}") from None
    return _pairs(msgspec.structs.astuple(r) for r in records)


def _csv_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    lines = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    header = next(lines)
    at = [header.index(c) for c in PAIR_COLUMNS]
    rows = []
    for values in lines:
        p, p_raw, n, n_raw, *fields = (values[i] for i in at)
        rows.append((p, base64.b64decode(p_raw) if p_raw else None, n, base64.b64decode(n_raw) if n_raw else None,
                     *(int(v) if v else None for v in fields)))
    return _pairs(rows)


def output_pairs(out: str) -> list[tuple[bytes, bytes]]:
    """``(exact path, stat_key)`` of every record of a walk's output, in the columns of the
    README's "The walk's records": a dataset directory (Parquet or NDJSON partitions) or what
    ``walk -o FILE`` wrote (NDJSON, or CSV: it starts with its header). A record without
    every stat field (an error record too) is a :class:`Mismatch`."""
    if os.path.isdir(out):
        parquet = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
        if parquet:
            import pyarrow.dataset as ds

            table = ds.dataset(parquet, format="parquet").to_table(columns=list(PAIR_COLUMNS))
            return _pairs(zip(*(table.column(c).to_pylist() for c in PAIR_COLUMNS), strict=True))
        pairs = []
        for name in sorted(glob.glob(os.path.join(out, "part-*.ndjson"))):
            with open(name, "rb") as f:
                pairs += _ndjson_pairs(f.read())
        return pairs
    with open(out, "rb") as f:
        data = f.read()
    return _csv_pairs(data) if data.startswith(b"parent,") else _ndjson_pairs(data)


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
        return self._check("walk -o FILE", r)

    def _check(self, what: str, r: dict) -> int:
        """Compare what the walk wrote with ``lstat`` of every entry; the output is removed."""
        try:
            self._status(r)
            pairs = output_pairs(r["out"])
        finally:
            self._remove(r["out"])
        return self._compare(what, pairs)

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
        return self._check("Parquet dataset", r)
