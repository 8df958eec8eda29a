"""The kretprobe and fprobe verbs: ``kretprobe.register|unregister|list`` and ``fprobe.register|unregister|list|read``,
served for one kernel by :class:`RetprobeSubsystem` (``verbs()`` is its table).

Both are desired state (kinds ``kretprobe`` and ``fprobe``, key: the probe's name): a restart registers them
again before the daemon announces itself online, after the kprobes. A kretprobe's return records share the
kprobe rings and come out of ``kprobe.read`` (Linux has one trace file for both), in the kernel's kretprobe
event format ``NAME: (CALLER+OFF/SIZE <- FUNC) arg1=RETVAL``; fprobe records come out of ``fprobe.read`` as
``NAME: (FUNC+OFF/SIZE) arg1=.. arg2=.. arg3=.. arg4=..`` (x0-x3) at entry and
``NAME: (CALLER+OFF/SIZE <- FUNC) arg1=RETVAL`` at exit. Sections ``kretprobes`` and ``fprobes`` of the state
document have the counters as of the last change or list.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from daemon.errors import LivepatchdError
from daemon.ftrace import Ftrace
from daemon.kernel.clock import ticks_to_us
from daemon.kernel.kernel import Kernel
from daemon.kprobes.core import Kprobes
from daemon.kprobes.fprobe import Fprobe, FprobeHit, Fprobes
from daemon.kprobes.kretprobes import Kretprobe, Kretprobes
from daemon.service.pipeline.context import RequestContext, VerbTable
from daemon.service.pipeline.core import Service
from daemon.service.store.desired import DesiredState
from schemas.retprobes import (
    FprobeHitRecord,
    FprobeInfo,
    FprobeListData,
    FprobeListRequest,
    FprobeReadData,
    FprobeReadRequest,
    FprobeRegisterData,
    FprobeRegisterRequest,
    FprobeUnregisterData,
    FprobeUnregisterRequest,
    KretprobeInfo,
    KretprobeListData,
    KretprobeListRequest,
    KretprobeRegisterData,
    KretprobeRegisterRequest,
    KretprobeUnregisterData,
    KretprobeUnregisterRequest,
)

KRETPROBE_KIND, FPROBE_KIND = "kretprobe", "fprobe"
"""Desired-state kinds (key: the probe's name; doc: the register request's fields)."""


def _doc(req: KretprobeRegisterRequest | FprobeRegisterRequest) -> dict[str, Any]:
    return req.model_dump(mode="json", exclude={"request_id", "reply_to"})


class RetprobeSubsystem:
    """The kretprobes and fprobes registered through the API on one kernel, and their desired state. ``kprobes``:
    the kprobe subsystem's own (a kretprobe's entry is one of its kprobes); ``ftrace``: the daemon's (an fprobe is
    an ops)."""

    def __init__(self, service: Service, kernel: Kernel, kprobes: Kprobes, ftrace: Ftrace,
                 desired: DesiredState | None = None) -> None:
        self.service, self.kernel, self.desired = service, kernel, desired
        self.kretprobes, self.fprobes = Kretprobes(kprobes), Fprobes(ftrace)
        self._unread: collections.deque[FprobeHit] = collections.deque(maxlen=4096)  # drained by the stream
        self._lock = threading.RLock()

    def verbs(self) -> VerbTable:
        return {"kretprobe.register": self.register_kretprobe, "kretprobe.unregister": self.unregister_kretprobe,
                "kretprobe.list": self.list_kretprobes, "fprobe.register": self.register_fprobe,
                "fprobe.unregister": self.unregister_fprobe, "fprobe.list": self.list_fprobes,
                "fprobe.read": self.read_fprobes}

    # -- views -----------------------------------------------------------------------------------------------

    def kretprobe_info(self, rp: Kretprobe) -> KretprobeInfo:
        d = self.kretprobes.info(rp)
        return KretprobeInfo(name=rp.name, address=rp.addr, symbol=rp.symbol, trampoline=d["trampoline"],
                             maxactive=rp.maxactive, record=rp.record, hits=d["hits"], entries=d["entries"],
                             nmissed=d["nmissed"], kprobe_nmissed=d["kprobe_nmissed"], in_use=d["in_use"],
                             definition=f"r{rp.maxactive}:kprobes/{rp.name} {rp.symbol} arg1=$retval")

    def fprobe_info(self, p: Fprobe) -> FprobeInfo:
        d = self.fprobes.info(p)
        target = ",".join(p.filter.split()) + ("%return" if p.exit else "")
        return FprobeInfo(name=p.name, filter=p.filter, functions=p.functions, exit=p.exit, record=p.record,
                          flags=list(p.flags), hits=d["hits"], exit_hits=d["exit_hits"], nmissed=d["nmissed"],
                          definition=f"f:fprobes/{p.name} {target}")

    def publish(self) -> None:
        krs = [self.kretprobe_info(self.kretprobes.get(d["name"])) for d in self.kretprobes.describe()]
        fps = [self.fprobe_info(self.fprobes.get(d["name"])) for d in self.fprobes.describe()]
        self.service.state.set_component("kretprobes", {"probes": {
            i.name: {"address": f"{i.address:#x}", "trampoline": i.trampoline, "hits": i.hits,
                     "nmissed": i.nmissed, "definition": i.definition} for i in krs}})
        self.service.state.set_component("fprobes", {"probes": {
            i.name: {"filter": i.filter, "functions": i.functions, "hits": i.hits, "exit_hits": i.exit_hits,
                     "nmissed": i.nmissed} for i in fps}})

    def fprobe_line(self, hit: FprobeHit, comms: dict[int, str]) -> str:
        ks = self.kernel.kallsyms
        secs, rem = divmod(ticks_to_us(hit.ts), 1_000_000)
        func = ks.containing(hit.ip)
        fname = func.name if func is not None else f"{hit.ip:#x}"
        if hit.exit:
            where = f"{ks.describe(hit.ret)} <- {fname}"
            args = f" arg1={hit.retval:#x}"
        else:
            where = ks.describe(hit.ip)
            args = "".join(f" arg{i + 1}={v:#x}" for i, v in enumerate(hit.args[:4]))
        head = f"{comms.get(hit.pid, '<...>'):>16}-{hit.pid:<7d} [{hit.cpu:03d}] ...1. {secs:5d}.{rem:06d}:"
        return f"{head} {hit.probe}: ({where}){args}\n"

    # -- kretprobe.* -----------------------------------------------------------------------------------------

    def _register_kretprobe(self, req: KretprobeRegisterRequest) -> Kretprobe:
        return self.kretprobes.register(req.name, req.target, maxactive=req.maxactive, trampoline=req.trampoline,
                                        record=req.record)

    def register_kretprobe(self, req: KretprobeRegisterRequest, ctx: RequestContext) -> KretprobeRegisterData:
        with self._lock:
            if ctx.already_applied:
                rp = self.kretprobes.get(req.name)  # registered before the crash, restored at boot
            else:
                rp = self._register_kretprobe(req)
                if self.desired is not None:
                    self.desired.put(KRETPROBE_KIND, req.name, _doc(req), request_id=ctx.request_id)
            info = self.kretprobe_info(rp)
        self.publish()
        ctx.events.emit("kretprobe.registered", name=rp.name, target=rp.symbol)
        return KretprobeRegisterData(**info.model_dump())

    def unregister_kretprobe(self, req: KretprobeUnregisterRequest, ctx: RequestContext) -> KretprobeUnregisterData:
        with self._lock:
            if ctx.already_applied and self.kretprobes.find(req.name) is None:
                return KretprobeUnregisterData(name=req.name, hits=0, nmissed=0, in_flight=0)
            rp = self.kretprobes.get(req.name)
            d = self.kretprobes.info(rp)
            self.kretprobes.unregister(req.name)
            in_flight = self.kretprobes.in_use(rp.index)
            if self.desired is not None:
                self.desired.delete(KRETPROBE_KIND, req.name, request_id=ctx.request_id)
        self.publish()
        ctx.events.emit("kretprobe.unregistered", name=req.name, hits=d["hits"])
        return KretprobeUnregisterData(name=req.name, hits=d["hits"], nmissed=d["nmissed"], in_flight=in_flight)

    def list_kretprobes(self, req: KretprobeListRequest, ctx: RequestContext) -> KretprobeListData:
        with self._lock:
            infos = [self.kretprobe_info(self.kretprobes.get(d["name"])) for d in self.kretprobes.describe()]
        self.publish()
        return KretprobeListData(probes=infos, kprobe_events="".join(f"{i.definition}\n" for i in infos))

    # -- fprobe.* --------------------------------------------------------------------------------------------

    def _register_fprobe(self, req: FprobeRegisterRequest) -> Fprobe:
        return self.fprobes.register(req.name, req.filter, exit=req.exit, record=req.record,
                                     flags=tuple(req.flags))

    def register_fprobe(self, req: FprobeRegisterRequest, ctx: RequestContext) -> FprobeRegisterData:
        with self._lock:
            if ctx.already_applied:
                p = self.fprobes.get(req.name)
            else:
                p = self._register_fprobe(req)
                if self.desired is not None:
                    self.desired.put(FPROBE_KIND, req.name, _doc(req), request_id=ctx.request_id)
            info = self.fprobe_info(p)
        self.publish()
        ctx.events.emit("fprobe.registered", name=p.name, target=p.filter)
        return FprobeRegisterData(**info.model_dump())

    def unregister_fprobe(self, req: FprobeUnregisterRequest, ctx: RequestContext) -> FprobeUnregisterData:
        with self._lock:
            if ctx.already_applied and self.fprobes.find(req.name) is None:
                return FprobeUnregisterData(name=req.name, hits=0, exit_hits=0)
            p = self.fprobes.get(req.name)
            d = self.fprobes.info(p)
            self.fprobes.unregister(req.name)
            if self.desired is not None:
                self.desired.delete(FPROBE_KIND, req.name, request_id=ctx.request_id)
        self.publish()
        ctx.events.emit("fprobe.unregistered", name=req.name, hits=d["hits"])
        return FprobeUnregisterData(name=req.name, hits=d["hits"], exit_hits=d["exit_hits"])

    def list_fprobes(self, req: FprobeListRequest, ctx: RequestContext) -> FprobeListData:
        with self._lock:
            infos = [self.fprobe_info(self.fprobes.get(d["name"])) for d in self.fprobes.describe()]
        self.publish()
        return FprobeListData(probes=infos, fprobe_events="".join(f"{i.definition}\n" for i in infos))

    def stream_lines(self) -> list[str]:
        """kprobe.stream's source: drain the fprobe rings, keep the records for fprobe.read, return their lines."""
        with self._lock:
            hits = self.fprobes.drain()
            self._unread.extend(hits)
            if not hits:
                return []
            comms = {t.pid: t.comm for t in self.kernel.tasks()}
            return [self.fprobe_line(h, comms).rstrip("\n") for h in hits]

    def read_fprobes(self, req: FprobeReadRequest, ctx: RequestContext) -> FprobeReadData:
        with self._lock:
            lost = self.fprobes.ring_lost
            hits = [*self._unread, *self.fprobes.drain()]
            self._unread.clear()
            comms = {t.pid: t.comm for t in self.kernel.tasks()}
            text = "".join(self.fprobe_line(h, comms) for h in hits)
            lost = self.fprobes.ring_lost - lost
        return FprobeReadData(text=text, lost=lost, hits=[
            FprobeHitRecord(probe=h.probe, cpu=h.cpu, pid=h.pid, ts=h.ts, exit=h.exit, ip=h.ip, ret=h.ret,
                            args=list(h.args), sp=h.sp, lr=h.lr, retval=h.retval, duration=h.duration)
            for h in hits])

    # -- desired state ---------------------------------------------------------------------------------------

    def restore(self) -> int:
        """Register the desired kretprobes and fprobes again (at boot, after the kprobes); returns how many."""
        if self.desired is None:
            return 0
        n = 0
        for item in self.desired.items(KRETPROBE_KIND):
            try:
                kreq = KretprobeRegisterRequest.model_validate({**item.doc, "request_id": "restore"}, strict=False)
                with self._lock:
                    self._register_kretprobe(kreq)
                n += 1
            except (LivepatchdError, ValueError) as exc:
                self.service.events.emit("kretprobe.restore_failed", name=item.key, error=str(exc))
        for item in self.desired.items(FPROBE_KIND):
            try:
                freq = FprobeRegisterRequest.model_validate({**item.doc, "request_id": "restore"}, strict=False)
                with self._lock:
                    self._register_fprobe(freq)
                n += 1
            except (LivepatchdError, ValueError) as exc:
                self.service.events.emit("fprobe.restore_failed", name=item.key, error=str(exc))
        if n:  # a host without any publishes no sections
            self.publish()
        return n
