"""The kernel's own verbs: ``info``, ``symbol.lookup``, ``call`` and ``tasks``."""

from __future__ import annotations

import time

from daemon.errors import SymbolError
from daemon.kernel.kallsyms import Symbol
from daemon.kernel.kernel import Kernel
from daemon.service.core import RequestContext, Service
from daemon.service.errors import InvalidArgument
from schemas import (
    SCHEMA_VERSION,
    CallData,
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

_U64 = (1 << 64) - 1


def callable_symbol(kernel: Kernel, function: str, sympos: int, cpu: int) -> Symbol:
    """The function a ``call``-like request names, on a CPU this kernel has (``invalid_argument`` otherwise)."""
    nr_cpus = kernel.config.nr_cpus
    if cpu >= nr_cpus:
        raise InvalidArgument(f"this kernel has {nr_cpus} CPUs; there is no CPU {cpu}", cpu=cpu, nr_cpus=nr_cpus)
    sym = kernel.kallsyms.lookup(function, sympos)
    if not sym.is_func:
        raise InvalidArgument(f"{function!r} is not a function", symbol=function)
    return sym


def register(service: Service, kernel: Kernel, *, version: str, call_timeout_s: float = 10.0) -> None:
    """Serve the kernel verbs of ``kernel`` (booted) on ``service``."""
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
                        broker=service.link)

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
        sym = callable_symbol(kernel, req.function, req.sympos, req.cpu)
        value = kernel.call(sym.addr, *(a & _U64 for a in req.args), cpu=req.cpu, timeout=call_timeout_s)
        signed = value - (1 << 64) if value >> 63 else value
        return CallData(function=sym.name, address=sym.addr, cpu=req.cpu, value=value, signed=signed)

    @service.handler("tasks")
    def tasks(req: TasksRequest, ctx: RequestContext) -> TasksData:
        entries = [TaskEntry(pid=t.pid, cpu=t.cpu, kind=t.kind, comm=t.comm,
                             state="running" if t.running else "waiting" if t.waiting else "runnable")
                   for t in kernel.tasks() if req.cpu is None or t.cpu == req.cpu]
        return TasksData(tasks=entries)
