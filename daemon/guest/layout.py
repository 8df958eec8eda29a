"""A tiny struct-layout language: the one place where guest struct layouts are defined.

Guest C code and host Python code both need the layout of every shared struct (per-CPU data, tasks, ftrace
ops, ...). Layouts are written once here, in Python; ``daemon.guest.build`` renders them into a C header with
``_Static_assert(offsetof(...))`` lines, so the C compiler checks that C and Python agree, and into
``#define`` offsets for assembly (Linux's asm-offsets). Fields are naturally aligned, as in the AAPCS64 ABI.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

_SCALARS: dict[str, int] = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
_CODES: dict[str, str] = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}

Value = int | Sequence[int] | bytes
"""What :meth:`Struct.pack` takes for a member: an int (scalar), up to ``count`` ints (array, the rest zero) or
the packed bytes of a nested struct."""


@dataclass(frozen=True)
class Field:
    """One member: a scalar (``u8``..``u64``), a nested struct, or an array of either."""

    name: str
    type: str | Struct
    count: int = 1  # > 1 makes an array
    ctype: str | None = None  # C spelling when it differs from the scalar, e.g. "struct task_struct *"

    @property
    def elem_size(self) -> int:
        return self.type.size if isinstance(self.type, Struct) else _SCALARS[self.type]

    @property
    def align(self) -> int:
        return self.type.align if isinstance(self.type, Struct) else _SCALARS[self.type]

    @property
    def size(self) -> int:
        return self.elem_size * self.count


@dataclass
class Struct:
    """A C struct with computed offsets; ``offsetof("a.b")`` follows nested members."""

    name: str
    fields: list[Field]
    doc: str = ""
    offsets: dict[str, int] = field(init=False, default_factory=dict)
    size: int = field(init=False, default=0)
    align: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        off = 0
        for f in self.fields:
            off = -(-off // f.align) * f.align
            if f.name in self.offsets:
                raise ValueError(f"{self.name}: duplicate field {f.name}")
            self.offsets[f.name] = off
            off += f.size
            self.align = max(self.align, f.align)
        self.size = -(-off // self.align) * self.align

    def pack(self, **values: Value) -> bytes:
        """The struct's bytes from its members, by name (padding zeroed). Every member must be given — an
        array with ``()`` when it starts zeroed — so that a member added to the layout, or a misspelt one, is
        refused instead of packed at the wrong offset."""
        unknown = sorted(values.keys() - self.offsets.keys())
        if unknown:
            raise KeyError(f"struct {self.name} has no member {', '.join(unknown)}")
        missing = [f.name for f in self.fields if f.name not in values]
        if missing:
            raise ValueError(f"struct {self.name}: no value for {', '.join(missing)} (give every member)")
        blob = bytearray(self.size)
        for f in self.fields:
            value, off = values[f.name], self.offsets[f.name]
            if isinstance(f.type, Struct):
                if not isinstance(value, bytes) or len(value) != f.size:
                    raise TypeError(f"{self.name}.{f.name}: {f.size} packed bytes of struct {f.type.name}")
                blob[off : off + f.size] = value
            elif f.count > 1:
                if isinstance(value, int | bytes) or len(value) > f.count:
                    raise TypeError(f"{self.name}.{f.name}: a sequence of at most {f.count} ints")
                struct.pack_into(f"<{len(value)}{_CODES[f.type]}", blob, off, *value)
            else:
                if not isinstance(value, int):
                    raise TypeError(f"{self.name}.{f.name}: an int")
                struct.pack_into(f"<{_CODES[f.type]}", blob, off, value)
        return bytes(blob)

    def codec(self) -> tuple[struct.Struct, dict[str, int]]:
        """A :class:`struct.Struct` that unpacks the whole struct at once (arrays flattened, nested structs as
        bytes, padding skipped) and each member's index in the tuples it yields: for bulk reads of rings."""
        fmt, pos, index, at = ["<"], 0, {}, 0
        for f in self.fields:
            off = self.offsets[f.name]
            if off > pos:
                fmt.append(f"{off - pos}x")
            index[f.name] = at
            if isinstance(f.type, Struct):
                fmt.append(f"{f.size}s")
                at += 1
            else:
                fmt.append(f"{f.count}{_CODES[f.type]}")
                at += f.count
            pos = off + f.size
        if self.size > pos:
            fmt.append(f"{self.size - pos}x")
        return struct.Struct("".join(fmt)), index

    def member(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"struct {self.name} has no member {name!r}")

    def offsetof(self, path: str) -> int:
        """Byte offset of ``path`` ("job.args" or "cpu_context"), like C's offsetof."""
        return self.resolve(path)[0]

    def resolve(self, path: str) -> tuple[int, Field]:
        """Offset and field of a dotted member path."""
        head, _, rest = path.partition(".")
        if head not in self.offsets:
            raise KeyError(f"struct {self.name} has no member {head!r}")
        f = self.member(head)
        if not rest:
            return self.offsets[head], f
        if not isinstance(f.type, Struct):
            raise KeyError(f"{self.name}.{head} is not a struct")
        off, inner = f.type.resolve(rest)
        return self.offsets[head] + off, inner


def u64(name: str, count: int = 1, ctype: str | None = None) -> Field:
    return Field(name, "u64", count, ctype)


def u32(name: str, count: int = 1) -> Field:
    return Field(name, "u32", count)


def u8(name: str, count: int = 1) -> Field:
    return Field(name, "u8", count)


def nested(name: str, struct: Struct, count: int = 1) -> Field:
    return Field(name, struct, count)


def _c_member(f: Field) -> str:
    ctype = f.ctype or (f"struct {f.type.name}" if isinstance(f.type, Struct) else f.type)
    star = ctype.endswith("*")
    sep = "" if star else " "
    return f"{ctype}{sep}{f.name}" + (f"[{f.count}]" if f.count > 1 else "") + ";"


def render_c(structs: list[Struct], constants: dict[str, int], prefix_notes: str) -> str:
    """The generated header: constants, structs, asm offsets and compile-time layout checks."""
    out = [f"/* {prefix_notes} */", "#ifndef GUEST_ABI_H", "#define GUEST_ABI_H", ""]
    for k, v in constants.items():
        out.append(f"#define {k} {v:#x}" if v >= 10 else f"#define {k} {v}")
    out.append("")
    for s in structs:
        for f in s.fields:
            out.append(f"#define {s.name.upper()}_{f.name.upper()} {s.offsets[f.name]}")
        out.append(f"#define {s.name.upper()}_SIZE {s.size}")
    out += ["", "#ifndef __ASSEMBLER__", '#include "types.h"', ""]
    for s in structs:
        if s.doc:
            out.append(f"/* {s.doc} */")
        out.append(f"struct {s.name} {{")
        out += [f"\t{_c_member(f)}" for f in s.fields]
        out.append("};")
        for f in s.fields:
            out.append(f"_Static_assert(__builtin_offsetof(struct {s.name}, {f.name}) == {s.offsets[f.name]}, "
                       f'"{s.name}.{f.name}");')
        out.append(f'_Static_assert(sizeof(struct {s.name}) == {s.size}, "sizeof {s.name}");')
        out.append("")
    out += ["#endif /* __ASSEMBLER__ */", "#endif /* GUEST_ABI_H */", ""]
    return "\n".join(out)
