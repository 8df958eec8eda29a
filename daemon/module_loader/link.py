"""Link a parsed relocatable object at given module-text and module-data addresses, entirely in host buffers.

Linking is split so that every check runs before guest memory is touched: :func:`resolve` binds undefined
symbols (kallsyms), :func:`plan` lays sections out and counts PLT veneers (sizes only), :func:`link` relocates
into two byte images for chosen base addresses. The module loader allocates, links, and only then writes.

Where each ``SHF_ALLOC`` section goes (offsets in section-index order, each at its own alignment)::

    module text (r-x)   SHF_EXECINSTR sections | PLT veneers, 12 bytes each | ftrace PLT (12 bytes, if traceable)
    module data (rw-)   every other SHF_ALLOC section: .data, .rodata*, __patchable_function_entries, .bss (zeroed)

Read-only data goes to module data (writable by the guest): the module area has only a text and a data half.

Undefined symbols resolve against kallsyms. A name defined more than once there (a ``static`` in several
files) must say which, as Linux's livepatch relocations do: an undefined symbol named
``.klp.sym.vmlinux.<name>,<sympos>`` binds to the ``sympos``-th ``<name>`` (``extern int f(void)
__asm__(".klp.sym.vmlinux.f,2")`` in C). An unresolved weak reference binds to 0.

A ``CALL26``/``JUMP26`` whose target is out of BL range (every kernel function: the module area is 2 GiB
below kernel text) goes through a veneer ``adrp x16, T; add x16, x16, :lo12:T; br x16``; one veneer per
distinct target T.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from daemon.arch.arm64 import insn, relocs
from daemon.errors import (
    AmbiguousSymbol,
    InsnError,
    ModuleFormatError,
    ModuleNoSpace,
    RelocationOverflow,
    SymbolError,
    UnresolvedSymbol,
)
from daemon.kernel.kallsyms import Kallsyms
from daemon.module_loader import elf

PAGE_SIZE = 4096
PLT_ENTRY_SIZE = 12
PATCHABLE_ENTRIES = "__patchable_function_entries"
MAX_AREA_SIZE = 16 << 20  # per module and area: live patches are kilobytes; a bigger header is bogus
_KLP_SYM = re.compile(r"\.klp\.sym\.vmlinux\.([A-Za-z_.$][\w.$]*),(\d+)")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Placement:
    in_text: bool
    offset: int  # from the start of its area


@dataclass(frozen=True)
class Plan:
    """Where everything goes, relative to the two area bases; decided before any address is known."""

    obj: elf.ObjectFile
    externals: Mapping[int, int]  # undefined symbol index -> address
    placements: Mapping[int, Placement]  # section index -> placement
    veneer_targets: tuple[int, ...]  # distinct out-of-module branch targets, in first-use order
    veneer_offset: int  # in text
    ftrace_target: int | None
    ftrace_plt_offset: int | None  # in text
    text_size: int
    data_size: int


@dataclass(frozen=True)
class LinkedSymbol:
    name: str
    addr: int
    size: int
    is_func: bool
    local: bool


@dataclass(frozen=True)
class Linked:
    text: bytes
    data: bytes
    symbols: tuple[LinkedSymbol, ...]
    sections: Mapping[str, int]  # first section of each name -> address
    veneers: Mapping[int, int]  # target -> veneer address
    ftrace_plt: int | None
    patchable_entries: tuple[int, ...]  # record addresses: the first pre-function NOP of each function


def kernel_symbol(kallsyms: Kallsyms, name: str) -> int:
    """Address of an undefined symbol's kernel definition (``.klp.sym.vmlinux.name,pos`` picks a position)."""
    m = _KLP_SYM.fullmatch(name)
    base, sympos = (m.group(1), int(m.group(2))) if m else (name, 0)
    try:
        return kallsyms.addr(base, sympos)
    except AmbiguousSymbol as exc:
        raise AmbiguousSymbol(f"{exc.message}: reference it as .klp.sym.vmlinux.{base},<sympos>",
                              **exc.details) from None
    except SymbolError as exc:
        raise UnresolvedSymbol(f"unresolved symbol {name!r}: {exc.message}", symbol=name) from None


def resolve(obj: elf.ObjectFile, kallsyms: Kallsyms) -> dict[int, int]:
    """Bind every undefined symbol (index > 0) to a kernel address."""
    out: dict[int, int] = {}
    for sym in obj.symbols[1:]:
        if not sym.undefined:
            continue
        if not sym.name or sym.bind == elf.STB_LOCAL:
            raise ModuleFormatError(f"symbol {sym.index} is undefined but local or nameless", symbol=sym.index)
        try:
            out[sym.index] = kernel_symbol(kallsyms, sym.name)
        except UnresolvedSymbol:
            if sym.bind != elf.STB_WEAK:
                raise
            out[sym.index] = 0
    return out


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def _layout(obj: elf.ObjectFile) -> tuple[dict[int, Placement], int, int]:
    placements: dict[int, Placement] = {}
    sizes = [0, 0]  # data, text
    for s in obj.sections:
        if not s.alloc or s.type in (elf.SHT_NULL, elf.SHT_RELA, elf.SHT_REL, elf.SHT_SYMTAB, elf.SHT_STRTAB):
            continue
        if s.align > PAGE_SIZE:
            raise ModuleFormatError(f"section {s.name} wants {s.align}-byte alignment (at most {PAGE_SIZE})",
                                    section=s.name)
        if s.executable and s.nobits:
            raise ModuleFormatError(f"section {s.name} is executable but has no contents", section=s.name)
        area = int(s.executable)
        offset = _align(sizes[area], s.align)
        placements[s.index] = Placement(bool(area), offset)
        sizes[area] = offset + s.size
    return placements, sizes[1], sizes[0]


def _symbol_value(obj: elf.ObjectFile, sym: elf.Symbol, externals: Mapping[int, int],
                  base: Mapping[int, int] | None) -> int | None:
    """S for a symbol: None when it lives in a section that is not loaded. ``base``: section -> address."""
    if sym.index == 0:
        return 0
    if sym.undefined:
        return externals[sym.index]
    if sym.shndx == elf.SHN_ABS:
        return sym.value
    if sym.shndx == elf.SHN_COMMON:
        raise ModuleFormatError(f"symbol {sym.name!r} is a common symbol (compile with -fno-common)",
                                symbol=sym.name)
    if base is None or sym.shndx not in base:
        return None
    if sym.value > obj.sections[sym.shndx].size:
        raise ModuleFormatError(f"symbol {sym.name!r} lies outside its section", symbol=sym.name)
    return (base[sym.shndx] + sym.value) & _MASK64


def _loaded_relocs(obj: elf.ObjectFile, placements: Mapping[int, Placement]) -> list[elf.RelocSection]:
    return [r for r in obj.relocations if r.target in placements]


def plan(obj: elf.ObjectFile, externals: Mapping[int, int], *, ftrace_target: int | None = None) -> Plan:
    """Lay the object out and reserve a veneer for every distinct branch target outside it."""
    placements, text_size, data_size = _layout(obj)
    targets: dict[int, None] = {}
    for rs in _loaded_relocs(obj, placements):
        for r in rs.relocs:
            relocs.lookup(r.type)  # unknown types are refused here, before any allocation
            sym = obj.symbols[r.symbol]
            if r.type in relocs.BRANCH_TYPES and (sym.undefined or sym.shndx == elf.SHN_ABS):
                value = _symbol_value(obj, sym, externals, None)
                if value is not None:
                    targets[(value + r.addend) & _MASK64] = None
    has_entries = any(obj.sections[i].name == PATCHABLE_ENTRIES for i in placements)
    veneer_offset = _align(text_size, 16)
    text_size = veneer_offset + PLT_ENTRY_SIZE * len(targets)
    ftrace_plt_offset = None
    if has_entries and ftrace_target is not None:
        ftrace_plt_offset = _align(text_size, 16)
        text_size = ftrace_plt_offset + PLT_ENTRY_SIZE
    if text_size > MAX_AREA_SIZE or data_size > MAX_AREA_SIZE:
        raise ModuleNoSpace(f"module needs {text_size} bytes of text and {data_size} of data "
                            f"(at most {MAX_AREA_SIZE} each)", text_size=text_size, data_size=data_size)
    return Plan(obj, dict(externals), placements, tuple(targets), veneer_offset,
                ftrace_target if ftrace_plt_offset is not None else None, ftrace_plt_offset, text_size, data_size)


def _put_plt(buf: bytearray, offset: int, pc: int, target: int) -> None:
    try:
        words = insn.gen_plt_entry(pc, target)
    except InsnError as exc:  # ADRP reaches +-4 GiB: the kernel and its heap, not an arbitrary address
        raise RelocationOverflow(f"no PLT veneer at {pc:#x} can reach {target:#x}: {exc.message}", place=pc,
                                 value=target) from None
    struct.pack_into("<3I", buf, offset, *words)


def link(p: Plan, text_base: int, data_base: int) -> Linked:
    """Relocate the object for ``text_base``/``data_base`` into host images; guest memory is not touched."""
    obj = p.obj
    images = (bytearray(p.data_size), bytearray(p.text_size))
    bases = (data_base, text_base)
    addr: dict[int, int] = {}
    for index, pl in p.placements.items():
        s = obj.sections[index]
        addr[index] = bases[pl.in_text] + pl.offset
        if not s.nobits:
            images[pl.in_text][pl.offset : pl.offset + s.size] = s.data
    veneers: dict[int, int] = {}
    for i, target in enumerate(p.veneer_targets):
        off = p.veneer_offset + i * PLT_ENTRY_SIZE
        veneers[target] = text_base + off
        _put_plt(images[1], off, text_base + off, target)
    ftrace_plt = None
    if p.ftrace_plt_offset is not None and p.ftrace_target is not None:
        ftrace_plt = text_base + p.ftrace_plt_offset
        _put_plt(images[1], p.ftrace_plt_offset, ftrace_plt, p.ftrace_target)
    for rs in _loaded_relocs(obj, p.placements):
        _relocate_section(p, rs, addr, images, veneers)
    symbols = _symbols(obj, addr)
    sections: dict[str, int] = {}
    for index in p.placements:
        sections.setdefault(obj.sections[index].name, addr[index])
    entries = _patchable_entries(p, images[0], addr, text_base)
    return Linked(bytes(images[1]), bytes(images[0]), symbols, sections, veneers, ftrace_plt, entries)


def _relocate_section(p: Plan, rs: elf.RelocSection, addr: Mapping[int, int],
                      images: tuple[bytearray, bytearray], veneers: Mapping[int, int]) -> None:
    obj = p.obj
    target = obj.sections[rs.target]
    pl = p.placements[rs.target]
    for r in rs.relocs:
        kind = relocs.lookup(r.type)
        if kind is None:
            continue
        if target.nobits or r.offset + kind.width > target.size:
            raise ModuleFormatError(f"{kind.name} at offset {r.offset:#x} is outside section {target.name}",
                                    section=target.name, offset=r.offset)
        sym = obj.symbols[r.symbol]
        s_value = _symbol_value(obj, sym, p.externals, addr)
        if s_value is None:
            raise ModuleFormatError(f"{kind.name} in {target.name} refers to {sym.name or 'a section'} "
                                    f"that is not loaded", section=target.name, symbol=sym.name)
        place = addr[rs.target] + r.offset
        value = (s_value + r.addend) & _MASK64
        if r.type in relocs.BRANCH_TYPES and not insn.reachable_by_bl(place, value) and value in veneers:
            value = veneers[value]
        relocs.apply(kind, images[pl.in_text], pl.offset + r.offset, place, value, symbol=sym.name)


def _symbols(obj: elf.ObjectFile, addr: Mapping[int, int]) -> tuple[LinkedSymbol, ...]:
    """Named functions and objects defined in loaded sections (no mapping symbols, no .L labels)."""
    out = []
    for sym in obj.symbols[1:]:
        if sym.type not in (elf.STT_FUNC, elf.STT_OBJECT, elf.STT_NOTYPE) or sym.shndx not in addr:
            continue
        if not sym.name or sym.name.startswith(("$", ".L")):
            continue
        value = _symbol_value(obj, sym, {}, addr)
        if value is not None:
            out.append(LinkedSymbol(sym.name, value, sym.size, sym.type == elf.STT_FUNC,
                                    sym.bind == elf.STB_LOCAL))
    return tuple(out)


def _patchable_entries(p: Plan, data: bytearray, addr: Mapping[int, int], text_base: int) -> tuple[int, ...]:
    """The relocated records of every __patchable_function_entries section; each must lie in module text."""
    out: list[int] = []
    for index, pl in p.placements.items():
        s = p.obj.sections[index]
        if s.name != PATCHABLE_ENTRIES:
            continue
        if s.nobits or s.size % 8 or pl.in_text:
            raise ModuleFormatError(f"{PATCHABLE_ENTRIES} is not an array of 8-byte records")
        for (rec,) in struct.iter_unpack("<Q", data[pl.offset : pl.offset + s.size]):
            if not text_base <= rec < text_base + p.text_size or rec & 3:
                raise ModuleFormatError(f"patchable-entry record {rec:#x} is not in the module's text",
                                        record=rec)
            out.append(rec)
    return tuple(sorted(out))
