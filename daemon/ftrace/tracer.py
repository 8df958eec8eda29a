"""Tracers: ftrace ops whose callbacks are guest code, and the host side that reads what they recorded.

========================  ======================  =================================================================
tracer                    guest callback          what the host reads
========================  ======================  =================================================================
:class:`FunctionTracer`   function_trace_call     per-CPU rings of (ip, parent_ip, ts, pid/cpu), drained
FunctionGraphTracer       ftrace_graph_func +     the same rings: entry and return records with depth and
                          return_to_handler       duration (function_graph, in :mod:`daemon.ftrace.fgraph`)
:class:`FunctionProfiler` function_profile_call   per-CPU hit counters per function, summed (trace_stat/function*)
:class:`FtraceOps`        ops_func_count          per-CPU counts in the ops itself (:meth:`Ftrace.ops_hits`)
========================  ======================  =================================================================

The rings live in ``cpu_data.rb`` (one ring tracer at a time, like the top-level trace instance). Each is
single-producer (its CPU) / single-consumer (the host): the guest stores the entry, then publishes ``head``;
the host copies ``[tail, head)`` and then publishes ``tail``. A full ring drops the newest entry and counts it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.errors import FtraceBusy, FtraceError
from daemon.ftrace.batch import BatchResult
from daemon.ftrace.core import Ftrace
from daemon.ftrace.hashes import GuestHash
from daemon.ftrace.ops import FtraceOps
from daemon.guest import abi

_ENTRY, _AT = abi.trace_entry.codec()  # one unpack per drained span of a ring
IP, PARENT_IP, TS, PID_CPU, TYPE, DEPTH, DURATION = (
    _AT[m] for m in ("ip", "parent_ip", "ts", "pid_cpu", "type", "depth", "duration"))
"""Where each member of a struct trace_entry is in a :data:`RawEntry`."""

RawEntry = tuple[int, ...]


@dataclass(frozen=True)
class TraceRecord:
    """One function-tracer event; ``ts`` in counter ticks (abi.CNTFRQ_HZ per second)."""

    ip: int
    parent_ip: int
    ts: int
    pid: int
    cpu: int

    @property
    def seconds(self) -> float:
        return self.ts / abi.CNTFRQ_HZ


class RingTracer:
    """A tracer whose guest callback writes the per-CPU rings: attach them, register, drain, detach.

    Only one ring tracer may run per kernel (``Ftrace.ring_owner``), like the top-level trace instance.
    """

    name = "function"

    def __init__(self, ftrace: Ftrace, func: str, *, filter: str | Iterable[str] | None = None,
                 notrace: str | Iterable[str] | None = None, entries_per_cpu: int = 4096) -> None:
        if entries_per_cpu < 2 or entries_per_cpu & (entries_per_cpu - 1):
            raise FtraceError(f"ring size must be a power of two >= 2, not {entries_per_cpu}",
                              entries_per_cpu=entries_per_cpu)
        self.ftrace = ftrace
        self.kernel = ftrace.kernel
        self.entries_per_cpu = entries_per_cpu
        self.ops = FtraceOps(self.name, func)
        ftrace.set_filter(self.ops, filter)
        ftrace.set_notrace(self.ops, notrace)
        self._buffers: list[int] = []
        self._lock = threading.Lock()
        self.read = 0  # entries drained so far
        self._final = (0, 0)  # (dropped, written) when the rings were freed

    @property
    def running(self) -> bool:
        return self.ops.registered

    def _rb(self, cpu: int) -> int:
        return self.kernel.cpu_data_addr + cpu * abi.cpu_data.size + abi.cpu_data.offsetof("rb")

    def _rb_field(self, cpu: int, name: str) -> int:
        return self._rb(cpu) + abi.ring_buffer.offsetof(name)

    def start(self) -> BatchResult | None:
        with self.ftrace.lock:
            owner = self.ftrace.ring_owner
            if owner is not None:
                raise FtraceBusy(f"the {getattr(owner, 'name', 'function')} tracer is already running on this "
                                 "kernel; stop it first")
            self.ftrace.ring_owner = self
        try:
            mem = self.kernel.memory
            size = self.entries_per_cpu * abi.trace_entry.size
            for cpu in range(self.kernel.config.nr_cpus):
                buf = self.kernel.heap.alloc(size)
                self._buffers.append(buf)
                for name, value in (("mask", self.entries_per_cpu - 1), ("head", 0), ("tail", 0), ("dropped", 0)):
                    mem.write_u64(self._rb_field(cpu, name), value)
                mem.write_u64(self._rb_field(cpu, "entries"), buf)  # last: the guest tests it first
            return self.ftrace.register(self.ops)
        except BaseException:
            self._release()
            raise

    def _stop(self) -> list[RawEntry]:
        if not self.running:
            raise FtraceError(f"the {self.name} tracer is not running")
        self.ftrace.unregister(self.ops)  # after the batch no CPU is inside the callback
        self._detach()
        rest = self._drain_raw()
        self._release(detached=True)
        return rest

    def _detach(self) -> None:
        """Stop the guest writing the rings (it tests ``entries`` first)."""
        for cpu in range(len(self._buffers)):
            self.kernel.memory.write_u64(self._rb_field(cpu, "entries"), 0)

    def _release(self, *, detached: bool = False) -> None:
        if not detached:
            self._detach()
        if self._buffers:
            self._final = (self.dropped, self.written)
        for buf in self._buffers:
            self.kernel.heap.free(buf, self.entries_per_cpu * abi.trace_entry.size)
        self._buffers = []
        with self.ftrace.lock:
            if self.ftrace.ring_owner is self:
                self.ftrace.ring_owner = None

    def _drain_raw(self) -> list[RawEntry]:
        """Every entry written since the last drain, per CPU in order, merged by timestamp (a stable sort)."""
        mem = self.kernel.memory
        out: list[RawEntry] = []
        with self._lock:
            for cpu, buf in enumerate(self._buffers):
                head = mem.read_u64(self._rb_field(cpu, "head"))
                tail = mem.read_u64(self._rb_field(cpu, "tail"))
                mask = self.entries_per_cpu - 1
                while tail != head:
                    i = tail & mask
                    n = min(head - tail, self.entries_per_cpu - i)
                    out.extend(_ENTRY.iter_unpack(mem.read(buf + i * _ENTRY.size, n * _ENTRY.size)))
                    tail += n
                mem.write_u64(self._rb_field(cpu, "tail"), tail)
            self.read += len(out)
        out.sort(key=lambda e: e[TS])
        return out

    @property
    def dropped(self) -> int:
        """Entries lost because a ring was full (the host did not drain fast enough); kept after stop."""
        if not self._buffers:
            return self._final[0]
        return sum(self.kernel.memory.read_u64(self._rb_field(c, "dropped")) for c in range(len(self._buffers)))

    @property
    def written(self) -> int:
        if not self._buffers:
            return self._final[1]
        return sum(self.kernel.memory.read_u64(self._rb_field(c, "head")) for c in range(len(self._buffers)))


def _record(e: RawEntry) -> TraceRecord:
    return TraceRecord(e[IP], e[PARENT_IP], e[TS], e[PID_CPU] >> 8, e[PID_CPU] & 0xFF)


class FunctionTracer(RingTracer):
    """``echo function > current_tracer``, restricted by set_ftrace_filter / set_ftrace_notrace expressions."""

    def __init__(self, ftrace: Ftrace, *, filter: str | Iterable[str] | None = None,
                 notrace: str | Iterable[str] | None = None, entries_per_cpu: int = 4096) -> None:
        super().__init__(ftrace, "function_trace_call", filter=filter, notrace=notrace,
                         entries_per_cpu=entries_per_cpu)

    def stop(self) -> list[TraceRecord]:
        """Unregister, then return what was still in the rings; the buffers are freed."""
        return [_record(e) for e in self._stop()]

    def drain(self) -> list[TraceRecord]:
        """Take every entry written since the last drain, per CPU in order, merged by timestamp."""
        return [_record(e) for e in self._drain_raw()]


@dataclass(frozen=True)
class ProfileLine:
    name: str
    ip: int
    hits: int


class FunctionProfiler:
    """``function_profile_enabled``: counts calls per function in the guest, per CPU, without a ring."""

    def __init__(self, ftrace: Ftrace, *, filter: str | Iterable[str] | None = None) -> None:
        self.ftrace = ftrace
        self.kernel = ftrace.kernel
        self.ops = FtraceOps("function_profile", "function_profile_call")
        ftrace.set_filter(self.ops, filter)
        ips = self.ops.filter if self.ops.filter is not None else frozenset(ftrace.by_ip)
        self.hash = GuestHash(self.kernel, ips)
        self._hits_size = 8 * self.kernel.config.nr_cpus << self.hash.size_bits
        self._hits = self.kernel.heap.alloc(self._hits_size)
        self.kernel.memory.write(self._hits, bytes(self._hits_size))
        self._private = self.kernel.heap.alloc(abi.ftrace_profile.size)
        self.kernel.memory.write(self._private, abi.ftrace_profile.pack(hash=self.hash.addr, hits=self._hits))
        self.ops.private = self._private

    def start(self) -> BatchResult | None:
        return self.ftrace.register(self.ops)

    def stop(self) -> BatchResult | None:
        return self.ftrace.unregister(self.ops)

    def hits(self) -> dict[int, int]:
        """Calls per record ip, summed over CPUs."""
        size = 1 << self.hash.size_bits
        raw = self.kernel.memory.read(self._hits, self._hits_size)
        counts = struct.unpack(f"<{len(raw) // 8}Q", raw)
        table = struct.unpack(f"<{size}Q", self.kernel.memory.read(self.hash.buckets, 8 * size))
        out: dict[int, int] = {}
        for i, ip in enumerate(table):
            if ip:
                out[ip] = sum(counts[cpu * size + i] for cpu in range(self.kernel.config.nr_cpus))
        return out

    def report(self) -> list[ProfileLine]:
        """Functions with at least one hit, most called first."""
        lines = [ProfileLine(self.ftrace.by_ip[ip].name, ip, n) for ip, n in self.hits().items() if n]
        return sorted(lines, key=lambda x: (-x.hits, x.name))

    def close(self) -> None:
        if self.ops.registered:
            self.stop()
        self.hash.free()
        self.kernel.heap.free(self._hits, self._hits_size)
        self.kernel.heap.free(self._private, abi.ftrace_profile.size)
