"""Livepatch on the emulated kernel (kernel/livepatch/core.c, patch.c, transition.c), as a client of ftrace.

:class:`Livepatch` loads signed patch bundles as modules, then enables and disables them under the per-task
consistency model:

==================  ======================================================================================
step                what happens (one stop-machine pause unless said otherwise)
==================  ======================================================================================
init transition     klp_target_state = target; every task's patch_state = the opposite
pre_patch           guest callback on a worker; an error cancels the enable
patch object        each func pushed on its old function's func_stack; the first one registers an
                    IPMODIFY|PERMANENT ftrace ops (klp_ftrace_handler) on it (ftrace's own batch)
start transition    TIF_PATCH_PENDING on every task not yet in the target state
try complete        (retried) every task whose stack holds no function being changed switches; the rest
                    switch at their next kernel exit; stragglers get fake signals per the StallPolicy
complete            replaced patches and NOP funcs dropped (atomic replace) or this patch's funcs popped
                    (unpatch); func->transition cleared; every task back to IDLE; post callbacks
==================  ======================================================================================

Only one transition runs at a time; disabling a patch during its own transition reverses it. The transition
driver, a job of the kernel's host worker (:class:`~daemon.kernel.worker.HostWorker`), retries a transition
that did not complete at once, applies the stall policy and reports what it sees; :meth:`Livepatch.wait`
blocks until the current transition ends.

Subscribers (:meth:`Livepatch.subscribe`) are told, synchronously and with :attr:`Livepatch.lock` held, in the
order things happen:

=======================  =============================================================================
event                    data (besides ``patch``)
=======================  =============================================================================
``loaded``               ``key_id`` (the signer's, or None), ``replace``, ``funcs`` (sysfs names)
``unloaded``             —
``transition_started``   ``target``; ``reversal``: True when it restarts after a reversal
``transition_blocked``   ``target``, ``blocked`` (pid -> why): the driver saw the set of tasks holding
                         the transition up change
``transition_stalled``   ``target``, ``waited_s``, ``blocked``: still blocked ``stall_after_s`` after it
                         started (once per transition and direction)
``transition_reversed``  ``target`` (the new one), ``attempts``, ``by``: ``request`` or ``policy``
``transition_complete``  ``target``, ``attempts``, ``seconds``
=======================  =============================================================================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.errors import (
    CallbackFailed,
    PatchIncompatible,
    PatchInUse,
    PatchNotFound,
    PatchStateError,
    TransitionBusy,
)
from daemon.ftrace import Ftrace
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.livepatch.funcstack import FuncStacks, add_nops
from daemon.livepatch.klp import KlpFunc, KlpObject, KlpPatch
from daemon.livepatch.modules import PatchModules
from daemon.livepatch.shadow import ShadowVars
from daemon.livepatch.transition import (
    IDLE,
    PATCHED,
    STATE_NAMES,
    UNPATCHED,
    GiveUp,
    StallPolicy,
    Transition,
    blocking_frame,
    check_ranges,
)
from daemon.module_loader import ModuleLoader
from patchformat.bundle import PatchBundle

_CALLBACKS = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")

Listener = Callable[[str, dict[str, object]], None]
"""``listener(event, data)``: see the module docstring for the events."""


@dataclass(frozen=True)
class TaskPatchState:
    pid: int
    comm: str
    cpu: int
    kind: str
    patch_state: str  # idle / unpatched / patched
    pending: bool  # TIF_PATCH_PENDING
    blocked: str | None  # why it did not switch at the last attempt


class Livepatch:
    """klp for one kernel. ``trusted_keys=None`` skips signature checks (library use); the daemon passes keys."""

    def __init__(self, kernel: Kernel, ftrace: Ftrace, loader: ModuleLoader | None = None, *,
                 trusted_keys: Iterable[Ed25519PublicKey] | None = None, policy: StallPolicy | None = None,
                 stall_after_s: float = 1.0) -> None:
        self.kernel = kernel
        self.ftrace = ftrace
        self.loader = loader or ModuleLoader(kernel)
        self.shadow = ShadowVars(kernel)  # the klp_shadow_* writers patches call
        self.modules = PatchModules(kernel, ftrace, self.loader, trusted_keys)
        self.policy = policy or StallPolicy()
        self.stall_after_s = stall_after_s
        """A transition still blocked this long after it started is reported stalled."""
        self._listeners: list[Listener] = []
        self.patches: list[KlpPatch] = []  # klp_patches: stack_order is the 1-based position
        self.stacks = FuncStacks(kernel, ftrace, self._say)
        self.transition: Transition | None = None
        self.log: list[str] = []  # the kernel log lines livepatch would print
        self.lock = threading.RLock()
        self._done = threading.Condition(self.lock)
        self._driving = False  # a driver job is scheduled on the kernel's worker (read and set under the lock)
        self._target_addr = kernel.kallsyms.addr("klp_target_state")
        self._objname = kernel.heap.alloc(16)
        kernel.memory.write(self._objname, b"vmlinux\0")

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event, data)`` for every event (see the module docstring), with the lock held."""
        self._listeners.append(listener)

    @property
    def trusted_keys(self) -> list[Ed25519PublicKey] | None:
        """The keys a bundle must be signed with (None: signatures are not checked)."""
        return self.modules.trusted_keys

    @trusted_keys.setter
    def trusted_keys(self, keys: Iterable[Ed25519PublicKey] | None) -> None:
        self.modules.trusted_keys = None if keys is None else list(keys)

    # -- patches ---------------------------------------------------------------------------------------------

    def patch(self, name: str) -> KlpPatch:
        for p in self.patches:
            if p.name == name:
                return p
        raise PatchNotFound(f"no loaded live patch named {name!r}", patch=name)

    def load(self, bundle: PatchBundle) -> KlpPatch:
        """Admit (signature, build id, functions), load the object into the module area, build the patch."""
        m = bundle.manifest
        with self.lock:
            if any(p.name == m.name for p in self.patches):
                raise PatchStateError(f"a patch named {m.name!r} is already loaded", patch=m.name)
            patch = self.modules.load(bundle)
            self.patches.append(patch)
            self._emit("loaded", patch, key_id=bundle.signature.key_id if bundle.signature is not None else None,
                       replace=patch.replace, funcs=[f.sysfs_name for f in patch.funcs() if not f.nop])
            return patch

    def mark_replaced(self, name: str) -> KlpPatch:
        """A loaded, disabled patch that an atomic replace took over before a restart: it stays replaced (it may
        be unloaded, not enabled again), as it was before the restart."""
        with self.lock:
            patch = self.patch(name)
            if patch.enabled or (self.transition is not None and self.transition.patch is patch):
                raise PatchStateError(f"patch {name!r} is enabled: it cannot be marked replaced", patch=name)
            patch.replaced = True
            return patch

    def unload(self, name: str) -> None:
        """rmmod: a disabled (or replaced) patch that is not in transition and was never forced."""
        with self.lock:
            patch = self.patch(name)
            if self.transition is not None and self.transition.patch is patch:
                raise PatchInUse(f"patch {name!r} is in transition", patch=name)
            if patch.enabled:
                raise PatchInUse(f"patch {name!r} is enabled: disable it first", patch=name)
            if patch.forced:
                raise PatchInUse(f"patch {name!r} was forced: its module can never be unloaded", patch=name)
            self.modules.drop(patch.module)
            self.patches.remove(patch)
            self._emit("unloaded", patch)

    # -- enable / disable ------------------------------------------------------------------------------------

    def enable(self, name: str, *, wait: bool = True, timeout: float | None = None) -> KlpPatch:
        """klp_enable_patch; with ``wait``, returns once the transition is over (or ``timeout`` passes)."""
        with self.lock:
            patch = self.patch(name)
            tr = self.transition
            if tr is not None and tr.patch is patch and tr.target == UNPATCHED:
                self._reverse("request")  # writing 1 to enabled during its own unpatching transition
                if wait:
                    self.wait(timeout)
                return patch
            if patch.enabled or patch.replaced:
                raise PatchStateError(f"patch {name!r} is already enabled" if patch.enabled else
                                      f"patch {name!r} was replaced; load it again to re-apply it", patch=name)
            self._check_idle()
            self._check_compatible(patch)
            self._say(f"enabling patch '{name}'")
            if patch.replace:
                add_nops(patch, self.patches)
            self._init_transition(patch, PATCHED)
            try:
                for obj in patch.objects:
                    ret = self._callback(obj, "pre_patch")
                    obj.post_unpatch_enabled = ret == 0
                    if ret:
                        self._say(f"pre-patch callback failed for object '{obj.name}'")
                        err = CallbackFailed(f"pre_patch callback of {name!r} failed for object {obj.name!r} "
                                             f"({ret})", patch=name, object=obj.name, ret=ret)
                        err.errno = ret
                        raise err
                    self._patch_object(obj)
            except BaseException:
                self._say(f"failed to enable patch '{name}'")
                self._cancel(patch)
                raise
            self._start_transition()
            patch.enabled = True
            self._try_complete()
            self._start_driver()
        if wait:
            self.wait(timeout)
        return patch

    def disable(self, name: str, *, wait: bool = True, timeout: float | None = None) -> KlpPatch:
        """Write 0 to enabled: unpatch, or reverse this patch's own transition."""
        with self.lock:
            patch = self.patch(name)
            tr = self.transition
            if tr is not None and tr.patch is patch:
                self._reverse("request")
            else:
                if not patch.enabled:
                    raise PatchStateError(f"patch {name!r} is not enabled", patch=name)
                self._check_idle()
                self._init_transition(patch, UNPATCHED)
                for obj in patch.objects:
                    if obj.patched:
                        self._callback(obj, "pre_unpatch")
                self._start_transition()
                patch.enabled = False
                self._try_complete()
                self._start_driver()
        if wait:
            self.wait(timeout)
        return patch

    def force(self, name: str) -> None:
        """klp_force_transition: switch every remaining task without checking its stack."""
        with self.lock:
            patch = self.patch(name)
            tr = self.transition
            if tr is None or tr.patch is not patch:
                raise PatchStateError(f"patch {name!r} is not in transition", patch=name)
            self._say("forcing remaining tasks to the patched state")
            target = tr.target

            def switch_all() -> None:
                for t in self.kernel.task_refs():
                    t.set("patch_state", target)
                    t.set("flags", t.get("flags") & ~abi.TIF_PATCH_PENDING)
            self.kernel.stop_machine(switch_all)
            if patch.replace:
                for p in self.patches:
                    if p is not patch:
                        p.forced = p.forced or p.enabled
            elif target == UNPATCHED:
                patch.forced = True
            self._complete()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no transition is in progress; False if ``timeout`` passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self.transition is not None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done.wait(left if left is not None else 0.5)
        return True

    # -- checks ----------------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self.transition is not None:
            raise TransitionBusy(f"patch {self.transition.patch.name!r} is in transition; wait, disable or force "
                                 "it first", patch=self.transition.patch.name)

    def _check_compatible(self, patch: KlpPatch) -> None:
        """klp_is_patch_compatible: a cumulative patch must carry every installed state at >= version."""
        for old in self.patches:
            if old is patch or not old.enabled:
                continue
            for sid, version in old.states.items():
                mine = patch.states.get(sid)
                ok = (not patch.replace) if mine is None else mine >= version
                if not ok:
                    self._say(f"Livepatch patch ({patch.name}) is not compatible with the already installed "
                              "livepatches.")
                    raise PatchIncompatible(
                        f"patch {patch.name!r} is not compatible with the installed livepatches: state {sid} is at "
                        f"version {version} in {old.name!r}, {patch.name!r} has "
                        f"{'none' if mine is None else f'version {mine}'}",
                        patch=patch.name, state=sid, installed=version, offered=mine)

    # -- transition steps ------------------------------------------------------------------------------------

    def _init_transition(self, patch: KlpPatch, target: int) -> None:
        self._say(f"'{patch.name}': initializing {self._verb(target)} transition")
        self.transition = Transition(patch, target, time.monotonic())
        funcs = patch.funcs()
        for f in funcs:
            f.transition = True

        def init() -> None:
            self.kernel.memory.write_u64(self._target_addr, target)
            for t in self.kernel.task_refs():
                t.set("patch_state", UNPATCHED if target == PATCHED else PATCHED)
            for f in funcs:
                if f.guest:
                    self.stacks.set_transition(f, 1)
        self.kernel.stop_machine(init)

    def _start_transition(self, *, reversal: bool = False) -> None:
        tr = self._transition()
        self._say(f"'{tr.patch.name}': starting {self._verb(tr.target)} transition")
        self._emit("transition_started", tr.patch, target=STATE_NAMES[tr.target], reversal=reversal)

        def mark() -> None:
            for t in self.kernel.task_refs():
                if t.get("patch_state") != tr.target:
                    t.set("flags", t.get("flags") | abi.TIF_PATCH_PENDING)
        self.kernel.stop_machine(mark)

    def _try_complete(self) -> bool:
        tr = self._transition()
        tr.attempts += 1
        ranges = check_ranges(tr.patch, tr.target, self.stacks.ops)

        def check_and_switch() -> dict[int, str]:
            blocked: dict[int, str] = {}
            for t in self.kernel.task_refs():
                if t.get("patch_state") == tr.target:
                    continue
                why = blocking_frame(self.kernel, t, ranges)
                if why is None:
                    t.set("patch_state", tr.target)
                    t.set("flags", t.get("flags") & ~abi.TIF_PATCH_PENDING)
                else:
                    blocked[t.get("pid")] = why
            return blocked
        tr.blocked = self.kernel.stop_machine(check_and_switch)
        if tr.blocked:
            return False
        self._complete()
        return True

    def _complete(self) -> None:
        tr = self._transition()
        patch, target = tr.patch, tr.target
        self._say(f"'{patch.name}': completing {self._verb(target)} transition")
        if target == PATCHED and patch.replace:
            for old in self.patches:
                if old is not patch and old.enabled:
                    for f in old.funcs():
                        self.stacks.pop(f)
                    for o in old.objects:
                        o.patched = False
                    old.enabled, old.replaced = False, True
            for o in patch.objects:
                for f in [f for f in o.funcs if f.nop]:
                    self.stacks.pop(f)
                o.funcs = [f for f in o.funcs if not f.nop]
        if target == UNPATCHED:
            for o in patch.objects:
                for f in o.funcs:
                    self.stacks.pop(f)
                o.funcs = [f for f in o.funcs if not f.nop]
                o.patched = False
        self._end_in_guest([f for f in patch.funcs() if f.guest])
        for f in patch.funcs():
            f.transition = False
        self.transition = None
        for obj in patch.objects:
            if target == PATCHED:
                self._callback(obj, "post_patch")
            elif obj.post_unpatch_enabled:
                self._callback(obj, "post_unpatch")
                obj.post_unpatch_enabled = False
        self._say(f"'{patch.name}': {self._verb(target)} complete")
        self._emit("transition_complete", patch, target=STATE_NAMES[target], attempts=tr.attempts,
                   seconds=round(time.monotonic() - tr.started, 6))
        self._done.notify_all()

    def _cancel(self, patch: KlpPatch) -> None:
        """klp_cancel_transition: a failed enable goes straight back to unpatched."""
        self._say("canceling patching transition, going to unpatch")
        tr = self._transition()
        tr.target = UNPATCHED
        for o in patch.objects:
            for f in o.funcs:
                if f.patched:
                    self.stacks.pop(f)
            o.funcs = [f for f in o.funcs if not f.nop]
            o.patched = False
            o.post_unpatch_enabled = False
        self._end_in_guest([])
        for f in patch.funcs():
            f.transition = False
        self.transition = None
        self._done.notify_all()

    def _end_in_guest(self, funcs: list[KlpFunc]) -> None:
        """In one pause: func->transition cleared, every task back to IDLE, klp_target_state IDLE."""
        def end() -> None:
            for f in funcs:
                self.stacks.set_transition(f, 0)
            for t in self.kernel.task_refs():
                t.set("patch_state", IDLE)
                t.set("flags", t.get("flags") & ~abi.TIF_PATCH_PENDING)
            self.kernel.memory.write_u64(self._target_addr, IDLE)
        self.kernel.stop_machine(end)

    def _reverse(self, by: str) -> None:
        """klp_reverse_transition: the transition in progress turns around (``by`` a request or the policy)."""
        tr = self._transition()
        new_target = UNPATCHED if tr.target == PATCHED else PATCHED
        self._say(f"'{tr.patch.name}': reversing transition from {self._verb(tr.target)} to "
                  f"{self._verb(new_target)}")
        self._emit("transition_reversed", tr.patch, target=STATE_NAMES[new_target], attempts=tr.attempts, by=by)

        def turn() -> None:
            for t in self.kernel.task_refs():
                t.set("flags", t.get("flags") & ~abi.TIF_PATCH_PENDING)
            self.kernel.memory.write_u64(self._target_addr, new_target)
        self.kernel.stop_machine(turn)
        tr.patch.enabled = not tr.patch.enabled
        tr.target = new_target
        tr.started = time.monotonic()
        tr.signals_sent = 0
        tr.stall_reported = False
        self._start_transition(reversal=True)
        self._try_complete()

    def _send_signals(self) -> None:
        """klp_send_signals: a fake signal to every task still pending, so interruptible sleeps end."""
        tr = self._transition()
        if tr.signals_sent == 0:
            self._say("signaling remaining tasks")

        def signal() -> list[int]:
            cpus = []
            for t in self.kernel.task_refs():
                if t.get("flags") & abi.TIF_PATCH_PENDING and t.get("kind") != abi.TASK_KIND_IDLE:
                    t.set("flags", t.get("flags") | abi.TIF_NOTIFY_SIGNAL)
                    cpus.append(t.get("cpu"))
            return cpus
        for cpu in set(self.kernel.stop_machine(signal)):
            self.kernel.kick(cpu)
        tr.signals_sent += 1
        tr.last_signal = time.monotonic()

    # -- func stacks -----------------------------------------------------------------------------------------

    def _patch_object(self, obj: KlpObject) -> None:
        """klp_patch_object: push every func (a failure leaves the pushed ones for the cancel to pop)."""
        for f in obj.funcs:
            self.stacks.push(f)
        obj.patched = True

    # -- guest helpers ---------------------------------------------------------------------------------------

    def _callback(self, obj: KlpObject, which: str) -> int:
        addr = obj.callbacks.get(which)
        if addr is None:
            return 0
        ret = self.kernel.call(addr, self._objname, timeout=30.0) & 0xFFFF_FFFF
        return ret - (1 << 32) if ret & 0x8000_0000 else ret  # an int return value

    def _transition(self) -> Transition:
        if self.transition is None:
            raise PatchStateError("no transition in progress")
        return self.transition

    @staticmethod
    def _verb(target: int) -> str:
        return "patching" if target == PATCHED else "unpatching"

    def _say(self, line: str) -> None:
        self.log.append(f"livepatch: {line}")

    def _emit(self, event: str, patch: KlpPatch, **extra: object) -> None:
        for listener in self._listeners:
            listener(event, {"patch": patch.name, **extra})

    # -- the driver: retries, signals, give-up, reports ----------------------------------------------------

    def _start_driver(self) -> None:
        if self.transition is None or self._driving:
            return
        self._driving = True
        self.kernel.worker.every(self.policy.retry_interval, self._drive, name="klp-transition")

    def _drive(self) -> bool:
        """One round of the driver (on the kernel's worker); False ends the job: no transition is left."""
        with self.lock:
            try:
                tr = self.transition
                if tr is None or not self.kernel.cpus_alive:
                    self._driving = False
                    return False
                blocked_before = set(tr.blocked)
                if self._try_complete():
                    self._driving = False
                    return False
                self._report(tr, blocked_before)
                self._apply_policy(tr)
                return True
            except BaseException:
                self._driving = False  # the next transition gets a driver of its own
                raise

    def is_stalled(self, tr: Transition) -> bool:
        """Still blocked ``stall_after_s`` after it started (or reversed)."""
        return bool(tr.blocked) and time.monotonic() - tr.started >= self.stall_after_s

    def _report(self, tr: Transition, blocked_before: set[int]) -> None:
        target = STATE_NAMES[tr.target]
        if tr.blocked.keys() != blocked_before:
            self._emit("transition_blocked", tr.patch, target=target, blocked=dict(tr.blocked))
        if not tr.stall_reported and self.is_stalled(tr):
            tr.stall_reported = True
            self._emit("transition_stalled", tr.patch, target=target,
                       waited_s=round(time.monotonic() - tr.started, 3), blocked=dict(tr.blocked))

    def _apply_policy(self, tr: Transition) -> None:
        p = self.policy
        waited = time.monotonic() - tr.started
        if p.give_up_after is not None and waited >= p.give_up_after and p.give_up is not GiveUp.WAIT:
            if p.give_up is GiveUp.REVERT:
                self._reverse("policy")
            else:
                self.force(tr.patch.name)
            return
        if p.signal_after is not None and waited >= p.signal_after and (
                tr.signals_sent == 0 or time.monotonic() - tr.last_signal >= p.signal_every):
            self._send_signals()

    # -- views -----------------------------------------------------------------------------------------------

    def task_states(self) -> list[TaskPatchState]:
        """Per-task patch state, as /proc/<pid>/patch_state plus why a task is holding a transition up."""
        blocked = self.transition.blocked if self.transition else {}
        out = []
        for info, ref in zip(self.kernel.tasks(), self.kernel.task_refs(), strict=True):
            state = ref.get("patch_state")
            out.append(TaskPatchState(info.pid, info.comm, info.cpu, info.kind, STATE_NAMES.get(state, str(state)),
                                      bool(ref.get("flags") & abi.TIF_PATCH_PENDING), blocked.get(info.pid)))
        return out
