"""Host-side livepatch objects (include/linux/livepatch.h): patches, objects, funcs and per-function ops.

The guest sees only what ``klp_ftrace_handler`` reads (abi.klp_ops, abi.klp_func); everything else — names,
sizes, callbacks, states, the enabled/forced bits — lives here.

A function's state pairs, as in Linux: (patched, transition) = (0, 0) unpatched -> (0, 1) while its entry is
being added -> (1, 1) visible to switched tasks -> (1, 0) patched for all. Unpatching walks them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.ftrace import FtraceOps
from daemon.module_loader import LoadedModule
from patchformat.manifest import Manifest


@dataclass(eq=False)
class KlpFunc:
    old_name: str
    old_sympos: int
    old_addr: int
    old_size: int
    new_name: str
    new_addr: int
    new_size: int
    nop: bool = False  # atomic replace: this patch drops the function, calls go to the original
    guest: int = 0  # its struct klp_func while on a func_stack
    patched: bool = False
    transition: bool = False

    @property
    def sysfs_name(self) -> str:
        return f"{self.old_name},{max(self.old_sympos, 1)}"


@dataclass(eq=False)
class KlpObject:
    name: str  # "vmlinux"
    funcs: list[KlpFunc]
    callbacks: dict[str, int] = field(default_factory=dict)  # pre_patch/post_patch/... -> guest address
    patched: bool = False
    post_unpatch_enabled: bool = False


@dataclass(eq=False)
class KlpPatch:
    name: str
    manifest: Manifest
    module: LoadedModule
    objects: list[KlpObject]
    replace: bool
    states: dict[int, int]  # klp_state id -> version
    enabled: bool = False
    forced: bool = False
    replaced: bool = False  # an atomic-replace patch took over: it may be unloaded without disabling

    def funcs(self) -> list[KlpFunc]:
        return [f for o in self.objects for f in o.funcs]


@dataclass(eq=False)
class KlpOps:
    """struct klp_ops: one per patched old function, shared by every patch that replaces it."""

    old_addr: int
    old_name: str
    ftrace_ops: FtraceOps
    guest: int  # struct klp_ops (func_stack pointer, old_func)
    stack: list[KlpFunc] = field(default_factory=list)  # func_stack, newest first
