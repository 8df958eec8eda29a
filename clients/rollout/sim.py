"""The seeded twin a rehearsal runs against: one model host per target, on the simulated clock.

A twin host has the target's build and patch stack (from its retained state) and the faults of a fleet spec's
fault plan (``schemas.fleet``), drawn with a seed the way the fleet simulator draws them. It answers the host
API's patch verbs as a daemon with those faults would:

=========  ======================================================================================================
stall      interruptible: the transition waits for the host's fake signal (``SIGNAL_AFTER_S``), then completes;
           uninterruptible: it never completes by itself (a reverse transition does: the sleeper never switched)
crash      ``when=transition``: the host dies as the patch is enabled; ``after_transition``: as the transition
           completes; ``uptime``: ``at_s`` after the rehearsal starts — down ``reboot_after_s``, then back with its
           desired state (the patch enabled if it was), ``times`` times in all
slow       every reply takes ``delay_s``: past a phase's deadline, the call times out
flaky      unreachable for ``down_s`` every ``every_s``, ``times`` times
reject     every load is refused (``patch_signature_untrusted``)
panic      the enabled patch panics the kernel: the host reboots and its crash-loop guard keeps the patch disabled
=========  ======================================================================================================

A bundle with the atomic-replace flag takes over the twin's other enabled patches when its transition completes
(they are then disabled and replaced: unloadable, never enabled again), as a daemon's Livepatch does.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clients.rollout.clock import Clock
from clients.rollout.driver import TIMEOUT, Outcome, TransitionView
from clients.rollout.plan import HostInfo
from schemas.fleet import CrashFault, Fault, FlakyFault, PanicFault, RejectFault, SlowFault, StallFault

SIGNAL_AFTER_S = 1.0
"""The daemon's default stall policy signals blocked tasks after a second (``StallPolicy.signal_after``)."""


def _rng(seed: int, *what: object) -> random.Random:
    return random.Random("/".join(str(w) for w in (seed, *what)))


def assign_faults(hosts: Sequence[str], faults: Sequence[Fault], seed: int) -> dict[str, list[Fault]]:
    """Which host carries which fault: ``hosts`` by name, ``count`` first in the fault's seeded order,
    ``share`` each host by a seeded draw."""
    out: dict[str, list[Fault]] = {h: [] for h in hosts}
    for j, f in enumerate(faults):
        chosen = {h for h in f.hosts if h in out}
        if f.count:
            rank = {h: _rng(seed, "fault", j, h).random() for h in hosts}
            chosen.update(sorted(hosts, key=rank.__getitem__)[: f.count])
        if f.share is not None:
            chosen.update(h for h in hosts if _rng(seed, "fault", j, h).random() < f.share)
        for h in sorted(chosen):
            out[h].append(f)
    return out


@dataclass
class _Transition:
    patch: str
    enabling: bool
    started: float
    blocked: bool  # an uninterruptible sleeper holds it


@dataclass
class TwinHost:
    info: HostInfo
    faults: list[Fault]
    patches: dict[str, bool] = field(default_factory=dict)  # name -> enabled
    replaced: set[str] = field(default_factory=set)  # taken over by an atomic replace (disabled for good)
    replacing: set[str] = field(default_factory=set)  # loaded with the atomic-replace flag
    transition: _Transition | None = None
    down_until: float = -1.0
    crashes: int = 0
    drops: int = 0
    guarded: set[str] = field(default_factory=set)

    def fault(self, kind: type[Any]) -> Any:
        return next((f for f in self.faults if isinstance(f, kind)), None)


class SimDriver:
    """A ``HostDriver`` over twin hosts; every call is answered at once on the simulated clock."""

    def __init__(self, clock: Clock, fleet: dict[str, HostInfo], faults: dict[str, list[Fault]], patch: str) -> None:
        self.clock, self.patch = clock, patch  # the rehearsed rollout's patch (load carries only its bundle)
        self.t0 = clock.now()
        self.hosts = {h: TwinHost(i, list(faults.get(h, [])), dict(i.patches)) for h, i in sorted(fleet.items())}
        self.calls = 0
        self._replace_flag: dict[str, bool] = {}  # bundle (base64) -> its manifest's replace flag

    def _is_replace(self, bundle_b64: str) -> bool:
        flag = self._replace_flag.get(bundle_b64)
        if flag is None:
            try:
                flag = bool(json.loads(base64.b64decode(bundle_b64))["manifest"].get("replace"))
            except (ValueError, KeyError, TypeError, AttributeError):
                flag = False
            self._replace_flag[bundle_b64] = flag
        return flag

    @staticmethod
    def _completed(h: TwinHost, tr: _Transition) -> None:
        """An enabling transition's end: an atomic replace takes the other enabled patches over."""
        if tr.enabling and tr.patch in h.replacing:
            for other, on in list(h.patches.items()):
                if other != tr.patch and on:
                    h.patches[other] = False
                    h.replaced.add(other)

    # -- faults over time --------------------------------------------------------------------------------------

    def _down(self, h: TwinHost, for_s: float) -> None:
        h.down_until = self.clock.now() + for_s
        if h.transition is not None:  # memory lost: the boot re-applies the desired state (enabled, switched)
            self._completed(h, h.transition)
        h.transition = None

    def _reachable(self, h: TwinHost) -> bool:
        now = self.clock.now()
        up = now - self.t0
        crash = h.fault(CrashFault)
        if crash is not None and crash.when == "uptime" and h.crashes < crash.times and up >= crash.at_s:
            h.crashes += 1
            self._down(h, crash.reboot_after_s)
        flaky = h.fault(FlakyFault)
        if flaky is not None and h.drops < flaky.times and up >= flaky.every_s * (h.drops + 1):
            h.drops += 1
            h.down_until = max(h.down_until, now + flaky.down_s)
        return now >= h.down_until

    def _answer(self, h: TwinHost, timeout_s: float | None) -> Outcome | None:
        """None when the host answers; else the TIMEOUT a caller sees."""
        self.calls += 1
        if not self._reachable(h):
            return Outcome(ok=False, code=TIMEOUT, message=f"{h.info.host} is unreachable")
        slow = h.fault(SlowFault)
        if slow is not None and timeout_s is not None and slow.delay_s > timeout_s:
            return Outcome(ok=False, code=TIMEOUT, message=f"{h.info.host} answered after the deadline")
        return None

    def _settle(self, h: TwinHost) -> None:
        """Finish a transition whose blockers are gone; a panic fault strikes once its patch is fully on."""
        tr = h.transition
        if tr is None:
            return
        now = self.clock.now()
        stall = h.fault(StallFault)
        if tr.enabling and stall is not None and stall.mode == "uninterruptible":
            return
        if tr.enabling and stall is not None and now - tr.started < SIGNAL_AFTER_S:
            return
        h.transition = None
        self._completed(h, tr)
        crash = h.fault(CrashFault)
        if tr.enabling and crash is not None and crash.when == "after_transition" and h.crashes < crash.times:
            h.crashes += 1
            self._down(h, crash.reboot_after_s)
        if tr.enabling and h.fault(PanicFault) is not None and tr.patch not in h.guarded:
            h.guarded.add(tr.patch)  # the crash-loop guard: the patch stays disabled after the reboot
            h.patches[tr.patch] = False
            self._down(h, 2.0)

    # -- the HostDriver calls ----------------------------------------------------------------------------------

    async def fleet(self) -> dict[str, HostInfo]:
        out = {}
        for name, h in self.hosts.items():
            i = h.info
            out[name] = HostInfo(i.host, i.build_id, self._reachable(h), dict(i.labels), dict(h.patches),
                                 h.transition is not None, {n: i.funcs.get(n, ()) for n in h.patches},
                                 {n: i.states.get(n, {}) for n in h.patches})
        return out

    async def load(self, host: str, bundle_b64: str, request_id: str, timeout_s: float) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, timeout_s)) is not None:
            return late
        if h.fault(RejectFault) is not None:
            return Outcome(ok=False, code="patch_signature_untrusted", message="no trusted key signed this bundle")
        name = self.patch
        if name in h.patches:
            return Outcome(ok=False, code="livepatch_bad_state", message=f"a patch named {name!r} is already loaded")
        h.patches[name] = False
        h.replaced.discard(name)
        if self._is_replace(bundle_b64):
            h.replacing.add(name)
        return Outcome(ok=True)

    async def enable(self, host: str, patch: str, request_id: str, timeout_s: float) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, timeout_s)) is not None:
            return late
        if h.transition is not None:
            return Outcome(ok=False, code="livepatch_transition_busy", message="a transition is in progress")
        if h.patches.get(patch) or patch in h.replaced:
            return Outcome(ok=False, code="livepatch_bad_state", message=f"patch {patch!r} is already enabled"
                           if h.patches.get(patch) else f"patch {patch!r} was replaced; load it again to re-apply it")
        h.patches[patch] = True
        stall = h.fault(StallFault)
        h.transition = _Transition(patch, True, self.clock.now(),
                                   stall is not None and stall.mode == "uninterruptible")
        crash = h.fault(CrashFault)
        if crash is not None and crash.when == "transition" and h.crashes < crash.times:
            h.crashes += 1
            self._down(h, crash.reboot_after_s)
            return Outcome(ok=False, code=TIMEOUT, message=f"{host} died during the enable")
        return Outcome(ok=True)

    async def transition(self, host: str, patch: str) -> TransitionView | Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        self._settle(h)
        if not self._reachable(h):
            return Outcome(ok=False, code=TIMEOUT, message=f"{host} is unreachable")
        tr = h.transition
        blocked = ([{"pid": 100, "comm": "sleeper", "why": "sleeping uninterruptibly in sleeper_middle"}]
                   if tr is not None and tr.blocked else [])
        signals = 1 if tr is not None and self.clock.now() - tr.started >= SIGNAL_AFTER_S else 0
        return TransitionView(completed=tr is None, enabled=h.patches.get(patch, False), blocked=blocked,
                              signals_sent=signals)

    async def disable(self, host: str, patch: str, request_id: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        if not h.patches.get(patch):
            return Outcome(ok=False, code="livepatch_bad_state", message=f"patch {patch!r} is not enabled")
        h.patches[patch] = False
        h.transition = None  # reversing: the sleeper never switched, so nothing blocks the way back
        return Outcome(ok=True)

    async def unload(self, host: str, patch: str, request_id: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        if patch not in h.patches:
            return Outcome(ok=False, code="livepatch_not_found", message=f"no patch {patch!r}")
        if h.patches[patch]:
            return Outcome(ok=False, code="livepatch_bad_state", message=f"patch {patch!r} is enabled")
        del h.patches[patch]
        h.replaced.discard(patch)
        h.replacing.discard(patch)
        return Outcome(ok=True)

    async def force(self, host: str, patch: str, request_id: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        if h.transition is not None:
            self._completed(h, h.transition)
        h.transition = None
        return Outcome(ok=True, data={"forced": True})

    async def check(self, host: str, patch: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        stall = h.fault(StallFault)
        tasks = [] if stall is None else [{"pid": 100, "comm": "sleeper", "function": stall.function,
                                           "mode": stall.mode}]
        return Outcome(ok=True, data={"would_stall": stall is not None and stall.mode == "uninterruptible",
                                      "tasks": tasks})

    async def predict(self, host: str, functions: list[tuple[str, int]]) -> Outcome:
        return await self.check(host, self.patch)  # a twin's stall fault sits in the function its patch replaces

    async def effect(self, host: str, patch: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        on = bool(h.patches.get(patch)) and h.transition is None
        return Outcome(ok=True, data={"verified": on, "new_calls": 1 if on else 0, "old_calls_since": 0})

    async def patches(self, host: str) -> Outcome:
        h = self.hosts[host]
        if (late := self._answer(h, None)) is not None:
            return late
        return Outcome(ok=True, data={"patches": [
            {"name": n, "enabled": on, "replaced": n in h.replaced, "replace": n in h.replacing,
             "transition": h.transition is not None and h.transition.patch == n} for n, on in h.patches.items()]})
