"""The ftrace verbs: ops with filters, tracefs views, the tracers, the function profiler and hijacks (redirects).

:func:`register` serves ``ftrace.*``, ``trace.*``, ``profile.*`` and ``hijack.*`` for one kernel's
:class:`Ftrace` and returns the :class:`FtraceVerbs` that owns what the API created: ops by name, hijacks by
name, at most one tracer session (``ftrace_trace.TraceSession``) and at most one function profiler. Every
change is one ftrace call, so one stop-machine batch that is all-or-nothing: a refused request leaves the kernel
exactly as it was (validation raises before anything is written). After each change the ``ftrace`` section of the
state document is republished and an event is emitted (``ftrace.ops.registered``, ``hijack.created``,
``trace.started``, …).

Safety rules (the API never takes a guest address to call):

* an ops' callback is ``count`` (``ops_func_count``) or ``nop`` (``ops_func_nop``), nothing else;
* an ``ipmodify`` hijack continues the call at the start of a function in kernel or module text — not the
  hijacked function itself, nor a function whose own hijacks lead back to it; the target must take the same
  arguments, which the daemon cannot check;
* a ``direct`` hijack goes through one of the guest's direct trampolines (``DIRECT_TRAMPOLINES``): they are
  entered with x9 = the caller and x30 = the traced function's body, a convention no C function follows.

**Desired state.** With a :class:`DesiredState` store, registered ops (kind ``ftrace.ops``) and hijacks (kind
``ftrace.hijack``) are recorded with each change, in the same transaction as the request id, and
:meth:`FtraceVerbs.restore` re-applies them at boot (after the live patches: a filter or a hijack target may
name a patch module's function). An ops' filter is kept as the sequence of expressions applied to it, so a
restore rebuilds exactly the same sets. A removed ops or hijack stays in the store as a tombstone holding its
last description, so that a request replayed after a crash, whose change had already reached the store, is
answered from the state instead of being applied twice. Trace sessions are not desired state: a restart ends
them, as a reboot ends tracing.

:class:`FtraceVerbs` holds the registries, the state section, the restore and the tracefs views; its verbs are
mixed in from ``ftrace_api_ops`` (``ftrace.ops.*``), ``ftrace_hijacks`` (``hijack.*``), ``ftrace_trace``
(``trace.*``) and ``ftrace_profile`` (``profile.*``), its desired-state records from ``ftrace_desired``.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field

import structlog

from daemon.arch.arm64.patching import BatchResult
from daemon.errors import LivepatchdError
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.records import RecFlag
from daemon.ftrace.tracer import FunctionProfiler
from daemon.kernel.kernel import Kernel
from daemon.service.ftrace_api_ops import OpsVerbs, _ApiOps, _text
from daemon.service.ftrace_desired import KIND_HIJACK, KIND_OPS, KIND_SYSCTL, FtraceDesired
from daemon.service.ftrace_hijacks import HijackVerbs, _Hijack
from daemon.service.ftrace_profile import ProfileVerbs
from daemon.service.ftrace_trace import StreamOutlet, TraceFormatter, TraceSession, TraceVerbs
from daemon.service.pipeline.core import RequestContext, Service
from daemon.service.store.desired import DesiredState
from schemas.ftrace import (
    AvailableData,
    AvailableRequest,
    BatchInfo,
    EnabledData,
    EnabledRequest,
    SysctlData,
    SysctlRequest,
)

log = structlog.get_logger(__name__)

_ENABLED = int(RecFlag.ENABLED)


def _batch(results: list[BatchResult | None]) -> BatchInfo | None:
    done = [r for r in results if r is not None]
    if not done:
        return None
    return BatchInfo(sites=sum(r.sites for r in done), data=sum(r.data for r in done),
                     pause_us=round(sum(r.pause_ns for r in done) / 1000, 1))


@dataclass
class RestoreReport:
    """What :meth:`FtraceVerbs.restore` re-applied at boot."""

    ops: list[str] = field(default_factory=list)
    hijacks: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


class FtraceVerbs(OpsVerbs, HijackVerbs, TraceVerbs, ProfileVerbs, FtraceDesired):
    """The API's ops, hijacks and trace session on one kernel's ftrace (see the module docstring)."""

    def __init__(self, service: Service, kernel: Kernel, ftrace: Ftrace, desired: DesiredState | None = None,
                 streams: StreamOutlet | None = None) -> None:
        self.service = service
        self.kernel = kernel
        self.ftrace = ftrace
        self.desired = desired
        self.streams = streams
        self.ops: dict[str, _ApiOps] = {}
        self.hijacks: dict[str, _Hijack] = {}
        self.session: TraceSession | None = None
        self.sessions = 0
        self.profiler: FunctionProfiler | None = None
        self.profile_filter: str | None = None
        self.restored: RestoreReport | None = None
        self.formatter = TraceFormatter(kernel, ftrace)
        self._lock = threading.RLock()  # the registries above (ftrace has its own lock for the kernel's state)

    def close(self) -> None:
        """Stop the drainer thread (the tracer itself goes away with the kernel)."""
        with self._lock:
            if self.session is not None:
                self.session.stop_draining()

    # -- views of the registries -----------------------------------------------------------------------------

    def functions(self, ops: FtraceOps) -> int:
        """How many functions ``ops`` covers (its filter, or every record, minus its notrace set)."""
        base = ops.filter if ops.filter else self.ftrace.by_ip.keys()
        return sum(1 for ip in base if ip not in ops.notrace and ip in self.ftrace.by_ip)

    def _observe(self, verb: str, *results: BatchResult | None) -> BatchInfo | None:
        for r in results:
            if r is not None and r.pause_ns:
                self.service.metrics.batch_pause.labels(verb).observe(r.pause_ns / 1e9)
        return _batch(list(results))

    def publish(self) -> None:
        """Republish the ``ftrace`` section of the state document (a no-op when nothing changed)."""
        with self._lock, self.ftrace.lock:
            session = self.session
            section = {
                "ops": [{"name": name, "callback": a.callback, "filter": _text(a.filter), "notrace": _text(a.notrace),
                         "functions": self.functions(a.ops)} for name, a in self.ops.items()],
                "hijacks": [{"name": h.name, "mode": h.mode, "function": h.rec.name, "sympos": h.sympos,
                             "target": self.ftrace.describe(h.target)} for h in self.hijacks.values()],
                "trace": None if session is None else {
                    "session": session.number, "filter": session.filter, "notrace": session.notrace,
                    "entries_per_cpu": session.entries_per_cpu},
                "profile": None if self.profiler is None else {
                    "filter": self.profile_filter, "functions": self.functions(self.profiler.ops)},
                "ftrace_enabled": self.ftrace.enabled,
                "ops_registered": len(self.ftrace.ops),
                "enabled_functions": sum(1 for r in self.ftrace.records if int(r.flags) & _ENABLED),
                "records": len(self.ftrace.records),
                "restore_failed": [] if self.restored is None else self.restored.failed,
            }
        self.service.state.set_component("ftrace", section)

    # -- boot --------------------------------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Set kernel.ftrace_enabled as last asked, re-register the desired ops, then re-create the desired
        hijacks, in the order they were first made.

        Blocking: call it in a worker thread, after the live patches' restore and before the journal replay.
        A failure is logged, published (``ftrace.restore_failed`` events, ``restore_failed`` in the state) and
        skipped; the item stays desired.
        """
        report = RestoreReport()
        items = [*self.desired.items(KIND_SYSCTL), *self.desired.items(KIND_OPS), *self.desired.items(KIND_HIJACK)
                 ] if self.desired else []
        with self._lock:
            for item in items:
                doc = item.doc
                try:
                    if item.kind == KIND_SYSCTL:
                        self.ftrace.set_enabled(bool(doc["value"]))
                    elif item.kind == KIND_OPS and doc.get("registered"):
                        self._register(item.key, doc["callback"], bool(doc.get("recursion")),
                                       [(e, bool(r)) for e, r in doc.get("filter", [])],
                                       [(e, bool(r)) for e, r in doc.get("notrace", [])])
                        report.ops.append(item.key)
                    elif item.kind == KIND_HIJACK and doc.get("active"):
                        self._create(item.key, doc)
                        report.hijacks.append(item.key)
                except LivepatchdError as exc:
                    report.failed.append({"kind": item.kind, "name": item.key, "code": exc.code,
                                          "message": exc.message})
                    log.error("ftrace_restore_failed", kind=item.kind, name=item.key, code=exc.code,
                              message=exc.message)
                    self.service.events.emit("ftrace.restore_failed", kind=item.kind, name=item.key, code=exc.code,
                                             message=exc.message)
            self.restored = report
        if items:
            log.info("ftrace_restored", ops=report.ops, hijacks=report.hijacks, failed=len(report.failed))
            self.service.events.emit("ftrace.restored", ops=report.ops, hijacks=report.hijacks,
                                     failed=len(report.failed))
        self.publish()
        return report

    # -- sysctl --------------------------------------------------------------------------------------------------

    def sysctl(self, req: SysctlRequest, ctx: RequestContext) -> SysctlData:
        """kernel.ftrace_enabled: read, or set (idempotent: a replay sets the same value again)."""
        with self._lock:
            value = req.ftrace_enabled
            if value is None or value == self.ftrace.enabled:
                return SysctlData(ftrace_enabled=self.ftrace.enabled, changed=False, sites=0)
            batch = self._observe("ftrace.sysctl", self.ftrace.set_enabled(value))
            self._record(KIND_SYSCTL, "ftrace_enabled", {"value": value}, ctx)
            sites = batch.sites if batch is not None else 0
            self.service.events.emit("ftrace.sysctl", ftrace_enabled=value, sites=sites)
        self.publish()
        return SysctlData(ftrace_enabled=value, changed=True, sites=sites)

    # -- tracefs views ---------------------------------------------------------------------------------------

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


def register(service: Service, kernel: Kernel, ftrace: Ftrace, *, desired: DesiredState | None = None,
             streams: StreamOutlet | None = None) -> FtraceVerbs:
    """Serve the ftrace verbs of ``ftrace`` on ``service`` and return their :class:`FtraceVerbs`.

    ``desired`` makes ops and hijacks survive restarts: call ``restore()`` on the result at boot (after the live
    patches' restore, before the journal replay). Trace batches go on the trace topic through ``streams``
    (default: ``service.streams``, which the MQTT bridge publishes). Call ``close()`` at shutdown.
    """
    verbs = FtraceVerbs(service, kernel, ftrace, desired, streams if streams is not None else service.streams)
    for verb, fn in (
        ("ftrace.ops.register", verbs.ops_register),
        ("ftrace.ops.unregister", verbs.ops_unregister),
        ("ftrace.ops.list", verbs.ops_list),
        ("ftrace.ops.filter", verbs.ops_filter),
        ("ftrace.available_filter_functions", verbs.available),
        ("ftrace.enabled_functions", verbs.enabled),
        ("ftrace.sysctl", verbs.sysctl),
        ("trace.start", verbs.trace_start),
        ("trace.read", verbs.trace_read),
        ("trace.stop", verbs.trace_stop),
        ("profile.start", verbs.profile_start),
        ("profile.read", verbs.profile_read),
        ("profile.stop", verbs.profile_stop),
        ("hijack.create", verbs.hijack_create),
        ("hijack.delete", verbs.hijack_delete),
        ("hijack.list", verbs.hijack_list),
    ):
        service.register(verb, fn)
    verbs.publish()
    return verbs
