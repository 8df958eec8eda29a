"""Hijacks (``hijack.*``): what one holds (the traced function, its ops, the target it redirects to, and how it
was asked for) and the verbs that create, list and delete them. What a hijack may target is checked by
``targets``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from daemon.errors import OpsStateError
from daemon.ftrace import BatchResult, DynFtrace, Ftrace, FtraceOps
from daemon.kernel.kernel import Kernel
from daemon.service.ftrace.counts import Counts
from daemon.service.ftrace.desired import KIND_HIJACK, FtraceDesired
from daemon.service.ftrace.targets import check_no_loop, direct_trampoline, function_start
from daemon.service.pipeline.context import RequestContext
from schemas.ftrace import (
    HijackCreateRequest,
    HijackData,
    HijackDeleteRequest,
    HijackInfo,
    HijackListData,
    HijackListRequest,
)

Mode = Literal["ipmodify", "direct"]


@dataclass
class Hijack:
    name: str
    mode: Mode
    rec: DynFtrace
    sympos: int
    target: int
    ops: FtraceOps
    spec: dict[str, Any]  # how it was asked for (target by name or address): what a restore re-applies

    @property
    def address(self) -> int:
        return self.rec.func_addr


class HijackVerbs:
    """The hijacks made through the API (under the subsystem's ``lock``; ``publish`` republishes its section)."""

    def __init__(self, kernel: Kernel, ftrace: Ftrace, desired: FtraceDesired, counts: Counts, *,
                 lock: threading.RLock, publish: Callable[[], None]) -> None:
        self.kernel = kernel
        self.ftrace = ftrace
        self.desired = desired
        self.counts = counts
        self.lock = lock
        self.publish = publish
        self.hijacks: dict[str, Hijack] = {}

    # -- views -----------------------------------------------------------------------------------------------

    def hijack_info(self, h: Hijack) -> HijackInfo:
        return HijackInfo(name=h.name, mode=h.mode, function=h.rec.name, sympos=h.sympos, address=h.address,
                          target=self.ftrace.describe(h.target), target_address=h.target, ops=h.ops.name,
                          ops_address=h.ops.addr or None)

    # -- hijacks ---------------------------------------------------------------------------------------------

    def create(self, name: str, spec: dict[str, Any]) -> tuple[Hijack, BatchResult | None]:
        if name in self.hijacks:
            raise OpsStateError(f"a hijack named {name!r} exists already (lpctl hijack list)", hijack=name)
        mode: Mode = spec["mode"]
        rec = self.ftrace.record(spec["function"], spec["sympos"])
        ops = FtraceOps(f"hijack:{name}")
        self.ftrace.set_filter_ips(ops, [rec.ip])
        if mode == "direct":
            target = direct_trampoline(self.kernel, spec["target"])
            result = self.ftrace.register_direct(ops, target)
        else:
            target = function_start(self.kernel, self.ftrace, spec["target"], spec["target_sympos"])
            redirects = {h.address: h.target for h in self.hijacks.values() if h.mode == "ipmodify"}
            check_no_loop(self.ftrace, redirects, rec.name, rec.func_addr, target)
            result = self.ftrace.register_redirect(ops, target)
        hijack = self.hijacks[name] = Hijack(name, mode, rec, spec["sympos"], target, ops, spec)
        return hijack, result

    def hijack_create(self, req: HijackCreateRequest, ctx: RequestContext) -> HijackData:
        name = req.name or (req.function if not req.sympos else f"{req.function}.{req.sympos}")
        spec = {"active": True, "mode": req.mode, "function": req.function, "sympos": req.sympos,
                "target": req.target, "target_sympos": req.target_sympos}
        with self.lock:
            if ctx.already_applied and name in self.hijacks:
                return HijackData(hijack=self.hijack_info(self.hijacks[name]))
            hijack, result = self.create(name, spec)
            try:
                self.desired.record(KIND_HIJACK, name, spec, ctx)
            except BaseException:
                self._remove(hijack)
                raise
            info = self.hijack_info(hijack)
        self.publish()
        ctx.events.emit("hijack.created", name=name, mode=req.mode, function=info.function, target=info.target)
        return HijackData(hijack=info, batch=self.counts.batch(ctx.verb, result))

    def _find(self, req: HijackDeleteRequest) -> Hijack:
        if req.name is not None:
            found = self.hijacks.get(req.name)
            if found is None:
                raise OpsStateError(f"no hijack named {req.name!r} (lpctl hijack list)", hijack=req.name)
            return found
        assert req.function is not None
        rec = self.ftrace.record(req.function, req.sympos)
        for h in self.hijacks.values():
            if h.rec is rec:
                return h
        raise OpsStateError(f"{req.function} is not hijacked (lpctl hijack list)", function=req.function)

    def _remove(self, h: Hijack) -> BatchResult | None:
        unregister = self.ftrace.unregister_direct if h.mode == "direct" else self.ftrace.unregister
        result = unregister(h.ops)
        del self.hijacks[h.name]
        return result

    def hijack_delete(self, req: HijackDeleteRequest, ctx: RequestContext) -> HijackData:
        with self.lock:
            gone = self.desired.deleted_hijack(req) if ctx.already_applied else None
            if gone is not None and gone.name not in self.hijacks:
                return HijackData(hijack=gone)
            h = self._find(req)
            info = self.hijack_info(h)
            result = self._remove(h)
            self.desired.record(KIND_HIJACK, h.name, {"active": False, "last": info.model_dump(mode="json")}, ctx)
        self.publish()
        ctx.events.emit("hijack.deleted", name=h.name, mode=h.mode, function=h.rec.name)
        return HijackData(hijack=info, batch=self.counts.batch(ctx.verb, result))

    def hijack_list(self, req: HijackListRequest, ctx: RequestContext) -> HijackListData:
        with self.lock:
            return HijackListData(hijacks=[self.hijack_info(h) for h in self.hijacks.values()])
