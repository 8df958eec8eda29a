"""The kernel's own verbs: ``info``, ``symbol.lookup``, ``call``, ``call.read`` and ``tasks``.

:class:`KernelVerbs` serves them for one booted kernel (``verbs()`` is its table); :class:`KernelCalls` runs the
functions ``call`` and ``call.read`` name. A kernel thread cannot be killed in the middle of a function, and
neither can a guest worker: a call that does not return within ``call_timeout_s`` is answered ``timeout``
(function name, address in hex) while the function keeps its worker; when it does return, the event
``call.finished_late`` says so, with its result.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog

from daemon.errors import GuestCallTimeout, LivepatchdError, SymbolError
from daemon.kernel.kallsyms import Symbol
from daemon.kernel.kernel import Kernel
from daemon.service.pipeline.context import RequestContext, VerbTable
from daemon.service.pipeline.core import Service
from daemon.service.pipeline.errors import CallNotAllowed, InvalidArgument
from daemon.service.pipeline.outbox import EventLog
from schemas import (
    SCHEMA_VERSION,
    CallData,
    CallPolicy,
    CallRequest,
    InfoData,
    InfoRequest,
    RequestCounts,
    SymbolData,
    SymbolLookupRequest,
    TaskEntry,
    TasksData,
    TasksRequest,
)
from schemas.livepatch import CallReadData, CallReadRequest

log = structlog.get_logger(__name__)

_U64 = (1 << 64) - 1


def as_u64(value: int) -> int:
    """A 64-bit argument as its register holds it: -1 and 2**64 - 1 are the same x0 (two's complement)."""
    return value & _U64


def as_signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


ALLOW_ANY_HINT = ("for a lab, let the daemon run any function: setting allow_any_call "
                  "(LIVEPATCHD_ALLOW_ANY_CALL=1, or livepatchd serve --allow-any-call)")


@dataclass(frozen=True)
class KernelCalls:
    """Runs the functions that ``call`` and ``call.read`` name on ``kernel``.

    By default only the functions the image marks callable (its ``_callable_funcs`` table: readers, syscall-like
    entry points, test helpers) may be run: a call is a kernel function run with the caller's arguments, and
    ``memset``'s would overwrite kernel memory. ``allow_any`` lifts that, for labs.
    """

    kernel: Kernel
    timeout_s: float = 10.0
    allow_any: bool = False
    callable: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "callable", frozenset(self.kernel.image.callable_funcs()))

    def names(self) -> list[str]:
        """The functions marked callable, by name."""
        ks = self.kernel.kallsyms
        return sorted(sym.name for addr in self.callable if (sym := ks.containing(addr)) is not None)

    def symbol(self, function: str, sympos: int, cpu: int) -> Symbol:
        """The function a request names, on a CPU this kernel has (``invalid_argument`` otherwise), and one it
        may call (``call_not_allowed``)."""
        nr_cpus = self.kernel.config.nr_cpus
        if cpu >= nr_cpus:
            raise InvalidArgument(f"this kernel has {nr_cpus} CPUs; there is no CPU {cpu}", cpu=cpu, nr_cpus=nr_cpus)
        sym = self.kernel.kallsyms.lookup(function, sympos)
        if not sym.is_func:
            raise InvalidArgument(f"{function!r} is not a function", symbol=function)
        if not self.allow_any and sym.addr not in self.callable:
            raise CallNotAllowed(
                f"{sym.name} is not marked callable in this kernel image: the call verbs run only the "
                f"{len(self.callable)} functions it marks (readers, syscall entry points, test helpers; "
                f"see info's callable list); {ALLOW_ANY_HINT}", function=sym.name, address=f"{sym.addr:#x}",
                hint=ALLOW_ANY_HINT)
        return sym

    def run(self, sym: Symbol, args: tuple[int, ...], *, cpu: int, events: EventLog, request_id: str,
            verb: str) -> int:
        """``sym(*args)`` on a worker of ``cpu``; x0 as an unsigned 64-bit value."""
        started = time.monotonic()
        try:
            return self.kernel.call(sym.addr, *(as_u64(a) for a in args), cpu=cpu, timeout=self.timeout_s)
        except GuestCallTimeout as late:
            late.details["request_id"] = request_id

            def finished(job: Future[int]) -> None:
                _report_late(job, events, started, verb=verb, request_id=request_id, function=sym.name,
                             address=f"{sym.addr:#x}", cpu=cpu)

            late.job.add_done_callback(finished)
            raise


def _report_late(job: Future[int], events: EventLog, started: float, **about: object) -> None:
    """The event for a call answered ``timeout`` that has now returned (or died with its vCPU)."""
    elapsed = round(time.monotonic() - started, 6)
    exc = job.exception()
    if exc is None:
        value = job.result()
        events.emit("call.finished_late", **about, elapsed_s=elapsed, ok=True, value=value, signed=as_signed(value))
        log.info("call_finished_late", **about, elapsed_s=elapsed, ok=True)
        return
    code = exc.code if isinstance(exc, LivepatchdError) else "guest_error"
    events.emit("call.finished_late", **about, elapsed_s=elapsed, ok=False, code=code, message=str(exc))
    log.info("call_finished_late", **about, elapsed_s=elapsed, ok=False, code=code)


class KernelVerbs:
    """The kernel verbs of one booted kernel."""

    def __init__(self, service: Service, kernel: Kernel, *, version: str, call_timeout_s: float = 10.0,
                 allow_any_call: bool = False) -> None:
        self.service = service
        self.kernel = kernel
        self.version = version
        self.calls = KernelCalls(kernel, timeout_s=call_timeout_s, allow_any=allow_any_call)
        self.policy = CallPolicy(allow_any=allow_any_call, callable=self.calls.names())
        self.started = time.monotonic()
        self.nr_tasks = len(kernel.tasks())  # fixed after boot

    def verbs(self) -> VerbTable:
        return {"info": self.info, "symbol.lookup": self.symbol_lookup, "call": self.call,
                "call.read": self.call_read, "tasks": self.tasks}

    async def info(self, req: InfoRequest, ctx: RequestContext) -> InfoData:
        service, kernel = self.service, self.kernel
        counts = service.journal.counts()
        return InfoData(host=service.host, version=self.version, schema_version=SCHEMA_VERSION,
                        kernel_build_id=kernel.image.build_id, arch="arm64", nr_cpus=kernel.config.nr_cpus,
                        boot_seq=service.boot_seq, uptime_s=round(time.monotonic() - self.started, 6),
                        symbols=len(kernel.kallsyms), tasks=self.nr_tasks,
                        requests=RequestCounts(accepted=counts["accepted"], answered=counts["answered"],
                                               replayed=service.replayed),
                        broker=service.link, calls=self.policy,
                        cpus_online=kernel.cpus_online,
                        tlb_mode="cpu" if kernel.config.tlb_mode == "cpu" else "virtual")  # a StrEnum

    async def symbol_lookup(self, req: SymbolLookupRequest, ctx: RequestContext) -> SymbolData:
        ks = self.kernel.kallsyms
        if req.name is not None:
            sym = ks.lookup(req.name, req.sympos)
            offset = 0
        else:
            assert req.address is not None
            found = ks.containing(req.address)
            if found is None:
                raise SymbolError(f"no symbol contains address {req.address:#x}", address=f"{req.address:#x}")
            sym, offset = found, req.address - found.addr
        return SymbolData(name=sym.name, sympos=sym.sympos, address=sym.addr, size=sym.size, is_func=sym.is_func,
                          offset=offset, description=ks.describe(sym.addr + offset))

    def call(self, req: CallRequest, ctx: RequestContext) -> CallData:
        sym = self.calls.symbol(req.function, req.sympos, req.cpu)
        value = self.calls.run(sym, tuple(req.args), cpu=req.cpu, events=ctx.events, request_id=ctx.request_id,
                               verb=ctx.verb)
        return CallData(function=sym.name, address=sym.addr, cpu=req.cpu, value=value, signed=as_signed(value))

    def call_read(self, req: CallReadRequest, ctx: RequestContext) -> CallReadData:
        """A reader ``f(buf, size) -> length`` run into a host buffer, its text returned (like ``cat /proc/...``)."""
        kernel = self.kernel
        sym = self.calls.symbol(req.function, req.sympos, req.cpu)
        buf = kernel.host_buffer.alloc(req.size)
        try:
            n = self.calls.run(sym, (buf, req.size), cpu=req.cpu, events=ctx.events, request_id=ctx.request_id,
                               verb=ctx.verb)
        except GuestCallTimeout as late:
            kernel.free_when_done(late.job, buf, req.size)  # the reader still writes into it
            raise
        except BaseException:
            kernel.host_buffer.free(buf, req.size)
            raise
        try:
            text = kernel.memory.read(buf, min(n, req.size)).decode("utf-8", "replace")
        finally:
            kernel.host_buffer.free(buf, req.size)
        return CallReadData(function=sym.name, cpu=req.cpu, length=n, text=text)

    def tasks(self, req: TasksRequest, ctx: RequestContext) -> TasksData:
        entries = [TaskEntry(pid=t.pid, cpu=t.cpu, kind=t.kind, comm=t.comm,
                             state="running" if t.running else "waiting" if t.waiting else "runnable")
                   for t in self.kernel.tasks() if req.cpu is None or t.cpu == req.cpu]
        return TasksData(tasks=entries)
