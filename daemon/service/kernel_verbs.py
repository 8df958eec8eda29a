"""The kernel's own verbs: ``info``, ``symbol.lookup``, ``call`` and ``tasks``."""

from __future__ import annotations

import time

from daemon.errors import SymbolError
from daemon.kernel.kernel import Kernel
from daemon.service.kernel_calls import KernelCalls, as_signed
from daemon.service.pipeline.core import RequestContext, Service
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


def register(service: Service, kernel: Kernel, *, version: str, call_timeout_s: float = 10.0,
             allow_any_call: bool = False) -> KernelCalls:
    """Serve the kernel verbs of ``kernel`` (booted) on ``service``; the calls they make serve ``call.read`` too."""
    calls = KernelCalls(kernel, timeout_s=call_timeout_s, allow_any=allow_any_call)
    policy = CallPolicy(allow_any=allow_any_call, callable=calls.names())
    started = time.monotonic()
    nr_cpus = kernel.config.nr_cpus
    nr_tasks = len(kernel.tasks())  # fixed after boot

    @service.handler("info")
    async def info(req: InfoRequest, ctx: RequestContext) -> InfoData:
        counts = service.journal.counts()
        return InfoData(host=service.host, version=version, schema_version=SCHEMA_VERSION,
                        kernel_build_id=kernel.image.build_id, arch="arm64", nr_cpus=nr_cpus,
                        boot_seq=service.boot_seq, uptime_s=round(time.monotonic() - started, 6),
                        symbols=len(kernel.kallsyms), tasks=nr_tasks,
                        requests=RequestCounts(accepted=counts["accepted"], answered=counts["answered"],
                                               replayed=service.replayed),
                        broker=service.link, calls=policy,
                        cpus_online=[v.index for v in kernel.machine.vcpus if v.alive])

    @service.handler("symbol.lookup")
    async def symbol_lookup(req: SymbolLookupRequest, ctx: RequestContext) -> SymbolData:
        ks = kernel.kallsyms
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

    @service.handler("call")
    def call(req: CallRequest, ctx: RequestContext) -> CallData:
        sym = calls.symbol(req.function, req.sympos, req.cpu)
        value = calls.run(sym, tuple(req.args), cpu=req.cpu, events=ctx.events, request_id=ctx.request_id,
                          verb=ctx.verb)
        return CallData(function=sym.name, address=sym.addr, cpu=req.cpu, value=value, signed=as_signed(value))

    @service.handler("tasks")
    def tasks(req: TasksRequest, ctx: RequestContext) -> TasksData:
        entries = [TaskEntry(pid=t.pid, cpu=t.cpu, kind=t.kind, comm=t.comm,
                             state="running" if t.running else "waiting" if t.waiting else "runnable")
                   for t in kernel.tasks() if req.cpu is None or t.cpu == req.cpu]
        return TasksData(tasks=entries)

    return calls
