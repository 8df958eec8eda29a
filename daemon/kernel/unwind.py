"""A reliable frame-pointer unwinder over guest memory (arm64's unwind_next with the reliability rules).

An AArch64 frame record is two words at x29: ``{previous x29, return address}``. Every task stack ends in a
*final frame record* ``{0, 0}`` in its top 16 bytes (written at task creation), so a walk that reaches it has
seen the whole stack. The walk is *reliable* only if it gets there with every record inside the task stack,
16-byte aligned, strictly above the previous one, and every return address in kernel or module text —
the rules livepatch's consistency model needs before trusting that a function is not on a stack.

A function hooked by the function_graph tracer returns to ``return_to_handler``: that is the address its frame
record holds while it runs. The unwinder translates it back through the task's return stack (arm64's
``ftrace_graph_ret_addr``): hooked frames appear on the stack in the order they were pushed, so the walk takes
entries from the top down, and each entry's saved frame pointer must be the frame record's next x29.
Otherwise the hooked function's caller would vanish from the trace, and a livepatch transition could switch
a task that is still inside a function being patched. A hooked return that cannot be translated makes the
walk unreliable.

A kretprobe hijacks a return the same way, to one of its trampolines (``retprobe_hooks``); the task's instances
(newest last, as (real return address, caller's frame pointer)) translate it as Linux's kretprobe_find_ret_addr
does. Both can stack on one frame: a graph-hooked return whose saved address is a trampoline.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from daemon.emu.memory import Memory

MAX_DEPTH = 256


@dataclass(frozen=True)
class StackTrace:
    pcs: tuple[int, ...]  # innermost first; pcs[0] is where the task stopped, the rest are return addresses
    reliable: bool
    reason: str  # why the walk is unreliable ("" when reliable)


def unwind(mem: Memory, *, pc: int, fp: int, stack_lo: int, stack_hi: int,
           is_text: Callable[[int], bool], return_hook: int = 0,
           ret_stack: Sequence[tuple[int, int]] = (), retprobe_hooks: Collection[int] = (),
           retprobe_instances: Sequence[tuple[int, int]] = ()) -> StackTrace:
    """Walk the frame records of one task from (pc, fp).

    ``ret_stack`` is the task's function_graph return stack, bottom first, as (original return address,
    caller's frame pointer); a return address equal to ``return_hook`` is replaced by its entry.
    ``retprobe_instances`` (bottom first, the same shape) replace a return address in ``retprobe_hooks``.
    """
    pcs = [pc]
    graph = len(ret_stack)  # entries not yet matched to a frame, from the top
    hijacked = len(retprobe_instances)
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
        if return_hook and ret == return_hook:
            if not graph:
                return StackTrace(tuple(pcs), False, "hooked return with no return-stack entry left")
            graph -= 1
            ret, saved_fp = ret_stack[graph]
            if saved_fp != fp:
                return StackTrace(tuple(pcs), False,
                                  f"hooked return's frame pointer {saved_fp:#x} is not the frame's {fp:#x}")
        while ret in retprobe_hooks:  # two kretprobes on one function: the first's saved address is a trampoline
            if not hijacked:
                return StackTrace(tuple(pcs), False, "kretprobe trampoline with no instance left")
            hijacked -= 1
            ret, saved_fp = retprobe_instances[hijacked]
            if saved_fp != fp:
                return StackTrace(tuple(pcs), False,
                                  f"kretprobe instance's frame pointer {saved_fp:#x} is not the frame's {fp:#x}")
        if not is_text(ret):
            return StackTrace(tuple(pcs), False, f"return address {ret:#x} is not in kernel text")
        pcs.append(ret)
    return StackTrace(tuple(pcs), False, f"stack deeper than {MAX_DEPTH} frames")
