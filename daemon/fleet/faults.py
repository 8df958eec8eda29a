"""A fleet host's injected faults, applied to every boot of the host (``HostFaults``).

=========  ======================================================================================================
stall      at boot, a worker task is put to sleep inside ``sleeper_middle`` (``sleeper_outer`` -> ``sleeper_middle``
           -> ``sleeper_inner``), the function ``livepatch_sleeper`` replaces: interruptible, a transition's fake
           signal clears it; uninterruptible (D state), the transition stays blocked until the stall policy acts
crash      the host dies abruptly (``Host.crash``: connection cut, last will, memory lost) when a transition
           starts, when one completes, or after ``at_s`` online; it boots again from its state dir
slow       every reply is delayed by ``delay_s`` (``Service.reply_delay_s``)
flaky      the broker connection is cut (last will) and kept down for ``down_s``, ``times`` times
reject     the host trusts no signing key (``host_settings``): every patch is refused
panic      a patch replacing ``function`` is loaded with its replacement's first instruction made BUG()
           (``brk #0x800``) on this host, as a patch that is wrong for this build: the first call that reaches the
           replacement (a workload's, a ``call``'s, once the patch is enabled) panics the kernel; the daemon dies as
           a panicked host does, boots again, and the crash-loop guard keeps the patch disabled
=========  ======================================================================================================

Crash and flaky counts are kept across boots (a host crashes ``times`` times in all, not at every boot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from daemon.app import Daemon
from daemon.arch.arm64.callsite import InsnPatch
from daemon.arch.arm64.patching import TextPatcher
from daemon.kernel.kernel import Kernel
from daemon.livepatch.core import Livepatch
from daemon.service import Service
from schemas import EventDoc
from schemas.fleet import CrashFault, FlakyFault, HostPlan, PanicFault, SlowFault, StallFault

if TYPE_CHECKING:
    from daemon.fleet.host import Host

log = structlog.get_logger(__name__)

UNINTERRUPTIBLE = 1
"""Bit 0 of the sleeper's flag address: sleep in ``wait_on`` (D state, deaf to signals) instead of
``wait_on_interruptible`` (the flag itself is 8-byte aligned, so the bit is free)."""

BUG_INSN = 0xD4210000
"""``brk #0x800``: arm64's BUG() (``BUG_BRK_IMM``), which the machine reports as a guest panic."""


class HostFaults:
    """The faults of one host's plan, and what is left of them (counts survive reboots)."""

    def __init__(self, host: Host, plan: HostPlan) -> None:
        self.host = host
        self.crash_left = {i: f.times for i, f in enumerate(plan.faults) if isinstance(f, CrashFault)}
        self.drops_left = {i: f.times for i, f in enumerate(plan.faults) if isinstance(f, FlakyFault)}
        self.faults = plan.faults

    def extension(self, service: Service, kernel: Kernel) -> None:
        """Per boot, before the daemon goes online: delays, sleeping tasks, event-driven faults."""
        for f in self.faults:
            if isinstance(f, SlowFault):
                service.reply_delay_s = f.delay_s
            elif isinstance(f, StallFault):
                flag = kernel.host_buffer.alloc(8)
                kernel.memory.write_u64(flag, 0)
                arg = flag | (UNINTERRUPTIBLE if f.mode == "uninterruptible" else 0)
                kernel.submit("sleeper_outer", arg, cpu=kernel.config.nr_cpus - 1)  # never woken: it sleeps
        service.events.listeners.append(self._on_event)
        panics = {f.function for f in self.faults if isinstance(f, PanicFault)}
        lp = self.host.daemon.livepatch if self.host.daemon is not None else None
        if panics and lp is not None:
            patcher = TextPatcher(kernel)
            # Livepatch's own subscriber: told on the loading thread, before the load returns, so no call can reach
            # the replacement before it is made to panic (restores at boot included)
            lp.subscribe(lambda event, data: self._arm_panic(lp, patcher, panics, event, data))

    @staticmethod
    def _arm_panic(lp: Livepatch, patcher: TextPatcher, functions: set[str], event: str,
                   data: dict[str, object]) -> None:
        if event != "loaded":
            return
        patch = lp.patch(str(data["patch"]))
        sites = [f.new_addr for f in patch.funcs() if not f.nop and f.old_name in functions]
        if sites:
            log.warning("fleet_fault_panic_armed", patch=patch.name, functions=sorted(functions))
            patcher.apply([InsnPatch(a, patcher.read_insn(a), BUG_INSN) for a in sites])

    def _on_event(self, event: EventDoc) -> None:
        started = event.type == "patch.transition.started"
        completed = event.type == "patch.transition.completed" and event.data.get("target") == "patched"
        if not (started or completed):
            return
        for i, f in enumerate(self.faults):
            if isinstance(f, CrashFault) and self.crash_left[i] > 0 and \
                    f.when == ("transition" if started else "after_transition"):
                self._crash(i, f, f"{f.when}: {event.data.get('patch')}")
                return

    def _crash(self, index: int, fault: CrashFault, why: str) -> None:
        self.crash_left[index] -= 1
        log.warning("fleet_fault_crash", why=why, left=self.crash_left[index])
        self.host.crash(fault.reboot_after_s)

    async def timed(self, daemon: Daemon) -> None:
        """Per boot, once online: the faults that act on a clock (uptime crashes, connection drops)."""
        if not any(isinstance(f, FlakyFault) or (isinstance(f, CrashFault) and f.when == "uptime")
                   for f in self.faults):
            return  # no poll for the others: a thousand hosts polling while they boot was 20,000 wake-ups a second
        while daemon.bridge is None or not daemon.bridge.online.is_set():
            await asyncio.sleep(0.05)
        bridge = daemon.bridge
        async with asyncio.TaskGroup() as tg:
            for i, f in enumerate(self.faults):
                if isinstance(f, CrashFault) and f.when == "uptime" and self.crash_left[i] > 0:
                    tg.create_task(self._crash_at(i, f), name="fleet.fault.crash")
                elif isinstance(f, FlakyFault) and self.drops_left[i] > 0:
                    tg.create_task(self._flaky(i, f, bridge.sever), name="fleet.fault.flaky")

    async def _crash_at(self, index: int, fault: CrashFault) -> None:
        await asyncio.sleep(fault.at_s)
        self._crash(index, fault, f"uptime {fault.at_s} s")

    async def _flaky(self, index: int, fault: FlakyFault, sever: Callable[[float], None]) -> None:
        while self.drops_left[index] > 0:
            await asyncio.sleep(fault.every_s)
            self.drops_left[index] -= 1
            log.warning("fleet_fault_flaky", left=self.drops_left[index], down_s=fault.down_s)
            sever(fault.down_s)
            await asyncio.sleep(fault.down_s)
