"""The ftrace verbs: ops with filters, tracefs views, the function tracer and hijacks (redirects).

:func:`register` serves ``ftrace.*``, ``trace.*`` and ``hijack.*`` for one kernel's :class:`Ftrace` and returns
the :class:`FtraceVerbs` that owns what the API created: ops by name, hijacks by name, and at most one
function-tracer session (``ftrace_trace.TraceSession``). Every change is one ftrace call, so one stop-machine
batch that is all-or-nothing: a refused request leaves the kernel exactly as it was (validation raises before
anything is written). After each change the ``ftrace`` section of the state document is republished and an
event is emitted (``ftrace.ops.registered``, ``hijack.created``, ``trace.started``, …).

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
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from daemon.arch.arm64 import callsite
from daemon.arch.arm64.patching import BatchResult
from daemon.errors import FtraceError, LivepatchdError, OpsStateError
from daemon.ftrace import filter as ftrace_filter
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.ftrace.records import DynFtrace, RecFlag
from daemon.ftrace.tracer import FunctionTracer
from daemon.kernel.kernel import Kernel
from daemon.service.core import RequestContext, Service
from daemon.service.desired import DesiredState, Item
from daemon.service.ftrace_targets import check_no_loop, direct_trampoline, function_start
from daemon.service.ftrace_trace import DRAIN_PERIOD_S, StreamOutlet, TraceFormatter, TraceSession
from schemas.ftrace_verbs import (
    AvailableData,
    AvailableRequest,
    BatchInfo,
    EnabledData,
    EnabledRequest,
    ForeignOps,
    HijackCreateRequest,
    HijackData,
    HijackDeleteRequest,
    HijackInfo,
    HijackListData,
    HijackListRequest,
    OpsData,
    OpsFilterRequest,
    OpsInfo,
    OpsListData,
    OpsListRequest,
    OpsRegisterRequest,
    OpsUnregisterRequest,
    TraceReadData,
    TraceReadRequest,
    TraceStartData,
    TraceStartRequest,
    TraceStopData,
    TraceStopRequest,
)

log = structlog.get_logger(__name__)

KIND_OPS = "ftrace.ops"
KIND_HIJACK = "ftrace.hijack"
"""Desired-state kinds (key: the ops or hijack name)."""
CALLBACKS = {"count": "ops_func_count", "nop": "ops_func_nop"}
_ENABLED = int(RecFlag.ENABLED)

Callback = Literal["count", "nop"]
Mode = Literal["ipmodify", "direct"]
Steps = list[tuple[str, bool]]
"""set_ftrace_filter writes since the last reset: (expression, reset)."""


class TraceNotRunning(FtraceError):
    """trace.read or trace.stop while the function tracer is not running."""

    code = "trace_not_running"


def _batch(results: list[BatchResult | None]) -> BatchInfo | None:
    done = [r for r in results if r is not None]
    if not done:
        return None
    return BatchInfo(sites=sum(r.sites for r in done), data=sum(r.data for r in done),
                     pause_us=round(sum(r.pause_ns for r in done) / 1000, 1))


def _flag_names(flags: OpsFlag) -> list[str]:
    return [f.name for f in OpsFlag if f.name and flags & f]


def _write(steps: Steps, expr: str, reset: bool) -> Steps:
    """The steps after one more write (an empty expression with reset clears; without reset it does nothing)."""
    if not ftrace_filter.terms(expr):
        return [] if reset else steps
    return [(expr, True)] if reset else [*steps, (expr, False)]


def _text(steps: Steps) -> str | None:
    return " ".join(expr for expr, _ in steps) or None


@dataclass
class _ApiOps:
    ops: FtraceOps
    callback: Callback
    recursion: bool
    filter: Steps = field(default_factory=list)
    notrace: Steps = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {"registered": True, "callback": self.callback, "recursion": self.recursion,
                "filter": [list(s) for s in self.filter], "notrace": [list(s) for s in self.notrace]}


@dataclass
class _Hijack:
    name: str
    mode: Mode
    rec: DynFtrace
    sympos: int
    target: int
    ops: FtraceOps
    spec: dict[str, Any]  # how it was asked for (target by name or address): what a restore re-applies

    @property
    def address(self) -> int:
        return callsite.func_addr(self.rec.ip)


@dataclass
class RestoreReport:
    """What :meth:`FtraceVerbs.restore` re-applied at boot."""

    ops: list[str] = field(default_factory=list)
    hijacks: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


class FtraceVerbs:
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

    def ops_info(self, a: _ApiOps) -> OpsInfo:
        ops = a.ops
        return OpsInfo(name=ops.name, callback=a.callback, filter=_text(a.filter), notrace=_text(a.notrace),
                       filter_functions=None if ops.filter is None else len(ops.filter),
                       notrace_functions=len(ops.notrace), functions=self.functions(ops) if ops.registered else 0,
                       flags=_flag_names(ops.flags), address=ops.addr or None, hits=self.ftrace.ops_hits(ops))

    def hijack_info(self, h: _Hijack) -> HijackInfo:
        return HijackInfo(name=h.name, mode=h.mode, function=h.rec.name, sympos=h.sympos, address=h.address,
                          target=self.ftrace.describe(h.target), target_address=h.target, ops=h.ops.name,
                          ops_address=h.ops.addr or None)

    def _api_ops(self, name: str) -> _ApiOps:
        found = self.ops.get(name)
        if found is None:
            raise OpsStateError(f"no ops named {name!r} was registered through the API (lpctl ftrace ops list)",
                                ops=name)
        return found

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
                "ops_registered": len(self.ftrace.ops),
                "enabled_functions": sum(1 for r in self.ftrace.records if int(r.flags) & _ENABLED),
                "records": len(self.ftrace.records),
                "restore_failed": [] if self.restored is None else self.restored.failed,
            }
        self.service.state.set_component("ftrace", section)

    # -- desired state ---------------------------------------------------------------------------------------

    def _already(self, ctx: RequestContext) -> bool:
        """A replayed request whose change reached the store before the crash (and was restored at boot)."""
        return ctx.replayed and self.desired is not None and self.desired.applied(ctx.request_id)

    def _record(self, kind: str, key: str, doc: dict[str, Any], ctx: RequestContext) -> None:
        if self.desired is not None:
            self.desired.put(kind, key, doc, request_id=ctx.request_id)

    def _tombstone(self, kind: str, key: str) -> Item | None:
        item = self.desired.get(kind, key) if self.desired is not None else None
        return item if item is not None and "last" in item.doc else None

    def restore(self) -> RestoreReport:
        """Re-register the desired ops, then re-create the desired hijacks, in the order they were first made.

        Blocking: call it in a worker thread, after the live patches' restore and before the journal replay.
        A failure is logged, published (``ftrace.restore_failed`` events, ``restore_failed`` in the state) and
        skipped; the item stays desired.
        """
        report = RestoreReport()
        items = [*self.desired.items(KIND_OPS), *self.desired.items(KIND_HIJACK)] if self.desired else []
        with self._lock:
            for item in items:
                doc = item.doc
                try:
                    if item.kind == KIND_OPS and doc.get("registered"):
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

    # -- ops -------------------------------------------------------------------------------------------------

    def _register(self, name: str, callback: Callback, recursion: bool, filt: Steps, notrace: Steps
                  ) -> tuple[_ApiOps, BatchResult | None]:
        if name in self.ops:
            raise OpsStateError(f"an ops named {name!r} is already registered", ops=name)
        ops = FtraceOps(name, CALLBACKS[callback], flags=OpsFlag.RECURSION if recursion else OpsFlag(0))
        for steps, set_hash in ((filt, self.ftrace.set_filter), (notrace, self.ftrace.set_notrace)):
            for expr, reset in steps:  # on an unregistered ops: only selects (FilterNoMatch for a bad term)
                set_hash(ops, expr, reset=reset)
        result = self.ftrace.register(ops)
        api = self.ops[name] = _ApiOps(ops, callback, recursion, filt, notrace)
        return api, result

    def ops_register(self, req: OpsRegisterRequest, ctx: RequestContext) -> OpsData:
        with self._lock:
            if self._already(ctx) and req.name in self.ops:
                return OpsData(ops=self.ops_info(self.ops[req.name]))
            api, result = self._register(req.name, req.callback, req.recursion, _write([], req.filter or "", True),
                                         _write([], req.notrace or "", True))
            try:
                self._record(KIND_OPS, req.name, api.doc(), ctx)
            except BaseException:
                del self.ops[req.name]
                self.ftrace.unregister(api.ops)
                raise
            info = self.ops_info(api)
        self.publish()
        ctx.events.emit("ftrace.ops.registered", name=req.name, callback=req.callback, functions=info.functions)
        return OpsData(ops=info, batch=self._observe(ctx.verb, result))

    def ops_unregister(self, req: OpsUnregisterRequest, ctx: RequestContext) -> OpsData:
        with self._lock:
            gone = self._tombstone(KIND_OPS, req.name)
            if self._already(ctx) and req.name not in self.ops and gone is not None:
                return OpsData(ops=OpsInfo.model_validate(gone.doc["last"]))
            api = self._api_ops(req.name)
            result = self.ftrace.unregister(api.ops)
            del self.ops[req.name]
            info = self.ops_info(api)
            self._record(KIND_OPS, req.name, {"registered": False, "last": info.model_dump(mode="json")}, ctx)
        self.publish()
        ctx.events.emit("ftrace.ops.unregistered", name=req.name, hits=info.hits)
        return OpsData(ops=info, batch=self._observe(ctx.verb, result))

    def ops_list(self, req: OpsListRequest, ctx: RequestContext) -> OpsListData:
        with self._lock:
            mine = {id(a.ops) for a in self.ops.values()}
            others = [ForeignOps(name=o.name, flags=_flag_names(o.flags), functions=self.functions(o))
                      for o in self.ftrace.ops if id(o) not in mine]
            return OpsListData(ops=[self.ops_info(a) for a in self.ops.values()], others=others)

    def ops_filter(self, req: OpsFilterRequest, ctx: RequestContext) -> OpsData:
        with self._lock:
            api = self._api_ops(req.name)
            if self._already(ctx):
                return OpsData(ops=self.ops_info(api))
            ops = api.ops
            for expr in (req.filter, req.notrace):  # both checked before either is applied
                if expr is not None and ftrace_filter.terms(expr):
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
            self._record(KIND_OPS, req.name, api.doc(), ctx)
            info = self.ops_info(api)
        self.publish()
        ctx.events.emit("ftrace.ops.filtered", name=req.name, filter=info.filter, notrace=info.notrace,
                        functions=info.functions)
        return OpsData(ops=info, batch=self._observe(ctx.verb, *results))

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

    # -- the function tracer ---------------------------------------------------------------------------------

    def trace_start(self, req: TraceStartRequest, ctx: RequestContext) -> TraceStartData:
        with self._lock:
            if self.session is not None:
                raise FtraceError("the function tracer is already running; stop it first (trace.stop)",
                                  session=self.session.number)
            tracer = FunctionTracer(self.ftrace, filter=req.filter, notrace=req.notrace,
                                    entries_per_cpu=req.entries_per_cpu)
            result = tracer.start()
            self.sessions += 1
            session = self.session = TraceSession(self.service, self.kernel, tracer, self.formatter,
                                                  number=self.sessions, filter=req.filter or None,
                                                  notrace=req.notrace or None, streams=self.streams)
            session.start_draining()
            functions = self.functions(tracer.ops)
        self.publish()
        ctx.events.emit("trace.started", session=session.number, filter=session.filter, functions=functions)
        return TraceStartData(filter=session.filter, notrace=session.notrace, entries_per_cpu=req.entries_per_cpu,
                              functions=functions, topic=self.service.topics.trace, streaming=self.streams is not None,
                              period_ms=round(DRAIN_PERIOD_S * 1000), batch=self._observe(ctx.verb, result))

    def _session(self) -> TraceSession:
        if self.session is None:
            raise TraceNotRunning("the function tracer is not running (trace.start starts it)")
        return self.session

    def trace_read(self, req: TraceReadRequest, ctx: RequestContext) -> TraceReadData:
        with self._lock:
            session = self._session()
            session.collect(session.tracer.drain)
            return TraceReadData.model_validate(session.read(req.limit, running=True))

    def trace_stop(self, req: TraceStopRequest, ctx: RequestContext) -> TraceStopData:
        with self._lock:
            session = self._session()
            session.stop_draining()
            before = self.ftrace.last_batch
            try:
                session.collect(session.tracer.stop)
            except BaseException:
                session.start_draining()  # still running: keep draining
                raise
            after = self.ftrace.last_batch
            self.session = None
            data = session.read(req.limit, running=False)
            data.update(remaining=0, discarded=data["remaining"],
                        batch=self._observe(ctx.verb, after if after is not before else None))
        self.publish()
        ctx.events.emit("trace.stopped", session=session.number, written=data["written"], dropped=data["dropped"])
        return TraceStopData.model_validate(data)

    # -- hijacks ---------------------------------------------------------------------------------------------

    def _create(self, name: str, spec: dict[str, Any]) -> tuple[_Hijack, BatchResult | None]:
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
            check_no_loop(self.ftrace, redirects, rec.name, callsite.func_addr(rec.ip), target)
            ops.func, ops.flags, ops.private = "ftrace_redirect_call", OpsFlag.IPMODIFY, target
            result = self.ftrace.register(ops)
        hijack = self.hijacks[name] = _Hijack(name, mode, rec, spec["sympos"], target, ops, spec)
        return hijack, result

    def hijack_create(self, req: HijackCreateRequest, ctx: RequestContext) -> HijackData:
        name = req.name or (req.function if not req.sympos else f"{req.function}.{req.sympos}")
        spec = {"active": True, "mode": req.mode, "function": req.function, "sympos": req.sympos,
                "target": req.target, "target_sympos": req.target_sympos}
        with self._lock:
            if self._already(ctx) and name in self.hijacks:
                return HijackData(hijack=self.hijack_info(self.hijacks[name]))
            hijack, result = self._create(name, spec)
            try:
                self._record(KIND_HIJACK, name, spec, ctx)
            except BaseException:
                self._remove(hijack)
                raise
            info = self.hijack_info(hijack)
        self.publish()
        ctx.events.emit("hijack.created", name=name, mode=req.mode, function=info.function, target=info.target)
        return HijackData(hijack=info, batch=self._observe(ctx.verb, result))

    def _find(self, req: HijackDeleteRequest) -> _Hijack:
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

    def _deleted(self, req: HijackDeleteRequest) -> HijackInfo | None:
        """The last description of the hijack a replayed delete already removed."""
        items = self.desired.items(KIND_HIJACK) if self.desired is not None else []
        for item in items:
            last = item.doc.get("last")
            if last is not None and (item.key == req.name or (
                    req.name is None and last["function"] == req.function and last["sympos"] == req.sympos)):
                return HijackInfo.model_validate(last)
        return None

    def _remove(self, h: _Hijack) -> BatchResult | None:
        unregister = self.ftrace.unregister_direct if h.mode == "direct" else self.ftrace.unregister
        result = unregister(h.ops)
        del self.hijacks[h.name]
        return result

    def hijack_delete(self, req: HijackDeleteRequest, ctx: RequestContext) -> HijackData:
        with self._lock:
            if self._already(ctx) and (gone := self._deleted(req)) is not None and gone.name not in self.hijacks:
                return HijackData(hijack=gone)
            h = self._find(req)
            info = self.hijack_info(h)
            result = self._remove(h)
            self._record(KIND_HIJACK, h.name, {"active": False, "last": info.model_dump(mode="json")}, ctx)
        self.publish()
        ctx.events.emit("hijack.deleted", name=h.name, mode=h.mode, function=h.rec.name)
        return HijackData(hijack=info, batch=self._observe(ctx.verb, result))

    def hijack_list(self, req: HijackListRequest, ctx: RequestContext) -> HijackListData:
        with self._lock:
            return HijackListData(hijacks=[self.hijack_info(h) for h in self.hijacks.values()])


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
        ("trace.start", verbs.trace_start),
        ("trace.read", verbs.trace_read),
        ("trace.stop", verbs.trace_stop),
        ("hijack.create", verbs.hijack_create),
        ("hijack.delete", verbs.hijack_delete),
        ("hijack.list", verbs.hijack_list),
    ):
        service.register(verb, fn)
    verbs.publish()
    return verbs
