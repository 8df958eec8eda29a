"""The live patches' desired state: what each change and each completed transition leaves in the
:class:`DesiredState` store (kind ``"livepatch"``), the check for a replayed request already applied, and
:meth:`PatchDesired.restore`, which re-applies the store at boot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from daemon.errors import BundleFormatError, LivepatchdError
from daemon.livepatch.bundle import PatchBundle
from daemon.livepatch.core import Livepatch
from daemon.service.crash_guard import CrashLoopGuard
from daemon.service.pipeline.core import RequestContext
from daemon.service.store.desired import DesiredState

log = structlog.get_logger(__name__)

KIND = "livepatch"
"""The desired-state kind of live patches (key: the patch name)."""


@dataclass
class RestoreReport:
    """What :meth:`PatchVerbs.restore` re-applied at boot."""

    loaded: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    held_back: list[dict[str, Any]] = field(default_factory=list)
    """Desired-enabled patches the crash-loop guard kept disabled, and why."""
    duration_s: float = 0.0


class PatchDesired:
    """Part of :class:`~daemon.service.patch_verbs.PatchVerbs`: its desired state, and the restore at boot."""

    # set by PatchVerbs.__init__
    lp: Livepatch
    desired: DesiredState | None
    restore_timeout_s: float
    restored: RestoreReport | None
    guard: CrashLoopGuard | None
    _started: dict[str, float]

    if TYPE_CHECKING:  # defined by PatchEvents
        def emit(self, type_: str, **data: Any) -> None: ...
        def publish(self) -> None: ...

    def _completed_in_desired(self, name: str, target: str) -> None:
        """The store follows what a transition ended in (a reversal by the stall policy included)."""
        if self.desired is None:
            return
        with self.lp.lock, self.desired.batch():
            items = {i.key: i for i in self.desired.items(KIND)}
            if name in items and target == "patched":  # enabled_at: what the crash-loop guard compares a panic to
                self.desired.update(KIND, name, {"enabled": True, "enabled_at": time.time()})
            elif name in items and items[name].doc.get("enabled"):
                self.desired.update(KIND, name, {"enabled": False})
            patch = next((p for p in self.lp.patches if p.name == name), None)
            if target == "patched" and patch is not None and patch.replace:
                for other in self.lp.patches:
                    if other is not patch and other.replaced and other.name in items:
                        self.desired.update(KIND, other.name, {"enabled": False, "replaced": True})

    def _already(self, ctx: RequestContext) -> bool:
        """A replayed request whose change reached the desired state before the crash (and was restored)."""
        return ctx.replayed and self.desired is not None and self.desired.applied(ctx.request_id)

    def _record(self, name: str, changes: dict[str, Any], request_id: str | None) -> None:
        if self.desired is None:
            return
        if self.desired.get(KIND, name) is None:  # loaded outside the verbs (a test, an extension): not journaled
            return
        self.desired.update(KIND, name, changes, request_id=request_id)

    # -- boot --------------------------------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Re-load every desired patch in order, then re-enable the enabled ones one by one (each transition
        waited for). Blocking: call it in a worker thread, before the journal replay and before going online."""
        report = RestoreReport()
        t0 = time.monotonic()
        items = self.desired.items(KIND) if self.desired is not None else []
        for item in items:
            try:
                if item.blob is None:
                    raise BundleFormatError(f"the desired state of {item.key} holds no bundle", patch=item.key)
                bundle = PatchBundle.from_bytes(item.blob, f"desired bundle {item.key}")
                self.lp.load(bundle)
                if item.doc.get("replaced"):
                    self.lp.mark_replaced(item.key)
                report.loaded.append(item.key)
            except LivepatchdError as exc:
                self._restore_failed(report, item.key, exc.code, exc.message)
        for item in items:
            if not item.doc.get("enabled") or item.key not in report.loaded:
                continue
            held = self.guard.hold_back(item.doc) if self.guard is not None else None
            if held is not None:
                self._held_back(report, item.key, held)
                continue
            try:
                self._started[item.key] = time.monotonic()
                self.lp.enable(item.key, wait=False)
                if not self.lp.wait(self.restore_timeout_s):
                    self._restore_failed(report, item.key, "timeout", f"the transition of {item.key} did not "
                                         f"complete within {self.restore_timeout_s} s; it goes on")
                    break
                report.enabled.append(item.key)
            except LivepatchdError as exc:
                self._restore_failed(report, item.key, exc.code, exc.message)
        report.duration_s = round(time.monotonic() - t0, 6)
        self.restored = report
        if items:
            log.info("patches_restored", loaded=report.loaded, enabled=report.enabled, failed=report.failed,
                     held_back=[h["patch"] for h in report.held_back], duration_s=report.duration_s)
            self.emit("patch.restored", patches=report.loaded, enabled=report.enabled, failed=report.failed,
                      held_back=[h["patch"] for h in report.held_back], duration_s=report.duration_s)
        self.publish()
        return report

    def _held_back(self, report: RestoreReport, name: str, why: dict[str, Any]) -> None:
        report.held_back.append({"patch": name, **why})
        assert self.desired is not None
        self.desired.update(KIND, name, {"enabled": False, "held_back": why})  # and at the boots after this one
        log.warning("patch_held_back", patch=name, reason=why["reason"], panic=why["panic"])
        self.emit("patch.held_back", patch=name, **why)

    def _restore_failed(self, report: RestoreReport, name: str, code: str, message: str) -> None:
        report.failed.append({"patch": name, "code": code, "message": message})
        log.error("patch_restore_failed", patch=name, code=code, message=message)
        self.emit("patch.restore_failed", patch=name, code=code, message=message)
