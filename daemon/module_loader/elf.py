"""A strict reader for AArch64 relocatable objects (ELF64, little-endian, ET_REL): sections, symbols, RELA.

Only what the module loader needs is read, and every offset, size and index is checked against the file
before use, so any malformed input (truncated, garbage, a hostile header) ends in
:class:`~daemon.errors.ModuleFormatError` and nothing else. A general-purpose reader raises a dozen exception
types on garbage; this one is small enough to check by fuzzing.

================  =======  ===============================================================================
structure         size     fields read (``<`` little-endian)
================  =======  ===============================================================================
ELF header        64       e_ident[16], e_type, e_machine, e_version, ..., e_shoff, ..., e_shentsize,
                           e_shnum, e_shstrndx
section header    64       sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
                           sh_addralign, sh_entsize
symbol            24       st_name, st_info (bind << 4 | type), st_other, st_shndx, st_value, st_size
RELA entry        24       r_offset, r_info (symbol << 32 | type), r_addend (signed)
================  =======  ===============================================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.errors import ModuleFormatError

EM_AARCH64 = 183
ET_REL = 1

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 0, 1, 2, 3, 4, 8, 9
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4

SHN_UNDEF, SHN_LORESERVE, SHN_ABS, SHN_COMMON, SHN_XINDEX = 0, 0xFF00, 0xFFF1, 0xFFF2, 0xFFFF
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    size: int
    align: int  # 1 when the header says 0
    link: int
    info: int
    data: bytes  # empty for SHT_NOBITS
    entsize: int = 0  # sh_entsize: the size of one entry in a table section (RELA, symtab)

    @property
    def alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def nobits(self) -> bool:
        return self.type == SHT_NOBITS


@dataclass(frozen=True)
class Symbol:
    index: int
    name: str
    bind: int
    type: int
    shndx: int  # a section index, or SHN_UNDEF / SHN_ABS / SHN_COMMON
    value: int
    size: int

    @property
    def undefined(self) -> bool:
        return self.shndx == SHN_UNDEF


@dataclass(frozen=True)
class Reloc:
    offset: int
    type: int
    symbol: int  # index into ObjectFile.symbols
    addend: int


@dataclass(frozen=True)
class RelocSection:
    name: str
    target: int  # index of the section the entries patch
    relocs: tuple[Reloc, ...]


@dataclass(frozen=True)
class ObjectFile:
    """A parsed relocatable object: every section (by index), the symbol table and each RELA section."""

    sections: tuple[Section, ...]
    symbols: tuple[Symbol, ...]  # index 0 is the null symbol
    relocations: tuple[RelocSection, ...]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


def _bad(message: str, **details: object) -> ModuleFormatError:
    return ModuleFormatError(f"malformed module object: {message}", **details)


def _cstr(table: bytes, offset: int, what: str) -> str:
    end = table.find(b"\0", offset) if 0 <= offset < len(table) else -1
    if end < 0:
        raise _bad(f"{what} name offset {offset} is outside its string table", offset=offset)
    try:
        return table[offset:end].decode("ascii")
    except UnicodeDecodeError:
        raise _bad(f"{what} name at offset {offset} is not ASCII", offset=offset) from None


def _check_header(raw: bytes) -> tuple[int, int, int]:
    """(e_shoff, e_shnum, e_shstrndx) after checking identity and machine."""
    if len(raw) < _EHDR.size:
        raise _bad(f"{len(raw)} bytes is shorter than an ELF header", size=len(raw))
    ident, e_type, machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize, _phnum, shentsize, \
        shnum, shstrndx = _EHDR.unpack_from(raw)
    if ident[:4] != b"\x7fELF":
        raise _bad("no ELF magic")
    if ident[4] != 2 or ident[5] != 1:
        raise ModuleFormatError("module object is not ELF64 little-endian", ei_class=ident[4], ei_data=ident[5])
    if machine != EM_AARCH64:
        raise ModuleFormatError(f"module object is for machine {machine}, not AArch64 ({EM_AARCH64})",
                                machine=machine)
    if e_type != ET_REL:
        raise ModuleFormatError(f"module object has ELF type {e_type}, not ET_REL (relocatable)", e_type=e_type)
    if shentsize != _SHDR.size or shnum == 0 or shstrndx in (SHN_UNDEF, SHN_XINDEX) or shstrndx >= shnum:
        raise _bad("section header table is missing or uses extended numbering", shnum=shnum,
                   shentsize=shentsize, shstrndx=shstrndx)
    if shoff + shnum * _SHDR.size > len(raw):
        raise _bad("section header table runs past the end of the file", shoff=shoff, shnum=shnum)
    return shoff, shnum, shstrndx


def parse(raw: bytes) -> ObjectFile:
    """Parse and check ``raw``; raises ModuleFormatError on anything the loader could not trust."""
    shoff, shnum, shstrndx = _check_header(raw)
    headers = [_SHDR.unpack_from(raw, shoff + i * _SHDR.size) for i in range(shnum)]
    contents: list[bytes] = []
    for i, (_name, sh_type, _flags, _addr, offset, size, _link, _info, align, _entsize) in enumerate(headers):
        if align & (align - 1):
            raise _bad(f"section {i} alignment {align} is not a power of two", section=i)
        if sh_type in (SHT_NULL, SHT_NOBITS):
            contents.append(b"")
        elif offset + size > len(raw):
            raise _bad(f"section {i} ({size} bytes at {offset}) runs past the end of the file", section=i)
        else:
            contents.append(raw[offset : offset + size])
    if headers[shstrndx][1] != SHT_STRTAB:
        raise _bad("section name table is not a string table", index=shstrndx)
    names = contents[shstrndx]
    sections = tuple(
        Section(i, _cstr(names, h[0], "section"), h[1], h[2], h[5], max(h[8], 1), h[6], h[7], contents[i], h[9])
        for i, h in enumerate(headers))
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if len(symtabs) > 1:
        raise _bad("more than one symbol table")
    symbols = _symbols(sections, symtabs[0]) if symtabs else ()
    relocations = []
    for s in sections:
        if s.type == SHT_REL and _target(sections, s).alloc:
            raise ModuleFormatError(f"section {s.name} uses REL entries; AArch64 objects use RELA",
                                    section=s.name)
        if s.type == SHT_RELA:
            relocations.append(_relocs(sections, s, symtabs[0] if symtabs else None, len(symbols)))
    return ObjectFile(sections, symbols, tuple(relocations))


def _target(sections: tuple[Section, ...], rel: Section) -> Section:
    if not 0 < rel.info < len(sections):
        raise _bad(f"relocation section {rel.name} patches section {rel.info}, which does not exist",
                   section=rel.name)
    return sections[rel.info]


def _check_entsize(table: Section, expected: int, what: str) -> None:
    # A table's entries are read at sh_entsize strides in the kernel (and in readelf); one whose header names
    # another size is not the layout this reader decodes, so it is refused rather than read at our stride.
    if table.entsize != expected:
        raise _bad(f"{what} {table.name} has entry size {table.entsize}, expected {expected}",
                   section=table.name, entsize=table.entsize, expected=expected)


def _symbols(sections: tuple[Section, ...], symtab: Section) -> tuple[Symbol, ...]:
    _check_entsize(symtab, _SYM.size, "symbol table")
    if symtab.size % _SYM.size or not 0 < symtab.link < len(sections) or \
            sections[symtab.link].type != SHT_STRTAB:
        raise _bad("symbol table has a bad size or string table link")
    strings = sections[symtab.link].data
    out = []
    for i in range(symtab.size // _SYM.size):
        name, info, _other, shndx, value, size = _SYM.unpack_from(symtab.data, i * _SYM.size)
        if shndx == SHN_XINDEX or (shndx < SHN_LORESERVE and shndx >= len(sections)):
            raise _bad(f"symbol {i} is in section {shndx}, which does not exist", symbol=i, shndx=shndx)
        if shndx >= SHN_LORESERVE and shndx not in (SHN_ABS, SHN_COMMON):
            raise _bad(f"symbol {i} has reserved section index {shndx:#x}", symbol=i, shndx=shndx)
        out.append(Symbol(i, _cstr(strings, name, "symbol"), info >> 4, info & 0xF, shndx, value, size))
    return tuple(out)


def _relocs(sections: tuple[Section, ...], rela: Section, symtab: Section | None, nsyms: int) -> RelocSection:
    target = _target(sections, rela)
    if symtab is None or rela.link != symtab.index:
        raise _bad(f"relocation section {rela.name} is not linked to the symbol table", section=rela.name)
    _check_entsize(rela, _RELA.size, "relocation section")
    if rela.size % _RELA.size:
        raise _bad(f"relocation section {rela.name} size {rela.size} is not a multiple of {_RELA.size}",
                   section=rela.name)
    relocs = []
    for offset, info, addend in _RELA.iter_unpack(rela.data):
        if info >> 32 >= nsyms:
            raise _bad(f"a relocation in {rela.name} names symbol {info >> 32}, which does not exist",
                       section=rela.name)
        relocs.append(Reloc(offset, info & 0xFFFF_FFFF, info >> 32, addend))
    return RelocSection(rela.name, target.index, tuple(relocs))
