"""A walk client that costs almost nothing: it follows the frontier without decoding listings.

It measures what an agent can serve, not what a client can digest: one thread, one
``selectors`` loop over ``connections`` keep-alive HTTP connections (raw sockets), each
carrying one ``POST /_agent/v1/walk`` at a time (``frontier_frames=True``, ``max_entries``
per answer; names walks also ``names_frames=True`` where the protocol has it). Of the
answer's length-prefixed msgpack frames it decodes only ``frontier`` and ``end`` (the
paths to ask for next). ``entries`` frames are counted from their array header, ``names``
frames from the length of their ``kinds`` string, and ``dir`` frames kept as raw bytes
(one per directory listed; decoded after the walk, for the exactness check). Any other
frame (``error``, ``skip``), or a non-200 answer, fails the walk.

Frame tags are read from the first bytes of a body: every frame is a msgpack array
(``0x9N``) whose first element is a fixstr naming it (``0xa3 dir``, ``0xa7 entries``...).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import selectors
import socket
import struct
from typing import Optional

import msgspec

from diskover_agent.protocol import MSGPACK_TYPE, WalkRequest, encode_walk_request
from walks import Mismatch

WALK_TARGET = "/_agent/v1/walk?format=msgpack"
#: Paths per request at most (as the library's ``walk.MAX_BATCH``).
MAX_BATCH = 64
_LEN = struct.Struct(">I").unpack_from
_decode = msgspec.msgpack.decode


class WalkFailed(RuntimeError):
    """The agent answered something a complete walk does not contain."""


class _Conn:
    __slots__ = ("body", "busy", "chunked", "ended", "headers_done", "left", "raw", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()  # bytes received, not yet de-chunked
        self.body = bytearray()  # de-chunked body bytes, not yet parsed into frames
        self.chunked = False
        self.left = 0  # bytes left in the current chunk, or of the body (Content-Length)
        self.headers_done = False
        self.busy = False
        self.ended = False  # the answer's end frame arrived


class FrontierWalk:
    """One walk of ``top`` through the agent at ``host:port`` (see the module's docstring)."""

    def __init__(self, host: str, port: int, top: bytes, *, connections: int = 8, max_entries: int = 4096,
                 stat: bool = False, keep_open: bool = False) -> None:
        """``keep_open``: the connections stay open after :meth:`run` (their local ports in
        ``local_ports``, e.g. to see which agent process holds each) until :meth:`close`."""
        self.host, self.port, self.top = host, port, top
        self.keep_open = keep_open
        self._socks: list[socket.socket] = []
        self.connections = connections
        self.max_entries = max_entries
        self.stat = stat
        self.todo: collections.deque[bytes] = collections.deque()
        self.dir_frames: list[bytes] = []
        self.entries = 0
        self.requests = 0
        self.local_ports: list[int] = []
        #: Names walks ask for ``names`` frames where the protocol has them (the agent's cheapest answer).
        self.names_frames = not stat and "names_frames" in {f.name for f in dataclasses.fields(WalkRequest)}
        self._names = {"names_frames": True} if self.names_frames else {}

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> FrontierWalk:
        sel = selectors.DefaultSelector()
        conns: list[_Conn] = []
        done = False
        try:
            for _ in range(self.connections):
                sock = socket.create_connection((self.host, self.port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conn = _Conn(sock)
                conns.append(conn)
                self.local_ports.append(sock.getsockname()[1])
                sel.register(sock, selectors.EVENT_READ, conn)
            self.todo.append(self.top)
            idle = list(conns)
            busy = 0
            while True:
                while idle and self.todo:
                    self._send(idle.pop())
                    busy += 1
                if not busy:
                    break
                events = sel.select(60)
                if not events:
                    raise WalkFailed("no answer for 60 s")
                for key, _ in events:
                    conn = key.data
                    data = conn.sock.recv(1 << 18)
                    if not data:
                        raise WalkFailed("the agent closed a connection in the middle of an answer")
                    if self._feed(conn, data):
                        conn.busy = False
                        busy -= 1
                        idle.append(conn)
            done = True
        finally:
            sel.close()
            self._socks = [conn.sock for conn in conns]
            if not (done and self.keep_open):
                self.close()
        return self

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    def _send(self, conn: _Conn) -> None:
        todo = self.todo
        n = max(1, min(MAX_BATCH, len(todo) // self.connections))
        paths = [todo.popleft() for _ in range(min(n, len(todo)))]
        body = encode_walk_request(WalkRequest(paths=paths, stat=self.stat, max_entries=self.max_entries,
                                               frontier_frames=True, **self._names))
        head = (f"POST {WALK_TARGET} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: {MSGPACK_TYPE}\r\n"
                f"Accept-Encoding: identity\r\nContent-Type: {MSGPACK_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        conn.sock.setblocking(True)  # a request is small: send it whole
        conn.sock.sendall(head + body)
        conn.sock.setblocking(False)
        conn.busy, conn.headers_done, conn.ended = True, False, False
        self.requests += 1

    # -- one answer --------------------------------------------------------------------------

    def _feed(self, conn: _Conn, data: bytes) -> bool:
        """Take received bytes; True once the answer is complete."""
        raw = conn.raw
        raw += data
        if not conn.headers_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._headers(conn, bytes(raw[:end]).decode("latin-1"))
            del raw[: end + 4]
        if conn.chunked:
            done = self._dechunk(conn)
        else:
            take = min(conn.left, len(raw))
            conn.body += raw[:take]
            del raw[:take]
            conn.left -= take
            done = conn.left == 0
        self._frames(conn)
        if done:
            if conn.body or raw:
                raise WalkFailed("bytes after the end of an answer")
            if not conn.ended:
                raise WalkFailed("walk answer ended before its end frame")
        return done

    @staticmethod
    def _headers(conn: _Conn, text: str) -> None:
        lines = text.split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "200":
            raise WalkFailed(f"walk request answered {lines[0]!r}")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get("content-encoding", "identity") != "identity":
            raise WalkFailed(f"unexpected Content-Encoding {fields['content-encoding']!r}")
        if fields.get("connection") == "close":
            raise WalkFailed("the agent closes the connection after an answer (no keep-alive)")
        conn.chunked = "chunked" in fields.get("transfer-encoding", "")
        conn.left = 0 if conn.chunked else int(fields.get("content-length", "0"))
        conn.headers_done = True

    @staticmethod
    def _dechunk(conn: _Conn) -> bool:
        """Move whole chunk data from ``raw`` to ``body``; True at the last chunk."""
        raw, body = conn.raw, conn.body
        pos = 0
        try:
            while True:
                if conn.left:
                    take = min(conn.left, len(raw) - pos)
                    if take <= 0:
                        return False
                    body += raw[pos : pos + take]
                    pos += take
                    conn.left -= take
                    if conn.left:
                        return False
                    continue
                # at a chunk header, possibly after the CRLF ending the previous chunk's data
                line_end = raw.find(b"\r\n", pos)
                if line_end < 0:
                    return False
                if line_end == pos:  # the CRLF after a chunk's data
                    pos += 2
                    continue
                size = int(bytes(raw[pos:line_end]).split(b";", 1)[0], 16)
                if size == 0:  # last chunk, then an empty trailer line
                    if len(raw) < line_end + 4:
                        return False
                    pos = line_end + 4
                    return True
                pos = line_end + 2
                conn.left = size
        finally:
            del raw[:pos]

    def _frames(self, conn: _Conn) -> None:
        body = conn.body
        pos, n = 0, len(body)
        while n - pos >= 4:
            (size,) = _LEN(body, pos)
            if n - pos - 4 < size:
                break
            start = pos + 4
            head = bytes(body[start + 1 : start + 10])
            if head.startswith(b"\xa7entries"):
                count = body[start + 9]
                if count == 0xDC:
                    count = int.from_bytes(body[start + 10 : start + 12], "big")
                elif count == 0xDD:
                    count = int.from_bytes(body[start + 10 : start + 14], "big")
                else:
                    count &= 0x0F
                self.entries += count
            elif head.startswith(b"\xa5names"):
                self.entries += _names_count(body, start + 7)
            elif head.startswith(b"\xa3dir"):
                self.dir_frames.append(bytes(body[start : start + size]))
            elif head.startswith(b"\xa8frontier"):
                self.todo.extend(_decode(body[start : start + size])[1])
            elif head.startswith(b"\xa3end"):
                self.todo.extend(_decode(body[start : start + size])[1])
                conn.ended = True
            else:
                frame = _decode(body[start : start + size])
                raise WalkFailed(f"unexpected frame in a walk of the benchmark tree: {frame!r:.200}")
            pos = start + size
        del body[:pos]

    # -- after the walk --------------------------------------------------------------------

    def dirs(self) -> list[bytes]:
        """The paths of the directories listed, one per ``dir`` frame (decoded now)."""
        return [_decode(f)[1] for f in self.dir_frames]


_BIN_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR_LEN = {0xD9: 1, 0xDA: 2, 0xDB: 4}


def _names_count(body: bytearray, pos: int) -> int:
    """Entries of a ``names`` frame whose ``names`` field (msgpack bin) starts at ``pos``:
    the length of the ``kinds`` string after it, one letter per entry."""
    width = _BIN_LEN[body[pos]]
    pos += 1 + width + int.from_bytes(body[pos + 1 : pos + 1 + width], "big")
    head = body[pos]
    if 0xA0 <= head <= 0xBF:
        return head & 0x1F
    width = _STR_LEN[head]
    return int.from_bytes(body[pos + 1 : pos + 1 + width], "big")


def connections_per_process(agent_pids: list[int], agent_port: int, client_ports: list[int]) -> dict[int, int]:
    """How many of the client's connections (by local port) each agent process holds."""

    wanted = set(client_ports)
    inodes: dict[str, int] = {}  # socket inode -> client port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, inode = parts[1], parts[2], parts[9]
                    if int(local.rsplit(":", 1)[1], 16) == agent_port and int(remote.rsplit(":", 1)[1], 16) in wanted:
                        inodes[f"socket:[{inode}]"] = int(remote.rsplit(":", 1)[1], 16)
        except OSError:
            continue
    out: dict[int, int] = {}
    for pid in agent_pids:
        owned: set[int] = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inodes:
                owned.add(inodes[link])
        out[pid] = len(owned)
    return out


def check_dirs(walk: FrontierWalk, want: set[bytes], want_entries: Optional[int] = None) -> int:
    """Raise :class:`walks.Mismatch` unless the walk listed every directory of ``want`` exactly once (and, given
    ``want_entries``, sent that many entries); returns the entry count."""
    dirs = walk.dirs()
    got = set(dirs)
    if len(dirs) != len(got):
        raise Mismatch(f"{len(dirs) - len(got)} directories listed more than once")
    if got != want:
        raise Mismatch(f"{len(got)} directories listed, {len(want)} in the tree; "
                       f"{len(want - got)} missing, {len(got - want)} unexpected")
    if want_entries is not None and walk.entries != want_entries:
        raise Mismatch(f"{walk.entries} entries sent, {want_entries} in the tree")
    return walk.entries
