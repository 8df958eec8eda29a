"""The kprobe verbs: ``kprobe.register``, ``kprobe.unregister``, ``kprobe.list``, ``kprobe.read``, served for one
kernel by :class:`KprobeSubsystem` (``verbs()`` is its table).

Each registered probe is desired state (kind ``kprobe``, key: its name): a restart registers it again before
the daemon announces itself online, as a boot script writing ``kprobe_events`` would. Counters start from zero
then (a reboot's do too). The ``kprobes`` section of the state document has every probe's address, mode, hits
and nmissed as of the last change or ``kprobe.list``.
Trace lines follow the kernel's format for kprobe events (``<comm>-<pid> [cpu] ..... secs.usecs: NAME:
(SYM+OFF/SIZE) arg=value``); a post handler's record is marked `` post``, which Linux has no line for.

``kprobe.stream`` adds the ``trace`` topic as a second way out, for kprobes, kretprobe returns and, through
``stream_sources``, fprobe records (each drain's kprobe lines first, then the fprobe ones): while enabled, a job
of the kernel's host worker (``kprobes.stream-drainer``) drains the rings every ``DRAIN_PERIOD_S`` and publishes
the lines as :class:`~schemas.ftrace.TraceBatchDoc` (``source: kprobes``). Every drain, whoever does it, also
keeps the hits for ``kprobe.read`` / ``fprobe.read`` (at most ``UNREAD_MAX``, the oldest dropped first), so a
poller and a subscriber each see every hit once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from daemon.errors import KprobeRefused, LivepatchdError
from daemon.kernel.clock import ticks_to_us
from daemon.kernel.kernel import Kernel
from daemon.kernel.worker import Job
from daemon.kprobes.core import Kprobe, KprobeHit, Kprobes
from daemon.service.pipeline.context import RequestContext, VerbTable
from daemon.service.pipeline.core import Service
from daemon.service.store.desired import DesiredState
from schemas.ftrace import TraceBatchDoc
from schemas.kprobes import (
    FetchArg,
    FetchArgIn,
    KprobeHitRecord,
    KprobeInfo,
    KprobeListData,
    KprobeListRequest,
    KprobeReadData,
    KprobeReadRequest,
    KprobeRegisterData,
    KprobeRegisterRequest,
    KprobeStreamData,
    KprobeStreamRequest,
    KprobeUnregisterData,
    KprobeUnregisterRequest,
)

DRAIN_PERIOD_S = 0.2
UNREAD_MAX = 4096
STREAM_BATCH = 256
KIND = "kprobe"
"""Desired-state kind (key: the probe's name; doc: the register request's fields)."""
SECTION = "kprobes"
_MASKS = {"64": (1 << 64) - 1, "32": (1 << 32) - 1}


def format_arg(arg: FetchArg | FetchArgIn, value: int) -> str:
    width = arg.type[1:]
    v = value & _MASKS[width]
    if arg.type[0] == "x":
        return f"{arg.name}=0x{v:x}"
    if arg.type[0] == "s" and v >> (int(width) - 1):
        v -= 1 << int(width)
    return f"{arg.name}={v}"


def _arg_spec(a: FetchArg | FetchArgIn) -> str:
    fetch = f"%{a.reg}" if a.offset is None else f"{a.offset:+d}(%{a.reg})"
    return f"{a.name}={fetch}" + ("" if a.type == "x64" else f":{a.type}")


def _arg_values(args: list[FetchArg], hit: KprobeHit) -> str:
    """Each fetch arg as trace prints it: a register from the hit's regs, a memory fetch from the guest's read
    at the hit (``(fault)`` where the address was not mapped, as copy_from_kernel_nofault's failure)."""
    out, m = [], 0
    for a in args:
        if a.offset is None:
            out.append(" " + format_arg(a, hit.regs[a.reg]))
            continue
        value = hit.mem[m] if m < len(hit.mem) else None
        m += 1
        out.append(f" {a.name}=(fault)" if value is None else " " + format_arg(a, value))
    return "".join(out)


class KprobeSubsystem:
    """The probes registered through the API on one kernel, and their desired state."""

    def __init__(self, service: Service, kernel: Kernel, desired: DesiredState | None = None,
                 kprobes: Kprobes | None = None) -> None:
        self.service, self.kernel, self.desired = service, kernel, desired
        self.kprobes = kprobes or Kprobes(kernel)
        self._lock = threading.RLock()
        self._args: dict[str, list[FetchArg]] = {}
        self._unread: collections.deque[KprobeHit] = collections.deque(maxlen=UNREAD_MAX)
        self._drainer: Job | None = None
        self._stream_seq = 0
        self.unread_dropped = 0
        self.stream_sources: list[Callable[[], list[str]]] = []
        """More trace lines for the stream, drained with the kprobe rings (RetprobeSubsystem's fprobe lines)."""

    def verbs(self) -> VerbTable:
        return {"kprobe.register": self.register_probe, "kprobe.unregister": self.unregister_probe,
                "kprobe.list": self.list_probes, "kprobe.read": self.read, "kprobe.stream": self.stream}

    # -- views -----------------------------------------------------------------------------------------------

    def definition(self, p: Kprobe) -> str:
        target = f"{p.symbol}+{p.offset}"
        return " ".join([f"p:kprobes/{p.name} {target}", *(_arg_spec(a) for a in self._args.get(p.name, []))])

    def info(self, p: Kprobe) -> KprobeInfo:
        d = self.kprobes.info(p)
        return KprobeInfo(name=p.name, address=p.addr, symbol=p.symbol, offset=p.offset, insn=d["insn"],
                          mode=p.mode, slot=p.slot or None, record=d["record"], post=d["post"], hits=d["hits"],
                          nmissed=d["nmissed"], post_hits=d["post_hits"], args=self._args.get(p.name, []),
                          definition=self.definition(p))

    def infos(self) -> list[KprobeInfo]:
        """The plain kprobes (a kretprobe's entry kprobe is the kretprobe verbs' to show)."""
        probes = [self.kprobes.get(d["name"]) for d in self.kprobes.describe()]
        return [self.info(p) for p in probes if not p.is_kretprobe]

    def publish(self, infos: list[KprobeInfo] | None = None) -> None:
        infos = self.infos() if infos is None else infos
        self.service.state.set_component(SECTION, {"probes": {
            i.name: {"address": f"{i.address:#x}", "mode": i.mode, "hits": i.hits, "nmissed": i.nmissed,
                     "definition": i.definition} for i in infos}})

    def trace_line(self, hit: KprobeHit, comms: dict[int, str]) -> str:
        p = self.kprobes.find(hit.probe)
        secs, rem = divmod(ticks_to_us(hit.ts), 1_000_000)
        comm = comms.get(hit.pid, "<...>")
        if p is None:
            where, args = f"{hit.regs['pc']:#x}", ""
        else:
            sym = self.kernel.kallsyms.containing(p.addr)
            size = sym.size if sym is not None else 0
            where = f"{p.symbol}+{p.offset:#x}/{size:#x}"
            args = _arg_values(self._args.get(p.name, []), hit)
        post = " post" if hit.post else ""
        if hit.kind == "ret" and p is not None:  # the kernel's kretprobe event line: (CALLER <- FUNC) $retval
            where = f"{self.kernel.kallsyms.describe(hit.regs['pc'])} <- {p.symbol}"
            args, post = f" arg1={hit.regs['x0']:#x}", ""
        head = f"{comm:>16}-{hit.pid:<7d} [{hit.cpu:03d}] d.... {secs:5d}.{rem:06d}:"
        return f"{head} {hit.probe}: ({where}){args}{post}\n"

    # -- changes ---------------------------------------------------------------------------------------------

    def _register(self, name: str, target: str, args: list[FetchArgIn], *, record: bool, post: bool,
                  set_reg: int | None, set_val: int) -> Kprobe:
        p = self.kprobes.register(name, target, record=record or bool(args), post=post, set_reg=set_reg,
                                  set_val=set_val, args=tuple(_arg_spec(a) for a in args),
                                  fetch=tuple((a.reg, a.offset) for a in args if a.offset is not None))
        self._args[name] = [FetchArg(name=a.name, reg=a.reg, type=a.type, offset=a.offset) for a in args]
        return p

    def register_probe(self, req: KprobeRegisterRequest, ctx: RequestContext) -> KprobeRegisterData:
        with self._lock:
            if ctx.already_applied:
                p = self.kprobes.get(req.name)  # registered before the crash, restored at boot
            else:
                p = self._register(req.name, req.target, list(req.args), record=req.record, post=req.post,
                                   set_reg=req.set_reg, set_val=req.set_val)
                if self.desired is not None:
                    doc: dict[str, Any] = req.model_dump(mode="json", exclude={"request_id", "reply_to"})
                    self.desired.put(KIND, req.name, doc, request_id=ctx.request_id)
            info = self.info(p)
        self.publish()
        ctx.events.emit("kprobe.registered", name=p.name, address=f"{p.addr:#x}", mode=p.mode)
        return KprobeRegisterData(**info.model_dump())

    def unregister_probe(self, req: KprobeUnregisterRequest, ctx: RequestContext) -> KprobeUnregisterData:
        with self._lock:
            if ctx.already_applied and self.kprobes.find(req.name) is None:
                return KprobeUnregisterData(name=req.name, hits=0, nmissed=0)
            p = self.kprobes.get(req.name)
            if p.is_kretprobe:
                raise KprobeRefused(f"{req.name!r} is a kretprobe: unregister it with kretprobe.unregister",
                                    probe=req.name, reason="a kretprobe's entry")
            hits, nmissed = self.kprobes.counter(p, "hits"), self.kprobes.counter(p, "nmissed")
            self.kprobes.unregister(req.name)
            self._args.pop(req.name, None)
            if self.desired is not None:
                self.desired.delete(KIND, req.name, request_id=ctx.request_id)
        self.publish()
        ctx.events.emit("kprobe.unregistered", name=req.name, hits=hits, nmissed=nmissed)
        return KprobeUnregisterData(name=req.name, hits=hits, nmissed=nmissed)

    def list_probes(self, req: KprobeListRequest, ctx: RequestContext) -> KprobeListData:
        with self._lock:
            infos = self.infos()
            events = "".join(f"{i.definition}\n" for i in infos)
            profile = "".join(f"  {i.name:<44} {i.hits:15d} {i.nmissed:15d}\n" for i in infos)
        self.publish(infos)
        return KprobeListData(probes=infos, kprobe_events=events, kprobe_profile=profile)

    def _collect(self) -> tuple[list[KprobeHit], int]:
        """Drain the rings (under the lock): keep the hits for kprobe.read, publish them while streaming."""
        lost = self.kprobes.ring_lost
        hits = self.kprobes.drain()
        lost = self.kprobes.ring_lost - lost
        overflow = len(self._unread) + len(hits) - UNREAD_MAX
        if overflow > 0:
            self.unread_dropped += overflow
        self._unread.extend(hits)
        if self._drainer is not None:
            comms = {t.pid: t.comm for t in self.kernel.tasks()} if hits else {}
            lines = [self.trace_line(h, comms).rstrip("\n") for h in hits]
            for source in self.stream_sources:
                lines += source()
            svc = self.service
            for k in range(0, len(lines), STREAM_BATCH):
                self._stream_seq += 1
                doc = TraceBatchDoc(host=svc.host, boot_seq=svc.boot_seq, source="kprobes", session=0,
                                    seq=self._stream_seq, time=time.time(), lines=lines[k:k + STREAM_BATCH],
                                    records=[], written=0, dropped=self.kprobes.ring_lost)
                svc.streams.put(svc.topics.trace, doc.model_dump_json())
        return hits, lost

    def _drain_once(self) -> bool:
        if not self.kernel.cpus_online:
            return False
        with self._lock:
            self._collect()
        return True

    def stream(self, req: KprobeStreamRequest, ctx: RequestContext) -> KprobeStreamData:
        with self._lock:
            if req.enable and self._drainer is None:
                self._drainer = self.kernel.worker.every(DRAIN_PERIOD_S, self._drain_once,
                                                         name="kprobes.stream-drainer")
            elif not req.enable and self._drainer is not None:
                self._collect()  # the last hits still go out
                self._drainer.cancel()
                self._drainer = None
            return KprobeStreamData(streaming=self._drainer is not None, topic=self.service.topics.trace)

    def close(self) -> None:
        """Stop the stream's drainer (at shutdown)."""
        with self._lock:
            if self._drainer is not None:
                self._drainer.cancel()
                self._drainer = None

    def read(self, req: KprobeReadRequest, ctx: RequestContext) -> KprobeReadData:
        with self._lock:
            before = self.unread_dropped
            _, lost = self._collect()
            hits = list(self._unread)
            self._unread.clear()
            lost += self.unread_dropped - before
            comms = {t.pid: t.comm for t in self.kernel.tasks()}
            text = "".join(self.trace_line(h, comms) for h in hits)
        return KprobeReadData(text=text, lost=lost, hits=[
            KprobeHitRecord(probe=h.probe, cpu=h.cpu, pid=h.pid, ts=h.ts, post=h.post, regs=h.regs,
                            kind=h.kind, mem=list(h.mem)) for h in hits])

    def restore(self) -> int:
        """Register the desired probes again (at boot, before the daemon is online); returns how many."""
        if self.desired is None:
            return 0
        n = 0
        for item in self.desired.items(KIND):
            try:
                req = KprobeRegisterRequest.model_validate({**item.doc, "request_id": "restore"}, strict=False)
                with self._lock:
                    self._register(req.name, req.target, list(req.args), record=req.record, post=req.post,
                                   set_reg=req.set_reg, set_val=req.set_val)
                n += 1
            except (LivepatchdError, ValueError) as exc:
                self.service.events.emit("kprobe.restore_failed", name=item.key, error=str(exc))
        if n:  # a host without probes publishes no section (and no extra state version at boot)
            self.publish()
        return n
