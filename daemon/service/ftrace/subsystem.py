"""The ftrace verbs: ops with filters, tracefs views, the tracers, the function profiler and hijacks (redirects).

:class:`FtraceSubsystem` serves ``ftrace.*``, ``trace.*``, ``profile.*`` and ``hijack.*`` for one kernel's
:class:`Ftrace` (``verbs()`` is its table) and owns what the API created: ops by name, hijacks by name, at most
one tracer session (``trace.TraceSession``) and at most one function profiler. Every
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
:meth:`FtraceSubsystem.restore` re-applies them at boot (after the live patches: a filter or a hijack target may
name a patch module's function). An ops' filter is kept as the sequence of expressions applied to it, so a
restore rebuilds exactly the same sets. A removed ops or hijack stays in the store as a tombstone holding its
last description, so that a request replayed after a crash, whose change had already reached the store, is
answered from the state instead of being applied twice. Trace sessions are not desired state: a restart ends
them, as a reboot ends tracing.

Its parts, each handed what it uses: ``ops`` (``ftrace.ops.*``), ``hijacks`` (``hijack.*``, their targets
checked by ``targets``), ``trace`` (``trace.*``), ``profile`` (``profile.*``), ``tracefs`` (the tracefs views and
the sysctl), ``desired`` (their records in the store), ``section`` (the state section), ``counts`` (what a
reply reports about a change). They share one lock (the registries; ftrace has its own for the kernel's state).
"""


from __future__ import annotations

import threading
from dataclasses import dataclass, field

import structlog

from daemon.errors import LivepatchdError
from daemon.ftrace import Ftrace
from daemon.kernel.kernel import Kernel
from daemon.service.ftrace.counts import Counts
from daemon.service.ftrace.desired import KIND_HIJACK, KIND_OPS, KIND_SYSCTL, FtraceDesired
from daemon.service.ftrace.hijacks import HijackVerbs
from daemon.service.ftrace.ops import OpsVerbs
from daemon.service.ftrace.profile import ProfileVerbs
from daemon.service.ftrace.section import FtraceSection
from daemon.service.ftrace.trace import StreamOutlet, TraceVerbs
from daemon.service.ftrace.tracefs import TracefsVerbs
from daemon.service.pipeline.context import VerbTable
from daemon.service.pipeline.core import Service
from daemon.service.store.desired import DesiredState

log = structlog.get_logger(__name__)


@dataclass
class RestoreReport:
    """What :meth:`FtraceSubsystem.restore` re-applied at boot."""

    ops: list[str] = field(default_factory=list)
    hijacks: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


class FtraceSubsystem:
    """The API's ops, hijacks, tracer and profiler on one kernel's ftrace (see the module docstring).

    Built, it publishes its section of the state document. Trace batches go on the trace topic through
    ``streams`` (default: ``service.streams``, which the MQTT bridge publishes). Call ``close()`` at shutdown.
    """

    def __init__(self, service: Service, kernel: Kernel, ftrace: Ftrace, desired: DesiredState | None = None,
                 streams: StreamOutlet | None = None) -> None:
        self.service = service
        self.ftrace = ftrace
        self.lock = threading.RLock()
        self.desired = FtraceDesired(desired)
        self.counts = counts = Counts(ftrace, service.metrics)
        lock, publish = self.lock, self.publish
        self.ops = OpsVerbs(ftrace, self.desired, counts, lock=lock, publish=publish)
        self.hijacks = HijackVerbs(kernel, ftrace, self.desired, counts, lock=lock, publish=publish)
        self.tracefs = TracefsVerbs(ftrace, self.desired, counts, lock=lock, publish=publish)
        self.trace = TraceVerbs(service, kernel, ftrace, streams if streams is not None else service.streams,
                                counts=counts, lock=lock, publish=publish)
        self.profile = ProfileVerbs(ftrace, counts, lock=lock, publish=publish)
        self.section = FtraceSection(service.state, ftrace, counts, self.lock, ops=self.ops, hijacks=self.hijacks,
                                     trace=self.trace, profile=self.profile)
        self.restored: RestoreReport | None = None
        self.publish()

    def verbs(self) -> VerbTable:
        ops, hijacks, trace, profile, tracefs = self.ops, self.hijacks, self.trace, self.profile, self.tracefs
        return {
            "ftrace.ops.register": ops.ops_register,
            "ftrace.ops.unregister": ops.ops_unregister,
            "ftrace.ops.list": ops.ops_list,
            "ftrace.ops.filter": ops.ops_filter,
            "ftrace.available_filter_functions": tracefs.available,
            "ftrace.enabled_functions": tracefs.enabled,
            "ftrace.sysctl": tracefs.sysctl,
            "trace.start": trace.trace_start,
            "trace.read": trace.trace_read,
            "trace.stop": trace.trace_stop,
            "profile.start": profile.profile_start,
            "profile.read": profile.profile_read,
            "profile.stop": profile.profile_stop,
            "hijack.create": hijacks.hijack_create,
            "hijack.delete": hijacks.hijack_delete,
            "hijack.list": hijacks.hijack_list,
        }

    def publish(self) -> None:
        """Republish the ``ftrace`` section of the state document (a no-op when nothing changed), and take the
        listing ``ftrace.ops.list`` answers from (after every change: ops, hijacks, tracers, a patch's klp ops)."""
        self.ops.refresh_listing()
        self.section.publish()

    def close(self) -> None:
        """Stop the trace drainer (the tracer itself goes away with the kernel)."""
        self.trace.close()

    def restore(self) -> RestoreReport:
        """Set kernel.ftrace_enabled as last asked, re-register the desired ops, then re-create the desired
        hijacks, in the order they were first made.

        Blocking: call it in a worker thread, after the live patches' restore and before the journal replay.
        A failure is logged, published (``ftrace.restore_failed`` events, ``restore_failed`` in the state) and
        skipped; the item stays desired.
        """
        report = RestoreReport()
        items = self.desired.items()
        events = self.service.events
        with self.lock:
            for item in items:
                doc = item.doc
                try:
                    if item.kind == KIND_SYSCTL:
                        self.ftrace.set_enabled(bool(doc["value"]))
                    elif item.kind == KIND_OPS and doc.get("registered"):
                        self.ops.register(item.key, doc["callback"], bool(doc.get("recursion")),
                                          [(e, bool(r)) for e, r in doc.get("filter", [])],
                                          [(e, bool(r)) for e, r in doc.get("notrace", [])])
                        report.ops.append(item.key)
                    elif item.kind == KIND_HIJACK and doc.get("active"):
                        self.hijacks.create(item.key, doc)
                        report.hijacks.append(item.key)
                except LivepatchdError as exc:
                    report.failed.append({"kind": item.kind, "name": item.key, "code": exc.code,
                                          "message": exc.message})
                    log.error("ftrace_restore_failed", kind=item.kind, name=item.key, code=exc.code,
                              message=exc.message)
                    events.emit("ftrace.restore_failed", kind=item.kind, name=item.key, code=exc.code,
                                message=exc.message)
            self.restored = report
            self.section.restore_failed = report.failed
        if items:
            log.info("ftrace_restored", ops=report.ops, hijacks=report.hijacks, failed=len(report.failed))
            events.emit("ftrace.restored", ops=report.ops, hijacks=report.hijacks, failed=len(report.failed))
        self.publish()
        return report
