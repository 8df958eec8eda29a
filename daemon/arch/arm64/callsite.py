"""arm64 ftrace call sites (CALL_OPS layout) and the compare-then-write edits that move them between states.

With ``-fpatchable-function-entry=4,2`` every traceable function starts like this (``addr`` is the entry of
``__patchable_function_entries``, 8-byte aligned; ``rec->ip`` is the word that becomes a BL)::

    addr+00  NOP   \\ 8-byte literal: the site's ftrace_ops pointer (CALL_OPS)
    addr+04  NOP   /
    addr+08  func: | Compiled | Disabled   | Enabled    |
                   | NOP      | MOV X9, LR | MOV X9, LR |    rec->ip - 4, written once (ftrace_init_nop)
    addr+12        | NOP      | NOP        | BL <tramp> |    rec->ip, toggled at run time

Each helper returns an :class:`InsnPatch` (expected old word, new word) rather than writing: the ftrace core
collects them into a batch that :mod:`daemon.arch.arm64.patching` validates and applies all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.arch.arm64 import insn
from daemon.errors import PatchMisaligned


@dataclass(frozen=True)
class InsnPatch:
    """Replace the word at ``addr`` with ``new``, provided it still holds ``old`` (compare-then-write)."""

    addr: int
    old: int
    new: int


@dataclass(frozen=True)
class DataPatch:
    """Store a 64-bit value (a CALL_OPS literal, or data that must change in the same batch as text)."""

    addr: int
    value: int


def ftrace_call_adjust(entry: int) -> int:
    """``rec->ip`` for a ``__patchable_function_entries`` entry (no BTI: entry + 12), as arm64 computes it."""
    if entry % 8:
        raise PatchMisaligned(f"misaligned patch-site {entry:#x}: the CALL_OPS literal must be 8-byte aligned",
                              address=entry)
    return entry + 12


def literal_addr(rec_ip: int) -> int:
    """Where the site's ops pointer lives: ALIGN_DOWN(rec->ip - 12, 8)."""
    return (rec_ip - 12) & ~7


def func_addr(rec_ip: int) -> int:
    """The function symbol's address for a record (arch_ftrace_get_symaddr without BTI)."""
    return rec_ip - 4


def can_call_directly(rec_ip: int, tramp: int) -> bool:
    """A direct call's site may branch straight to its trampoline (else it calls ftrace_caller, which jumps there):
    only when the trampoline is within BL range (+-128 MiB) of the site."""
    return insn.reachable_by_bl(rec_ip, tramp)


def find_callable_addr(rec_ip: int, target: int, *, caller: int, plt: int) -> int | None:
    """ftrace_find_callable_addr: what the site's BL must branch to for ``target``, or None if nothing reaches.

    ``target`` itself when in BL range (+-128 MiB); for a module site calling ``ftrace_caller`` (``caller``) from
    out of range, the module's ftrace PLT (``plt``, 0 if it has none), which branches there.
    """
    if insn.reachable_by_bl(rec_ip, target):
        return target
    if target == caller and plt and insn.reachable_by_bl(rec_ip, plt):
        return plt
    return None


def init_nop(rec_ip: int) -> InsnPatch:
    """Compiled -> disabled: the first entry NOP becomes ``mov x9, x30`` for the life of the kernel."""
    return InsnPatch(rec_ip - 4, insn.NOP, insn.MOV_X9_LR)


def make_call(rec_ip: int, target: int) -> InsnPatch:
    """Disabled -> enabled: NOP becomes ``BL target`` (raises BranchOutOfRange if it cannot reach)."""
    return InsnPatch(rec_ip, insn.NOP, insn.gen_branch(rec_ip, target, link=True))


def make_nop(rec_ip: int, old_target: int) -> InsnPatch:
    """Enabled -> disabled: ``BL old_target`` becomes NOP."""
    return InsnPatch(rec_ip, insn.gen_branch(rec_ip, old_target, link=True), insn.NOP)


def modify_call(rec_ip: int, old_target: int, new_target: int) -> InsnPatch:
    """Enabled -> enabled elsewhere: ``BL old`` becomes ``BL new``."""
    return InsnPatch(rec_ip, insn.gen_branch(rec_ip, old_target, link=True),
                     insn.gen_branch(rec_ip, new_target, link=True))
