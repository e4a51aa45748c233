"""How a protocol message becomes frames and back: the codec under llmos/protocol.py.

Wire format (one ZeroMQ multipart message):
    frame 0: one byte, the opcode
    frame 1: msgpack map {"v": PROTOCOL_VERSION, "f": {field: value}, "a": [[name, dtype, shape], ...]}
    frame 2..: raw bytes of each array field, in the order of "a" (no copy, no pickle)

`decode` never trusts a frame: unknown opcodes, wrong versions, missing or unknown
fields and wrongly typed fields raise `BadMessage`, which receivers count and log.
The messages themselves, and every type they hold, are declared in llmos/protocol.py
with this module's `message` and `item` decorators; everyone imports them from there.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
_ARRAY_DTYPES = {"int32", "int64", "float32", "uint8"}
MAX_ARRAY_DIMS = 4


class BadMessage(ValueError):
    """A frame sequence that is not a valid message of this protocol version."""


class Unencodable(ValueError):
    """A message that cannot be written (a lone surrogate in a string, an int past 64
    bits, a value msgpack has no type for). Nothing was sent; the sender fails the
    request the message belongs to."""


class Message:
    OPCODE: ClassVar[int]
    ARRAYS: ClassVar[tuple[str, ...]] = ()


_REGISTRY: dict[int, type] = {}
_FIELD_TYPES: dict[type, dict[str, tuple]] = {}   # message or item class -> field -> accepted wire types
_ITEM_FIELDS: dict[type, dict[str, Any]] = {}     # message or item class -> its fields that hold items -> hint
_ITEMS: set[type] = set()


def item(cls):
    """Class decorator: a typed record inside a message. A field of a message or of another
    item may hold one (`X`), maybe one (`X | None`), a list (`list[X]`) or a map
    (`dict[str, X]`) of them; on decode each is checked field by field like the message
    itself, nested items included. Declare an item before the classes that hold it."""
    cls = dataclass(cls)
    _register_fields(cls)
    _ITEMS.add(cls)
    return cls


def message(opcode: int, arrays: tuple[str, ...] = ()):
    """Class decorator: make a dataclass a bus message with this opcode."""

    def wrap(cls):
        cls = dataclass(cls)
        if opcode in _REGISTRY:
            raise RuntimeError(f"opcode {opcode:#x} declared twice")
        cls.OPCODE, cls.ARRAYS = opcode, arrays
        _REGISTRY[opcode] = cls
        _register_fields(cls)
        return cls

    return wrap


def _register_fields(cls) -> None:
    hints = typing.get_type_hints(cls)
    for name, hint in hints.items():
        if _holds_items(hint) and not _one_shape(hint):
            raise TypeError(f"{cls.__name__}.{name}: a union may hold one item type and None, not {hint}")
    _FIELD_TYPES[cls] = {f.name: _accepted(hints[f.name]) for f in dataclasses.fields(cls)}
    _ITEM_FIELDS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if _holds_items(hints[f.name])}


def _holds_items(hint) -> bool:
    return hint in _ITEMS or any(_holds_items(arg) for arg in typing.get_args(hint))


def _one_shape(hint) -> bool:
    """No union of two item types (a decoder could not tell which one came)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in args if a is not type(None)]
        if len(args) != 1:
            return False
    return all(_one_shape(a) for a in args)


def _accepted(hint) -> tuple:
    """The runtime types a field of this annotation may hold after msgpack decoding."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted(arg))
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (float, int)
    if hint is Any:
        return (object,)
    if hint is np.ndarray:
        return (np.ndarray,)
    if hint in _ITEMS:   # an item travels as a map of its fields
        return (dict,)
    return (origin or hint,)


def _is_a(value, accepted: tuple) -> bool:
    """isinstance, except that a bool is not an int (or a float) unless bool is accepted."""
    return isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted
                                                and object not in accepted)


def _to_wire(hint, value):
    """A value of a field that holds items, as it travels: items as maps of their fields."""
    if hint in _ITEMS:
        if not isinstance(value, hint):
            raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
        return {k: (_to_wire(_ITEM_FIELDS[hint][k], getattr(value, k)) if k in _ITEM_FIELDS[hint]
                    else getattr(value, k)) for k in _FIELD_TYPES[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _to_wire(next(a for a in args if a is not type(None)), value)
    if origin is list and isinstance(value, list):
        return [_to_wire(args[0], x) for x in value]
    if origin is dict and isinstance(value, dict):
        return {k: _to_wire(args[1], v) for k, v in value.items()}
    raise TypeError(f"expected {hint}, got {type(value).__name__}")


def _from_wire(where: str, hint, value):
    """The inverse of _to_wire, checking every level: BadMessage names the first bad place."""
    if hint in _ITEMS:
        return _decode_item(where, hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _from_wire(where, next(a for a in args if a is not type(None)), value)
    if origin is list and isinstance(value, list):
        return [_from_wire(f"{where}[{i}]", args[0], x) for i, x in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        if not all(_is_a(k, _accepted(args[0])) for k in value):
            raise BadMessage(f"{where}: unexpected key type")
        return {k: _from_wire(f"{where}[{k!r:.40}]", args[1], v) for k, v in value.items()}
    raise BadMessage(f"{where}: unexpected {type(value).__name__}")


def plain(value):
    """An item (or a list or map of items) as plain maps and lists, the form it travels in:
    what the io driver serialises to JSON."""
    if type(value) in _ITEMS:
        return _to_wire(type(value), value)
    if isinstance(value, list):
        return [plain(x) for x in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def encode(msg: Message) -> list[bytes]:
    """The frames of `msg`. Raises Unencodable (nothing is sent) for what cannot be written."""
    fields, arrays, frames = {}, [], []
    try:
        for f in dataclasses.fields(msg):
            value = getattr(msg, f.name)
            if f.name in msg.ARRAYS:
                arr = np.ascontiguousarray(value)
                if str(arr.dtype) not in _ARRAY_DTYPES:
                    raise TypeError(f"{f.name}: arrays of {arr.dtype} are not part of the protocol")
                arrays.append([f.name, str(arr.dtype), list(arr.shape)])
                frames.append(arr.data)
            elif f.name in _ITEM_FIELDS[type(msg)]:
                fields[f.name] = _to_wire(_ITEM_FIELDS[type(msg)][f.name], value)
            else:
                fields[f.name] = value
        head = msgpack.packb({"v": PROTOCOL_VERSION, "f": fields, "a": arrays}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:   # UnicodeEncodeError is a ValueError
        raise Unencodable(f"{type(msg).__name__}: {type(exc).__name__}: {exc}") from None
    return [bytes([msg.OPCODE]), head, *frames]


def decode(frames: list) -> Message:
    try:
        return _decode(frames)
    except BadMessage:
        raise
    except Exception as exc:  # whatever a hostile frame provokes, it is a bad message, never a crash
        raise BadMessage(f"undecodable frames: {type(exc).__name__}: {exc}") from None


def _decode(frames: list) -> Message:
    if len(frames) < 2:
        raise BadMessage(f"expected at least 2 frames, got {len(frames)}")
    op = bytes(frames[0])
    if len(op) != 1 or op[0] not in _REGISTRY:
        raise BadMessage(f"unknown opcode {op[:8]!r}")
    cls = _REGISTRY[op[0]]
    try:
        head = msgpack.unpackb(bytes(frames[1]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"{cls.__name__}: payload is not msgpack ({exc})") from None
    if not isinstance(head, dict) or set(head) != {"v", "f", "a"}:
        raise BadMessage(f"{cls.__name__}: malformed header")
    if head["v"] != PROTOCOL_VERSION:
        raise BadMessage(f"{cls.__name__}: protocol version {head['v']!r}, expected {PROTOCOL_VERSION}")
    values = head["f"]
    if not isinstance(values, dict):
        raise BadMessage(f"{cls.__name__}: fields are not a map")
    values = dict(values)
    values.update(_decode_arrays(cls, head["a"], frames[2:]))
    return cls(**_decode_fields(cls.__name__, cls, values))


def _check_fields(where: str, values: dict, expected: dict) -> None:
    if set(values) != set(expected):
        missing, extra = set(expected) - set(values), set(values) - set(expected)
        raise BadMessage(f"{where}: missing {sorted(missing)} unknown {sorted(map(str, extra))[:8]}")
    for name, value in values.items():
        if not _is_a(value, expected[name]):
            raise BadMessage(f"{where}.{name}: unexpected {type(value).__name__}")


def _decode_fields(where: str, cls, values: dict) -> dict:
    """The checked constructor arguments of a message or item: its fields, items decoded."""
    _check_fields(where, values, _FIELD_TYPES[cls])
    for name, hint in _ITEM_FIELDS[cls].items():
        values[name] = _from_wire(f"{where}.{name}", hint, values[name])
    return values


def _decode_item(where: str, cls, value):
    if not isinstance(value, dict):
        raise BadMessage(f"{where}: expected a map, got {type(value).__name__}")
    return cls(**_decode_fields(where, cls, dict(value)))


def _decode_arrays(cls, specs, frames) -> dict[str, np.ndarray]:
    if not isinstance(specs, list) or len(specs) != len(cls.ARRAYS) or len(frames) != len(specs):
        raise BadMessage(f"{cls.__name__}: expected arrays {cls.ARRAYS}")
    out = {}
    for spec, frame in zip(specs, frames):
        if not (isinstance(spec, list) and len(spec) == 3 and spec[0] in cls.ARRAYS
                and spec[1] in _ARRAY_DTYPES and isinstance(spec[2], list) and len(spec[2]) <= MAX_ARRAY_DIMS
                and all(type(d) is int and d >= 0 for d in spec[2])):
            raise BadMessage(f"{cls.__name__}: bad array spec {spec!r:.200}")
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        dtype = np.dtype(spec[1])
        count = math.prod(spec[2])   # exact: an int64 product could wrap around to match the frame
        if buf.nbytes != count * dtype.itemsize:
            raise BadMessage(f"{cls.__name__}.{spec[0]}: {buf.nbytes} bytes for shape {spec[2]}")
        out[spec[0]] = np.frombuffer(buf, dtype=dtype).reshape(spec[2])
    return out


def registered_messages() -> tuple[type, ...]:
    """Every message class declared so far, in opcode declaration order."""
    return tuple(_REGISTRY.values())


def i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)
