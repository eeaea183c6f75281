"""The records of ``walk`` output (one per entry, the columns :data:`FIELDS`) and their
writer, as NDJSON or CSV."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Sequence
from typing import IO, Optional

import msgspec
import msgspec.structs

from ..protocol import KIND_NAMES, KIND_SYMLINK, Entry
from .common import _join

#: The ``type`` of an entry in walk output, by the wire's one-letter kind.
TYPES = KIND_NAMES

#: The columns of ``walk`` output, in order (NDJSON keys, CSV header).
FIELDS = (
    "path", "path_b64", "name", "type", "target_type", "size", "allocated", "blocks", "mode", "uid", "gid",
    "inode", "nlink", "dev", "atime", "mtime", "ctime", "atime_ns", "mtime_ns", "ctime_ns",
)


class Record(msgspec.Struct, gc=False):
    """One entry of ``walk`` output; the field order is :data:`FIELDS`."""

    path: str
    path_b64: Optional[str]
    name: str
    type: str
    target_type: Optional[str]
    size: Optional[int]
    allocated: Optional[int]
    blocks: Optional[int]
    mode: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    inode: Optional[int]
    nlink: Optional[int]
    dev: Optional[int]
    atime: Optional[float]
    mtime: Optional[float]
    ctime: Optional[float]
    atime_ns: Optional[int]
    mtime_ns: Optional[int]
    ctime_ns: Optional[int]


assert Record.__struct_fields__ == FIELDS

_NO_STAT = (None,) * 15


def _texts(parent: bytes, entries: Sequence[Entry]) -> tuple[list[str], list[Optional[str]], list[str]]:
    """``(paths, path_b64s, names)`` of ``entries`` of directory ``parent`` as :data:`FIELDS`
    has them: UTF-8 text (U+FFFD for bytes that are not), and the exact path in base64 when
    it is not UTF-8. Names hold no ``/`` (the wire's rule), so one decode of them all, joined
    by ``/``, does for the directory; a directory with a name that is not UTF-8 (or a parent
    that is not) is decoded name by name."""
    try:
        prefix = (parent if parent.endswith(b"/") else parent + b"/").decode("utf-8")
        names = b"/".join([e.name for e in entries]).decode("utf-8").split("/")
        if len(names) == len(entries):
            return [prefix + n for n in names], [None] * len(names), names
    except UnicodeDecodeError:
        pass
    paths: list[str] = []
    b64s: list[Optional[str]] = []
    for e in entries:
        raw = _join(parent, e.name)
        try:
            paths.append(raw.decode("utf-8"))
            b64s.append(None)
        except UnicodeDecodeError:
            paths.append(raw.decode("utf-8", "replace"))
            b64s.append(base64.b64encode(raw).decode("ascii"))
    return paths, b64s, [e.name.decode("utf-8", "replace") for e in entries]


def records(parent: bytes, entries: Sequence[Entry]) -> list[Record]:
    """The walk records of ``entries``, in their order, of directory ``parent``. Times in
    seconds are ``os.stat_result``'s floats (whole seconds plus nanoseconds * 1e-9, the same
    rounding); an entry without its stat (vanished, or in a directory that cannot be
    searched) has every stat field null."""
    if not entries:
        return []
    types = TYPES
    out: list[Record] = []
    append = out.append
    for e, path, b64, name in zip(entries, *_texts(parent, entries), strict=True):
        kind = e.kind
        target = types.get(e.target) if kind == KIND_SYMLINK and e.target is not None else None
        st = e.stat
        if st is None:
            append(Record(path, b64, name, types.get(kind, "unknown"), target, *_NO_STAT))
            continue
        mode, ino, dev, nlink, uid, gid, size, a, m, c, blocks = st[:11]
        a_s = a // 1_000_000_000 + a % 1_000_000_000 * 1e-9
        m_s = a_s if m == a else m // 1_000_000_000 + m % 1_000_000_000 * 1e-9
        c_s = m_s if c == m else c // 1_000_000_000 + c % 1_000_000_000 * 1e-9
        append(Record(path, b64, name, types.get(kind, "unknown"), target, size, blocks * 512, blocks, mode, uid,
                      gid, ino, nlink, dev, a_s, m_s, c_s, a, m, c))
    return out


class RecordWriter:
    """Walk records to a binary stream, as NDJSON or CSV. It holds nothing back: what it
    was given is in the stream (the stream's own buffer aside), so a stream that fails
    leaves nothing here to flush again."""

    def __init__(self, out: IO[bytes], fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self._csv_text: Optional[io.StringIO] = None
        if fmt == "csv":
            self._csv_text = io.StringIO(newline="")
            self._csv = csv.writer(self._csv_text, lineterminator="\n")
            self._csv.writerow(FIELDS)
            self._write_csv()
        else:
            self._encode_lines = msgspec.json.Encoder().encode_lines

    def add_dir(self, path: bytes, entries: Sequence[Entry]) -> None:
        """Write the records of a directory's entries."""
        self.write(records(path, entries))

    def add_error(self, path: bytes, error: OSError) -> None:
        """A directory that could not be listed has no record (the walk names it on stderr)."""

    def write(self, rows: list[Record]) -> None:
        if not rows:
            return
        if self._csv_text is not None:
            self._csv.writerows(map(msgspec.structs.astuple, rows))
            self._write_csv()
        else:
            self.out.write(self._encode_lines(rows))

    def _write_csv(self) -> None:
        """The CSV rows written so far, as UTF-8, to the stream."""
        assert self._csv_text is not None
        text = self._csv_text.getvalue()
        self._csv_text.seek(0)
        self._csv_text.truncate()
        self.out.write(text.encode("utf-8"))

    def flush(self) -> None:
        self.out.flush()
