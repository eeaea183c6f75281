"""The wire protocol shared by the agent and the client (version 1).

A structured answer is a stream of *frames*. On the ``msgpack`` format each frame is
a 4-byte big-endian length followed by one MessagePack array; on the ``ndjson`` format
each frame is one JSON array on its own line. The first element names the frame:

``["dir", path, stat]``
    A directory listing starts; ``path`` is its remote path, ``stat`` the directory's
    own stat record when stat was asked for (else ``null``).
``["entries", [[name, kind, target, stat, target_stat], ...]]``
    Entries of the current directory (several frames for a big directory).
``["names", names, kinds, targets]``
    The same for a walk without stat that asks for it (``names_frames``), in bulk:
    ``names`` is the entries' names joined by NUL bytes, ``kinds`` one ``KIND_*``
    letter per name, ``targets`` one letter per symlink among them (in order): the
    kind it points to, or ``-`` when it dangles or loops. Entries of one directory
    come in ``entries`` frames or in ``names`` frames, never both.
``["error", errno, code, message]``
    The current directory could not be listed (entries sent for it are void).
``["frontier", [path, ...]]``
    Directories found but not listed (subtree walks that ask for these frames, with
    ``frontier_frames``): sent as they are found, in frames of bounded size.
``["skip", path]``
    A requested path (with ``nofollow``) that is a symlink now: nothing is walked.
``["end", frontier]``
    The answer is complete; ``frontier`` lists directories found but not listed
    (that were not already sent in ``frontier`` frames).

Names and paths are the exact bytes (msgpack ``bin``); in JSON they are text when
they are valid UTF-8, else ``{"b64": "<base64 of the bytes>"}``. ``kind`` and
``target`` are one-letter types (see ``KIND_*``); ``target`` is the type a symlink
points to (``null`` when dangling or looping, and for every non-symlink). ``stat``
is ``null`` unless asked for, else the lstat fields in ``STAT_FIELDS`` order;
``target_stat`` is the same for a symlink's target (``null`` when not asked for,
for non-symlinks, and when the target cannot be stat'ed).
"""

from __future__ import annotations

import base64
import errno
import os
import stat as _stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import quote_from_bytes, unquote_to_bytes

import msgspec

VERSION = 1
PROTOCOL_HEADER = "X-Diskover-Agent-Protocol"
MSGPACK_TYPE = "application/vnd.diskover-agent.v1+msgpack"
NDJSON_TYPE = "application/x-ndjson"
TEXT_TYPE = "text/plain; charset=utf-8"
ERROR_TYPE = "application/json"
FORMATS = ("text", "msgpack", "ndjson")

#: Upper bound on one frame, so that a broken or hostile peer cannot make the
#: reader allocate without limit.
MAX_FRAME = 64 * 1024 * 1024
#: Longest remote path (bytes) a request may name. Deeper directories are reported
#: with ``ENAMETOOLONG``; anything shorter is served, whatever ``PATH_MAX`` says.
MAX_PATH = 64 * 1024
#: Bytes of paths gathered before a ``frontier`` frame goes out (a frame holds at most
#: this much plus one path).
FRONTIER_FRAME_BYTES = 64 * 1024

KIND_DIR = "d"
KIND_FILE = "f"
KIND_SYMLINK = "l"
KIND_FIFO = "p"
KIND_SOCKET = "s"
KIND_CHAR = "c"
KIND_BLOCK = "b"
KIND_UNKNOWN = "?"

#: The kinds by name, as the command line and the dataset write them.
KIND_NAMES = {
    KIND_DIR: "dir", KIND_FILE: "file", KIND_SYMLINK: "symlink", KIND_FIFO: "fifo", KIND_SOCKET: "socket",
    KIND_CHAR: "char", KIND_BLOCK: "block", KIND_UNKNOWN: "unknown",
}

STAT_FIELDS = (
    "st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
    "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks", "st_blksize", "st_rdev",
)

_FMT_KINDS = {
    _stat.S_IFDIR: KIND_DIR, _stat.S_IFREG: KIND_FILE, _stat.S_IFLNK: KIND_SYMLINK,
    _stat.S_IFIFO: KIND_FIFO, _stat.S_IFSOCK: KIND_SOCKET, _stat.S_IFCHR: KIND_CHAR,
    _stat.S_IFBLK: KIND_BLOCK,
}


def kind_of_mode(mode: int) -> str:
    """The one-letter kind of a ``st_mode``."""
    return _FMT_KINDS.get(_stat.S_IFMT(mode), KIND_UNKNOWN)


def stat_fields(st: Any) -> tuple[int, ...]:
    """The wire form of an ``os.stat_result``."""
    return (
        st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
        st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, st.st_blksize, st.st_rdev,
    )


# -- URL paths ---------------------------------------------------------------------

def quote_path(path: bytes) -> str:
    """Percent-encode a remote path (any bytes) for a request target."""
    return quote_from_bytes(path, safe="/")


def unquote_path(target: str) -> bytes:
    """The bytes of a percent-encoded request path."""
    return unquote_to_bytes(target)


# -- frames ------------------------------------------------------------------------

_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_encode = msgspec.json.Encoder().encode
_pack_len = struct.Struct(">I").pack
_unpack_len = struct.Struct(">I").unpack
_unpack_len_from = struct.Struct(">I").unpack_from


def _json_name(name: bytes) -> Union[str, dict]:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(name).decode("ascii")}


def encode_frame(frame: Sequence[Any], fmt: str) -> bytes:
    """Encode one frame (a tuple: tag, then its fields) for ``fmt``."""
    if fmt == "msgpack":
        body = _msgpack_encode(frame)
        return _pack_len(len(body)) + body
    tag = frame[0]
    if tag == "dir":
        frame = ("dir", _json_name(frame[1]), *frame[2:])
    elif tag == "entries":
        frame = ("entries", [(_json_name(e[0]), *e[1:]) for e in frame[1]])
    elif tag in ("end", "frontier"):
        frame = (tag, [_json_name(p) for p in frame[1]])
    elif tag in ("skip", "names"):
        frame = (tag, _json_name(frame[1]), *frame[2:])
    return _json_encode(frame) + b"\n"


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


class ProtocolError(ValueError):
    """An answer that does not follow the wire protocol."""


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


#: The letters of ``kinds`` in a ``names`` frame, and of its ``targets`` (``-``: dangling).
KIND_LETTERS = "dflpscb?"
TARGET_LETTERS = KIND_LETTERS + "-"
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


def read_frames_raw(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The bodies of length-prefixed frames from ``read(n)``, until end of stream."""
    while True:
        head = read(4)
        if not head:
            return
        if len(head) != 4:
            raise ProtocolError("truncated frame header")
        (size,) = _unpack_len(head)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME} limit")
        body = read(size)
        if len(body) != size:
            raise ProtocolError("truncated frame")
        yield body


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


# -- the subtree walk request ---------------------------------------------------------

class WalkRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The body of ``POST /_agent/v1/walk``: walk below ``paths`` within a budget,
    leaving out what the exclusions prune (see the agent's ``filters`` module).

    ``frontier_frames``: the client reads ``frontier`` frames, so the agent sends the
    frontier as it finds it, in bounded frames. ``nofollow``: the paths were found by
    the walk; the last component of each is opened without following a symlink, and
    one that is a symlink now is answered with a ``skip`` frame (``os.walk`` does not
    descend into a symlink it finds at descent time). ``names_frames``: without stat,
    entries come in ``names`` frames. All three default to off, as older clients send
    them (and older agents refuse a field they do not know: a 400).
    """

    paths: list[bytes]
    stat: bool = False
    max_entries: int = 10_000
    max_seconds: float = 1.0
    exclude_dirs: list[bytes] = []
    exclude_files: list[bytes] = []
    one_fs: bool = False
    frontier_frames: bool = False
    nofollow: bool = False
    names_frames: bool = False


class _B64(msgspec.Struct, forbid_unknown_fields=True):
    b64: bytes


class _JSONWalkRequest(msgspec.Struct, forbid_unknown_fields=True):
    paths: list[Union[str, _B64]]
    stat: bool = False
    max_entries: int = 10_000
    max_seconds: float = 1.0
    exclude_dirs: list[Union[str, _B64]] = []
    exclude_files: list[Union[str, _B64]] = []
    one_fs: bool = False
    frontier_frames: bool = False
    nofollow: bool = False
    names_frames: bool = False


def _json_bytes(items: list[Union[str, _B64]]) -> list[bytes]:
    return [p.encode("utf-8") if isinstance(p, str) else p.b64 for p in items]


def decode_json_walk_request(body: bytes) -> WalkRequest:
    """A walk request written in JSON: paths as text, or ``{"b64": ...}`` for other bytes."""
    req = msgspec.json.decode(body, type=_JSONWalkRequest)
    return WalkRequest(
        _json_bytes(req.paths), req.stat, req.max_entries, req.max_seconds,
        _json_bytes(req.exclude_dirs), _json_bytes(req.exclude_files), req.one_fs,
        req.frontier_frames, req.nofollow, req.names_frames,
    )


def encode_walk_request(req: WalkRequest) -> bytes:
    return _msgpack_encode(req)


def encode_path_item(path: bytes, fmt: str) -> bytes:
    """One path as an element of a frame's list (for frames written in pieces)."""
    return _msgpack_encode(path) if fmt == "msgpack" else _json_encode(_json_name(path))


def _msgpack_array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def end_frame_pieces(count: int, items_size: int, fmt: str) -> tuple[bytes, bytes, bytes]:
    """``(head, separator, tail)`` of an ``end`` frame whose ``count`` frontier paths,
    encoded by :func:`encode_path_item`, take ``items_size`` bytes: the frame is
    ``head``, the items joined by ``separator``, then ``tail``."""
    if fmt != "msgpack":
        return b'["end",[', b",", b"]]\n"
    body = b"\x92\xa3end" + _msgpack_array_header(count)
    return _pack_len(len(body) + items_size) + body, b"", b""


def encode_entry_item(entry: Sequence[Any]) -> bytes:
    """One wire entry in msgpack, as an element of an ``entries`` frame written in pieces."""
    return _msgpack_encode(entry)


def entries_frame(count: int, items: bytes) -> bytes:
    """The msgpack ``entries`` frame of ``count`` entries already encoded and concatenated
    (by :func:`encode_entry_item`, or the agent's compiled read loop): the same bytes as
    :func:`encode_frame` gives for them."""
    head = b"\x92\xa7entries" + _msgpack_array_header(count)
    return b"".join((_pack_len(len(head) + len(items)), head, items))


@dataclass(frozen=True)
class Exclusions:
    """What a walk prunes at the agent: directory and file patterns, other file systems.

    Patterns are ``fnmatch`` patterns on names, or on whole remote paths when they
    hold a ``/``. Given as text or bytes.
    """

    dirs: tuple[bytes, ...] = ()
    files: tuple[bytes, ...] = ()
    one_fs: bool = False

    @classmethod
    def of(cls, dirs: Iterable[Union[str, bytes]] = (), files: Iterable[Union[str, bytes]] = (),
           one_fs: bool = False) -> Exclusions:
        return cls(tuple(map(os.fsencode, dirs)), tuple(map(os.fsencode, files)), one_fs)

    def __bool__(self) -> bool:
        return bool(self.dirs or self.files or self.one_fs)

    def query(self) -> str:
        """The query-string form for a listing request (with a leading ``&``)."""
        parts = [f"&exclude_dir={quote_from_bytes(p, safe='')}" for p in self.dirs]
        parts += [f"&exclude_file={quote_from_bytes(p, safe='')}" for p in self.files]
        if self.one_fs:
            parts.append("&one_fs=1")
        return "".join(parts)


# -- error bodies ------------------------------------------------------------------

class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The JSON body of every error answer."""

    error: str
    message: str
    errno: Optional[int] = None
    path: Optional[str] = None


_error_decoder = msgspec.json.Decoder(ErrorBody)


def errno_name(num: Optional[int]) -> str:
    """The symbolic name of an errno (``ENOENT``), ``EIO`` when unknown."""
    return errno.errorcode.get(num or 0, "EIO")


def encode_error(body: ErrorBody) -> bytes:
    return _json_encode(body)


def decode_error(data: bytes) -> Optional[ErrorBody]:
    """The error body of an answer, or None when it is not one of ours."""
    try:
        return _error_decoder.decode(data)
    except msgspec.DecodeError:
        return None
