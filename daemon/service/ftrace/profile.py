"""The function profiler behind ``profile.start`` / ``profile.read`` / ``profile.stop``.

One :class:`~daemon.ftrace.tracer.FunctionProfiler` at a time (``function_profile_enabled``): the guest counts
the calls of each selected function per CPU in a hash-indexed table, no ring and no Python per call; a read sums
the CPUs and prints ``trace_stat/function``. It runs beside a trace session (it uses no ring). Not desired state:
a restart ends it, as a reboot does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from daemon.errors import FtraceError
from daemon.ftrace import Ftrace, FunctionProfiler, tracefs
from daemon.service.ftrace.counts import Counts
from daemon.service.pipeline.context import RequestContext
from schemas.ftrace import (
    ProfileLine,
    ProfileReadData,
    ProfileReadRequest,
    ProfileStartData,
    ProfileStartRequest,
    ProfileStopData,
    ProfileStopRequest,
)


class ProfileNotRunning(FtraceError):
    """profile.read or profile.stop while the function profiler is not running."""

    code = "profile_not_running"


class ProfileVerbs:
    """The function profiler's verbs (under the subsystem's ``lock``; ``publish`` republishes its section)."""

    def __init__(self, ftrace: Ftrace, counts: Counts, *, lock: threading.RLock, publish: Callable[[], None]) -> None:
        self.ftrace = ftrace
        self.counts = counts
        self.lock = lock
        self.publish = publish
        self.profiler: FunctionProfiler | None = None
        self.profile_filter: str | None = None

    def profile_start(self, req: ProfileStartRequest, ctx: RequestContext) -> ProfileStartData:
        with self.lock:
            if self.profiler is not None:
                raise FtraceError("the function profiler is already running; stop it first (profile.stop)")
            profiler = FunctionProfiler(self.ftrace, filter=req.filter)  # a filter matching nothing raises here
            try:
                result = profiler.start()
            except BaseException:
                profiler.close()
                raise
            self.profiler, self.profile_filter = profiler, req.filter or None
            functions = self.counts.functions(profiler.ops)
        self.publish()
        ctx.events.emit("profile.started", filter=self.profile_filter, functions=functions)
        return ProfileStartData(filter=self.profile_filter, functions=functions,
                                batch=self.counts.batch(ctx.verb, result))

    def _profiler(self) -> FunctionProfiler:
        if self.profiler is None:
            raise ProfileNotRunning("the function profiler is not running (profile.start starts it)")
        return self.profiler

    def _counts(self, profiler: FunctionProfiler, limit: int, *, running: bool) -> ProfileReadData:
        report = profiler.report()
        shown = report[:limit]
        return ProfileReadData(text=tracefs.function_stat(shown), total_functions=len(report),
                               functions=[ProfileLine(function=p.name, address=p.ip, hits=p.hits) for p in shown],
                               total_hits=sum(p.hits for p in report), running=running)

    def profile_read(self, req: ProfileReadRequest, ctx: RequestContext) -> ProfileReadData:
        with self.lock:
            return self._counts(self._profiler(), req.limit, running=True)

    def profile_stop(self, req: ProfileStopRequest, ctx: RequestContext) -> ProfileStopData:
        with self.lock:
            profiler = self._profiler()
            result = profiler.stop()  # unregistered: the counts stay readable until close()
            counts = self._counts(profiler, req.limit, running=False)
            profiler.close()
            self.profiler = self.profile_filter = None
        self.publish()
        ctx.events.emit("profile.stopped", functions=counts.total_functions, hits=counts.total_hits)
        return ProfileStopData(**counts.model_dump(), batch=self.counts.batch(ctx.verb, result))
