"""postcard, the serde format of rld's messages: the primitives and how
types are composed, without any rld message layout (those are in
:mod:`rld.wire`).

Unsigned integers are LEB128 varints (7 bits a byte, low group first), i64
is zigzag-encoded first, u8 and bool are one byte, f64 is 8 little-endian
bytes, strings and sequences are a varint length then their contents,
``Option`` is a 00/01 byte then the value, enums are a varint variant index
then the variant's fields, structs are their fields in order. Decoding
accepts exactly what the daemon's postcard accepts (including non-minimal
varints) and names the field it failed in. See
https://postcard.jamesmunns.com/wire-format.
"""

from __future__ import annotations

import struct
from typing import Any, List, Optional, Sequence, Tuple, Type

from .errors import MalformedFrame
from .messages import WireEnum


class DecodeError(MalformedFrame):
    """Bytes that are not a message; says where and in which field."""


class Reader:
    """A position in a frame body, and the path of fields being read (for
    error messages)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.path: List[str] = []

    def fail(self, problem: str) -> DecodeError:
        where = ".".join(self.path) or "frame"
        return DecodeError(f"malformed frame: {problem} at byte {self.pos} (reading {where})")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"{n} bytes needed, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of frame")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, bits: int) -> int:
        """A LEB128 varint of at most ``bits`` bits, as postcard reads it: at
        most ceil(bits/7) bytes, the last one without bits beyond the type."""
        max_bytes = (bits + 6) // 7
        last_max = (1 << (bits - 7 * (max_bytes - 1))) - 1
        value = 0
        for i in range(max_bytes):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i == max_bytes - 1 and b > last_max:
                    raise self.fail(f"varint overflows u{bits}")
                return value
        raise self.fail(f"varint longer than {max_bytes} bytes for u{bits}")

    def flag(self, what: str) -> bool:
        b = self.byte()
        if b > 1:
            raise self.fail(f"{what} byte is {b:#04x}, not 00 or 01")
        return b == 1


def put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


class Spec:
    """How one type is encoded: ``encode(out, value)`` and ``decode(reader)``."""

    def encode(self, out: bytearray, value: Any) -> None:
        raise NotImplementedError

    def decode(self, r: Reader) -> Any:
        raise NotImplementedError


def _check_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


class Unsigned(Spec):
    def __init__(self, bits: int) -> None:
        self.bits = bits

    def encode(self, out: bytearray, value: Any) -> None:
        put_varint(out, _check_int(value, 0, (1 << self.bits) - 1, f"u{self.bits}"))

    def decode(self, r: Reader) -> int:
        return r.varint(self.bits)


class Signed64(Spec):
    """i64, zigzag then varint."""

    def encode(self, out: bytearray, value: Any) -> None:
        n = _check_int(value, -(1 << 63), (1 << 63) - 1, "i64")
        put_varint(out, (n << 1) ^ (n >> 63))

    def decode(self, r: Reader) -> int:
        z = r.varint(64)
        return (z >> 1) ^ -(z & 1)


class Byte(Spec):
    """u8: one raw byte (not a varint)."""

    def encode(self, out: bytearray, value: Any) -> None:
        out.append(_check_int(value, 0, 255, "u8"))

    def decode(self, r: Reader) -> int:
        return r.byte()


class Bool(Spec):
    def encode(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"bool expected, not {value!r}")
        out.append(1 if value else 0)

    def decode(self, r: Reader) -> bool:
        return r.flag("bool")


class Float64(Spec):
    def encode(self, out: bytearray, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"f64 expected, not {value!r}")
        out += struct.pack("<d", value)

    def decode(self, r: Reader) -> float:
        return struct.unpack("<d", r.take(8))[0]


class Str(Spec):
    def encode(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"str expected, not {value!r}")
        data = value.encode("utf-8")
        put_varint(out, len(data))
        out += data

    def decode(self, r: Reader) -> str:
        data = r.take(r.varint(64))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise r.fail(f"string is not UTF-8 ({e.reason})") from None


class Fixed(Spec):
    """A byte array of fixed length, without a length prefix."""

    def __init__(self, n: int) -> None:
        self.n = n

    def encode(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, (bytes, bytearray)) or len(value) != self.n:
            raise ValueError(f"{self.n} bytes expected, not {value!r}")
        out += value

    def decode(self, r: Reader) -> bytes:
        return bytes(r.take(self.n))


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def encode(self, out: bytearray, value: Any) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self.inner.encode(out, value)

    def decode(self, r: Reader) -> Any:
        return self.inner.decode(r) if r.flag("Option tag") else None


class Seq(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def encode(self, out: bytearray, value: Any) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"a list expected, not {value!r}")
        put_varint(out, len(value))
        for item in value:
            self.inner.encode(out, item)

    def decode(self, r: Reader) -> list:
        n = r.varint(64)
        # Every element takes at least one byte: a count beyond what is left
        # is malformed (and must not make us allocate).
        if n > len(r.data) - r.pos:
            raise r.fail(f"sequence of {n} items in {len(r.data) - r.pos} bytes")
        items = []
        for i in range(n):
            r.path.append(f"[{i}]")
            items.append(self.inner.decode(r))
            r.path.pop()
        return items


class Struct(Spec):
    """A class built from keyword fields (a dataclass), encoded as its
    fields in wire order."""

    def __init__(self, cls: type, fields: Sequence[Tuple[str, Spec]]) -> None:
        self.cls = cls
        self.fields = fields

    def encode(self, out: bytearray, value: Any) -> None:
        if not isinstance(value, self.cls):
            raise TypeError(f"{self.cls.__name__} expected, not {value!r}")
        for name, spec in self.fields:
            try:
                spec.encode(out, getattr(value, name))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{self.cls.__name__}.{name}: {e}") from None

    def decode(self, r: Reader) -> Any:
        values = {}
        for name, spec in self.fields:
            r.path.append(name)
            values[name] = spec.decode(r)
            r.path.pop()
        return self.cls(**values)


class Enum(Spec):
    """A fieldless enum: its index in declaration order."""

    def __init__(self, cls: Type[WireEnum]) -> None:
        self.members = list(cls)
        self.cls = cls

    def encode(self, out: bytearray, value: Any) -> None:
        put_varint(out, self.members.index(self.cls.parse(value)))

    def decode(self, r: Reader) -> WireEnum:
        i = r.varint(32)
        if i >= len(self.members):
            raise r.fail(f"unknown {self.cls.__name__} variant {i}")
        return self.members[i]


class Tagged(Spec):
    """An enum with fields: the variant index, then its payload. Values are
    ``(kind, payload)`` pairs; a variant without fields has payload ``None``."""

    def __init__(self, name: str, variants: Sequence[Tuple[str, Optional[Spec]]]) -> None:
        self.name = name
        self.variants = variants
        self.index = {kind: i for i, (kind, _) in enumerate(variants)}

    def encode(self, out: bytearray, value: Any) -> None:
        kind, payload = value
        if kind not in self.index:
            raise ValueError(f"unknown {self.name} {kind!r}")
        i = self.index[kind]
        put_varint(out, i)
        spec = self.variants[i][1]
        if spec is not None:
            spec.encode(out, payload)
        elif payload is not None:
            raise ValueError(f"{self.name}::{kind} carries no value, got {payload!r}")

    def decode(self, r: Reader) -> Tuple[str, Any]:
        i = r.varint(32)
        if i >= len(self.variants):
            raise r.fail(f"unknown {self.name} variant {i}")
        kind, spec = self.variants[i]
        r.path.append(kind)
        payload = None if spec is None else spec.decode(r)
        r.path.pop()
        return kind, payload


U16, U32, U64, I64 = Unsigned(16), Unsigned(32), Unsigned(64), Signed64()
U8, BOOL, F64, STR = Byte(), Bool(), Float64(), Str()
