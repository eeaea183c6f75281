"""The wire protocol shared by the agent and the client (version 1): what both sides encode.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union
from urllib.parse import quote_from_bytes, unquote_to_bytes

from .codec import json_encode as _json_encode
from .codec import msgpack_encode as _msgpack_encode

VERSION = 1
PROTOCOL_HEADER = "X-Diskover-Agent-Protocol"
#: The agent's port, where nothing else is said.
DEFAULT_PORT = 9999
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


class ProtocolError(ValueError):
    """An answer that does not follow the wire protocol."""


#: The letters of ``kinds`` in a ``names`` frame, and of its ``targets`` (``-``: dangling).
KIND_LETTERS = "dflpscb?"
TARGET_LETTERS = KIND_LETTERS + "-"


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

@dataclass
class ErrorBody:
    """The JSON body of every error answer."""

    error: str
    message: str
    errno: Optional[int] = None
    path: Optional[str] = None


def errno_name(num: Optional[int]) -> str:
    """The symbolic name of an errno (``ENOENT``), ``EIO`` when unknown."""
    return errno.errorcode.get(num or 0, "EIO")


def encode_error(body: ErrorBody) -> bytes:
    """The JSON of an error body (fields that are None left out)."""
    out: dict[str, Any] = {"error": body.error, "message": body.message}
    if body.errno is not None:
        out["errno"] = body.errno
    if body.path is not None:
        out["path"] = body.path
    return _json_encode(out)


# -- the subtree walk request ---------------------------------------------------------

@dataclass
class WalkRequest:
    """The body of ``POST /_agent/v1/walk``: walk below ``paths`` within a budget,
    leaving out what the exclusions prune (see the agent's ``filters`` module).

    ``frontier_frames``: the client reads ``frontier`` frames, so the agent sends the
    frontier as it finds it, in bounded frames. ``nofollow``: the paths were found by
    the walk; the last component of each is opened without following a symlink, and
    one that is a symlink now is answered with a ``skip`` frame (``os.walk`` does not
    descend into a symlink it finds at descent time). ``names_frames``: without stat,
    entries come in ``names`` frames. All three default to off, as older clients send
    them (and older agents refuse a field they do not know: a 400).

    On the wire: a MessagePack map of the fields in this order, those at their default
    left out (paths are ``bin``); or a JSON object, paths as text or ``{"b64": ...}``.
    """

    paths: list[bytes]
    stat: bool = False
    max_entries: int = 10_000
    max_seconds: float = 1.0
    exclude_dirs: list[bytes] = field(default_factory=list)
    exclude_files: list[bytes] = field(default_factory=list)
    one_fs: bool = False
    frontier_frames: bool = False
    nofollow: bool = False
    names_frames: bool = False


_WALK_FIELDS = tuple(fields(WalkRequest))
_WALK_DEFAULTS = {f.name: f.default for f in _WALK_FIELDS if f.name != "paths"}
_WALK_DEFAULTS.update(exclude_dirs=[], exclude_files=[])
#: What each field takes: ``bool``, ``int``, ``float`` or ``paths`` (a list of paths).
_WALK_TYPES = {"paths": "paths", "exclude_dirs": "paths", "exclude_files": "paths", "max_entries": "int",
               "max_seconds": "float", **{f.name: "bool" for f in _WALK_FIELDS if f.type in ("bool", bool)}}


def encode_walk_request(req: WalkRequest) -> bytes:
    """The MessagePack body of a walk request (fields at their default left out)."""
    out: dict[str, Any] = {"paths": list(req.paths)}
    for name, default in _WALK_DEFAULTS.items():
        value = getattr(req, name)
        if isinstance(value, (list, tuple)):
            if value:
                out[name] = list(value)
        elif value != default:
            out[name] = value
    return _msgpack_encode(out)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes", list: "array",
            dict: "object"}.get(type(value), "ext")


def _expected(want: str, value: Any, where: str) -> ValueError:
    return ValueError(f"Expected `{want}`, got `{_type_name(value)}` - at `{where}`")


def _json_path(item: Any, where: str) -> bytes:
    if isinstance(item, str):
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"Invalid Unicode (a lone surrogate) - at `{where}`") from None
    if type(item) is not dict:
        raise _expected("str | object", item, where)
    for key in item:
        if key != "b64":
            raise ValueError(f"Object contains unknown field `{key}` - at `{where}`")
    if "b64" not in item:
        raise ValueError(f"Object missing required field `b64` - at `{where}`")
    text = item["b64"]
    if not isinstance(text, str):
        raise _expected("str", text, f"{where}.b64")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"Invalid base64 encoded string - at `{where}.b64`") from None


def walk_request_of(obj: Any, json: bool) -> WalkRequest:
    """The walk request in a decoded body (plain values from :mod:`.codec`), checked as
    the protocol types it: no unknown or missing field, each of its type (``bool`` is
    not an ``int``; an ``int`` is a ``float``); paths as ``bin`` in MessagePack, as text
    or ``{"b64": ...}`` in JSON. Raises ``ValueError`` saying what and where. Ranges are
    the agent's business (its ``subtree.validate``). One implementation whatever the codec."""
    if type(obj) is not dict:
        raise _expected("object", obj, "$")
    for key in obj:
        if not isinstance(key, str):
            raise ValueError(f"Expected `str`, got `{_type_name(key)}` - at `key` in `$`")
        if key not in _WALK_TYPES:
            raise ValueError(f"Object contains unknown field `{key}`")
    if "paths" not in obj:
        raise ValueError("Object missing required field `paths`")
    values: dict[str, Any] = {}
    for key, value in obj.items():
        want, where = _WALK_TYPES[key], f"$.{key}"
        if want == "bool":
            if type(value) is not bool:
                raise _expected("bool", value, where)
        elif want == "int":
            if type(value) is not int:
                raise _expected("int", value, where)
        elif want == "float":
            if type(value) is int:
                try:
                    value = float(value)
                except OverflowError:
                    raise ValueError(f"Number out of range - at `{where}`") from None
            elif type(value) is not float:
                raise _expected("float", value, where)
        else:
            if type(value) is not list:
                raise _expected("array", value, where)
            items = []
            for i, item in enumerate(value):
                if json:
                    items.append(_json_path(item, f"{where}[{i}]"))
                elif type(item) is bytes:
                    items.append(item)
                else:
                    raise _expected("bytes", item, f"{where}[{i}]")
            value = items
        values[key] = value
    return WalkRequest(**values)
