"""Register, arm, disarm and read kprobes of one kernel (kernel/kprobes.c + arch_prepare/arm/disarm_kprobe).

The host does what Linux does in process context: checks the address (aligned, kernel text, a traceable
function, not the ftrace site ``rec->ip``, not already probed), decodes the instruction
(:mod:`daemon.kprobes.decode`), prepares the out-of-line slot (instruction + ``BRK #KPROBES_BRK_SS_IMM``) or
none for a simulated instruction, fills a ``kprobe_table`` entry, and arms it with one stop-machine batch that
writes the slot, ``BRK #KPROBES_BRK_IMM`` over the instruction (compare-then-write) and the entry's
``KPF_ARMED`` flag together. Every hit then runs in the guest (``kprobes.c``).

Several probes may share an address (Linux's aggr_kprobe): the first writes the BRK and the slot, the others
only arm their table entries (same kind and slot), the guest runs every armed entry's handlers at a hit, and
the last one to go puts the instruction back. A kretprobe's entry and a kprobe can so share a function's entry.

Disarming restores the original instruction in a stop-machine batch; the slot is freed after it, when no CPU
can be in it: vCPUs park only at safe points, never inside a debug exception or a slot.
A kprobe at a function's address (``func+0``, before ``rec->ip``) must be armed after ftrace initialised the
site (``ftrace_init_nop`` writes ``mov x9, x30`` there once): the probe then steps that instruction.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from daemon.arch.arm64 import insn as a64insn
from daemon.arch.arm64.callsite import DataPatch, InsnPatch, ftrace_call_adjust
from daemon.arch.arm64.patching import TextPatcher
from daemon.emu.machine import Resume, VCpu
from daemon.errors import GuestFault, KprobeExists, KprobeNoSpace, KprobeNotFound, KprobeRefused
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.kprobes import decode

KIND_NAMES = {abi.KP_STEP: "step", abi.KP_SIM_NOP: "simulate:nop", abi.KP_SIM_B: "simulate:b",
              abi.KP_SIM_BCOND: "simulate:b.cond", abi.KP_SIM_CBZ: "simulate:cbz", abi.KP_SIM_TBZ: "simulate:tbz",
              abi.KP_SIM_ADR: "simulate:adr", abi.KP_SIM_LDR_LIT: "simulate:ldr_literal",
              abi.KP_SIM_BR: "simulate:br"}
HitKind = Literal["pre", "post", "ret", "?"]
_HIT_KINDS: dict[int, HitKind] = {0: "pre", 1: "post", abi.KPROBE_TRACE_RET: "ret"}
BRK_KPROBE = a64insn.gen_brk(abi.KPROBES_BRK_IMM)
BRK_SS = a64insn.gen_brk(abi.KPROBES_BRK_SS_IMM)
SLOT_SIZE = 8
BLACKLIST_PREFIXES = ("kprobe", "do_debug_exception", "el1", "vectors", "ftrace_caller", "ftrace_regs",
                      "return_to_handler", "host_call", "panic", "__kretprobe_trampoline",
                      "arch_rethook_trampoline", "fprobe", "kretprobe", "pre_handler_kretprobe")
"""NOKPROBE_SYMBOL()s by name, beside the rule that notrace and entry code (no ftrace record) is refused."""
ADDRESS_REFUSALS = frozenset({
    "not 4-byte aligned", "not in kernel text", "blacklisted (NOKPROBE_SYMBOL): entry, ftrace or kprobe handler code",
    "blacklisted: notrace or entry code (the function has no ftrace record)",
    "the ftrace call site (rec->ip) of the function: arm64 has no KPROBES_ON_FTRACE; probe the function's address "
    "instead"})
"""The ``reason`` of a refusal by address (check_address); the decoder's are ``decode.REFUSAL_REASONS``."""


@dataclass
class Kprobe:
    name: str
    addr: int
    symbol: str
    offset: int
    opcode: int
    kind: int
    index: int
    slot: int  # 0: simulated
    flags: int
    set_reg: int = 0
    set_val: int = 0
    call_fn: int = 0
    args: tuple[str, ...] = ()
    fetch: tuple[tuple[str, int], ...] = ()  # memory fetch args: (base register, offset)

    @property
    def mode(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def is_kretprobe(self) -> bool:
        """The entry kprobe of a kretprobe (its own verbs show and remove it)."""
        return bool(self.flags & abi.KPF_KRETPROBE)


@dataclass(frozen=True)
class KprobeHit:
    """One register record from a KPF_RECORD probe's ring."""

    probe: str
    cpu: int
    pid: int
    ts: int
    post: bool
    regs: dict[str, int]
    kind: HitKind = "pre"  # "ret": a kretprobe's return (regs["x0"] is the return value)
    duration: int = 0  # "ret": counter ticks since the entry
    mem: tuple[int | None, ...] = ()  # the probe's memory fetches at the hit, None where the address was unmapped


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of :meth:`Kprobes.register_batch` (the arguments of :meth:`Kprobes.register`)."""

    name: str
    target: str | int
    record: bool = False
    post: bool = False
    set_reg: int | None = None
    set_val: int = 0
    call_fn: str | int | None = None
    args: tuple[str, ...] = ()
    kretprobe: int = 0
    fetch: tuple[tuple[str, int], ...] = ()


@dataclass
class _Slots:
    pages: list[int] = field(default_factory=list)
    free: list[int] = field(default_factory=list)


FETCH_BASES = {**{f"x{i}": i for i in range(31)}, "sp": 31, "pc": 32}


def _fetch_words(fetch: tuple[tuple[str, int], ...]) -> list[int]:
    """kprobe.fetch[]: VALID | base << 32 | (u32)offset per memory fetch arg, 0 for the unused ones."""
    if len(fetch) > abi.KPROBE_FETCH_MAX:
        raise KprobeRefused(f"at most {abi.KPROBE_FETCH_MAX} memory fetch args (+OFFSET(%REG)) per probe",
                            reason="too many memory fetch args", limit=abi.KPROBE_FETCH_MAX)
    words = []
    for reg, off in fetch:
        if reg not in FETCH_BASES:
            raise KprobeRefused(f"a memory fetch is based on x0-x30, sp or pc, not {reg!r}", reason="bad fetch base")
        if not -(1 << 31) <= off < 1 << 31:
            raise KprobeRefused(f"fetch offset {off} does not fit 32 bits", reason="bad fetch offset")
        words.append(abi.KPROBE_FETCH_VALID | FETCH_BASES[reg] << 32 | (off & 0xFFFF_FFFF))
    return words + [0] * (abi.KPROBE_FETCH_MAX - len(words))


class Kprobes:
    """The kprobes of one booted :class:`Kernel`."""

    def __init__(self, kernel: Kernel, patcher: TextPatcher | None = None) -> None:
        self.kernel = kernel
        self.memory = kernel.memory
        self.patcher = patcher or TextPatcher(kernel)
        sym = kernel.kallsyms.addr
        self.table = sym("kprobe_table")
        self.ctlblk = sym("kprobe_ctlblk")
        self.nr_addr = sym("kprobe_nr")
        self._mcount = (sym("__start_mcount_loc"), sym("__stop_mcount_loc"))
        self._rec_ips: npt.NDArray[np.uint64] | None = None  # sorted, read at the first registration
        self._lock = threading.Lock()
        self._probes: dict[str, Kprobe] = {}
        self._by_addr: dict[int, list[Kprobe]] = {}  # several probes on one address share its BRK and slot
        self._slots = _Slots()
        self._ring_seen = [0] * abi.MAX_CPUS
        self.ring_lost = 0
        self.faults_reset = 0
        # kprobe_fault_handler: a fault while a CPU steps a probed instruction (or runs a handler) leaves that
        # CPU's kprobe_ctlblk busy; the kernel recovers the job on a fresh stack, so the probe state is reset
        # first, or the CPU's next hit would be a "reentered kprobe" BUG.
        self._write_mem_ranges()
        self._next_fault_handler = kernel.machine.on_fault
        kernel.machine.on_fault = self._on_fault

    def _write_mem_ranges(self) -> None:
        """kprobe_mem_ranges: the mapped guest ranges, merged, that a memory fetch may read."""
        spans: list[list[int]] = []
        for r in sorted(self.memory.regions, key=lambda r: r.base):
            if spans and spans[-1][1] == r.base:
                spans[-1][1] = r.end
            else:
                spans.append([r.base, r.end])
        base = self.kernel.kallsyms.addr("kprobe_mem_ranges")
        for i in range(abi.KPROBE_MEM_RANGES):
            lo, hi = spans[i] if i < len(spans) else (0, 0)
            self.memory.write_u64(base + 16 * i, lo)
            self.memory.write_u64(base + 16 * i + 8, hi)

    def _on_fault(self, vcpu: VCpu, fault: GuestFault) -> Resume | None:
        cb = abi.kprobe_ctlblk
        base = self.ctlblk + vcpu.index * cb.size
        if self.memory.read_u64(base + cb.offsetof("current")):
            for f in ("current", "status", "prev_kprobe", "prev_status", "saved_irqflag"):
                self.memory.write_u64(base + cb.offsetof(f), 0)
            self.faults_reset += 1
            fault.details["kprobe"] = "fault in a kprobe single step or handler: probe state reset"
        return self._next_fault_handler(vcpu, fault) if self._next_fault_handler is not None else None

    def _is_rec_ip(self, ip: int) -> bool:
        """Is ``ip`` an ftrace site's rec->ip? (A sorted array, not a set: a fleet holds many kernels.)"""
        if self._rec_ips is None:
            start, stop = self._mcount
            entries = np.frombuffer(self.memory.read(start, stop - start), dtype=np.uint64)
            self._rec_ips = np.sort(entries + np.uint64(ftrace_call_adjust(0)))
        i = int(np.searchsorted(self._rec_ips, np.uint64(ip)))
        return i < len(self._rec_ips) and int(self._rec_ips[i]) == ip

    # -- addresses -------------------------------------------------------------------------------------------

    def resolve(self, target: str | int) -> tuple[int, str, int]:
        """``FUNC+OFF`` / ``FUNC`` / an address -> (address, symbol, offset)."""
        ks = self.kernel.kallsyms
        if isinstance(target, int):
            addr = target
        else:
            name, _, off = target.partition("+")
            func = ks.lookup(name.strip())
            offset = int(off, 0) if off else 0
            if not 0 <= offset < max(func.size, 1):
                raise KprobeRefused(f"offset {offset:#x} is beyond {func.name} ({func.size:#x} bytes)",
                                    symbol=func.name, offset=offset, reason="offset beyond the function")
            addr = func.addr + offset
        s = ks.containing(addr)
        if s is None or not s.is_func:
            raise KprobeRefused(f"{addr:#x} is not inside a function", address=f"{addr:#x}",
                                reason="not in a function")
        return addr, s.name, addr - s.addr

    def check_address(self, addr: int, symbol: str, offset: int) -> tuple[int, int]:
        """Linux's register_kprobe checks, then arch_prepare_kprobe's decode; returns (opcode, kind)."""
        where = f"{symbol}+{offset:#x}"

        def no(reason: str) -> KprobeRefused:
            return KprobeRefused(f"cannot probe {where} ({addr:#x}): {reason}", address=f"{addr:#x}",
                                 symbol=symbol, offset=offset, reason=reason)

        if addr & 3:
            raise no("not 4-byte aligned")
        if not self.kernel.text.contains(addr, 4):
            raise no("not in kernel text")
        if symbol.startswith(BLACKLIST_PREFIXES):
            raise no("blacklisted (NOKPROBE_SYMBOL): entry, ftrace or kprobe handler code")
        func = addr - offset
        if not self._is_rec_ip(func + 4):
            raise no("blacklisted: notrace or entry code (the function has no ftrace record)")
        if self._is_rec_ip(addr):
            raise no("the ftrace call site (rec->ip) of the function: arm64 has no KPROBES_ON_FTRACE; probe the "
                     "function's address instead")
        if addr in self._by_addr:  # already checked and armed: the new probe joins it (aggr_kprobe)
            joined = self._by_addr[addr][0]
            return joined.opcode, joined.kind
        opcode = self.memory.read_u32(addr)
        try:
            kind = decode.decode(opcode)
            first = max(func, addr - 4 * decode.MAX_ATOMIC_CONTEXT_SIZE)
            words = [self.memory.read_u32(a) for a in range(first, addr + 4, 4)]
            decode.check_atomic_context(words, len(words) - 1)
        except KprobeRefused as exc:
            raise no(str(exc.details.get("reason", exc.message))) from None
        return opcode, kind

    # -- register / unregister -------------------------------------------------------------------------------

    def register(self, name: str, target: str | int, *, record: bool = False, post: bool = False,
                 set_reg: int | None = None, set_val: int = 0, call_fn: str | int | None = None,
                 args: tuple[str, ...] = (), kretprobe: int = 0,
                 fetch: tuple[tuple[str, int], ...] = ()) -> Kprobe:
        """``kretprobe``: the guest ``struct kretprobe`` whose entry this probe is (daemon.kprobes.kretprobes).
        ``fetch``: memory fetch args ``+OFFSET(%REG)`` as (register, offset), read by the guest at each recorded
        hit (at most KPROBE_FETCH_MAX; REG x0-x30, sp or pc)."""
        spec = ProbeSpec(name, target, record=record, post=post, set_reg=set_reg, set_val=set_val, call_fn=call_fn,
                         args=args, kretprobe=kretprobe, fetch=fetch)
        return self.register_batch([spec])[0]

    def register_batch(self, specs: Sequence[ProbeSpec]) -> list[Kprobe]:
        """Register and arm every probe of ``specs`` in ONE stop-machine batch (all BRKs, slots and table flags
        together); all or nothing: a refused or duplicate spec raises before anything is armed."""
        checked = [(spec, _fetch_words(spec.fetch), self._check_spec(spec)) for spec in specs]
        with self._lock:
            pending: dict[int, Kprobe] = {}  # address -> the first probe of this batch on it
            names: set[str] = set()
            used = {p.index for p in self._probes.values()}
            new_slots: list[int] = []
            probes: list[Kprobe] = []
            sites: list[InsnPatch] = []
            data: list[DataPatch] = []
            try:
                for spec, words, (addr, symbol, offset) in checked:
                    if spec.name in self._probes or spec.name in names:
                        raise KprobeExists(f"kprobe {spec.name!r} exists", probe=spec.name)
                    names.add(spec.name)
                    opcode, kind = self.check_address(addr, symbol, offset)
                    index = self._free_index(used)
                    used.add(index)
                    shared = self._by_addr[addr][0] if addr in self._by_addr else pending.get(addr)
                    if shared is not None:
                        slot = shared.slot
                    else:
                        slot = self._alloc_slot() if kind == abi.KP_STEP else 0
                        if slot:
                            new_slots.append(slot)
                    p, flags = self._fill_entry(spec, words, addr=addr, symbol=symbol, offset=offset, opcode=opcode,
                                                kind=kind, index=index, slot=slot)
                    if shared is None:  # the first probe on the address writes the slot and the BRK
                        pending[addr] = p
                        sites.append(InsnPatch(addr, opcode, BRK_KPROBE))
                        if slot:
                            sites += [InsnPatch(slot, self.memory.read_u32(slot), opcode),
                                      InsnPatch(slot + 4, self.memory.read_u32(slot + 4), BRK_SS)]
                    data.append(DataPatch(self._entry(index) + abi.kprobe.offsetof("flags"), flags))
                    probes.append(p)
                if not probes:
                    return []
                nr = max(self.memory.read_u64(self.nr_addr), max(p.index for p in probes) + 1)
                self.patcher.apply(sites, [*data, DataPatch(self.nr_addr, nr)])
            except Exception:  # nothing armed: give back the slots taken for this batch
                self._slots.free += new_slots
                raise
            for p in probes:
                self._probes[p.name] = p
                self._by_addr.setdefault(p.addr, []).append(p)
            return probes

    def _check_spec(self, spec: ProbeSpec) -> tuple[int, str, int]:
        if not spec.name or not spec.name.replace("_", "").isalnum():
            raise KprobeRefused(f"bad probe name {spec.name!r}", reason="bad name")
        if spec.set_reg is not None and not 0 <= spec.set_reg <= 30:
            raise KprobeRefused(f"set_reg must be a GPR number 0..30, not {spec.set_reg}", reason="bad register")
        return self.resolve(spec.target)

    def _fill_entry(self, spec: ProbeSpec, words: list[int], *, addr: int, symbol: str, offset: int, opcode: int,
                    kind: int, index: int, slot: int) -> tuple[Kprobe, int]:
        """Write the (still unarmed) kprobe_table entry; returns the probe and the flags that arm it."""
        flags = abi.KPF_ARMED | (abi.KPF_RECORD if spec.record else 0) | (abi.KPF_POST if spec.post else 0)
        fn = 0
        if spec.set_reg is not None:
            flags |= abi.KPF_SET_REG
        if spec.kretprobe:
            flags |= abi.KPF_KRETPROBE
        if spec.call_fn is not None:
            fn = self.kernel.resolve(spec.call_fn)
            flags |= abi.KPF_CALL
        p = Kprobe(spec.name, addr, symbol, offset, opcode, kind, index, slot, flags, spec.set_reg or 0,
                   spec.set_val, fn, spec.args, spec.fetch)
        entry = self._entry(index)
        k = abi.kprobe
        for f, v in (("addr", addr), ("opcode", opcode), ("kind", kind), ("slot", slot),
                     ("restore", addr + 4 if slot else 0), ("flags", 0), ("set_reg", p.set_reg),
                     ("set_val", spec.set_val & (2**64 - 1)), ("call_fn", fn), ("rp", spec.kretprobe)):
            self.memory.write_u64(entry + k.offsetof(f), v)
        for counter in ("hits", "nmissed", "post_hits"):
            for cpu in range(abi.MAX_CPUS):
                self.memory.write_u64(entry + k.offsetof(counter) + 8 * cpu, 0)
        for i, w in enumerate(words):
            self.memory.write_u64(entry + k.offsetof("fetch") + 8 * i, w)
        return p, flags

    def unregister(self, name: str) -> Kprobe:
        return self.unregister_batch([name])[0]

    def unregister_batch(self, names: Sequence[str]) -> list[Kprobe]:
        """Disarm and remove every named probe in ONE stop-machine batch; an unknown name raises first."""
        with self._lock:
            probes = []
            for name in dict.fromkeys(names):
                p = self._probes.get(name)
                if p is None:
                    raise KprobeNotFound(f"no kprobe {name!r}", probe=name)
                probes.append(p)
            going = {id(p) for p in probes}
            sites: list[InsnPatch] = []
            emptied: list[Kprobe] = []
            for addr in dict.fromkeys(p.addr for p in probes):
                if all(id(q) in going for q in self._by_addr[addr]):
                    # the last probe on the address puts the instruction back; others keep the BRK and the slot
                    first = self._by_addr[addr][0]
                    sites.append(InsnPatch(addr, BRK_KPROBE, first.opcode))
                    emptied.append(first)
            self.patcher.apply(sites, [DataPatch(self._entry(p.index) + abi.kprobe.offsetof("flags"), 0)
                                       for p in probes])
            # every vCPU parked at a safe point since: none is in the slot or a handler of these probes
            self._slots.free += [p.slot for p in emptied if p.slot]
            for p in probes:
                del self._probes[p.name]
                others = [q for q in self._by_addr[p.addr] if q is not p]
                if others:
                    self._by_addr[p.addr] = others
                else:
                    del self._by_addr[p.addr]
            return probes

    def _entry(self, index: int) -> int:
        return self.table + index * abi.kprobe.size

    def entry_address(self, p: Kprobe) -> int:
        """The probe's ``struct kprobe`` in guest memory."""
        return self._entry(p.index)

    def _free_index(self, used: set[int]) -> int:
        for i in range(abi.KPROBE_MAX):
            if i not in used:
                return i
        raise KprobeNoSpace(f"at most {abi.KPROBE_MAX} kprobes", limit=abi.KPROBE_MAX)

    def _alloc_slot(self) -> int:
        if not self._slots.free:
            page = self.kernel.module_text_alloc.alloc(abi.PAGE_SIZE)
            self._slots.pages.append(page)
            self._slots.free = [page + i for i in range(abi.PAGE_SIZE - SLOT_SIZE, -1, -SLOT_SIZE)]
        return self._slots.free.pop()

    # -- state -----------------------------------------------------------------------------------------------

    def find(self, name: str) -> Kprobe | None:
        return self._probes.get(name)

    def get(self, name: str) -> Kprobe:
        p = self._probes.get(name)
        if p is None:
            raise KprobeNotFound(f"no kprobe {name!r}", probe=name)
        return p

    def counter(self, p: Kprobe, name: str) -> int:
        base = self._entry(p.index) + abi.kprobe.offsetof(name)
        return sum(self.memory.read_u64(base + 8 * cpu) for cpu in range(self.kernel.config.nr_cpus))

    def info(self, p: Kprobe) -> dict[str, Any]:
        return {"name": p.name, "address": f"{p.addr:#x}", "symbol": p.symbol, "offset": p.offset,
                "insn": f"{p.opcode:#010x}", "mode": p.mode, "slot": f"{p.slot:#x}" if p.slot else None,
                "record": bool(p.flags & abi.KPF_RECORD), "post": bool(p.flags & abi.KPF_POST),
                "hits": self.counter(p, "hits"), "nmissed": self.counter(p, "nmissed"),
                "post_hits": self.counter(p, "post_hits"), "args": list(p.args)}

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.info(p) for p in sorted(self._probes.values(), key=lambda q: q.name)]

    def drain(self) -> list[KprobeHit]:
        """Register records written since the last drain (a CPU that wrote more than KPROBE_RING since lost
        the oldest: counted in ``ring_lost``)."""
        by_index = {p.index: p.name for p in self._probes.values()}
        by_fetch = {p.index: p.fetch for p in self._probes.values()}
        out: list[KprobeHit] = []
        cb, tr = abi.kprobe_ctlblk, abi.kprobe_trace
        for cpu in range(self.kernel.config.nr_cpus):
            base = self.ctlblk + cpu * cb.size
            head = self.memory.read_u64(base + cb.offsetof("ring_head"))
            first = max(self._ring_seen[cpu], head - abi.KPROBE_RING)
            self.ring_lost += first - self._ring_seen[cpu]
            for seq in range(first, head):
                e = base + cb.offsetof("ring") + (seq % abi.KPROBE_RING) * tr.size
                r = e + tr.offsetof("regs")
                regs = {f"x{i}": self.memory.read_u64(r + 8 * i) for i in range(31)}
                for f in ("sp", "pc", "pstate"):
                    regs[f] = self.memory.read_u64(r + abi.pt_regs.offsetof(f))
                post = self.memory.read_u64(e + tr.offsetof("post"))
                index = self.memory.read_u64(e + tr.offsetof("probe"))
                fault = self.memory.read_u64(e + tr.offsetof("mem_fault"))
                nfetch = len(by_fetch.get(index, ()))
                mem = tuple(None if fault >> i & 1 else self.memory.read_u64(e + tr.offsetof("mem") + 8 * i)
                            for i in range(nfetch))
                out.append(KprobeHit(by_index.get(index, "?"), cpu, self.memory.read_u64(e + tr.offsetof("pid")),
                                     self.memory.read_u64(e + tr.offsetof("ts")), post == 1, regs,
                                     _HIT_KINDS.get(post, "?"), self.memory.read_u64(e + tr.offsetof("aux")), mem))
            self._ring_seen[cpu] = head
        out.sort(key=lambda h: h.ts)
        return out

    def bugs(self) -> int:
        cb = abi.kprobe_ctlblk
        return sum(self.memory.read_u64(self.ctlblk + c * cb.size + cb.offsetof("bugs"))
                   for c in range(self.kernel.config.nr_cpus))
