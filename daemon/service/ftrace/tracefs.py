"""The tracefs files served as verbs: ``available_filter_functions``, ``enabled_functions`` (or
``touched_functions``), and the ``kernel.ftrace_enabled`` sysctl."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable

from daemon.ftrace import Ftrace, RecFlag, tracefs
from daemon.service.ftrace.counts import Counts
from daemon.service.ftrace.desired import KIND_SYSCTL, FtraceDesired
from daemon.service.pipeline.context import RequestContext
from schemas.ftrace import AvailableData, AvailableRequest, EnabledData, EnabledRequest, SysctlData, SysctlRequest


class TracefsVerbs:
    """Views of one kernel's ftrace records, and its on/off switch."""

    def __init__(self, ftrace: Ftrace, desired: FtraceDesired, counts: Counts, *, lock: threading.RLock,
                 publish: Callable[[], None]) -> None:
        self.ftrace = ftrace
        self.desired = desired
        self.counts = counts
        self.lock = lock
        self.publish = publish

    def sysctl(self, req: SysctlRequest, ctx: RequestContext) -> SysctlData:
        """kernel.ftrace_enabled: read, or set (idempotent: a replay sets the same value again)."""
        with self.lock:
            value = req.ftrace_enabled
            if value is None or value == self.ftrace.enabled:
                return SysctlData(ftrace_enabled=self.ftrace.enabled, changed=False, sites=0)
            batch = self.counts.batch("ftrace.sysctl", self.ftrace.set_enabled(value))
            self.desired.record(KIND_SYSCTL, "ftrace_enabled", {"value": value}, ctx)
            sites = batch.sites if batch is not None else 0
            ctx.events.emit("ftrace.sysctl", ftrace_enabled=value, sites=sites)
        self.publish()
        return SysctlData(ftrace_enabled=value, changed=True, sites=sites)

    def available(self, req: AvailableRequest, ctx: RequestContext) -> AvailableData:
        pattern = req.pattern
        with self.ftrace.lock:
            if pattern is None:
                chosen = self.ftrace.records
            elif any(ch in pattern for ch in "*?["):
                chosen = [r for r in self.ftrace.records if fnmatch.fnmatchcase(r.name, pattern)]
            else:
                chosen = [r for r in self.ftrace.records if r.name == pattern]
            page = [self.ftrace.name_of(r) for r in chosen[req.offset:req.offset + req.limit]]
        end = req.offset + len(page)
        return AvailableData(functions=page, total=len(chosen), offset=req.offset,
                             next_offset=end if end < len(chosen) else None)

    def enabled(self, req: EnabledRequest, ctx: RequestContext) -> EnabledData:
        want = int(RecFlag.TOUCHED if req.touched else RecFlag.ENABLED)
        with self.ftrace.lock:
            chosen = [r for r in self.ftrace.records if int(r.flags) & want]  # int(): IntFlag's & is 20x slower
            page = chosen[req.offset:req.offset + req.limit]
            text = "".join(tracefs.enabled_line(self.ftrace, r) for r in page)
        end = req.offset + len(page)
        return EnabledData(text=text, functions=len(page), total=len(chosen), offset=req.offset,
                           next_offset=end if end < len(chosen) else None)
