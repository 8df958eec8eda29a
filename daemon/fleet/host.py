"""One simulated host: a :class:`~daemon.app.Daemon` built from the fleet's settings and the host's plan.

``Host.run()`` boots the daemon and keeps the host alive until ``stop()``: a crash (``crash()``) ends the
daemon abruptly, and after the reboot delay a new daemon boots from the same state directory, so it re-applies
its desired state exactly as ``livepatchd serve`` does after a restart. The plan's attributes (build, labels,
workload, faults) are in the host's retained state (``kernel.release``, ``components.labels``,
``components.fleet``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from daemon.app import Daemon
from daemon.fleet.faults import HostFaults
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.service import Service
from daemon.settings import Settings
from schemas.fleet import HostPlan

log = structlog.get_logger(__name__)

PANIC_REBOOT_S = 1.0
"""How long a host whose kernel panicked stays down before it boots again."""

HostEvent = Callable[[str, str, dict[str, Any]], None]
"""``(host, event, data)``: ``online`` (boot_seq), ``crashed``, ``stopped``."""


def host_settings(base: Settings, plan: HostPlan) -> Settings:
    """The fleet's settings with this host's identity and attributes (no validation is skipped: ``plan`` came
    from a validated spec and ``base`` was validated once)."""
    update: dict[str, Any] = {"host_id": plan.host, "nr_cpus": plan.nr_cpus, "kernel_build": plan.release,
                              "kernel_release": plan.release, "labels": dict(plan.labels)}
    if any(f.kind == "reject" for f in plan.faults):  # trusts no signing key: every patch is refused
        update.update(trusted_keys=[], trusted_keys_dir=None, dev_signing_key=False)
    return base.model_copy(update=update)


def fleet_section(plan: HostPlan) -> dict[str, Any]:
    """``components.fleet``: what the fleet spec gave this host (a dashboard shows the faults)."""
    return {"release": plan.release, "workload": plan.workload, "seed": plan.seed,
            "faults": [f.model_dump(mode="json", exclude={"count", "share", "hosts"}) for f in plan.faults]}


class Host:
    """A fleet's host: its plan, its settings, and the daemon currently running it (a new one after a crash)."""

    def __init__(self, plan: HostPlan, base: Settings, *, on_event: HostEvent | None = None) -> None:
        self.plan = plan
        self.settings = host_settings(base, plan)
        self.on_event = on_event
        self.daemon: Daemon | None = None
        self.boots = 0
        self.crashes = 0
        self.faults = HostFaults(self, plan)
        self._stopping = False
        self._reboot_after_s: float | None = None
        self._wake = asyncio.Event()

    @property
    def host_id(self) -> str:
        return self.plan.host

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def online(self) -> bool:
        d = self.daemon
        return d is not None and d.bridge is not None and d.bridge.online.is_set()

    def stop(self) -> None:
        """Shut down gracefully (offline is published); a host waiting to reboot does not boot again."""
        self._stopping = True
        self._wake.set()
        if self.daemon is not None:
            self.daemon.stop()

    def crash(self, reboot_after_s: float = 2.0) -> None:
        """Die abruptly now (the last will fires, memory is lost); boot again from the state dir after the delay."""
        if self.daemon is None or self._stopping:
            return
        self._reboot_after_s = reboot_after_s
        self.daemon.crash()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(host=self.host_id)
        while not self._stopping:
            daemon = self.daemon = Daemon(self.settings, extensions=[self._attributes, self.faults.extension],
                                          on_ready=self._ready)
            self.boots += 1
            self._reboot_after_s = None
            async with asyncio.TaskGroup() as tg:
                timed = tg.create_task(self.faults.timed(daemon), name="fleet.faults")
                try:
                    await daemon.run()
                finally:
                    timed.cancel()
            if not daemon.crashed:
                break
            self.crashes += 1
            delay = PANIC_REBOOT_S if self._reboot_after_s is None else self._reboot_after_s
            self._emit("crashed", boot_seq=daemon.service.boot_seq if daemon.service else None, reboot_after_s=delay,
                       panic=daemon.panic.message if daemon.panic is not None else None)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        self._emit("stopped")

    def _attributes(self, service: Service, kernel: Kernel) -> None:
        service.state.set_component("fleet", fleet_section(self.plan))
        if self.plan.workload != "idle":  # the guest's own load generators: no Python per call
            kernel.set_load(abi.LOADGEN_CORPUS if self.plan.workload == "steady" else abi.LOADGEN_MIX)

    def _ready(self, daemon: Daemon) -> None:
        self._emit("online", boot_seq=daemon.service.boot_seq if daemon.service else None)

    def _emit(self, event: str, **data: Any) -> None:
        log.info("fleet_host", change=event, **data)
        if self.on_event is not None:
            self.on_event(self.host_id, event, data)
