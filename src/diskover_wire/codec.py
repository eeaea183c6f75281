"""MessagePack and JSON, with accelerators used when importable.

One place decides how the wire is encoded and decoded, for the agent and for what the
client shares with it:

* msgspec, when importable (compiled: the fastest);
* else the ``msgpack`` package (its C extension, or its pure-Python ``fallback`` module)
  and the standard library's ``json``.

Setting :data:`PURE_ENV` (to anything but ``0``) chooses the pure-Python way even where
msgspec is installed (msgpack's ``fallback`` module and ``json``), as it also chooses the
agent's pure-Python read loop. The bytes of MessagePack are the same either way (ints in
their smallest form, floats as float64, ``bytes`` as bin, ``str`` as str, tuples as arrays,
maps in insertion order); JSON is equal as values. Decoding gives plain Python values
(``dict``, ``list``, ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None``), and any
malformed input raises :class:`DecodeError`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, Optional

#: Set (to anything but ``0``) for the pure-Python codec and read loop.
PURE_ENV = "DISKOVER_AGENT_PURE"


class DecodeError(ValueError):
    """Input that is not well-formed MessagePack or JSON."""


def pure_wanted() -> bool:
    """Whether the environment asks for pure Python (:data:`PURE_ENV`)."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("Number out of range")
    return value


_json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_json_loads = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode


def _stdlib_json_encode(obj: Any) -> bytes:
    return _json_dumps(obj).encode("utf-8")


def _stdlib_json_decode(data: bytes) -> Any:
    # As strict as msgspec: UTF-8 only (no UTF-16/32 guessing), no NaN/Infinity, no BOM.
    try:
        return _json_loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"JSON is malformed: {exc}") from None


Codec = tuple[str, Callable[[Any], bytes], Callable[[bytes], Any], Callable[[Any], bytes], Callable[[bytes], Any]]


def _msgspec_codec() -> Optional[Codec]:
    try:
        import msgspec
    except ImportError:
        return None
    mp_enc = msgspec.msgpack.Encoder().encode
    js_enc = msgspec.json.Encoder().encode
    mp_dec_raw = msgspec.msgpack.Decoder().decode
    js_dec_raw = msgspec.json.Decoder().decode

    def mp_dec(data: bytes) -> Any:
        try:
            return mp_dec_raw(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise DecodeError(str(exc)) from None

    def js_dec(data: bytes) -> Any:
        try:
            return js_dec_raw(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise DecodeError(str(exc)) from None

    return "msgspec", mp_enc, mp_dec, js_enc, js_dec


def _msgpack_codec(pure: bool) -> Optional[Codec]:
    try:
        import msgpack
        from msgpack import exceptions, fallback
    except ImportError:
        return None
    if pure:
        packer, unpackb, name = fallback.Packer, fallback.unpackb, "msgpack (pure Python)"
    else:
        packer, unpackb = msgpack.Packer, msgpack.unpackb
        name = "msgpack (pure Python)" if packer is fallback.Packer else "msgpack (compiled)"
    errors = (ValueError, TypeError, OverflowError, RecursionError, exceptions.UnpackException)

    def mp_enc(obj: Any) -> bytes:
        # A packer per call: one shared by the agent's threads would mix their output.
        return packer().pack(obj)

    def mp_dec(data: bytes) -> Any:
        try:
            return unpackb(data, raw=False, timestamp=0)
        except errors as exc:
            raise DecodeError(f"MessagePack data is malformed: {exc}") from None

    return name, mp_enc, mp_dec, _stdlib_json_encode, _stdlib_json_decode


def load(pure: bool) -> Codec:
    """The codec to use: the pure-Python one when ``pure`` (if msgpack is installed), else
    msgspec if importable, else msgpack; ``ImportError`` when neither is installed."""
    found = (_msgpack_codec(True) if pure else None) or _msgspec_codec() or _msgpack_codec(False)
    if found is None:
        raise ImportError("diskover_wire needs msgspec or msgpack: pip install msgpack")
    return found


#: Which codec this process uses: ``"msgspec"``, ``"msgpack (compiled)"`` or ``"msgpack (pure Python)"``.
CODEC: str
msgpack_encode: Callable[[Any], bytes]
msgpack_decode: Callable[[bytes], Any]
json_encode: Callable[[Any], bytes]
json_decode: Callable[[bytes], Any]
CODEC, msgpack_encode, msgpack_decode, json_encode, json_decode = load(pure_wanted())
