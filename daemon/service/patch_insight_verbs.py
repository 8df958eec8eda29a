"""``patch.check``: the stalls a loaded patch's transition would meet if it were enabled now (read-only).

The prediction is :func:`daemon.livepatch.precheck.predict`: the transition's own stack check over every task, in
one stop-machine pause, with nothing written. Errors are Livepatch's: an unknown patch is
``livepatch_not_found``; a patch already enabled, in transition or replaced is ``livepatch_bad_state``.
"""

from __future__ import annotations

from daemon.livepatch.core import Livepatch
from daemon.livepatch.precheck import predict
from daemon.service.core import RequestContext, Service
from schemas.patch_insight import PatchCheckData, PatchCheckRequest, PredictedBlocker


def register(service: Service, livepatch: Livepatch) -> None:
    """Serve ``patch.check`` for ``livepatch`` on ``service``."""

    @service.handler("patch.check")
    def patch_check(req: PatchCheckRequest, ctx: RequestContext) -> PatchCheckData:
        p = predict(livepatch, req.name)
        return PatchCheckData(
            name=p.patch, tasks_scanned=p.tasks_scanned, functions=list(p.functions), would_block=bool(p.blocks),
            will_stall=p.will_stall, signals=p.signals, busy_with=p.busy_with,
            blockers=[PredictedBlocker(pid=b.pid, comm=b.comm, cpu=b.cpu, kind=b.kind, reason=b.reason,
                                       outcome=b.outcome, why=b.why, function=b.function, stack=list(b.stack))
                      for b in p.blocks])
