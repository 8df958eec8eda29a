"""The kernel image: an AArch64 ELF executable with its symbols, build id and patchable-entry table."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from daemon.errors import ImageError

_SYMBOL_TYPES = ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")


@dataclass(frozen=True)
class Section:
    name: str
    addr: int
    size: int
    data: bytes  # empty for NOBITS (.bss)
    flags: int


@dataclass(frozen=True)
class ElfSymbol:
    name: str
    addr: int
    size: int
    kind: str  # "func" or "object"
    local: bool


@dataclass(frozen=True)
class KernelImage:
    """What the host needs from vmlinux: load layout, symbols, build id and mcount_loc entries."""

    path: Path
    sections: dict[str, Section]
    symbols: list[ElfSymbol]
    build_id: str
    entry: int

    @classmethod
    def load(cls, path: Path) -> KernelImage:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read kernel image {path}: {exc.strerror}", path=str(path)) from exc
        try:
            elf = ELFFile(io.BytesIO(raw))
            if elf["e_machine"] != "EM_AARCH64" or elf.elfclass != 64 or elf["e_type"] != "ET_EXEC":
                raise ImageError(f"{path} is not an AArch64 executable", path=str(path))
            sections = {
                s.name: Section(s.name, s["sh_addr"], s["sh_size"],
                                b"" if s["sh_type"] == "SHT_NOBITS" else s.data(), s["sh_flags"])
                for s in elf.iter_sections()
                if s["sh_flags"] & 2  # SHF_ALLOC
            }
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise ImageError(f"{path} has no symbol table", path=str(path))
            symbols = [
                ElfSymbol(s.name, s["st_value"], s["st_size"],
                          "func" if s["st_info"]["type"] == "STT_FUNC" else "object",
                          s["st_info"]["bind"] == "STB_LOCAL")
                for s in symtab.iter_symbols()
                if s.name and s["st_info"]["type"] in _SYMBOL_TYPES and s["st_shndx"] != "SHN_UNDEF"
            ]
            build_id = ""
            notes = elf.get_section_by_name(".notes")
            if isinstance(notes, NoteSection):
                for note in notes.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        build_id = note["n_desc"]
            entry = elf["e_entry"]
        except ELFError as exc:
            raise ImageError(f"{path} is not a valid ELF file: {exc}", path=str(path)) from exc
        return cls(path, sections, symbols, build_id, entry)

    def section(self, name: str) -> Section:
        try:
            return self.sections[name]
        except KeyError:
            raise ImageError(f"kernel image has no {name} section", section=name) from None

    def mcount_loc(self) -> list[int]:
        """Entries of __patchable_function_entries: the first pre-function NOP of each traceable function."""
        data = self.section("__mcount_loc").data
        return list(struct.unpack(f"<{len(data) // 8}Q", data))

    def callable_funcs(self) -> list[int]:
        """Entries of _callable_funcs: the functions marked CALLABLE() in the guest, which the call verbs may run
        by default (an image without the table marks none)."""
        section = self.sections.get("_callable_funcs")
        data = section.data if section is not None else b""
        return list(struct.unpack(f"<{len(data) // 8}Q", data))
