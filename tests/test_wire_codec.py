"""The shared wire package's codec: msgspec, msgpack's C extension and msgpack's pure-Python
``fallback`` give the same MessagePack bytes, and JSON equal as values; the walk request is
checked by one implementation, as strictly as the msgspec-typed decoder the agent had before
(kept here as the reference), whatever codec decoded the body."""

from __future__ import annotations

import base64
import json
import os
from typing import Optional, Union

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskover_wire import codec
from diskover_wire.protocol import (
    STAT_FIELDS,
    ErrorBody,
    WalkRequest,
    encode_error,
    encode_walk_request,
    end_frame_pieces,
    entries_frame,
    walk_request_of,
)

#: Every codec this test environment has (the suite installs msgspec and msgpack).
CODECS = {
    "msgspec": codec._msgspec_codec(),
    "msgpack-compiled": codec._msgpack_codec(False),
    "msgpack-pure": codec._msgpack_codec(True),
}


def test_every_codec_is_here():
    """The test environment has all three; msgpack's own choice is its C extension."""
    assert all(CODECS.values()), CODECS
    assert [c[0] for c in CODECS.values()] == ["msgspec", "msgpack (compiled)", "msgpack (pure Python)"]


# Ints at each MessagePack size boundary, both signs.
BOUNDARY_INTS = sorted({
    sign * (edge + delta)
    for edge in (0, 2**4, 2**5, 2**7, 2**8, 2**15, 2**16, 2**31, 2**32, 2**63)
    for delta in (-1, 0, 1)
    for sign in (1, -1)
    if -(2**63) <= sign * (edge + delta) < 2**64
} | {2**64 - 1})
STAT = tuple(range(len(STAT_FIELDS)))
STAT_NEG = (0o40755, 2**64 - 1, 2**63, 1, 2**32 - 1, 0, 2**63 - 1, -1, -(2**63), -86_400 * 10**9, 0, 4096, 0)
NAMES = [b"a", b"\xff\xfe bad utf-8", "é".encode(), b"x" * 31, b"y" * 32, b"z" * 255, b"w" * 256, b"v" * 70_000]

FRAMES = [
    ("dir", b"/mnt/isilon", None),
    ("dir", b"/mnt/\xffisilon", STAT),
    ("dir", b"/mnt/isilon", STAT_NEG),
    ("entries", []),
    ("entries", [(n, "f", None, None, None) for n in NAMES]),
    ("entries", [(b"l", "l", "d", STAT, STAT_NEG), (b"l2", "l", None, STAT, None), (b"d", "d", None, STAT, None)]),
    ("entries", [(b"%d" % i, "f", None, STAT, None) for i in range(70_000)]),  # array32 header
    ("names", b"", "", ""),
    ("names", b"a\0b\0\xff", "flp", "-"),
    ("error", 13, "EACCES", "Permission denied"),
    ("error", 0, "EIO", "é" * 40),
    ("end", []),
    ("end", [b"/mnt/isilon/a", b"/mnt/\xff"] * 10),
    ("frontier", [b"/mnt/x" * 10] * 17),
    ("skip", b"/mnt/isilon/l"),
    ("ints", BOUNDARY_INTS),
    ("floats", [0.0, -0.0, 1.5, 1e308, -1e-308]),
    ("strs", ["", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65_535, "a" * 65_536]),
    ("maps", {"a": 1, "b": [True, False, None]}, {}),
    ("tuples-and-lists", (1, (2, [3, ()])), []),
    [["name", True], ["other", False]],  # a spilled run of the text listing
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: str(f[0])[:20])
def test_msgpack_bytes_are_the_same_with_every_codec(frame):
    encoded = {name: c[1](frame) for name, c in CODECS.items()}
    assert len(set(encoded.values())) == 1, {k: v[:64] for k, v in encoded.items()}
    for name, c in CODECS.items():  # and each decodes what the others encoded
        assert _plain(c[2](encoded["msgspec"])) == _plain(frame), name


def _plain(value):
    """``value`` with tuples as lists (decoders give lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


WIRE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WIRE_VALUES)
def test_msgpack_bytes_agree_on_any_value(value):
    assert len({c[1](value) for c in CODECS.values()}) == 1


JSON_FRAMES = [
    ["dir", "/mnt/isilon", None],
    ["entries", [["é", "f", None, list(STAT_NEG), None], [{"b64": "//4="}, "l", "d", None, None]]],
    {"error": "not_found", "message": "No such file or directory", "errno": 2, "path": "/mnt/\\xff"},
    {"agent": "diskover-storage-agent", "exports": ["/mnt/isilon", "/ü"], "protocol": 1, "x": 1.5},
    ["ctl\u0001\n\t\"\\", "\u2028", "😀"],
]


@pytest.mark.parametrize("value", JSON_FRAMES, ids=lambda v: str(v)[:20])
def test_json_is_equal_as_values_with_every_codec(value):
    encoded = {name: c[3](value) for name, c in CODECS.items()}
    for name, data in encoded.items():
        assert json.loads(data) == value, name
        assert b"\n" not in data, name  # one frame, one line
        for other, c in CODECS.items():
            assert c[4](data) == value, (name, other)


def test_hand_written_frames_match_the_codec():
    """``entries_frame`` and ``end_frame_pieces`` write msgpack headers themselves: the same
    bytes as the codec gives for the whole frame, at each array-size boundary."""
    enc = CODECS["msgpack-pure"][1]
    for count in (0, 15, 16, 65_535, 65_536):
        entries = [(b"n", "f", None, None, None)] * count
        items = b"".join(enc(e) for e in entries)
        whole = enc(("entries", entries))
        assert entries_frame(count, items) == len(whole).to_bytes(4, "big") + whole
        paths = [b"/p"] * count
        head, sep, tail = end_frame_pieces(count, sum(len(enc(p)) for p in paths), "msgpack")
        whole = enc(("end", paths))
        assert head + sep.join(enc(p) for p in paths) + tail == len(whole).to_bytes(4, "big") + whole


def test_walk_request_body_is_read_by_older_agents():
    """The client's request body is what the msgspec Struct it replaces decodes (older agents
    use it) to the same request; fields in the Struct's order, those at their default left out
    (an agent older than a field refuses it: sent only when asked for)."""
    reqs = [
        WalkRequest(paths=[b"/a"]),
        WalkRequest([b"/a", b"/\xff"], True, 5, 2.5, [b"*.tmp"], [b"x/*"], True, True, True, True),
        WalkRequest(paths=[b"/a"], max_entries=10_000, max_seconds=1.0, names_frames=True),
        WalkRequest(paths=[b"/a"], max_seconds=1, exclude_dirs=[]),
    ]
    for req in reqs:
        body = encode_walk_request(req)
        assert msgspec.msgpack.decode(body, type=OldWalkRequest) == OldWalkRequest(**vars(req))
        keys = list(msgspec.msgpack.decode(body))
        defaults = OldWalkRequest(paths=[])
        assert keys == [f for f in OldWalkRequest.__struct_fields__
                        if f == "paths" or getattr(req, f) != getattr(defaults, f)], req
        for c in CODECS.values():
            assert walk_request_of(c[2](body), False) == req


def test_error_body_leaves_out_what_is_none():
    body = ErrorBody(error="not_found", message="gone", errno=2)
    for c in CODECS.values():
        assert c[4](encode_error(body)) == {"error": "not_found", "message": "gone", "errno": 2}


# -- the walk request: one validator, as strict as the msgspec Struct it replaces ----------------

class OldWalkRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The agent's decoder before this package (the reference)."""

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


class OldJSONWalkRequest(msgspec.Struct, forbid_unknown_fields=True):
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


def _old(body: bytes, is_json: bool) -> Optional[tuple]:
    """What the old decoder made of ``body``: the request's fields, or None when refused."""
    try:
        if is_json:
            r = msgspec.json.decode(body, type=OldJSONWalkRequest)
            conv = [p.encode("utf-8") if isinstance(p, str) else p.b64 for p in r.paths], \
                [p.encode("utf-8") if isinstance(p, str) else p.b64 for p in r.exclude_dirs], \
                [p.encode("utf-8") if isinstance(p, str) else p.b64 for p in r.exclude_files]
            return (conv[0], r.stat, r.max_entries, r.max_seconds, conv[1], conv[2], r.one_fs,
                    r.frontier_frames, r.nofollow, r.names_frames)
        r = msgspec.msgpack.decode(body, type=OldWalkRequest)
    except (msgspec.DecodeError, UnicodeEncodeError):
        return None
    return tuple(getattr(r, f) for f in r.__struct_fields__)


def _new(body: bytes, is_json: bool, c) -> Optional[tuple]:
    try:
        r = walk_request_of(c[4](body) if is_json else c[2](body), is_json)
    except ValueError:
        return None
    return tuple(vars(r).values())


def _same(a: Optional[tuple], b: Optional[tuple]) -> bool:
    if a is None or b is None:
        return a is b
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))  # NaN equals NaN here


JSON_BODIES = [
    b'{"paths":["/mnt/isilon"]}', b' {"paths":["/a"]} ', b'{"paths":[]}', b'{"paths":["\\ud83d\\ude00"]}',
    b'{"paths":["\\ud800"]}', b'{"paths":["\xff"]}', b'\xef\xbb\xbf{"paths":["a"]}', b'{"paths":["a\x01"]}',
    b'{"paths":[{"b64":"L21udA=="}]}', b'{"paths":[{"b64":"L21udA"}]}', b'{"paths":[{"b64":"L21u dA=="}]}',
    b'{"paths":[{"b64":"L-_udA=="}]}', b'{"paths":[{"b64":"L21udB=="}]}', b'{"paths":[{"b64":""}]}',
    b'{"paths":[{"b64":"L21udA==","x":1}]}', b'{"paths":[{}]}', b'{"paths":[{"b64":1}]}',
    b'{"paths":[{"b64":"\xc3\xa9"}]}', b'{"paths":["a"],"max_entries":1.0}', b'{"paths":["a"],"max_entries":1e2}',
    b'{"paths":["a"],"max_entries":true}', b'{"paths":["a"],"max_seconds":1}', b'{"paths":["a"],"max_seconds":true}',
    b'{"paths":["a"],"stat":1}', b'{"paths":["a"],"stat":null}', b'{"paths":["a"],"max_entries":10000000000000000}',
    b'{"paths":["a"],"max_seconds":1e999}', b'{"paths":["a"],"max_seconds":NaN}', b'{"paths":["a"],"max_seconds":-0.0}',
    b'{"paths":["a"],"max_seconds":9007199254740993}', b'{"paths":["a"],"exclude_dirs":null}', b'{"paths":null}',
    b'{"paths":["a"]}x', b'{"paths":"a"}', b'["a"]', b"null", b"", b'{"paths":["a"]', b'{"paths":[1]}',
    b'{"paths":["a"],"follow":true}', b'{"max_entries":5}', b'{"paths":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"paths":["a"],"exclude_files":["*.tmp",{"b64":"/w=="}],"one_fs":true,"nofollow":false}',
    b'{"paths":["a"],"frontier_frames":true,"names_frames":true,"stat":false,"max_seconds":0.5}',
    '{"paths":["a"]}'.encode("utf-16"),
]
MSGPACK_VALUES = [
    {"paths": [b"/a"]}, {"paths": ["/a"]}, {"paths": [b"a"], "max_seconds": 1}, {"paths": [b"a"], "max_entries": 1.0},
    {"paths": [b"a"], "max_entries": 2**64 - 1}, {"paths": [b"a"], "max_entries": -(2**63)},
    {"paths": [b"a"], "stat": 1}, {"paths": [b"a"], "stat": None}, {"paths": [b"a"], 1: 2},
    {"paths": [b"a"], b"stat": True}, {"paths": [b"a"], "max_seconds": float("nan")},
    {"paths": [b"a"], "max_seconds": float("inf")}, {"paths": [b"a"], "max_entries": True},
    {"paths": (b"a",), "exclude_dirs": [b"x", "y"]}, {"paths": [b"a"], "exclude_files": [b"x"], "one_fs": True},
    [b"a"], b"a", None, {"paths": {"a": 1}}, {"paths": [[b"a"]]},
]
MSGPACK_BODIES = [msgspec.msgpack.encode(v) for v in MSGPACK_VALUES] + [
    msgspec.msgpack.encode({"paths": [b"a"]}) + b"\x00",  # trailing bytes
    b"\x81\xa5paths\x91\xc7\x01\x05a",  # an ext type as a path
    b"\x81\xa5paths\x91\xd6\xff\x00\x00\x00\x01",  # a timestamp as a path
    b"\x81\xa5paths\x91\xc4",  # truncated
    b"\x81\xa5paths" + b"\x91" * 5000 + b"\x90",  # deeply nested
    b"\xc1", b"", b'{"paths": ["/mnt/isilon"]}', os.urandom(64),
]


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_walk_request_bodies_decode_as_before(codec_name):
    c = CODECS[codec_name]
    for body in JSON_BODIES:
        assert _same(_new(body, True, c), _old(body, True)), body[:80]
    for body in MSGPACK_BODIES:
        assert _same(_new(body, False, c), _old(body, False)), body[:80]


FIELD_VALUES = st.one_of(
    st.booleans(), st.none(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=6),
    st.binary(max_size=6), st.lists(st.binary(max_size=6) | st.text(max_size=6) | st.integers(0, 3), max_size=3),
)
FIELD_NAMES = st.sampled_from([*OldWalkRequest.__struct_fields__, "other", "b64"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=5), st.booleans())
def test_any_walk_request_is_judged_as_before(fields, with_paths):
    """Random requests (right and wrong types, unknown fields): every codec accepts exactly
    what the msgspec-typed decoder accepted, with the same values."""
    if with_paths:
        fields.setdefault("paths", [b"/a"])
    body = msgspec.msgpack.encode(fields)
    json_fields = {k: [base64.b64encode(p).decode() if isinstance(p, bytes) else p for p in v]
                   if isinstance(v, list) else v for k, v in fields.items() if not isinstance(v, bytes)}
    try:
        json_body = msgspec.json.encode(json_fields)
    except (TypeError, msgspec.EncodeError):
        json_body = None
    for name, c in CODECS.items():
        assert _same(_new(body, False, c), _old(body, False)), (name, fields)
        if json_body is not None:
            assert _same(_new(json_body, True, c), _old(json_body, True)), (name, json_body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoders_raise_only_decode_error(data):
    """Any bytes: a value or :class:`codec.DecodeError`, never another exception (a 500)."""
    for c in CODECS.values():
        for decode in (c[2], c[4]):
            try:
                decode(data)
            except codec.DecodeError:
                pass


def test_pure_codec_agent_refuses_absurd_walk_requests_with_400(tmp_path, monkeypatch):
    """The agent on the pure-Python codec answers each hostile walk body of test_hostile with a
    4xx JSON error (never a 500 or a traceback), and a good one with the walk."""
    from test_hostile import WALK_BODIES

    from conftest import Agent, http_get

    (tmp_path / "t" / "d").mkdir(parents=True)
    monkeypatch.setenv(codec.PURE_ENV, "1")
    agent = Agent([("/mnt/isilon", str(tmp_path / "t"))])
    try:
        assert "codec: msgpack (pure Python)" in "".join(agent.log)
        for case, (content_type, body) in WALK_BODIES.items():
            status, _, answer = http_get(agent.port, "/_agent/v1/walk", method="POST", body=body,
                                         headers={"Content-Type": content_type})
            assert 400 <= status < 500, (case, status, answer[:300])
            assert json.loads(answer)["message"], case
        status, _, answer = http_get(agent.port, "/_agent/v1/walk?format=ndjson", method="POST",
                                     body=b'{"paths": ["/mnt/isilon"], "stat": true}',
                                     headers={"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer.splitlines()[0])[:2] == ["dir", "/mnt/isilon"]
        assert "Traceback" not in "".join(agent.log)
    finally:
        assert agent.terminate() == 0
