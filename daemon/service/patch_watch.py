"""The transition in progress, as :class:`~daemon.service.patch_verbs.PatchVerbs` sees it: the watcher thread that
reports stalls and reversals (``patch.transition.stalled`` / ``.reversed`` events), the tasks blocking it, and its
progress in replies."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, cast

import structlog

from daemon.kernel.kernel import Kernel
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import STATE_NAMES, Transition
from daemon.service.core import Service
from schemas.patch_verbs import BlockedTask, TransitionProgress, TransitionTarget

log = structlog.get_logger(__name__)

WATCH_PERIOD_S = 0.05


class TransitionWatch:
    """Part of :class:`~daemon.service.patch_verbs.PatchVerbs`: the watcher and views of the transition."""

    # set by PatchVerbs.__init__
    service: Service
    kernel: Kernel
    lp: Livepatch
    stall_after_s: float
    _started: dict[str, float]
    _watcher: threading.Thread | None
    _watch_lock: threading.Lock

    if TYPE_CHECKING:  # defined by PatchEvents
        def emit(self, type_: str, **data: Any) -> None: ...
        def publish(self) -> None: ...

    def _stalled(self, tr: Transition) -> bool:
        return bool(tr.blocked) and time.monotonic() - tr.started >= self.stall_after_s

    # -- the watcher: stalls and reversals of the transition in progress ------------------------------------

    def _watch(self) -> None:
        with self._watch_lock:
            if self.lp.transition is None or (self._watcher is not None and self._watcher.is_alive()):
                return
            self._watcher = threading.Thread(target=self._watch_loop, name="patch-watch", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        seen: tuple[int, int] | None = None  # (id of the transition, its target) last looked at
        stalled_for: tuple[int, int] | None = None
        blocked_seen: frozenset[int] = frozenset()
        while True:
            time.sleep(WATCH_PERIOD_S)
            with self.lp.lock:
                tr = self.lp.transition
                if tr is None or not all(v.alive for v in self.kernel.machine.vcpus):
                    return
                now = (id(tr), tr.target)
                name, target = tr.patch.name, STATE_NAMES.get(tr.target, str(tr.target))
                reversed_ = seen is not None and seen[0] == now[0] and seen[1] != now[1]
                seen = now
                stalled = self._stalled(tr) and stalled_for != now
                blocked = self._blocked(tr) if stalled else []
                waited = time.monotonic() - tr.started
                blocked_now = frozenset(tr.blocked)
            if reversed_:  # by the stall policy (a disable request emits its own)
                self._started[name] = time.monotonic()
                self.service.metrics.transition_reversals.labels("policy").inc()
                self.emit("patch.transition.reversed", patch=name, target=target, by="policy")
            if stalled:
                stalled_for = now
                self.service.metrics.transition_stalls.inc()
                log.warning("transition_stalled", patch=name, target=target, waited_s=round(waited, 3),
                            blocked=[b.model_dump() for b in blocked])
                self.emit("patch.transition.stalled", patch=name, target=target, waited_s=round(waited, 3),
                          blocked=[b.model_dump() for b in blocked])
            if stalled or reversed_ or blocked_now != blocked_seen:
                blocked_seen = blocked_now
                self.publish()

    # -- views -----------------------------------------------------------------------------------------------

    def _blocked(self, tr: Transition) -> list[BlockedTask]:
        tasks = {t.pid: t for t in self.kernel.tasks()}
        out = []
        for pid, why in sorted(tr.blocked.items()):
            t = tasks.get(pid)
            out.append(BlockedTask(pid=pid, comm=t.comm if t else "?", cpu=t.cpu if t else -1, why=why))
        return out

    def _progress(self) -> TransitionProgress | None:
        """The transition in progress (call with ``lp.lock`` held)."""
        tr = self.lp.transition
        if tr is None:
            return None
        target = STATE_NAMES.get(tr.target, str(tr.target))
        states = self.lp.task_states()
        return TransitionProgress(
            patch=tr.patch.name, target=cast(TransitionTarget, target),
            elapsed_s=round(time.monotonic() - tr.started, 6), attempts=tr.attempts, signals_sent=tr.signals_sent,
            tasks_total=len(states), tasks_switched=sum(1 for s in states if s.patch_state == target),
            stalled=self._stalled(tr), blocked=self._blocked(tr))
