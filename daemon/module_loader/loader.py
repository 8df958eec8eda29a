"""The module loader: relocatable AArch64 objects into the kernel's module area, and out again.

Load, in order; anything refused before step 4 leaves guest memory and both allocators as they were:

1. parse and check the ELF (:mod:`daemon.module_loader.elf`);
2. bind undefined symbols against kallsyms, lay sections out, count PLT veneers (:mod:`daemon.module_loader.link`);
3. allocate page blocks of module text and module data, relocate into host buffers (freed again on error);
4. write the images, then drop every vCPU's translations of the text block in a stop-machine: the block may
   have held another module's code that some engine still has translated;
5. publish the :class:`LoadedModule`.

Unload poisons the text with ``BRK #0x800`` (BUG: a stray call into a freed module traps instead of running
stale code), zeroes the data, invalidates the text block and frees both blocks. Whether anything may still run
the module's code is its user's business (livepatch frees a patch module only after its transition).
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from daemon.arch.arm64 import insn
from daemon.errors import (
    AmbiguousSymbol,
    GuestError,
    ModuleError,
    ModuleExists,
    ModuleNoSpace,
    ModuleNotLoaded,
    SymbolError,
)
from daemon.kernel.heap import GuestAllocator
from daemon.kernel.kernel import Kernel
from daemon.module_loader import elf, link

PAGE_SIZE = link.PAGE_SIZE
MODULE_NAME_LEN = 56  # Linux's MODULE_NAME_LEN, terminator included
_POISON = struct.pack("<I", insn.gen_brk(0x800))  # BUG_BRK_IMM
_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MODULE_NAME_LEN - 1}}}")


@dataclass(frozen=True)
class ModuleSymbol:
    name: str
    addr: int
    size: int
    is_func: bool
    local: bool

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True, eq=False)
class LoadedModule:
    """A module in guest memory: its blocks, symbols, PLT veneers and patchable-entry records."""

    name: str
    text: tuple[int, int]  # guest [begin, end) of its text block (page aligned; code, then veneers)
    data: tuple[int, int] | None  # guest [begin, end) of its data block, None if it has no data
    all_symbols: tuple[ModuleSymbol, ...]
    sections: Mapping[str, int]  # loaded section name -> guest address (the first, if several share a name)
    veneers: Mapping[int, int]  # branch target -> its PLT veneer
    ftrace_plt: int | None  # PLT to ftrace_caller, for call sites that cannot BL the kernel's trampoline
    patchable_entries: tuple[int, ...]  # like mcount_loc: the first pre-function NOP of each traceable function
    load_ns: int  # object bytes -> ready, as measured by load()

    def symbol(self, name: str) -> ModuleSymbol:
        found = [s for s in self.all_symbols if s.name == name]
        if not found:
            raise SymbolError(f"module {self.name} defines no symbol {name!r}", symbol=name, module=self.name)
        if len(found) > 1:
            raise AmbiguousSymbol(f"module {self.name} defines {name!r} {len(found)} times", symbol=name,
                                  module=self.name, count=len(found))
        return found[0]

    def addr(self, name: str) -> int:
        return self.symbol(name).addr

    @property
    def symbols(self) -> dict[str, int]:
        """Name -> address of every symbol defined exactly once."""
        counts = Counter(s.name for s in self.all_symbols)
        return {s.name: s.addr for s in self.all_symbols if counts[s.name] == 1}

    def contains(self, addr: int) -> bool:
        inside = self.text[0] <= addr < self.text[1]
        return inside or (self.data is not None and self.data[0] <= addr < self.data[1])

    def containing(self, addr: int) -> ModuleSymbol | None:
        return next((s for s in self.all_symbols if s.addr <= addr < s.end), None)

    def describe(self, addr: int) -> str:
        """``name+0xoff/0xsize [module]`` like %pS, or the bare address."""
        sym = self.containing(addr)
        if sym is None:
            return f"{addr:#x}"
        return f"{sym.name}+{addr - sym.addr:#x}/{sym.size:#x} [{self.name}]"


def _pages(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


class ModuleLoader:
    """Loads and unloads modules on one kernel. Use one per kernel: module names are unique per loader."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._lock = threading.Lock()
        self._modules: dict[str, LoadedModule] = {}
        ftrace = kernel.kallsyms.all("ftrace_caller")
        self._ftrace_caller = ftrace[0].addr if len(ftrace) == 1 else None

    @property
    def modules(self) -> Mapping[str, LoadedModule]:
        with self._lock:
            return dict(self._modules)

    def module_at(self, addr: int) -> LoadedModule | None:
        """The loaded module whose text or data holds ``addr``."""
        with self._lock:
            return next((m for m in self._modules.values() if m.contains(addr)), None)

    def load(self, name: str, obj: bytes) -> LoadedModule:
        """Load the relocatable object ``obj`` as module ``name``; all-or-nothing."""
        t0 = time.perf_counter_ns()
        if not _NAME.fullmatch(name):
            raise ModuleError(f"bad module name {name!r}: 1..{MODULE_NAME_LEN - 1} letters, digits, _ or -",
                              module=name)
        parsed = elf.parse(obj)
        externals = link.resolve(parsed, self.kernel.kallsyms)
        plan = link.plan(parsed, externals, ftrace_target=self._ftrace_caller)
        with self._lock:
            if name in self._modules:
                raise ModuleExists(f"module {name} is already loaded", module=name)
            text = self._alloc(self.kernel.module_text_alloc, max(plan.text_size, 1), name)
            data = None
            try:
                if plan.data_size:
                    data = self._alloc(self.kernel.module_data_alloc, plan.data_size, name)
                linked = link.link(plan, text[0], data[0] if data else 0)
            except BaseException:
                self._free(text, data)  # nothing was written yet
                raise
            try:
                self._write(text, linked.text, data, linked.data)
            except BaseException:
                self._release(text, data)
                raise
            module = LoadedModule(
                name, text, data,
                tuple(ModuleSymbol(s.name, s.addr, s.size, s.is_func, s.local) for s in linked.symbols),
                linked.sections, linked.veneers, linked.ftrace_plt, linked.patchable_entries,
                time.perf_counter_ns() - t0)
            self._modules[name] = module
        return module

    def unload(self, module: LoadedModule | str) -> None:
        """Unload a module (by object or name); its blocks return to the allocators."""
        name = module if isinstance(module, str) else module.name
        with self._lock:
            found = self._modules.get(name)
            if found is None or (not isinstance(module, str) and found is not module):
                raise ModuleNotLoaded(f"module {name} is not loaded", module=name)
            del self._modules[name]
            self._release(found.text, found.data)

    # -- guest memory ----------------------------------------------------------------------------------------

    def _alloc(self, allocator: GuestAllocator, size: int, name: str) -> tuple[int, int]:
        size = _pages(size)
        try:
            base = allocator.alloc(size)
        except GuestError:
            raise ModuleNoSpace(f"{allocator.name} cannot hold module {name} ({size} bytes; "
                                f"{allocator.free_bytes} free)", module=name, requested=size) from None
        if base % PAGE_SIZE:  # page-multiple blocks from a page-aligned range stay aligned; check, don't trust
            allocator.free(base, size)
            raise ModuleNoSpace(f"{allocator.name} returned an unaligned block {base:#x}", module=name)
        return base, base + size

    def _write(self, text: tuple[int, int], text_image: bytes, data: tuple[int, int] | None,
               data_image: bytes) -> None:
        memory = self.kernel.memory
        pad = text[1] - text[0] - len(text_image)
        memory.write(text[0], text_image + bytes(pad % 4) + _POISON * (pad // 4))
        if data is not None:
            memory.write(data[0], data_image.ljust(data[1] - data[0], b"\0"))
        self.kernel.stop_machine(lambda: None, invalidate=[text])

    def _release(self, text: tuple[int, int], data: tuple[int, int] | None) -> None:
        """Poison and free the blocks (the text block is invalidated, so nothing runs its old code)."""
        memory = self.kernel.memory
        memory.write(text[0], _POISON * ((text[1] - text[0]) // 4))
        if data is not None:
            memory.write(data[0], bytes(data[1] - data[0]))
        try:
            self.kernel.stop_machine(lambda: None, invalidate=[text])
        finally:
            self._free(text, data)

    def _free(self, text: tuple[int, int], data: tuple[int, int] | None) -> None:
        self.kernel.module_text_alloc.free(text[0], text[1] - text[0])
        if data is not None:
            self.kernel.module_data_alloc.free(data[0], data[1] - data[0])
