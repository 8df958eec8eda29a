"""The restore at boot: every desired patch loaded again in order, then the enabled ones enabled one by one (each
transition waited for), like kpatch's ``load --all`` at boot — unless the crash-loop guard holds one back."""

from __future__ import annotations

import time
from typing import Any

import structlog

from daemon.errors import BundleFormatError, LivepatchdError
from daemon.livepatch.core import Livepatch
from daemon.service.livepatch.crash_guard import CrashLoopGuard
from daemon.service.livepatch.desired import PatchRecorder, RestoreReport
from daemon.service.livepatch.events import PatchEvents
from daemon.service.livepatch.section import LivepatchSection
from patchformat.bundle import PatchBundle

log = structlog.get_logger(__name__)


class PatchRestore:
    """Re-applies one Livepatch's desired state (``restore()``, once, at boot)."""

    def __init__(self, livepatch: Livepatch, recorder: PatchRecorder, events: PatchEvents,
                 section: LivepatchSection, *, guard: CrashLoopGuard | None, timeout_s: float) -> None:
        self.lp = livepatch
        self.recorder = recorder
        self.events = events
        self.section = section
        self.guard = guard
        self.timeout_s = timeout_s

    def restore(self) -> RestoreReport:
        """Re-load every desired patch in order, then re-enable the enabled ones one by one (each transition
        waited for). Blocking: call it in a worker thread, before the journal replay and before going online."""
        report = RestoreReport()
        t0 = time.monotonic()
        items = self.recorder.items()
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
                self._failed(report, item.key, exc.code, exc.message)
        for item in items:
            if not item.doc.get("enabled") or item.key not in report.loaded:
                continue
            held = self.guard.hold_back(item.doc) if self.guard is not None else None
            if held is not None:
                self._held_back(report, item.key, held)
                continue
            try:
                self.events.started_now(item.key)
                self.lp.enable(item.key, wait=False)
                if not self.lp.wait(self.timeout_s):
                    self._failed(report, item.key, "timeout", f"the transition of {item.key} did not "
                                 f"complete within {self.timeout_s} s; it goes on")
                    break
                report.enabled.append(item.key)
            except LivepatchdError as exc:
                self._failed(report, item.key, exc.code, exc.message)
        report.duration_s = round(time.monotonic() - t0, 6)
        self.section.restored = report
        if items:
            log.info("patches_restored", loaded=report.loaded, enabled=report.enabled, failed=report.failed,
                     held_back=[h["patch"] for h in report.held_back], duration_s=report.duration_s)
            self.events.emit("patch.restored", patches=report.loaded, enabled=report.enabled, failed=report.failed,
                             held_back=[h["patch"] for h in report.held_back], duration_s=report.duration_s)
        self.section.publish()
        return report

    def _held_back(self, report: RestoreReport, name: str, why: dict[str, Any]) -> None:
        report.held_back.append({"patch": name, **why})
        self.recorder.held_back(name, why)
        log.warning("patch_held_back", patch=name, reason=why["reason"], panic=why["panic"])
        self.events.emit("patch.held_back", patch=name, **why)

    def _failed(self, report: RestoreReport, name: str, code: str, message: str) -> None:
        report.failed.append({"patch": name, "code": code, "message": message})
        log.error("patch_restore_failed", patch=name, code=code, message=message)
        self.events.emit("patch.restore_failed", patch=name, code=code, message=message)
