"""The ops the API registers (``ftrace.ops.*``): their callbacks, their filter and notrace write steps (what a
restore replays), how they are described, and the verbs that register, filter, list and unregister them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.errors import OpsStateError
from daemon.ftrace import BatchResult, Ftrace, FtraceOps, OpsFlag, filter_terms
from daemon.service.ftrace.counts import Counts
from daemon.service.ftrace.desired import KIND_OPS, FtraceDesired
from daemon.service.pipeline.context import RequestContext
from schemas.ftrace import (
    ForeignOps,
    OpsData,
    OpsFilterRequest,
    OpsInfo,
    OpsListData,
    OpsListRequest,
    OpsRegisterRequest,
    OpsUnregisterRequest,
)

CALLBACKS = {"count": "ops_func_count", "nop": "ops_func_nop"}

Callback = Literal["count", "nop"]
Steps = list[tuple[str, bool]]
"""set_ftrace_filter writes since the last reset: (expression, reset)."""


def _flag_names(flags: OpsFlag) -> list[str]:
    return [f.name for f in OpsFlag if f.name and flags & f]


def _write(steps: Steps, expr: str, reset: bool) -> Steps:
    """The steps after one more write (an empty expression with reset clears; without reset it does nothing)."""
    if not filter_terms(expr):
        return [] if reset else steps
    return [(expr, True)] if reset else [*steps, (expr, False)]


def text(steps: Steps) -> str | None:
    return " ".join(expr for expr, _ in steps) or None


@dataclass
class ApiOps:
    ops: FtraceOps
    callback: Callback
    recursion: bool
    filter: Steps = field(default_factory=list)
    notrace: Steps = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {"registered": True, "callback": self.callback, "recursion": self.recursion,
                "filter": [list(s) for s in self.filter], "notrace": [list(s) for s in self.notrace]}


@dataclass(frozen=True)
class Listing:
    """What ``ftrace.ops.list`` answers, as of the last change (hits aside, read live): a read that does not wait
    behind a change holding the lock for its whole update plan and stop-machine batch (tens of ms)."""

    mine: list[tuple[ApiOps, OpsInfo]]
    others: list[ForeignOps]
    ftrace_ops: tuple[FtraceOps, ...]
    """ftrace's ops list when it was taken: another list now (an ops registered elsewhere, e.g. an fprobe) means
    it is stale."""

    def current(self, now: tuple[FtraceOps, ...]) -> bool:
        return len(now) == len(self.ftrace_ops) and all(a is b for a, b in zip(now, self.ftrace_ops, strict=True))


class OpsVerbs:
    """The ops registered through the API (under the subsystem's ``lock``; ``publish`` republishes its section).
    ``ftrace.ops.list`` answers from the listing taken when the last change was published, without the lock."""

    def __init__(self, ftrace: Ftrace, desired: FtraceDesired, counts: Counts, *, lock: threading.RLock,
                 publish: Callable[[], None]) -> None:
        self.ftrace = ftrace
        self.desired = desired
        self.counts = counts
        self.lock = lock
        self.publish = publish
        self.ops: dict[str, ApiOps] = {}
        self._listing: Listing | None = None

    # -- views -----------------------------------------------------------------------------------------------

    def ops_info(self, a: ApiOps) -> OpsInfo:
        ops = a.ops
        return OpsInfo(name=ops.name, callback=a.callback, filter=text(a.filter), notrace=text(a.notrace),
                       filter_functions=None if ops.filter is None else len(ops.filter),
                       notrace_functions=len(ops.notrace),
                       functions=self.counts.functions(ops) if ops.registered else 0,
                       flags=_flag_names(ops.flags), address=ops.addr or None, hits=self.ftrace.ops_hits(ops))

    def _api_ops(self, name: str) -> ApiOps:
        found = self.ops.get(name)
        if found is None:
            raise OpsStateError(f"no ops named {name!r} was registered through the API (lpctl ftrace ops list)",
                                ops=name)
        return found

    # -- ops -------------------------------------------------------------------------------------------------

    def register(self, name: str, callback: Callback, recursion: bool, filt: Steps, notrace: Steps
                  ) -> tuple[ApiOps, BatchResult | None]:
        if name in self.ops:
            raise OpsStateError(f"an ops named {name!r} is already registered", ops=name)
        ops = FtraceOps(name, CALLBACKS[callback], flags=OpsFlag.RECURSION if recursion else OpsFlag(0))
        for steps, set_hash in ((filt, self.ftrace.set_filter), (notrace, self.ftrace.set_notrace)):
            for expr, reset in steps:  # on an unregistered ops: only selects (FilterNoMatch for a bad term)
                set_hash(ops, expr, reset=reset)
        result = self.ftrace.register(ops)
        api = self.ops[name] = ApiOps(ops, callback, recursion, filt, notrace)
        return api, result

    def ops_register(self, req: OpsRegisterRequest, ctx: RequestContext) -> OpsData:
        with self.lock:
            if ctx.already_applied and req.name in self.ops:
                return OpsData(ops=self.ops_info(self.ops[req.name]))
            api, result = self.register(req.name, req.callback, req.recursion, _write([], req.filter or "", True),
                                         _write([], req.notrace or "", True))
            try:
                self.desired.record(KIND_OPS, req.name, api.doc(), ctx)
            except BaseException:
                del self.ops[req.name]
                self.ftrace.unregister(api.ops)
                raise
            info = self.ops_info(api)
        self.publish()
        ctx.events.emit("ftrace.ops.registered", name=req.name, callback=req.callback, functions=info.functions)
        return OpsData(ops=info, batch=self.counts.batch(ctx.verb, result))

    def ops_unregister(self, req: OpsUnregisterRequest, ctx: RequestContext) -> OpsData:
        with self.lock:
            gone = self.desired.tombstone(KIND_OPS, req.name)
            if ctx.already_applied and req.name not in self.ops and gone is not None:
                return OpsData(ops=OpsInfo.model_validate(gone.doc["last"]))
            api = self._api_ops(req.name)
            result = self.ftrace.unregister(api.ops)
            del self.ops[req.name]
            info = self.ops_info(api)
            self.desired.record(KIND_OPS, req.name, {"registered": False, "last": info.model_dump(mode="json")}, ctx)
        self.publish()
        ctx.events.emit("ftrace.ops.unregistered", name=req.name, hits=info.hits)
        return OpsData(ops=info, batch=self.counts.batch(ctx.verb, result))

    def refresh_listing(self) -> Listing:
        """Take the listing anew (with the lock held: after every change, from the subsystem's ``publish``)."""
        with self.lock:
            ftrace_ops = self.ftrace.ops_now
            mine = {id(a.ops) for a in self.ops.values()}
            others = [ForeignOps(name=o.name, flags=_flag_names(o.flags), functions=self.counts.functions(o))
                      for o in ftrace_ops if id(o) not in mine]
            listing = self._listing = Listing([(a, self.ops_info(a)) for a in self.ops.values()], others,
                                              ftrace_ops)
            return listing

    def ops_list(self, req: OpsListRequest, ctx: RequestContext) -> OpsListData:
        listing = self._listing
        if listing is None or not listing.current(self.ftrace.ops_now):
            listing = self.refresh_listing()  # the slow way, once after a change this subsystem did not publish
        return OpsListData(ops=[info.model_copy(update={"hits": self.ftrace.ops_hits(a.ops)})
                                for a, info in listing.mine], others=list(listing.others))

    def ops_filter(self, req: OpsFilterRequest, ctx: RequestContext) -> OpsData:
        with self.lock:
            api = self._api_ops(req.name)
            if ctx.already_applied:
                return OpsData(ops=self.ops_info(api))
            ops = api.ops
            for expr in (req.filter, req.notrace):  # both checked before either is applied
                if expr is not None and filter_terms(expr):
                    self.ftrace.select(expr)
            old_filter = ops.filter
            results: list[BatchResult | None] = []
            if req.filter is not None:
                results.append(self.ftrace.set_filter(ops, req.filter, reset=req.reset))
            if req.notrace is not None:
                try:
                    results.append(self.ftrace.set_notrace(ops, req.notrace, reset=req.reset))
                except BaseException:
                    if req.filter is not None:
                        self.ftrace.set_filter_ips(ops, old_filter)
                    raise
            if req.filter is not None:
                api.filter = _write(api.filter, req.filter, req.reset)
            if req.notrace is not None:
                api.notrace = _write(api.notrace, req.notrace, req.reset)
            self.desired.record(KIND_OPS, req.name, api.doc(), ctx)
            info = self.ops_info(api)
        self.publish()
        ctx.events.emit("ftrace.ops.filtered", name=req.name, filter=info.filter, notrace=info.notrace,
                        functions=info.functions)
        return OpsData(ops=info, batch=self.counts.batch(ctx.verb, *results))
