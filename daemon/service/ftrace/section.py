"""The ``ftrace`` section of the retained state document: the API's ops, hijacks, trace session and profiler,
and the kernel's counts (ops registered, enabled functions, records)."""

from __future__ import annotations

import threading
from typing import Any

from daemon.ftrace import Ftrace, RecFlag
from daemon.service.ftrace.counts import Counts
from daemon.service.ftrace.hijacks import HijackVerbs
from daemon.service.ftrace.ops import OpsVerbs, text
from daemon.service.ftrace.profile import ProfileVerbs
from daemon.service.ftrace.trace import TraceVerbs
from daemon.service.pipeline.outbox import StateBoard

_ENABLED = int(RecFlag.ENABLED)


class FtraceSection:
    """Builds and republishes ``components.ftrace`` from the parts of the ftrace API."""

    def __init__(self, state: StateBoard, ftrace: Ftrace, counts: Counts, lock: threading.RLock, *, ops: OpsVerbs,
                 hijacks: HijackVerbs, trace: TraceVerbs, profile: ProfileVerbs) -> None:
        self.state = state
        self.ftrace = ftrace
        self.counts = counts
        self.lock = lock
        self.ops, self.hijacks, self.trace, self.profile = ops, hijacks, trace, profile
        self.restore_failed: list[dict[str, str]] = []
        """What the restore at boot could not re-apply."""

    def publish(self) -> None:
        """Republish the section (a no-op when nothing changed)."""
        ftrace, functions = self.ftrace, self.counts.functions
        with self.lock, ftrace.lock:
            session = self.trace.session
            profiler = self.profile.profiler
            section: dict[str, Any] = {
                "ops": [{"name": name, "callback": a.callback, "filter": text(a.filter), "notrace": text(a.notrace),
                         "functions": functions(a.ops)} for name, a in self.ops.ops.items()],
                "hijacks": [{"name": h.name, "mode": h.mode, "function": h.rec.name, "sympos": h.sympos,
                             "target": ftrace.describe(h.target)} for h in self.hijacks.hijacks.values()],
                "trace": None if session is None else {
                    "session": session.number, "filter": session.filter, "notrace": session.notrace,
                    "entries_per_cpu": session.entries_per_cpu},
                "profile": None if profiler is None else {
                    "filter": self.profile.profile_filter, "functions": functions(profiler.ops)},
                "ftrace_enabled": ftrace.enabled,
                "ops_registered": len(ftrace.ops),
                # no ops, no enabled site: a fleet host's boot publishes this with none, and the walk over ten
                # thousand records was ~12 ms of its event loop (shared by every host of the process)
                "enabled_functions": sum(1 for r in ftrace.records if int(r.flags) & _ENABLED) if ftrace.ops else 0,
                "records": len(ftrace.records),
                "restore_failed": list(self.restore_failed),
            }
        self.state.set_component("ftrace", section)
