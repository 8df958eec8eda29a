"""The function_graph tracer: entry and return of every traced call, with nesting depth and duration.

Per call, all in the guest (``fgraph.c``, ``return_to_handler`` in ``ftrace_entry.S``):

========  ====================================================================================================
when      what
========  ====================================================================================================
entry     ``ftrace_graph_func`` pushes {return address, function, caller's x29, now} on the current task's
          ``ret_stack`` (FTRACE_RETFUNC_DEPTH deep; a full stack leaves the call unhooked and counts
          ``trace_overrun``), records TRACE_GRAPH_ENT and swaps ``fregs->lr`` for ``return_to_handler``
return    ``return_to_handler`` saves x0-x8, ``ftrace_return_to_handler(x29)`` pops (a frame-pointer mismatch
          is a guest panic), records TRACE_GRAPH_RET with now - calltime, and execution resumes at the
          original return address
========  ====================================================================================================

``set_graph_function`` (``graph_function``) and ``set_graph_notrace`` (``graph_notrace``) are guest hashes in the
ops' private data (struct fgraph_hashes), tested in ``ftrace_graph_func``: with a graph function set, a call is
recorded only while its task is inside one of those functions (which records itself and everything beneath it);
a graph notrace function and everything beneath it are never recorded. Which functions are hooked at all is
still set_ftrace_filter / set_ftrace_notrace's business.

The host side only attaches the rings, writes the hashes, registers the ops and drains. A call hooked before
``stop`` still returns through ``return_to_handler`` afterwards (a sleeping task keeps its ``ret_stack``); the
rings are detached inside a stop-machine pause, so no CPU is halfway through writing one when its buffer is
freed, and the hashes are freed after the ops is unregistered (``return_to_handler`` never reads them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from daemon.ftrace import filter as ftrace_filter
from daemon.ftrace.batch import BatchResult
from daemon.ftrace.core import Ftrace
from daemon.ftrace.hashes import GuestHash
from daemon.ftrace.tracer import DEPTH, DURATION, IP, PARENT_IP, PID_CPU, TS, TYPE, RawEntry, RingTracer
from daemon.guest import abi
from daemon.kernel.structs import StructRef


@dataclass(frozen=True)
class GraphRecord:
    """One function_graph event; ``ts`` and ``duration`` in counter ticks (abi.CNTFRQ_HZ per second).

    For a return, ``parent_ip`` is the address the call returned to and ``duration`` its time since entry.
    """

    entry: bool
    ip: int
    parent_ip: int
    ts: int
    pid: int
    cpu: int
    depth: int
    duration: int = 0

    @property
    def duration_ns(self) -> int:
        return self.duration * 1_000_000_000 // abi.CNTFRQ_HZ


def _graph_set(ftrace: Ftrace, expr: str | Iterable[str] | None) -> frozenset[int]:
    """The record ips of a set_graph_function / set_graph_notrace expression (None or empty: none)."""
    if expr is None or not ftrace_filter.terms(expr):
        return frozenset()
    return ftrace.select(expr)


def _record(e: RawEntry) -> GraphRecord:
    ip, parent, ts, pid_cpu, kind, depth, duration = (e[IP], e[PARENT_IP], e[TS], e[PID_CPU], e[TYPE], e[DEPTH],
                                                       e[DURATION])
    if kind not in (abi.TRACE_GRAPH_ENT, abi.TRACE_GRAPH_RET):
        raise ValueError(f"not a function_graph entry: type {kind}")
    return GraphRecord(kind == abi.TRACE_GRAPH_ENT, ip, parent, ts, pid_cpu >> 8, pid_cpu & 0xFF, depth, duration)


class FunctionGraphTracer(RingTracer):
    """``echo function_graph > current_tracer``, restricted by set_ftrace_filter / set_ftrace_notrace (what is
    hooked) and set_graph_function / set_graph_notrace (what of it is recorded), all in the same syntax."""

    name = "function_graph"

    def __init__(self, ftrace: Ftrace, *, filter: str | Iterable[str] | None = None,
                 notrace: str | Iterable[str] | None = None, graph_function: str | Iterable[str] | None = None,
                 graph_notrace: str | Iterable[str] | None = None, entries_per_cpu: int = 4096) -> None:
        # checked first: a bad expression is refused before anything is set up
        self.graph_function = _graph_set(ftrace, graph_function)
        self.graph_notrace = _graph_set(ftrace, graph_notrace)
        super().__init__(ftrace, "ftrace_graph_func", filter=filter, notrace=notrace,
                         entries_per_cpu=entries_per_cpu)
        self._hashes: list[GuestHash] = []

    def start(self) -> BatchResult | None:
        if self.graph_function or self.graph_notrace:
            self.ops.private = self._write_hashes()
        try:
            return super().start()
        except BaseException:
            self._free_hashes()
            raise

    def _write_hashes(self) -> int:
        """struct fgraph_hashes and its non-empty hashes, in the heap until the tracer stops."""
        addrs: dict[str, int] = {}
        for member, ips in (("function_hash", self.graph_function), ("notrace_hash", self.graph_notrace)):
            if ips:
                self._hashes.append(GuestHash(self.kernel, ips))
            addrs[member] = self._hashes[-1].addr if ips else 0
        addr = self.kernel.heap.alloc(abi.fgraph_hashes.size)
        self.kernel.memory.write(addr, abi.fgraph_hashes.pack(**addrs))
        return addr

    def _free_hashes(self) -> None:
        for h in self._hashes:
            h.free()
        self._hashes = []
        if self.ops.private:
            self.kernel.heap.free(self.ops.private, abi.fgraph_hashes.size)
            self.ops.private = 0

    def _detach(self) -> None:
        # return_to_handler writes the rings even after the ops is gone: park every CPU to detach them
        self.kernel.stop_machine(super()._detach)

    def _release(self, *, detached: bool = False) -> None:
        super()._release(detached=detached)
        self._free_hashes()  # unregistered: no CPU is inside ftrace_graph_func (return_to_handler never reads them)

    def stop(self) -> list[GraphRecord]:
        """Unregister, detach the rings, and return what was still in them; the buffers are freed."""
        return [_record(e) for e in self._stop()]

    def drain(self) -> list[GraphRecord]:
        """Every event written since the last drain, per CPU in order, merged by timestamp."""
        return [_record(e) for e in self._drain_raw()]

    def _tasks(self) -> list[StructRef]:
        return [self.kernel.task(i) for i in range(self.kernel.boot_params.get("nr_tasks"))]

    @property
    def overrun(self) -> int:
        """Calls left unhooked because their task's ret_stack was full (every task, since boot)."""
        return sum(t.get("trace_overrun") for t in self._tasks())

    def hooked(self) -> dict[int, int]:
        """pid -> returns still hooked on that task (a task asleep inside traced functions keeps them)."""
        return {t.get("pid"): n for t in self._tasks() if (n := t.get("curr_ret_stack"))}
