"""``patch.check`` and ``patch.effect``: will a patch's transition stall, and did the patch take effect.

* ``patch.check`` (read-only) is :func:`daemon.livepatch.precheck.predict`: the transition's own stack check over
  every task, in one stop-machine pause, with nothing written.
* ``patch.effect`` reads the guest's per-CPU counters (:mod:`daemon.livepatch.effect`): calls each replacement
  took since the patch was enabled, and entries the original took since the patching transition completed (from
  a baseline taken at completion: :meth:`PatchEffects.on_event` listens to Livepatch's events). The retained state's
  ``components.patch_effect`` carries every enabled patch's summary, refreshed with each livepatch event, each
  ``patch.effect`` and every ``refresh_s`` seconds while a patch is enabled (a job of the kernel's host worker,
  ended when no patch is enabled; an unchanged section is not republished).

Errors are Livepatch's: an unknown patch is ``livepatch_not_found``; ``patch.check`` of a patch already enabled,
in transition or replaced, and ``patch.effect`` of a patch that is not enabled, are ``livepatch_bad_state``.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.errors import PatchStateError
from daemon.kernel.kernel import Kernel
from daemon.livepatch.core import Livepatch
from daemon.livepatch.effect import func_calls, orig_calls
from daemon.livepatch.precheck import predict, predict_functions
from daemon.service.pipeline.outbox import StateBoard
from schemas.patch_insight import (
    FuncEffect,
    PatchCheckData,
    PatchCheckRequest,
    PatchEffectData,
    PatchEffectSummary,
    PredictedBlocker,
)

SECTION = "patch_effect"


class PatchEffects:
    """What ``patch.effect`` and the state's ``patch_effect`` section report, for one Livepatch."""

    def __init__(self, state: StateBoard, kernel: Kernel, livepatch: Livepatch, *, refresh_s: float = 5.0) -> None:
        self.state = state
        self.kernel = kernel
        self.lp = livepatch
        self.refresh_s = refresh_s
        self._baseline: dict[str, dict[int, int]] = {}  # patch -> old_addr -> orig_calls at its completion
        self._completed_at: dict[str, float] = {}
        self._refreshing = False  # a refresh job is scheduled (read and set under lp.lock)

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        """Livepatch's subscriber (its lock held): baselines at completion, dropped when a transition starts."""
        name = str(data["patch"])
        if event in ("transition_started", "transition_reversed", "unloaded"):
            self._baseline.pop(name, None)
            self._completed_at.pop(name, None)
        elif event == "transition_complete" and data.get("target") == "patched":
            self._baseline.pop(name, None)
            self._baseline_of(name)
            self._completed_at[name] = time.monotonic()
            if not self._refreshing and self.refresh_s > 0:
                self._refreshing = True
                self.kernel.worker.every(self.refresh_s, self._refresh, name="klp-effect")
        self.publish()

    def _baseline_of(self, name: str) -> dict[int, int]:
        """orig_calls of the patch's functions at completion (taken now if the completion was not seen)."""
        base = self._baseline.get(name)
        if base is None:
            p = self.lp.patch(name)
            ops = self.lp.stacks.ops
            base = self._baseline[name] = {f.old_addr: orig_calls(self.kernel, ops[f.old_addr])
                                           for f in p.funcs() if not f.nop and f.old_addr in ops}
        return base

    def effect(self, name: str) -> PatchEffectData:
        with self.lp.lock:
            p = self.lp.patch(name)  # livepatch_not_found
            if not p.enabled:
                raise PatchStateError(f"patch {name!r} is not enabled: patch.effect shows an enabled patch's effect "
                                      "(patch.check predicts a loaded patch's transition)", patch=name)
            tr = self.lp.transition
            completed = tr is None or tr.patch is not p
            ops = self.lp.stacks.ops
            base = self._baseline_of(name) if completed else {}
            funcs = []
            for f in p.funcs():
                if f.nop:
                    continue
                kops = ops.get(f.old_addr)
                old = None
                if completed and kops is not None:
                    old = orig_calls(self.kernel, kops) - base.get(f.old_addr, 0)
                funcs.append(FuncEffect(old_name=f.old_name, new_name=f.new_name, sysfs_name=f.sysfs_name,
                                        calls=func_calls(self.kernel, f),
                                        active=kops is not None and bool(kops.stack) and kops.stack[0] is f,
                                        old_calls=old))
            at = self._completed_at.get(name)
        old_ran = any((f.old_calls or 0) > 0 for f in funcs)
        return PatchEffectData(
            name=name, completed=completed,
            completed_s_ago=round(time.monotonic() - at, 6) if completed and at is not None else None,
            calls=sum(f.calls for f in funcs), old_ran=old_ran,
            verified=completed and not old_ran and all(f.calls > 0 for f in funcs), funcs=funcs)

    def publish(self) -> None:
        """Republish ``components.patch_effect`` (not republished when unchanged)."""
        with self.lp.lock:
            patches = {}
            for p in self.lp.patches:
                if p.enabled:
                    e = self.effect(p.name)
                    old = None if not e.completed else sum(f.old_calls or 0 for f in e.funcs)
                    patches[p.name] = PatchEffectSummary(calls=e.calls, old_calls=old,
                                                         verified=e.verified).model_dump(mode="json")
        self.state.set_component(SECTION, {"patches": patches})

    def _refresh(self) -> bool:
        """The refresh job: False (the job ends) once no patch is enabled."""
        with self.lp.lock:
            if not any(p.enabled for p in self.lp.patches):
                self._refreshing = False
                return False
        self.publish()
        return True


def check(livepatch: Livepatch, req: PatchCheckRequest) -> PatchCheckData:
    """``patch.check``: would this patch's transition (or one replacing these functions) stall, and on whom."""
    if req.name is not None:
        p = predict(livepatch, req.name)
    else:
        p = predict_functions(livepatch, [(f.name, f.sympos) for f in req.functions])
    return PatchCheckData(
        name=p.patch, tasks_scanned=p.tasks_scanned, functions=list(p.functions), would_block=bool(p.blocks),
        will_stall=p.will_stall, signals=p.signals, busy_with=p.busy_with,
        blockers=[PredictedBlocker(pid=b.pid, comm=b.comm, cpu=b.cpu, kind=b.kind, reason=b.reason,
                                   outcome=b.outcome, why=b.why, function=b.function, stack=list(b.stack))
                  for b in p.blocks])
