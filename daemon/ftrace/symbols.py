"""Which symbol holds an address, in kernel text or in a loaded module: kallsyms_lookup_size_offset for ftrace.

A caller that must know whether an address starts a function asks for the offset (``offset == 0 and is_func``)
instead of parsing a ``%pS`` string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SymbolAt:
    """The symbol holding an address: ``start`` its first byte, ``offset`` the address's distance from it."""

    name: str
    start: int
    size: int
    offset: int
    is_func: bool
    module: str = ""  # "" for the kernel image

    @property
    def is_function_start(self) -> bool:
        return self.is_func and self.offset == 0

    def describe(self) -> str:
        """%pS: ``name+0xoff/0xsize``, with `` [module]`` for module text."""
        text = f"{self.name}+{self.offset:#x}/{self.size:#x}"
        return f"{text} [{self.module}]" if self.module else text


SymbolLookup = Callable[[int], SymbolAt | None]
"""A source of symbols (a loaded module's): the symbol holding an address, or None if it holds none there."""
