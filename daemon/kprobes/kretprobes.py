"""kretprobes: a kprobe at a function's address whose pre handler hijacks the return (kernel/kprobes.c).

Registration fills a ``kretprobe_table`` entry (its trampoline, per-CPU pools of ``maxactive`` instances in
kernel heap, flags) and then registers the entry kprobe at ``func+0`` with ``KPF_KRETPROBE``: from then on
every hit runs in the guest (``kretprobes.c``, ``kretprobes_entry.S``). Two trampolines, per probe:

``brk``      ``__kretprobe_trampoline``: ``BRK #KRETPROBES_BRK_IMM``; the return handler gets the genuine
             exception pt_regs (real pstate) and the exception return resumes at the real return address.
``rethook``  ``arch_rethook_trampoline``: no exception; the trampoline saves the registers itself and
             synthesizes pstate (NZCV | DAIF | CurrentEL | SPSel: what the old arm64 trampoline called "a useful
             saved PSTATE") and a pc of 0 that the handler replaces with the return address. A handler that
             reads ``regs->pstate`` sees made-up state; the ``brk`` one costs an exception per return.

``maxactive`` is per CPU (the pools need no cross-CPU atomics because tasks never migrate): an entry that
finds its CPU's pool empty is not hooked and counts ``nmissed``. Unregistering disarms the entry kprobe and
clears ``KRPF_ARMED``; returns hijacked before still land in the trampoline and go back to their callers,
without the handler. The table entry and its pool are reused only once every instance is back on its free
list (``KRPF_USED`` until then).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from daemon.errors import KprobeExists, KprobeNoSpace, KprobeNotFound, KprobeRefused
from daemon.guest import abi
from daemon.kprobes.core import Kprobe, Kprobes

TRAMPOLINES = {"brk": "__kretprobe_trampoline", "rethook": "arch_rethook_trampoline"}
DEFAULT_MAXACTIVE = 10  # Linux's floor for maxactive (max(10, 2 * NR_CPUS) there, for all CPUs together)


@dataclass
class Kretprobe:
    name: str
    kprobe: Kprobe
    index: int
    trampoline: str
    maxactive: int
    record: bool

    @property
    def symbol(self) -> str:
        return self.kprobe.symbol

    @property
    def addr(self) -> int:
        return self.kprobe.addr


@dataclass
class _Pool:
    addr: int
    size: int
    maxactive: int  # per CPU
    nr_cpus: int


class Kretprobes:
    """The kretprobes of one kernel, on top of its :class:`Kprobes`."""

    def __init__(self, kprobes: Kprobes) -> None:
        self.kprobes = kprobes
        self.kernel = kprobes.kernel
        self.memory = kprobes.memory
        self.table = self.kernel.kallsyms.addr("kretprobe_table")
        self.trampolines = {k: self.kernel.kallsyms.addr(v) for k, v in TRAMPOLINES.items()}
        self._lock = threading.Lock()
        self._probes: dict[str, Kretprobe] = {}
        self._pools: dict[int, _Pool] = {}  # table index -> pool, while the entry is live or has instances out

    def _entry(self, index: int) -> int:
        return self.table + index * abi.kretprobe.size

    def _field(self, index: int, name: str) -> int:
        return self._entry(index) + abi.kretprobe.offsetof(name)

    # -- register / unregister -------------------------------------------------------------------------------

    def register(self, name: str, target: str | int, *, maxactive: int = DEFAULT_MAXACTIVE,
                 trampoline: str = "brk", record: bool = False) -> Kretprobe:
        if trampoline not in TRAMPOLINES:
            raise KprobeRefused(f"unknown kretprobe trampoline {trampoline!r} (brk or rethook)",
                                reason="bad trampoline")
        if not 1 <= maxactive <= abi.KRETPROBE_MAXACTIVE_MAX:
            raise KprobeRefused(f"maxactive must be 1..{abi.KRETPROBE_MAXACTIVE_MAX}, not {maxactive}",
                                reason="bad maxactive")
        addr, symbol, offset = self.kprobes.resolve(target)
        if offset:
            raise KprobeRefused(f"a kretprobe goes at a function's entry, not {symbol}+{offset:#x}",
                                symbol=symbol, offset=offset, reason="not a function entry")
        with self._lock:
            if name in self._probes or self.kprobes.find(name) is not None:
                raise KprobeExists(f"probe {name!r} exists", probe=name)
            index = self._free_index()
            pool = self._alloc_pool(maxactive)
            e = self._entry(index)
            for f, v in (("kp", 0), ("trampoline", self.trampolines[trampoline]),
                         ("flags", abi.KRPF_ARMED | abi.KRPF_USED | (abi.KRPF_RECORD if record else 0)),
                         ("maxactive", maxactive), ("pool", pool.addr)):
                self.memory.write_u64(e + abi.kretprobe.offsetof(f), v)
            for cpu in range(abi.MAX_CPUS):
                first = pool.addr + cpu * maxactive * abi.kretprobe_instance.size if cpu < pool.nr_cpus else 0
                self.memory.write_u64(self._field(index, "free") + 8 * cpu, first)
                self.memory.write_u64(self._field(index, "hits") + 8 * cpu, 0)
                self.memory.write_u64(self._field(index, "nmissed") + 8 * cpu, 0)
            try:
                kp = self.kprobes.register(name, addr, kretprobe=e)
            except BaseException:
                self.memory.write_u64(self._field(index, "flags"), 0)
                self.kernel.heap.free(pool.addr, pool.size)
                raise
            self.memory.write_u64(self._field(index, "kp"), self.kprobes.entry_address(kp))
            self._pools[index] = pool
            rp = Kretprobe(name, kp, index, trampoline, maxactive, record)
            self._probes[name] = rp
            return rp

    def unregister(self, name: str) -> Kretprobe:
        with self._lock:
            rp = self._probes.get(name)
            if rp is None:
                raise KprobeNotFound(f"no kretprobe {name!r}", probe=name)
            self.kprobes.unregister(name)  # stop-machine: no CPU is in the entry handler from here on
            flags = self._field(rp.index, "flags")
            self.memory.write_u64(flags, self.memory.read_u64(flags) & ~(abi.KRPF_ARMED | abi.KRPF_RECORD))
            del self._probes[name]
            self._reap()
            return rp

    def _alloc_pool(self, maxactive: int) -> _Pool:
        nr = self.kernel.config.nr_cpus
        isz = abi.kretprobe_instance.size
        size = nr * maxactive * isz
        addr = self.kernel.heap.alloc(size)
        for cpu in range(nr):
            for i in range(maxactive):
                a = addr + (cpu * maxactive + i) * isz
                nxt = a + isz if i + 1 < maxactive else 0
                for f, v in (("next", nxt), ("rp", 0), ("ret_addr", 0), ("fp", 0), ("entry_ts", 0), ("cpu", cpu)):
                    self.memory.write_u64(a + abi.kretprobe_instance.offsetof(f), v)
        return _Pool(addr, size, maxactive, nr)

    def _free_count(self, index: int, cpu: int) -> int:
        n, a = 0, self.memory.read_u64(self._field(index, "free") + 8 * cpu)
        while a and n <= abi.KRETPROBE_MAXACTIVE_MAX:
            n += 1
            a = self.memory.read_u64(a + abi.kretprobe_instance.offsetof("next"))
        return n

    def in_use(self, index: int) -> int:
        """Instances of table entry ``index`` out on tasks' lists (hijacked returns not yet taken)."""
        pool = self._pools.get(index)
        if pool is None:
            return 0
        return sum(pool.maxactive - self._free_count(index, c) for c in range(pool.nr_cpus))

    def _reap(self) -> None:
        """Free the pools of unregistered kretprobes whose instances are all back (none can leave again)."""
        live = {rp.index for rp in self._probes.values()}
        for index in [i for i in self._pools if i not in live]:
            if self.in_use(index) == 0:
                pool = self._pools.pop(index)
                self.memory.write_u64(self._field(index, "flags"), 0)
                self.kernel.heap.free(pool.addr, pool.size)

    def _free_index(self) -> int:
        self._reap()
        for i in range(abi.KRETPROBE_MAX):
            if i not in self._pools:
                return i
        raise KprobeNoSpace(f"at most {abi.KRETPROBE_MAX} kretprobes (entries of unregistered ones come back "
                            f"when their hijacked returns have returned)", limit=abi.KRETPROBE_MAX)

    # -- state -----------------------------------------------------------------------------------------------

    def find(self, name: str) -> Kretprobe | None:
        return self._probes.get(name)

    def get(self, name: str) -> Kretprobe:
        rp = self._probes.get(name)
        if rp is None:
            raise KprobeNotFound(f"no kretprobe {name!r}", probe=name)
        return rp

    def counter(self, rp: Kretprobe, name: str) -> int:
        base = self._field(rp.index, name)
        return sum(self.memory.read_u64(base + 8 * cpu) for cpu in range(self.kernel.config.nr_cpus))

    def info(self, rp: Kretprobe) -> dict[str, Any]:
        return {"name": rp.name, "address": f"{rp.addr:#x}", "symbol": rp.symbol, "trampoline": rp.trampoline,
                "maxactive": rp.maxactive, "record": rp.record, "hits": self.counter(rp, "hits"),
                "entries": self.kprobes.counter(rp.kprobe, "hits"), "nmissed": self.counter(rp, "nmissed"),
                "kprobe_nmissed": self.kprobes.counter(rp.kprobe, "nmissed"), "in_use": self.in_use(rp.index)}

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.info(rp) for rp in sorted(self._probes.values(), key=lambda q: q.name)]
