"""Use-cases behind the MQTT API: the verb registry, the request journal, and the kernel's verbs.

How a subsystem adds a verb (ftrace, livepatch, …):

1. in the subsystem's schema module (``schemas/ftrace.py``, ``schemas/livepatch.py``; the kernel's own
   verbs are in ``schemas/kernel.py``): a request model (subclass of ``schemas.Request``), a data model (subclass
   of ``schemas.Outbound``) and a ``VerbSpec`` in that module's ``SPECS`` (``mutating=True`` serializes it with
   the others), which the catalog ``schemas.catalog.VERBS`` collects; then ``python -m schemas.export`` to refresh the
   checked-in JSON Schema and AsyncAPI files;
2. a module in ``daemon/service/`` with a ``register(service, ...)`` function that registers handlers::

       def register(service: Service, ftrace: Ftrace) -> None:
           @service.handler("ftrace.ops.list")
           def ops_list(req: OpsListRequest, ctx: RequestContext) -> OpsListData:   # plain def: runs in a thread
               ctx.state.set_component("ftrace", {...})       # republishes the retained state document
               ctx.events.emit("ftrace.ops.registered", ...)  # publishes an event
               return OpsListData(...)

   raising any ``daemon.errors.LivepatchdError`` for a refusal (its ``code`` goes on the wire);
3. one call of that ``register`` in ``daemon/app.py`` (next to ``kernel_verbs.register``), or, for a test or an
   experiment, ``Daemon(settings, extensions=[lambda service, kernel: register(service, ...)])``.

Requests of every verb get the same treatment: journaled before the broker's PUBACK, answered once per
``request_id``, replayed after a crash before the daemon announces itself online.
"""

from daemon.service.pipeline.core import Outcome, ReplyRoute, RequestContext, Service
from daemon.service.pipeline.metrics import Metrics
from daemon.service.store.journal import Journal

__all__ = ["Journal", "Metrics", "Outcome", "ReplyRoute", "RequestContext", "Service"]
