"""The client's side of the wire protocol: typed, validating decoding of answers (msgspec).

The protocol itself (frames, kinds, the walk request, error bodies, encoding) is
:mod:`diskover_wire.protocol`, shared with the agent; its names are re-exported here.
The client decodes with msgspec, in C: its CPU per entry matters.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, Optional, Union

import msgspec

from diskover_wire.protocol import (
    ERROR_TYPE,
    FORMATS,
    FRONTIER_FRAME_BYTES,
    KIND_BLOCK,
    KIND_CHAR,
    KIND_DIR,
    KIND_FIFO,
    KIND_FILE,
    KIND_LETTERS,
    KIND_NAMES,
    KIND_SOCKET,
    KIND_SYMLINK,
    KIND_UNKNOWN,
    MAX_FRAME,
    MAX_PATH,
    MSGPACK_TYPE,
    NDJSON_TYPE,
    PROTOCOL_HEADER,
    STAT_FIELDS,
    TARGET_LETTERS,
    TEXT_TYPE,
    VERSION,
    ErrorBody,
    Exclusions,
    ProtocolError,
    WalkRequest,
    encode_entry_item,
    encode_error,
    encode_frame,
    encode_path_item,
    encode_walk_request,
    end_frame_pieces,
    entries_frame,
    errno_name,
    kind_of_mode,
    quote_path,
    read_frames_raw,
    stat_fields,
    unquote_path,
)

__all__ = [
    "ERROR_TYPE", "FORMATS", "FRONTIER_FRAME_BYTES", "FS_ENCODING", "FS_ERRORS", "KIND_BLOCK", "KIND_CHAR",
    "KIND_DIR", "KIND_FIFO", "KIND_FILE", "KIND_LETTERS", "KIND_NAMES", "KIND_SOCKET", "KIND_SYMLINK",
    "KIND_UNKNOWN", "MAX_FRAME", "MAX_PATH", "MSGPACK_TYPE", "NDJSON_TYPE", "PROTOCOL_HEADER", "STAT_FIELDS",
    "TARGET_LETTERS", "TEXT_TYPE", "VERSION", "DirFrame", "EndFrame", "EntriesFrame", "Entry", "ErrorBody",
    "ErrorFrame", "Exclusions", "Frame", "FrontierFrame", "NamesFrame", "ProtocolError", "SkipFrame",
    "StatFields", "WalkRequest", "check_names", "decode_error", "decode_names", "encode_entry_item",
    "encode_error", "encode_frame", "encode_path_item", "encode_walk_request", "end_frame_pieces",
    "entries_frame", "errno_name", "kind_of_mode", "quote_path", "read_frame_blocks", "read_frames",
    "read_frames_raw", "stat_fields", "unquote_path",
]

# What the client accepts in a stat record: each field within its C type on Linux, sizes and
# counts never negative. Times are signed (a file may date from before 1970). msgspec checks
# these while it decodes, in C, so a record out of range is a malformed frame.
_U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
_U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack holds no integer above 2**64 - 1
_NONNEG_I64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_I64 = int  # msgpack holds no integer below -2**63
#: ``STAT_FIELDS`` as they travel: mode, uid, gid are 32-bit; ino, dev, nlink, rdev 64-bit
#: unsigned; size, blocks, blksize non-negative 64-bit; the three times signed nanoseconds.
StatFields = tuple[_U32, _U64, _U64, _U64, _U32, _U32, _NONNEG_I64, _I64, _I64, _I64, _NONNEG_I64, _NONNEG_I64, _U64]
Kind = Literal["d", "f", "l", "p", "s", "c", "b", "?"]


class Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One directory entry as it travels."""

    name: bytes
    kind: Kind
    target: Optional[Kind]
    stat: Optional[StatFields]
    target_stat: Optional[StatFields]


class DirFrame(msgspec.Struct, tag="dir", array_like=True):
    path: bytes
    stat: Optional[StatFields] = None


class EntriesFrame(msgspec.Struct, tag="entries", array_like=True):
    entries: list[Entry]


class NamesFrame(msgspec.Struct, tag="names", array_like=True):
    """Entries without stat, in bulk (see the module docstring)."""

    names: bytes
    kinds: str
    targets: str


class ErrorFrame(msgspec.Struct, tag="error", array_like=True):
    errno: int
    code: str
    message: str


class EndFrame(msgspec.Struct, tag="end", array_like=True):
    frontier: list[bytes]


class FrontierFrame(msgspec.Struct, tag="frontier", array_like=True):
    paths: list[bytes]


class SkipFrame(msgspec.Struct, tag="skip", array_like=True):
    path: bytes


Frame = Union[DirFrame, EntriesFrame, NamesFrame, ErrorFrame, EndFrame, FrontierFrame, SkipFrame]
_frame_decoder = msgspec.msgpack.Decoder(Frame)


_NOT_NAMES = frozenset((b"", b".", b".."))


def check_names(entries: Sequence[Entry], seen: set[bytes]) -> Optional[str]:
    """Why the names of a directory's next ``entries`` are not valid, or None.

    A name is one path component: not empty, not ``.`` or ``..``, without ``/`` or NUL,
    and it appears once in its directory: ``seen`` holds the names of the directory's
    earlier entries, and is updated. The common case costs a few C loops per frame.
    """
    if not entries:
        return None
    names = [e.name for e in entries]
    new = set(names)
    joined = b"/".join(names)
    if (len(new) == len(names) and new.isdisjoint(_NOT_NAMES) and seen.isdisjoint(new)
            and b"\0" not in joined and joined.count(b"/") == len(names) - 1):
        seen |= new
        return None
    for name in names:
        if name in _NOT_NAMES or b"/" in name or b"\0" in name:
            return f"invalid entry name {name!r}"
        if name in seen:
            return f"entry name {name!r} appears twice in one directory"
        seen.add(name)
    return None  # not reached: the quick test fails only on one of the cases above


_unpack_len_from = struct.Struct(">I").unpack_from
FS_ENCODING = sys.getfilesystemencoding()
FS_ERRORS = sys.getfilesystemencodeerrors()
_NOT_TEXT_NAMES = frozenset(("", ".", ".."))


def decode_names(frame: NamesFrame, text: bool, seen: Optional[set[Any]]) -> tuple[list[Any], set[Any]]:
    """The names of a ``names`` frame in agent order (``str`` decoded as ``os.fsdecode``
    does when ``text``, else ``bytes``), and the set of the directory's names so far.

    Raises :class:`ProtocolError` unless the frame keeps the promises of
    :func:`check_names` (no ``/``, NUL, empty name, ``.``, ``..``, nor a name twice in
    the directory: ``seen`` holds the names of its earlier frames, updated) and has one
    kind letter per name and one target letter per symlink. A few C-level calls per frame.
    """
    blob, kinds, targets = frame.names, frame.kinds, frame.targets
    if not kinds:
        if blob or targets:
            raise ProtocolError("a names frame with names but no kinds")
        return [], set() if seen is None else seen
    if b"/" in blob:
        bad = next(n for n in blob.split(b"\0") if b"/" in n)
        raise ProtocolError(f"invalid entry name {bad!r}")
    names: list[Any] = blob.decode(FS_ENCODING, FS_ERRORS).split("\0") if text else blob.split(b"\0")
    if len(names) != len(kinds):
        raise ProtocolError(f"a names frame with {len(names)} names and {len(kinds)} kinds")
    if kinds.strip(KIND_LETTERS):
        raise ProtocolError(f"a names frame with an invalid kind letter in {kinds.strip(KIND_LETTERS)[:8]!r}")
    if len(targets) != kinds.count(KIND_SYMLINK) or targets.strip(TARGET_LETTERS):
        raise ProtocolError("a names frame whose targets do not match its symlinks")
    new = set(names)
    if len(new) != len(names) or not new.isdisjoint(_NOT_TEXT_NAMES if text else _NOT_NAMES) or (
            seen is not None and not seen.isdisjoint(new)):
        earlier: set[Any] = set() if seen is None else seen
        for name in names:
            if name in _NOT_TEXT_NAMES or name in _NOT_NAMES:
                raise ProtocolError(f"invalid entry name {name!r}")
            if name in earlier:
                raise ProtocolError(f"entry name {name!r} appears twice in one directory")
            earlier.add(name)
    if seen is None:
        return names, new
    seen |= new
    return names, seen


def read_frames(read: Callable[[int], bytes]) -> Iterator[Frame]:
    """Decode msgpack frames from ``read(n)`` until end of stream."""
    for body in read_frames_raw(read):
        try:
            yield _frame_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed frame: {exc}") from None


def read_frame_blocks(read1: Callable[[int], bytes], block: int = 256 * 1024) -> Iterator[Optional[Frame]]:
    """Decode msgpack frames from ``read1(n)`` (which returns what is at hand, at most
    ``n`` bytes, ``b""`` at the end) until end of stream, reading big blocks and cutting
    them into frames without copies; ``None`` after the frames of each block (the next
    one waits for the network: a reader may hand over what it gathered)."""
    buf = bytearray()
    unpack_from = _unpack_len_from
    decode = _frame_decoder.decode
    while True:
        data = read1(block)
        if not data:
            if buf:
                raise ProtocolError("truncated frame" if len(buf) >= 4 else "truncated frame header")
            return
        buf += data
        end = len(buf)
        pos = 0
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (size,) = unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME} limit")
                stop = pos + 4 + size
                if stop > end:
                    break
                try:
                    frame = decode(view[pos + 4:stop])
                except msgspec.DecodeError as exc:
                    raise ProtocolError(f"malformed frame: {exc}") from None
                pos = stop
                yield frame
        finally:
            view.release()
        del buf[:pos]
        yield None


_error_decoder = msgspec.json.Decoder(ErrorBody)


def decode_error(data: bytes) -> Optional[ErrorBody]:
    """The error body of an answer, or None when it is not one of ours."""
    try:
        return _error_decoder.decode(data)
    except msgspec.DecodeError:
        return None
