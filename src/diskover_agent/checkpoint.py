"""A dataset directory's checkpoint: what the walk is, which partitions it committed, and
the frontier of directories not yet listed.

The checkpoint (``CHECKPOINT``, JSON) is the commit record of a walk written as a dataset:
a partition counts only once the checkpoint names it. A partition is written under a
temporary name, fsynced and renamed; then the checkpoint, written the same way, names it
and holds the new frontier; then the directory is fsynced. So at every instant each
directory of the walk is in exactly one committed partition or in the saved frontier, and
``--resume`` discards whatever partition the checkpoint does not name (a crash between the
two renames, or during a write). The frontier, not the tree, bounds its size: committed
directories are not stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

#: The checkpoint's file name in the dataset directory.
CHECKPOINT = "_checkpoint.json"
VERSION = 1


@dataclass(frozen=True)
class WalkSpec:
    """What defines a walk's result (hosts and the connection's settings do not): a resume
    must match it."""

    top: str
    format: str
    stat: bool = True
    exclude_dirs: tuple[str, ...] = ()
    exclude_files: tuple[str, ...] = ()
    one_fs: bool = False
    max_depth: Optional[int] = None

    @classmethod
    def of(cls, top: str, fmt: str, *, stat: bool = True, exclude_dirs: Iterable[str] = (),
           exclude_files: Iterable[str] = (), one_fs: bool = False, max_depth: Optional[int] = None) -> WalkSpec:
        """The spec, with exclusions in a canonical order (their order changes nothing)."""
        return cls(top, fmt, stat, tuple(sorted(set(exclude_dirs))), tuple(sorted(set(exclude_files))), one_fs,
                   max_depth)

    def differences(self, other: WalkSpec) -> list[str]:
        """``"name: saved X, now Y"`` for each setting ``other`` (now) changes (the top apart)."""
        out = []
        for name in ("format", "stat", "exclude_dirs", "exclude_files", "one_fs", "max_depth"):
            saved, now = getattr(self, name), getattr(other, name)
            if saved != now:
                out.append(f"{name}: {_shown(saved)} then, {_shown(now)} now")
        return out


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]" if value else "none"
    return str(value)


@dataclass
class Checkpoint:
    """The state saved with each commit. ``summary`` holds the manifest's fields so far
    (partitions committed, counts, seconds); ``frontier`` the directories owed (remote
    paths, bytes)."""

    spec: WalkSpec
    summary: dict[str, Any]
    frontier: set[bytes] = field(default_factory=set)
    complete: bool = False

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "walk": asdict(self.spec), "complete": self.complete, "summary": self.summary,
               # paths as the file system's str (surrogate escapes, kept exact by JSON's \\u escapes)
               "frontier": [os.fsdecode(p) for p in self.frontier]}
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        doc = json.loads(data)
        if doc.get("version") != VERSION:
            raise ValueError(f"checkpoint version {doc.get('version')!r}, expected {VERSION}")
        w = doc["walk"]
        spec = WalkSpec(w["top"], w["format"], w["stat"], tuple(w["exclude_dirs"]), tuple(w["exclude_files"]),
                        w["one_fs"], w["max_depth"])
        return cls(spec, doc["summary"], {os.fsencode(p) for p in doc["frontier"]}, doc["complete"])


def load(directory: str) -> Optional[Checkpoint]:
    """The checkpoint of the dataset in ``directory``; None when there is none.
    ``ValueError`` when it cannot be read as one."""
    try:
        with open(os.path.join(directory, CHECKPOINT), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{os.path.join(directory, CHECKPOINT)} is not a valid checkpoint: {exc}") from None


def write_durably(directory: str, name: str, data: bytes) -> None:
    """Write ``data`` as ``directory/name`` atomically: a temporary file, fsync, rename."""
    tmp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, name))


def fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str, checkpoint: Checkpoint) -> None:
    """Commit ``checkpoint`` (after the partitions it names are renamed): write it
    durably, then fsync the directory."""
    write_durably(directory, CHECKPOINT, checkpoint.to_json())
    fsync_dir(directory)
