"""The consistency model's per-task half (kernel/livepatch/transition.c): who may switch, and the stall policy.

A task may switch to the target state when no frame of its stack lies in a function this transition
changes (klp_check_stack). The check runs inside a stop-machine pause, where every CPU is parked at a safe
point: every stack, the running tasks' included, is still and complete (what task_call_func guarantees in
Linux). Return addresses are tested at the call (pc - 4), so a call that ends its caller — a noreturn call —
still counts against the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.kernel.structs import StructRef
from daemon.kernel.unwind import StackTrace
from daemon.livepatch.klp import KlpFunc, KlpOps, KlpPatch

PATCHED = abi.KLP_TRANSITION_PATCHED
UNPATCHED = abi.KLP_TRANSITION_UNPATCHED
IDLE = abi.KLP_TRANSITION_IDLE
STATE_NAMES = {PATCHED: "patched", UNPATCHED: "unpatched", IDLE: "idle"}


class GiveUp(Enum):
    WAIT = "wait"  # keep retrying for ever (Linux)
    REVERT = "revert"  # reverse the transition (kpatch's default after its timeout)
    FORCE = "force"  # mark the remaining tasks switched (breaks consistency; the patch becomes unloadable)


@dataclass(frozen=True)
class StallPolicy:
    """When a transition stalls: retry, poke the stragglers with fake signals, then give up (or not).

    Linux retries every second and signals every 15 retries; kpatch waits, signals, waits, then reverts.
    """

    retry_interval: float = 0.05
    signal_after: float | None = 1.0
    signal_every: float = 1.0
    give_up_after: float | None = None
    give_up: GiveUp = GiveUp.WAIT


@dataclass
class Transition:
    patch: KlpPatch
    target: int
    started: float
    signals_sent: int = 0
    last_signal: float = 0.0
    attempts: int = 0
    blocked: dict[int, str] = field(default_factory=dict)  # pid -> why it has not switched (last attempt)
    stall_reported: bool = False  # transition_stalled told for this direction (reset by a reversal)


def check_ranges(patch: KlpPatch, target: int, ops: dict[int, KlpOps]) -> list[tuple[int, int, str]]:
    """The [begin, end) ranges a switching task must not be in (klp_check_stack_func)."""
    return check_ranges_of(patch.funcs(), target, ops)


def check_ranges_of(funcs: list[KlpFunc], target: int, ops: dict[int, KlpOps]) -> list[tuple[int, int, str]]:
    """:func:`check_ranges` of these funcs (a patch's, or the ones it would have once enabled: see
    :mod:`daemon.livepatch.precheck`). A func not on its stack yet checks what its stack's top runs now."""
    out = []
    for func in funcs:
        if target == UNPATCHED:
            out.append((func.new_addr, func.new_addr + func.new_size, func.new_name))
            continue
        below = _below(func, ops)
        if below is None:
            out.append((func.old_addr, func.old_addr + func.old_size, func.old_name))
        else:
            out.append((below.new_addr, below.new_addr + below.new_size, below.new_name))
    return out


def _below(func: KlpFunc, ops: dict[int, KlpOps]) -> KlpFunc | None:
    stack = ops[func.old_addr].stack if func.old_addr in ops else []
    if func in stack:
        i = stack.index(func)
        return stack[i + 1] if i + 1 < len(stack) else None
    return stack[0] if stack else None


def blocking_frame(kernel: Kernel, task: StructRef, ranges: list[tuple[int, int, str]]) -> str | None:
    """Why ``task`` may not switch now, or None. Call only while every vCPU is parked."""
    return blocking_reason(kernel.stack_of(task), ranges)


def blocking_reason(trace: StackTrace, ranges: list[tuple[int, int, str]]) -> str | None:
    """Why a task with stack ``trace`` may not switch, or None (klp_check_stack): the wording the transition
    reports (``Transition.blocked``), which patch.check predicts with the same function."""
    if not trace.reliable:
        return f"unreliable stack: {trace.reason}"
    name = blocking_function(trace, ranges)
    return None if name is None else f"sleeping on function {name}"


def blocking_function(trace: StackTrace, ranges: list[tuple[int, int, str]]) -> str | None:
    """The innermost function of ``ranges`` on the stack, or None."""
    for i, pc in enumerate(trace.pcs):
        at = pc if i == 0 else pc - 4
        for begin, end, name in ranges:
            if begin <= at < end:
                return name
    return None
