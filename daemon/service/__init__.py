"""Use-cases behind the MQTT API: the request pipeline, what a host keeps on disk, and one sub-package per subsystem.

Layout::

    pipeline/    the request path every verb shares: Service (core), RequestContext and VerbTable (context),
                 the path's own errors, payload peeking, the outbox (state document, events, streams), metrics
    store/       the request journal, the desired-state store, checkpoints, group fsync, stored replies, integrity
    kernel.py    the kernel's own verbs (info, symbol.lookup, call, call.read, tasks)
    ftrace/      ops, hijacks, the tracers, the function profiler, tracefs views (FtraceSubsystem)
    livepatch/   patch.* use-cases, Livepatch's event subscriber, state section, desired state, restore, views,
                 trusted keys, check/effect (LivepatchSubsystem)
    kprobes/     kprobe.* (KprobeSubsystem), kretprobe.* and fprobe.* (RetprobeSubsystem)

How a subsystem adds a verb (copy the smallest package, ``kprobes/``):

1. in the subsystem's schema module (``schemas/ftrace.py``, ``schemas/livepatch.py``, ``schemas/kprobes.py``; the
   kernel's own verbs are in ``schemas/kernel.py``): a request model (subclass of ``schemas.Request``), a data
   model (subclass of ``schemas.Outbound``) and a ``VerbSpec`` in that module's ``SPECS`` (``mutating=True``
   serializes it with the others), which the catalog ``schemas.catalog.VERBS`` collects; then
   ``python -m schemas.export`` to refresh the checked-in JSON Schema and AsyncAPI files;
2. a method on the subsystem's object (built with what it uses: the service, the kernel, the desired-state
   store...), named in its verb table::

       class KprobeSubsystem:
           def verbs(self) -> VerbTable:
               return {"kprobe.list": self.list_probes, ...}

           def list_probes(self, req: KprobeListRequest, ctx: RequestContext) -> KprobeListData:  # def: a thread
               ctx.state.set_component("kprobes", {...})   # republishes the retained state document
               ctx.events.emit("kprobe.registered", ...)   # publishes an event
               if ctx.already_applied: ...                # a replay whose change the desired state already holds
               return KprobeListData(...)

   raising any ``daemon.errors.LivepatchdError`` for a refusal (its ``code`` goes on the wire); a coroutine
   method runs on the event loop and must not block;
3. in ``daemon/app.py``, build the subsystem and ``service.serve(subsystem.verbs())`` (with the others, before
   the restore at boot), or, for a test or an experiment, ``Daemon(settings, extensions=[lambda service, kernel:
   service.serve(...)])``.

Requests of every verb get the same treatment: journaled before the broker's PUBACK, answered once per
``request_id``, replayed after a crash before the daemon announces itself online; whether a replayed request's
change already reached the desired state is decided once, by the service (``RequestContext.already_applied``).
"""

from daemon.service.pipeline.core import Outcome, ReplyRoute, RequestContext, Service, kernel_identity
from daemon.service.pipeline.metrics import Metrics
from daemon.service.store.journal import Journal

__all__ = ["Journal", "Metrics", "Outcome", "ReplyRoute", "RequestContext", "Service", "kernel_identity"]
