"""A reliable frame-pointer unwinder over guest memory (arm64's unwind_next with the reliability rules).

An AArch64 frame record is two words at x29: ``{previous x29, return address}``. Every task stack ends in a
*final frame record* ``{0, 0}`` in its top 16 bytes (written at task creation), so a walk that reaches it has
seen the whole stack. The walk is *reliable* only if it gets there with every record inside the task stack,
16-byte aligned, strictly above the previous one, and every return address in kernel or module text —
the rules livepatch's consistency model needs before trusting that a function is not on a stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daemon.emu.memory import Memory

MAX_DEPTH = 256


@dataclass(frozen=True)
class StackTrace:
    pcs: tuple[int, ...]  # innermost first; pcs[0] is where the task stopped, the rest are return addresses
    reliable: bool
    reason: str  # why the walk is unreliable ("" when reliable)


def unwind(mem: Memory, *, pc: int, fp: int, stack_lo: int, stack_hi: int,
           is_text: Callable[[int], bool]) -> StackTrace:
    """Walk the frame records of one task from (pc, fp)."""
    pcs = [pc]
    if not is_text(pc):
        return StackTrace(tuple(pcs), False, f"pc {pc:#x} is not in kernel text")
    final = stack_hi - 16
    prev = stack_lo - 1
    while len(pcs) <= MAX_DEPTH:
        if fp == final:
            if mem.read_u64(fp) == 0 and mem.read_u64(fp + 8) == 0:
                return StackTrace(tuple(pcs), True, "")
            return StackTrace(tuple(pcs), False, "final frame record is corrupt")
        if fp & 0xF:
            return StackTrace(tuple(pcs), False, f"misaligned frame pointer {fp:#x}")
        if not stack_lo <= fp < final:
            return StackTrace(tuple(pcs), False, f"frame pointer {fp:#x} outside the task stack")
        if fp <= prev:
            return StackTrace(tuple(pcs), False, f"frame pointer {fp:#x} does not move up the stack")
        prev = fp
        fp, ret = mem.read_u64(fp), mem.read_u64(fp + 8)
        if not is_text(ret):
            return StackTrace(tuple(pcs), False, f"return address {ret:#x} is not in kernel text")
        pcs.append(ret)
    return StackTrace(tuple(pcs), False, f"stack deeper than {MAX_DEPTH} frames")
