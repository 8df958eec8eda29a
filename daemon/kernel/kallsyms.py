"""kallsyms: symbol name <-> address, with Linux livepatch's ``sympos`` for duplicated local names."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from daemon.errors import AmbiguousSymbol, SymbolError


@dataclass(frozen=True)
class Symbol:
    name: str
    addr: int
    size: int
    is_func: bool
    sympos: int  # 1-based position among symbols of the same name, in address order (as klp's sympos)

    @property
    def end(self) -> int:
        return self.addr + self.size


class Kallsyms:
    """Symbol table with exact lookup by name (and sympos) and by address (``name+off/size``)."""

    def __init__(self, symbols: Iterable[tuple[str, int, int, bool]]) -> None:
        ordered = sorted(symbols, key=lambda s: (s[1], s[0]))
        by_name: dict[str, list[Symbol]] = {}
        self._sorted: list[Symbol] = []
        for name, addr, size, is_func in ordered:
            same = by_name.setdefault(name, [])
            sym = Symbol(name, addr, size, is_func, len(same) + 1)
            same.append(sym)
            self._sorted.append(sym)
        self._by_name = by_name
        self._sized = [s for s in self._sorted if s.size > 0]
        self._sized_addrs = [s.addr for s in self._sized]

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self._sorted)

    def all(self, name: str) -> list[Symbol]:
        return list(self._by_name.get(name, ()))

    def lookup(self, name: str, sympos: int = 0) -> Symbol:
        """The symbol ``name``; with duplicates, ``sympos`` (1-based) must say which, as klp_find_object_symbol."""
        found = self._by_name.get(name)
        if not found:
            raise SymbolError(f"unknown symbol {name!r}", symbol=name)
        if sympos == 0:
            if len(found) > 1:
                raise AmbiguousSymbol(
                    f"symbol {name!r} is defined {len(found)} times; give its position (sympos 1..{len(found)})",
                    symbol=name, count=len(found))
            return found[0]
        if not 1 <= sympos <= len(found):
            raise SymbolError(f"symbol {name!r} has no position {sympos} (it has {len(found)})", symbol=name,
                              sympos=sympos, count=len(found))
        return found[sympos - 1]

    def addr(self, name: str, sympos: int = 0) -> int:
        return self.lookup(name, sympos).addr

    def containing(self, addr: int) -> Symbol | None:
        """The sized symbol whose [addr, addr+size) holds ``addr`` (labels of size 0 are skipped)."""
        i = bisect.bisect_right(self._sized_addrs, addr) - 1
        if i >= 0 and addr < self._sized[i].end:
            return self._sized[i]
        return None

    def describe(self, addr: int) -> str:
        """``name+0xoff/0xsize`` like %pS, or the bare address."""
        sym = self.containing(addr)
        if sym is None:
            return f"{addr:#x}"
        return f"{sym.name}+{addr - sym.addr:#x}/{sym.size:#x}"
