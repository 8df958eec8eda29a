"""The ftrace core: records, the registered ops and the update plans that move call sites between states.

Every change (register, unregister, a new filter, a new direct target) goes through the same three steps:

1. **validate** the request against the current state (raising before anything is written);
2. **plan**: compute for each affected record what the kernel's ``ftrace_check_record`` would decide (count,
   flags, the literal's ops, the BL target) and turn differences into an :class:`UpdatePlan` of literal
   stores, ops-list pointer stores and compare-then-write instruction edits;
3. **apply** the plan as one stop-machine batch (:class:`~daemon.arch.arm64.patching.TextPatcher`; the result is a
   :class:`~daemon.ftrace.batch.BatchResult`): data
   before text, so a literal always holds its new ops before a BL can reach it, and a site being disabled
   points at ``ftrace_nop_ops`` before its BL disappears (kernel-mechanics §2.4).

Because every vCPU parks at a safe point outside any ftrace callback, the stop-machine pause is also the
grace period ``ftrace_shutdown`` waits for with RCU-tasks: ops and hashes replaced by a batch are freed as
soon as it returns.

``enabled`` is the ``kernel.ftrace_enabled`` sysctl. Cleared, every site is a NOP again (records keep their
ops count and their static flags, losing ENABLED and the ``*_EN`` bits, as ``ftrace_check_record`` disables
them); ops may still register (non-PERMANENT ones: their sites wait for the sysctl), and it cannot be cleared
while a PERMANENT ops — a livepatch — is registered: both refusals are -EBUSY.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from daemon.arch.arm64 import callsite
from daemon.arch.arm64.callsite import DataPatch, InsnPatch
from daemon.arch.arm64.patching import TextPatcher
from daemon.errors import AmbiguousSymbol, BadDirectCall, FtraceBusy, FtraceError, OpsStateError, SymbolError
from daemon.ftrace import filter as ftrace_filter
from daemon.ftrace.batch import BatchResult
from daemon.ftrace.hashes import GuestHash
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.ftrace.records import DynFtrace, RecFlag, records_from
from daemon.ftrace.symbols import SymbolAt, SymbolLookup
from daemon.guest import abi
from daemon.kernel.kernel import Kernel

REDIRECT_CALLBACK = "ftrace_redirect_call"
"""The guest callback of a redirect ops: ``regs->pc = ops->private``."""


@dataclass
class UpdatePlan:
    """What one batch writes: guest data first (literals, ops-list links, hash pointers), then text."""

    data: list[DataPatch] = field(default_factory=list)
    text: list[InsnPatch] = field(default_factory=list)
    records: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # ip -> new (flags, literal, target)

    def __bool__(self) -> bool:
        return bool(self.data or self.text or self.records)


@dataclass(frozen=True)
class _BootSites:
    """An image's patchable call sites (``records_from`` over its ``__patchable_function_entries``)."""

    ips: npt.NDArray[np.uint64]
    names: list[str]
    old: npt.NDArray[np.uint32]
    new: npt.NDArray[np.uint32]
    literals: npt.NDArray[np.uint64]


_boot_sites_cache: dict[int, tuple[object, _BootSites]] = {}
"""By the image object (``load_image`` parses an image once per process), which the entry keeps alive."""
_boot_sites_lock = threading.Lock()


def _boot_sites(kernel: Kernel) -> _BootSites:
    key = id(kernel.image)
    with _boot_sites_lock:
        found = _boot_sites_cache.get(key)
        if found is not None and found[0] is kernel.image:
            return found[1]
        ks = kernel.kallsyms

        def name_at(addr: int) -> str | None:
            sym = ks.containing(addr)
            return sym.name if sym is not None and sym.addr == addr else None
        recs = records_from(kernel.image.mcount_loc(), name_at)
        ips = np.fromiter((r.ip for r in recs), dtype=np.uint64, count=len(recs))
        nops = [callsite.init_nop(r.ip) for r in recs]
        sites = _BootSites(ips=ips, names=[r.name for r in recs],
                           old=np.fromiter((p.old for p in nops), dtype=np.uint32, count=len(nops)),
                           new=np.fromiter((p.new for p in nops), dtype=np.uint32, count=len(nops)),
                           literals=np.fromiter((callsite.literal_addr(r.ip) for r in recs), dtype=np.uint64,
                                                count=len(recs)))
        for p, ip in zip(nops, ips.tolist(), strict=True):
            assert p.addr == ip - 4  # init_nop edits the word before rec->ip (apply_bulk is given ips - 4)
        _boot_sites_cache[key] = (kernel.image, sites)
        return sites


@dataclass(frozen=True)
class _State:
    """A record's wanted state."""

    flags: int
    literal: int
    target: int


class Ftrace:
    """Dynamic ftrace for one kernel.

    ``force_list`` models a kernel without CALL_OPS: every enabled site calls through ``ftrace_list_ops``.
    """

    def __init__(self, kernel: Kernel, patcher: TextPatcher | None = None, *, force_list: bool = False) -> None:
        self.kernel = kernel
        self.patcher = patcher or TextPatcher(kernel)
        self.force_list = force_list
        sym = kernel.kallsyms.addr
        self.caller = sym("ftrace_caller")
        self.list_ops = sym("ftrace_list_ops")
        self.nop_ops = sym("ftrace_nop_ops")
        self.list_end = sym("ftrace_list_end")
        self.list_head = sym("ftrace_ops_list")
        self.call_direct_funcs = sym("call_direct_funcs")
        self.lock = threading.RLock()
        self._ops: list[FtraceOps] = []  # guest list order: the newest first, as add_ftrace_ops links them
        self.records: list[DynFtrace] = []
        self.by_ip: dict[int, DynFtrace] = {}
        self.by_name: dict[str, list[DynFtrace]] = {}
        self._symbols: list[SymbolLookup] = []  # loaded modules' symbols, after the kernel's
        self.last_batch: BatchResult | None = None
        self.ring_owner: object | None = None  # the function tracer using the per-CPU rings, if any
        self.enabled = True
        """kernel.ftrace_enabled (change it with :meth:`set_enabled`)."""
        self._init_records()

    # -- records ---------------------------------------------------------------------------------------------

    def _init_records(self) -> None:
        """ftrace_init: a record per patchable entry of the kernel image, each site made `mov x9, lr; nop`.

        What the sites are depends on the image only: worked out once per image and process (a fleet process
        boots a thousand kernels of a few images), then written as one array batch."""
        sites = _boot_sites(self.kernel)
        recs = [DynFtrace(ip, name) for ip, name in zip(sites.ips.tolist(), sites.names, strict=True)]
        with self.lock:
            self.last_batch = BatchResult.of(self.patcher.apply_bulk(
                sites.ips - np.uint64(4), sites.old, sites.new, sites.literals, self.nop_ops))
            for r in recs:
                r.literal = self.nop_ops
                self.by_ip[r.ip] = r
                self.by_name.setdefault(r.name, []).append(r)
            self.records.extend(recs)
            self.records.sort(key=lambda r: r.ip)

    def add_records(self, recs: Sequence[DynFtrace], symbols: SymbolLookup | None = None) -> None:
        """Take over fresh call sites (kernel text at boot; later, loaded modules): ftrace_init_nop on each.

        The literal is set to ``ftrace_nop_ops`` in the same batch that writes ``mov x9, x30``. ``symbols``
        names the addresses of the text they belong to (a module's), until :meth:`forget_symbols`.
        """
        with self.lock:
            dup = [r for r in recs if r.ip in self.by_ip]
            if dup:
                raise FtraceError(f"call site {dup[0].ip:#x} ({dup[0].name}) already has a record", ip=dup[0].ip)
            self.last_batch = BatchResult.of(self.patcher.apply(
                [callsite.init_nop(r.ip) for r in recs],
                [DataPatch(callsite.literal_addr(r.ip), self.nop_ops) for r in recs]))
            for r in recs:
                r.flags, r.target, r.literal = 0, 0, self.nop_ops
                self.records.append(r)
                self.by_ip[r.ip] = r
                self.by_name.setdefault(r.name, []).append(r)
            self.records.sort(key=lambda r: r.ip)
            new_ips = [r.ip for r in recs]
            if any(o.covers(ip) for o in self._ops for ip in new_ips):  # ftrace_module_enable
                self._apply(self._plan(new_ips))
            if symbols is not None:
                self._symbols.append(symbols)

    def forget_symbols(self, symbols: SymbolLookup) -> None:
        """Stop naming addresses with a module's symbols (it is unloading)."""
        with self.lock:
            if symbols in self._symbols:
                self._symbols.remove(symbols)

    def remove_records(self, ips: Iterable[int]) -> None:
        """Forget records of text that goes away (a module unloading); they must not be traced any more."""
        with self.lock:
            gone = {ip for ip in ips if ip in self.by_ip}
            busy = [self.by_ip[ip] for ip in gone if self.by_ip[ip].count]
            if busy:
                raise FtraceBusy(f"{busy[0].name} is still traced by {busy[0].count} ops", function=busy[0].name)
            for ip in gone:
                rec = self.by_ip.pop(ip)
                self.by_name[rec.name].remove(rec)
                if not self.by_name[rec.name]:
                    del self.by_name[rec.name]
            self.records = [r for r in self.records if r.ip not in gone]

    def record(self, name: str, sympos: int = 0) -> DynFtrace:
        """The record of a traceable function (``sympos`` picks among its traceable definitions, 1-based)."""
        found = self.by_name.get(name, [])
        if not found:
            if name in self.kernel.kallsyms:
                raise ftrace_filter.no_match(name)  # a function, but notrace
            raise SymbolError(f"unknown symbol {name!r}", symbol=name)
        if sympos == 0 and len(found) > 1:
            raise AmbiguousSymbol(f"{name!r} names {len(found)} functions; give its position (sympos "
                                  f"1..{len(found)})", symbol=name, count=len(found))
        if sympos > len(found):
            raise SymbolError(f"{name!r} has no position {sympos} (it has {len(found)})", symbol=name,
                              sympos=sympos)
        return found[max(sympos, 1) - 1]

    def symbol_at(self, addr: int) -> SymbolAt | None:
        """kallsyms_lookup_size_offset: the symbol holding ``addr`` (loaded modules', then the kernel's)."""
        for lookup in self._symbols:
            found = lookup(addr)
            if found is not None:
                return found
        sym = self.kernel.kallsyms.containing(addr)
        if sym is None:
            return None
        return SymbolAt(sym.name, sym.addr, sym.size, addr - sym.addr, sym.is_func)

    def is_function_start(self, addr: int) -> bool:
        """``addr`` is the first instruction of a function in kernel or module text."""
        found = self.symbol_at(addr)
        return found is not None and found.is_function_start and self.kernel.is_text(addr)

    def describe(self, addr: int) -> str:
        """%pS of an address: loaded modules' symbols, then the kernel's, else the bare hex address."""
        found = self.symbol_at(addr)
        return f"{addr:#x}" if found is None else found.describe()

    def symbol_name(self, addr: int) -> str:
        """%ps: the name of the symbol holding ``addr``, without offset (or the raw address)."""
        return self.describe(addr).split("+", 1)[0]

    def name_of(self, rec: DynFtrace) -> str:
        """%ps of a record: the function name, with `` [module]`` for module text."""
        return f"{rec.name} [{rec.module}]" if rec.module else rec.name

    def select(self, expr: str | Iterable[str]) -> frozenset[int]:
        """The record ips a set_ftrace_filter expression selects."""
        return frozenset(ftrace_filter.select(expr, self.records, self.by_name))

    # -- the sysctl ------------------------------------------------------------------------------------------

    def set_enabled(self, value: bool) -> BatchResult | None:
        """sysctl kernel.ftrace_enabled: every traced site off (NOP) or back to what its ops want, in one batch."""
        with self.lock:
            if value == self.enabled:
                return None
            permanent = [o.name for o in self._ops if o.flags & OpsFlag.PERMANENT]
            if not value and permanent:
                raise FtraceBusy(f"ftrace_enabled cannot be cleared while PERMANENT ops are registered: "
                                 f"{', '.join(permanent)} (live patches need their call sites; disable them first)",
                                 ops=permanent)
            self.enabled = value
            try:
                return self._apply(self._plan(r.ip for r in self.records if r.count))
            except BaseException:
                self.enabled = not value
                raise

    # -- ops: public API -------------------------------------------------------------------------------------

    @property
    def ops(self) -> list[FtraceOps]:
        """Registered ops, newest first (the order ftrace_ops_list_func calls them)."""
        with self.lock:
            return list(self._ops)

    @property
    def ops_now(self) -> tuple[FtraceOps, ...]:
        """The registered ops without taking the lock (a copy, made in one step under the GIL): for a view that
        must not wait behind a change in progress, e.g. to tell whether its snapshot is still current."""
        return tuple(self._ops)

    def register(self, ops: FtraceOps) -> BatchResult | None:
        """register_ftrace_function: add ``ops`` and enable every site it covers, in one batch."""
        with self.lock:
            if ops in self._ops or ops.registered:
                raise OpsStateError(f"ops {ops.name!r} is already registered", ops=ops.name)
            if ops.flags & OpsFlag.PERMANENT and not self.enabled:
                raise FtraceBusy(f"ops {ops.name!r} is PERMANENT and ftrace_enabled is 0: set it to 1 first",
                                 ops=ops.name)
            self._check_ops(ops)
            func = self.kernel.resolve(ops.func)
            if not self.kernel.is_text(func):
                raise FtraceError(f"ops {ops.name!r}: func {func:#x} is not kernel or module text", ops=ops.name)
            ips = self._covered(ops)
            self._check_exclusive(ops, ips)
            filter_hash = GuestHash(self.kernel, ops.filter or ())
            notrace_hash = GuestHash(self.kernel, ops.notrace)
            addr = self.kernel.heap.alloc(abi.ftrace_ops.size)
            head = self.kernel.memory.read_u64(self.list_head)
            self._write_ops(addr, func=func, next=head, flags=ops.flags | OpsFlag.ENABLED, private=ops.private,
                            filter_hash=filter_hash.addr, notrace_hash=notrace_hash.addr,
                            direct_call=ops.direct_call)
            ops.addr = addr
            ops.hashes = {"filter": filter_hash, "notrace": notrace_hash}
            ops.flags |= OpsFlag.ENABLED
            self._ops.insert(0, ops)
            try:
                plan = self._plan(ips)
                plan.data.insert(0, DataPatch(self.list_head, addr))
                return self._apply(plan)
            except BaseException:
                self._ops.remove(ops)
                ops.flags &= ~OpsFlag.ENABLED
                self._free_ops(ops)
                raise

    def unregister(self, ops: FtraceOps) -> BatchResult | None:
        """unregister_ftrace_function: unlink ``ops``, re-plan its sites, free its guest memory."""
        with self.lock:
            if ops not in self._ops:
                raise OpsStateError(f"ops {ops.name!r} is not registered", ops=ops.name)
            ips = self._covered(ops)
            i = self._ops.index(ops)
            prev = self.list_head if i == 0 else self._ops[i - 1].addr + abi.ftrace_ops.offsetof("next")
            nxt = self.list_end if i == len(self._ops) - 1 else self._ops[i + 1].addr
            self._ops.remove(ops)
            try:
                plan = self._plan(ips)
                plan.data.insert(0, DataPatch(prev, nxt))
                result = self._apply(plan)
            except BaseException:
                self._ops.insert(i, ops)
                raise
            ops.flags &= ~OpsFlag.ENABLED
            ops.saved_hits = self.ops_hits(ops)
            self._free_ops(ops)
            return result

    def set_filter(self, ops: FtraceOps, expr: str | Iterable[str] | None, *, reset: bool = True) -> BatchResult | None:
        """ftrace_set_filter: ``None`` or an empty expression (with ``reset``) traces every function."""
        return self._set_hash(ops, "filter", expr, reset)

    def set_notrace(self, ops: FtraceOps, expr: str | Iterable[str] | None, *, reset: bool = True
                    ) -> BatchResult | None:
        """ftrace_set_notrace: functions ``ops`` must never see, whatever its filter says."""
        return self._set_hash(ops, "notrace", expr, reset)

    def set_filter_ips(self, ops: FtraceOps, ips: Iterable[int] | None) -> BatchResult | None:
        """ftrace_set_filter_ips: a filter given as record ips or function addresses."""
        if ips is None:
            return self._replace_filters(ops, None, ops.notrace)
        chosen = set()
        for ip in ips:
            rec = self.by_ip.get(ip) or self.by_ip.get(ip + 4)
            if rec is None:
                raise ftrace_filter.no_match(f"{ip:#x}")
            chosen.add(rec.ip)
        return self._replace_filters(ops, frozenset(chosen), ops.notrace)

    # -- redirects -------------------------------------------------------------------------------------------

    def register_redirect(self, ops: FtraceOps, target: int) -> BatchResult | None:
        """Calls to the functions of ``ops``' filter run ``target`` instead (an IPMODIFY ops whose callback,
        ``ftrace_redirect_call``, sets ``pt_regs->pc`` to it): what livepatch does for one function."""
        with self.lock:
            if not self.is_function_start(target):
                raise FtraceError(f"redirect target {self.describe(target)} ({target:#x}) is not the start of a "
                                  "function in kernel or module text", ops=ops.name, address=target)
            ops.func, ops.flags, ops.private = REDIRECT_CALLBACK, ops.flags | OpsFlag.IPMODIFY, target
            try:
                return self.register(ops)
            except BaseException:
                ops.flags &= ~OpsFlag.IPMODIFY
                ops.private = 0
                raise

    # -- direct calls ----------------------------------------------------------------------------------------

    def register_direct(self, ops: FtraceOps, addr: int | str) -> BatchResult | None:
        """register_ftrace_direct: calls to the functions of ``ops``' filter go to trampoline ``addr``."""
        with self.lock:
            tramp = self._direct_target(ops, addr)
            if not ops.filter:
                raise FtraceError(f"direct ops {ops.name!r} needs a filter naming its functions", ops=ops.name)
            ops.func = self.call_direct_funcs
            ops.flags |= OpsFlag.DIRECT
            ops.direct_call = tramp
            try:
                return self.register(ops)
            except BaseException:
                ops.flags &= ~OpsFlag.DIRECT
                ops.direct_call = 0
                raise

    def modify_direct(self, ops: FtraceOps, addr: int | str) -> BatchResult | None:
        """modify_ftrace_direct: retarget every site of ``ops`` without a window where calls are lost.

        In one batch: ``ops->direct_call`` is stored and each site that branched straight to the old trampoline
        is re-aimed (at the new one, or at ftrace_caller if the new one is out of BL range) — the effect of
        Linux's temporary stub ops, which exists only because its sites are not patched all at once.
        """
        with self.lock:
            if ops not in self._ops or not ops.flags & OpsFlag.DIRECT:
                raise OpsStateError(f"ops {ops.name!r} is not a registered direct ops", ops=ops.name)
            tramp = self._direct_target(ops, addr)
            old = ops.direct_call
            ops.direct_call = tramp
            try:
                plan = self._plan(self._covered(ops))
                plan.data.insert(0, DataPatch(ops.addr + abi.ftrace_ops.offsetof("direct_call"), tramp))
                return self._apply(plan)
            except BaseException:
                ops.direct_call = old
                raise

    def unregister_direct(self, ops: FtraceOps) -> BatchResult | None:
        """unregister_ftrace_direct."""
        with self.lock:
            if not ops.flags & OpsFlag.DIRECT:
                raise OpsStateError(f"ops {ops.name!r} is not a direct ops", ops=ops.name)
            result = self.unregister(ops)
            ops.flags &= ~OpsFlag.DIRECT
            ops.direct_call = 0
            return result

    def direct_of(self, rec: DynFtrace) -> int:
        """ftrace_find_rec_direct: the direct trampoline attached to a record, or 0."""
        for o in self._ops:
            if o.flags & OpsFlag.DIRECT and o.covers(rec.ip):
                return o.direct_call
        return 0

    def unique_ops(self, rec: DynFtrace) -> FtraceOps | None:
        """ftrace_find_unique_ops: the only ops covering the record, if exactly one does."""
        found = [o for o in self._ops if o.covers(rec.ip)]
        return found[0] if len(found) == 1 else None

    def ops_hits(self, ops: FtraceOps) -> int:
        """Sum of the per-CPU ``counts`` of an ops (those incremented by the counting callback)."""
        if not ops.addr:
            return ops.saved_hits
        base = ops.addr + abi.ftrace_ops.offsetof("counts")
        return sum(struct.unpack_from(f"<{abi.MAX_CPUS}Q", self.kernel.memory.read(base, 8 * abi.MAX_CPUS)))

    # -- validation ------------------------------------------------------------------------------------------

    def _check_ops(self, ops: FtraceOps) -> None:
        # arm64 builds DYNAMIC_FTRACE_WITH_ARGS, not WITH_REGS: there is no pt_regs to give (ftrace_regs only),
        # so register_ftrace_function refuses SAVE_REGS with -EINVAL; SAVE_REGS_IF_SUPPORTED gets ftrace_regs
        if ops.flags & OpsFlag.SAVE_REGS:
            raise FtraceError(f"ops {ops.name!r} asks for FTRACE_OPS_FL_SAVE_REGS: arm64 has no "
                              "DYNAMIC_FTRACE_WITH_REGS (the callback gets ftrace_regs, the arguments only); use "
                              "SAVE_REGS_IF_SUPPORTED or a kprobe for a full pt_regs", ops=ops.name,
                              flag="SAVE_REGS")
        if ops.flags & OpsFlag.IPMODIFY:
            if ops.filter is None or not ops.filter:
                raise FtraceError(f"IPMODIFY ops {ops.name!r} must name its functions (an empty filter means all)",
                                  ops=ops.name)
            if ops.notrace:
                raise FtraceError(f"IPMODIFY ops {ops.name!r} may not have a notrace set", ops=ops.name)
            if ops.flags & OpsFlag.DIRECT:
                raise FtraceError(f"ops {ops.name!r} cannot be both IPMODIFY and DIRECT", ops=ops.name)
        if ops.flags & OpsFlag.STUB:
            raise FtraceError(f"ops {ops.name!r}: STUB ops are the kernel's own placeholders", ops=ops.name)

    def _check_exclusive(self, ops: FtraceOps, ips: Iterable[int], ignore: FtraceOps | None = None) -> None:
        """__ftrace_hash_update_ipmodify and the direct_functions hash: one IPMODIFY, one direct per function."""
        if not ops.flags & (OpsFlag.IPMODIFY | OpsFlag.DIRECT):
            return
        others = [o for o in self._ops if o is not ops and o is not ignore]
        for ip in ips:
            for o in others:
                if not o.covers(ip):
                    continue
                clash = (ops.flags & OpsFlag.IPMODIFY and o.flags & (OpsFlag.IPMODIFY | OpsFlag.DIRECT)) or (
                    ops.flags & OpsFlag.DIRECT and o.flags & (OpsFlag.IPMODIFY | OpsFlag.DIRECT))
                if clash:
                    name = self.by_ip[ip].name
                    raise FtraceBusy(
                        f"{name} is already modified by ops {o.name!r} "
                        f"({'IPMODIFY' if o.flags & OpsFlag.IPMODIFY else 'direct call'}); "
                        f"only one IPMODIFY or direct ops may own a function", function=name, owner=o.name)

    def _direct_target(self, ops: FtraceOps, addr: int | str) -> int:
        try:
            tramp = self.kernel.resolve(addr)
        except SymbolError as e:
            raise BadDirectCall(f"direct trampoline {addr!r} is not a kernel symbol", ops=ops.name) from e
        if not self.kernel.is_text(tramp) or tramp & 3:
            raise BadDirectCall(f"direct trampoline {tramp:#x} is not in kernel or module text", ops=ops.name,
                                address=tramp)
        return tramp

    # -- filters ---------------------------------------------------------------------------------------------

    def _set_hash(self, ops: FtraceOps, which: str, expr: str | Iterable[str] | None, reset: bool
                  ) -> BatchResult | None:
        with self.lock:
            current = (ops.filter or frozenset()) if which == "filter" else ops.notrace
            base = frozenset() if reset else current
            merged = base if expr is None or not ftrace_filter.terms(expr) else frozenset(
                ftrace_filter.select(expr, self.records, self.by_name, start=base))
            if which == "filter":
                return self._replace_filters(ops, merged or None, ops.notrace)
            return self._replace_filters(ops, ops.filter, merged)

    def _replace_filters(self, ops: FtraceOps, filt: frozenset[int] | None, notrace: frozenset[int]
                         ) -> BatchResult | None:
        with self.lock:
            if not ops.registered:
                ops.filter, ops.notrace = filt, notrace
                return None
            old_filter, old_notrace = ops.filter, ops.notrace
            before = self._covered(ops)
            ops.filter, ops.notrace = filt, notrace
            new_hashes: dict[str, GuestHash] = {}
            try:
                self._check_ops(ops)
                after = self._covered(ops)
                self._check_exclusive(ops, after - before)
                plan = self._plan(before | after)
                for key, ips in (("filter", filt or ()), ("notrace", notrace)):
                    if frozenset(ips) != ops.hashes[key].ips:
                        new_hashes[key] = GuestHash(self.kernel, ips)
                        off = abi.ftrace_ops.offsetof(f"{key}_hash")
                        plan.data.insert(0, DataPatch(ops.addr + off, new_hashes[key].addr))
                result = self._apply(plan)
            except BaseException:
                ops.filter, ops.notrace = old_filter, old_notrace
                for h in new_hashes.values():
                    h.free()
                raise
            for key, h in new_hashes.items():
                ops.hashes[key].free()
                ops.hashes[key] = h
            return result

    def _covered(self, ops: FtraceOps) -> frozenset[int]:
        base = ops.filter if ops.filter else self.by_ip.keys()
        return frozenset(ip for ip in base if ip not in ops.notrace and ip in self.by_ip)

    # -- planning --------------------------------------------------------------------------------------------

    def wanted(self, rec: DynFtrace) -> _State:
        """ftrace_check_record's verdict for one record, given the registered ops."""
        covering = [o for o in self._ops if o.covers(rec.ip)]
        count = len(covering)
        sticky = rec.flags & (RecFlag.TOUCHED | RecFlag.MODIFIED)
        if not count:
            return _State(sticky, self.nop_ops, 0)
        flags = count | RecFlag.ENABLED | RecFlag.TOUCHED | sticky
        if any(o.flags & OpsFlag.IPMODIFY for o in covering):
            flags |= RecFlag.IPMODIFY | RecFlag.MODIFIED
        direct = next((o.direct_call for o in covering if o.flags & OpsFlag.DIRECT), 0)
        if direct:
            flags |= RecFlag.DIRECT | RecFlag.MODIFIED
        literal = self.list_ops
        if count == 1 and not self.force_list and not covering[0].flags & OpsFlag.RECURSION:
            flags |= RecFlag.CALL_OPS | RecFlag.CALL_OPS_EN
            literal = covering[0].addr
        if not self.enabled:  # counted, not called: the flags ftrace_check_record keeps for a disabled record
            return _State(flags & ~(RecFlag.ENABLED | RecFlag.CALL_OPS_EN), self.nop_ops, 0)
        target = self.caller
        if count == 1 and direct and callsite.can_call_directly(rec.ip, direct):
            flags |= RecFlag.DIRECT_EN
            target = direct
        return _State(flags, literal, self._callable(rec, target))

    def _callable(self, rec: DynFtrace, target: int) -> int:
        """A BL target the site can reach (the architecture's ftrace_find_callable_addr), or -EINVAL."""
        found = callsite.find_callable_addr(rec.ip, target, caller=self.caller, plt=rec.plt)
        if found is None:
            raise FtraceError(f"{rec.name}: no module PLT reaches {self.describe(target)}", function=rec.name)
        return found

    def _plan(self, ips: Iterable[int]) -> UpdatePlan:
        plan = UpdatePlan()
        for ip in sorted(ips):
            rec = self.by_ip[ip]
            want = self.wanted(rec)
            if want.literal != rec.literal:
                plan.data.append(DataPatch(callsite.literal_addr(ip), want.literal))
            if want.target != rec.target:
                if not rec.target:
                    plan.text.append(callsite.make_call(ip, want.target))
                elif not want.target:
                    plan.text.append(callsite.make_nop(ip, rec.target))
                else:
                    plan.text.append(callsite.modify_call(ip, rec.target, want.target))
            if (want.flags, want.literal, want.target) != (rec.flags, rec.literal, rec.target):
                plan.records[ip] = (want.flags, want.literal, want.target)
        return plan

    def _apply(self, plan: UpdatePlan) -> BatchResult | None:
        if not plan.data and not plan.text:
            result = None
        else:
            result = BatchResult.of(self.patcher.apply(plan.text, plan.data))
            self.last_batch = result
        for ip, (flags, literal, target) in plan.records.items():
            rec = self.by_ip[ip]
            rec.flags, rec.literal, rec.target = flags, literal, target
        return result

    # -- guest memory ----------------------------------------------------------------------------------------

    def _write_ops(self, addr: int, **fields: int) -> None:
        """A fresh struct ftrace_ops, written before anything links to it (counts start at zero)."""
        self.kernel.memory.write(addr, abi.ftrace_ops.pack(counts=(), **fields))

    def _free_ops(self, ops: FtraceOps) -> None:
        for h in ops.hashes.values():
            h.free()
        ops.hashes = {}
        if ops.addr:
            self.kernel.heap.free(ops.addr, abi.ftrace_ops.size)
            ops.addr = 0
