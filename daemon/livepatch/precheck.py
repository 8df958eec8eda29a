"""Stall prediction: which tasks would hold up the patching transition of a loaded patch if it were enabled now.

:func:`predict` runs the transition's own stack check (:func:`~daemon.livepatch.transition.check_ranges_of` and
:func:`~daemon.livepatch.transition.blocking_reason`, the code ``_try_complete`` runs) over every task, in one
stop-machine pause, against the ranges the enable would check: the patch's functions and, for an atomic
replace, the NOP funcs it would get (:func:`~daemon.livepatch.funcstack.nop_funcs`); a function another patch
already replaces is checked against what runs there now (the top of its func stack). Nothing is written: the
patch, the func stacks and every task stay as they were.

Each blocking task is classified by what would end the block:

================  ===================================================  ===========================================
reason            the task                                             outcome
================  ===================================================  ===========================================
interruptible     sleeps (TASK_INTERRUPTIBLE) inside a function        ``signal_clears`` when the stall policy
                                                                       sends fake signals, else ``stalls``
uninterruptible   sleeps in D state (TASK_WAITING)                     ``stalls`` until the stall policy gives up
running           is running or runnable inside the function           ``stalls`` for as long as it stays there
unreliable_stack  has a stack the unwinder cannot trust                ``stalls`` (never switched by a check)
================  ===================================================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from daemon.errors import PatchStateError
from daemon.guest import abi
from daemon.kernel.kernel import KIND_NAMES
from daemon.livepatch.artifact import old_function
from daemon.livepatch.core import Livepatch
from daemon.livepatch.funcstack import nop_funcs
from daemon.livepatch.klp import KlpFunc
from daemon.livepatch.transition import PATCHED, blocking_function, blocking_reason, check_ranges_of

Reason = Literal["interruptible", "uninterruptible", "running", "unreliable_stack"]
Outcome = Literal["signal_clears", "stalls"]


@dataclass(frozen=True)
class PredictedBlock:
    pid: int
    comm: str
    cpu: int
    kind: str
    reason: Reason
    outcome: Outcome
    why: str  # the transition's own wording (Transition.blocked)
    function: str | None  # the function of the patch it is in (None: unreliable stack)
    stack: tuple[str, ...]  # innermost first, return addresses described at their call


@dataclass(frozen=True)
class Prediction:
    patch: str
    tasks_scanned: int
    functions: tuple[str, ...]  # what the check looks for on the stacks
    blocks: tuple[PredictedBlock, ...]
    signals: bool  # the stall policy sends fake signals
    busy_with: str | None  # another patch's transition in progress: enabling now would be refused

    @property
    def will_stall(self) -> bool:
        return any(b.outcome == "stalls" for b in self.blocks)


def predict(lp: Livepatch, name: str) -> Prediction:
    """Scan every task's stack now for the patching transition of ``name`` (loaded, not enabled)."""
    with lp.lock:
        patch = lp.patch(name)  # PatchNotFound
        tr = lp.transition
        if tr is not None and tr.patch is patch:
            raise PatchStateError(f"patch {name!r} is in transition: patch.transition shows what blocks it",
                                  patch=name)
        if patch.enabled:
            raise PatchStateError(f"patch {name!r} is already enabled: patch.check predicts the transition of a "
                                  "patch not yet enabled (patch.effect shows an enabled patch's effect)", patch=name)
        if patch.replaced:
            raise PatchStateError(f"patch {name!r} was replaced; load it again to re-apply it", patch=name)
        funcs = patch.funcs() + (nop_funcs(patch, lp.patches) if patch.replace else [])
        return _scan(lp, name, funcs)


def predict_functions(lp: Livepatch, functions: list[tuple[str, int]]) -> Prediction:
    """The same scan for a patch that is not loaded, from the functions it would replace (``(name, sympos)``, as
    its manifest lists them): what a dry run asks before anything is sent. An atomic replace's NOP funcs are not
    known this way (they depend on the patch object), so only the named functions are checked."""
    with lp.lock:
        funcs = []
        for fn, sympos in functions:
            old = old_function(lp.kernel.kallsyms, fn, sympos, "(patch.check)")
            funcs.append(KlpFunc(fn, sympos, old.addr, old.size, fn, old.addr, old.size))
        return _scan(lp, "(functions)", funcs)


def _scan(lp: Livepatch, name: str, funcs: list[KlpFunc]) -> Prediction:
    """Every task's stack against the ranges of ``funcs`` (``lp.lock`` held)."""
    tr = lp.transition
    ranges = check_ranges_of(funcs, PATCHED, lp.stacks.ops)
    kernel = lp.kernel
    signals = lp.policy.signal_after is not None

    def scan() -> tuple[int, list[PredictedBlock]]:
        nr = kernel.boot_params.get("nr_tasks")
        current = {kernel.cpu(c).get("current") for c in range(kernel.config.nr_cpus)}
        out = []
        for i in range(nr):
            t = kernel.task(i)
            trace = kernel.stack_of(t)
            why = blocking_reason(trace, ranges)
            if why is None:
                continue
            kind = KIND_NAMES.get(t.get("kind"), "?")
            state = t.get("state")
            reason: Reason
            if not trace.reliable:
                reason = "unreliable_stack"
            elif t.addr not in current and state == abi.TASK_INTERRUPTIBLE:
                reason = "interruptible"
            elif t.addr not in current and state == abi.TASK_WAITING:
                reason = "uninterruptible"
            else:
                reason = "running"
            # klp_send_signals: every pending task but the idle ones; only interruptible sleeps end
            cleared = reason == "interruptible" and signals and t.get("kind") != abi.TASK_KIND_IDLE
            stack = tuple(lp.ftrace.describe(pc if j == 0 else pc - 4) for j, pc in enumerate(trace.pcs))
            out.append(PredictedBlock(
                pid=t.get("pid"), cpu=t.get("cpu"), kind=kind,
                comm=t.get_bytes("comm").split(b"\0", 1)[0].decode(), reason=reason,
                outcome="signal_clears" if cleared else "stalls", why=why,
                function=blocking_function(trace, ranges), stack=stack))
        return nr, out
    nr, blocks = kernel.stop_machine(scan)
    return Prediction(patch=name, tasks_scanned=nr, functions=tuple(sorted({r[2] for r in ranges})),
                      blocks=tuple(blocks), signals=signals,
                      busy_with=None if tr is None else tr.patch.name)
