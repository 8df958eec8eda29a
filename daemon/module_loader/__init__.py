"""The kernel's module loader: relocatable AArch64 ELF objects into the module area, and out again.

It knows ELF, symbols and the module area; nothing of ftrace or livepatch (livepatch loads its patch objects
through it, and hands their patchable entries to ftrace itself). The AArch64 relocations it applies are in
:mod:`daemon.arch.arm64.relocs`.

- :mod:`daemon.module_loader.elf`: parse and check an ``ET_REL`` object;
- :mod:`daemon.module_loader.link`: bind symbols, lay sections out, relocate into host buffers;
- :mod:`daemon.module_loader.loader`: allocate, write, publish and unload modules in a running kernel.
"""

from daemon.module_loader.loader import MODULE_NAME_LEN, PAGE_SIZE, LoadedModule, ModuleLoader, ModuleSymbol

__all__ = ["MODULE_NAME_LEN", "PAGE_SIZE", "LoadedModule", "ModuleLoader", "ModuleSymbol"]
