"""The SMP machine: one guest memory, N vCPU engines, each on its own thread, and cooperative stop-machine.

Each vCPU is a Unicorn engine mapping the shared :class:`~daemon.emu.memory.Memory` and running the guest
kernel's per-CPU loop in one long ``emu_start``. Python runs only when the guest traps with ``svc #0``
(``host_call``): the vCPU's own thread then runs the handler for the reason the guest stored in its
``cpu_data.trap``. Handlers of the machine itself:

=========  ==============================================================================================
HC_PARK    the guest saw its ``stop_requested`` flag at a safe point; the thread blocks in the hook until
           the stop-machine callback has run, removes stale translations from **its own** engine, resumes
HC_IDLE    nothing runnable; the thread blocks until the host posts work (:meth:`Machine.kick`) or a
           stop-machine starts, in which case it parks as above
=========  ==============================================================================================

Why parking is cooperative: ``emu_stop()`` from another thread can resume a vCPU by re-executing a load that
already overwrote its base register (Unicorn #1355), and a stop that lands between two ``emu_start`` calls is
lost. Why each vCPU invalidates its own engine: translated blocks are per engine and survive writes to the
backing buffer, so every engine must drop them before it executes again; doing it on the owning thread,
before the hook returns, means no vCPU can run a stale block of a batch, and the engines work in parallel.

Each engine's TLB is per machine (``tlb_mode``, see :mod:`daemon.emu.tlb`): by default Unicorn's virtual TLB,
filled by native code with each region's permissions, which spares every guest store unicorn 2.1.4's slow path.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import unicorn
from unicorn import arm64_const as a64
from unicorn.unicorn_py3 import unicorn as uc_binding
from unicorn.unicorn_py3.arch.arm64 import UcRegCP64

from daemon.emu.memory import Memory
from daemon.emu.tlb import (
    DEFAULT_TLB_MODE,
    FillTable,
    TlbMode,
    grow_tlb_if_churning,
    install_fill_hook,
    refusal_error,
)
from daemon.errors import GuestError, GuestFault, GuestPanic
from daemon.guest import abi

T = TypeVar("T")
HostCallHandler = Callable[["VCpu", int, int], None]

_EXCP_SWI = 2  # Unicorn's interrupt number for svc on AArch64
_EXCP_BKPT = 7  # brk
_BUG_BRK_IMM = 0x800
# BRKs the guest handles through its own vectors (kprobes_entry.S): the host emulates only the CPU's exception
# entry, since unicorn reports a BRK to the interrupt hook (intno 7, pc left on the BRK) and never runs the
# guest's VBAR_EL1 table. Every other BRK (BUG() = #0x800) stays a host-reported panic.
_VECTORED_BRKS = frozenset({abi.KPROBES_BRK_IMM, abi.KPROBES_BRK_SS_IMM, abi.KRETPROBES_BRK_IMM})
_ESR_IL = 1 << 25
_PSTATE_DAIF = 0x3C0
_PSTATE_SPSEL = 1  # EL1h: the current-EL-with-SP_ELx vectors, VBAR_EL1 + 0x200
_PSTATE_IL_SS = (1 << 20) | (1 << 21)  # cleared by exception entry
_SCR_EL3 = (3, 6, 1, 1, 0)  # op0, op1, CRn, CRm, op2
_SPSR_EL1 = (3, 0, 4, 0, 0)
_SCR_EL3_RW = 1 << 10
_TRAP = abi.cpu_data.offsetof("trap")
# Above this much text, one ctl_flush_tb (18 us) beats removing the range block by block (measured: 0.4-1.7 ms per
# engine for the 600 KiB of a 10,000-site batch); a range that large is nearly all the hot code anyway.
FLUSH_ALL_ABOVE = 128 << 10
PAUSES_KEPT = 4096
"""Recent stop-machine pauses kept for statistics (~450 B each: a long-running daemon must not keep them all)."""


@dataclass(frozen=True)
class Pause:
    """One stop-machine, in nanoseconds after the request (stop flags raised).

    ``first_parked_ns`` .. ``resumed_ns`` is the pause the guest sees: from the first vCPU stopping to the last
    one running again (after dropping its stale translations), timed on the vCPU threads themselves.
    """

    first_parked_ns: int
    parked_ns: int  # the last vCPU parked: the callback may run
    applied_ns: int  # the callback returned
    resumed_ns: int  # the last vCPU resumed

    @property
    def pause_ns(self) -> int:
        return self.resumed_ns - self.first_parked_ns


@dataclass
class _StopState:
    active: bool = False
    generation: int = 0
    parked: dict[int, int] = field(default_factory=dict)  # vCPU -> time it parked
    resumed: dict[int, int] = field(default_factory=dict)  # vCPU -> time it resumed
    ranges: tuple[tuple[int, int], ...] = ()


class _RawRegs:
    """Register access straight through libunicorn (0.45 us a call instead of the binding's 1.8 us): the
    debug-exception entry, on every kprobe hit, reads 3 registers and writes 5."""

    def __init__(self, uc: unicorn.Uc) -> None:
        self._h = uc._uch
        self._lib = uc_binding.uclib
        self._v = ctypes.c_uint64()
        op0, op1, crn, crm, op2 = _SPSR_EL1
        self._spsr = UcRegCP64(crn, crm, op0, op1, op2, 0)

    def read(self, reg: int) -> int:
        self._v.value = 0  # 32-bit registers (PSTATE) fill only the low half
        if self._lib.uc_reg_read(self._h, reg, ctypes.byref(self._v)):
            raise GuestError(f"cannot read register {reg}", register=reg)
        return int(self._v.value)

    def write(self, reg: int, value: int) -> None:
        self._v.value = value
        if self._lib.uc_reg_write(self._h, reg, ctypes.byref(self._v)):
            raise GuestError(f"cannot write register {reg}", register=reg)

    def write_spsr_el1(self, value: int) -> None:
        self._spsr.val = value
        if self._lib.uc_reg_write(self._h, a64.UC_ARM64_REG_CP_REG, ctypes.byref(self._spsr)):
            raise GuestError("cannot write SPSR_EL1")


class VCpu:
    """One virtual CPU: a Unicorn engine and the thread that runs it."""

    def __init__(self, machine: Machine, index: int, tcg_buffer_size: int, count_instructions: bool) -> None:
        self.machine = machine
        self.index = index
        self.uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        self.uc.ctl_set_tcg_buffer_size(tcg_buffer_size)
        self.tlb_mode = machine.tlb_mode
        self.fill_table: FillTable | None = None
        if self.tlb_mode is TlbMode.VIRTUAL:
            self.fill_table = FillTable.of(machine.memory.regions)
            install_fill_hook(self.uc, self.fill_table)
        else:
            self.uc.ctl_set_tlb_mode(unicorn.UC_TLB_CPU)
        for r in machine.memory.regions:
            self.uc.mem_map_ptr(r.base, r.size, int(r.perms), r.host_address)
        self.uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        # The address of an access that faults (Linux's far), under the CPU TLB only: the virtual TLB's fill
        # callback records its refusals itself, and with this hook installed its TLB no longer grows to the
        # working set (measured: 1.5 fills per corpus call instead of < 0.1, tests/test_tlb.py).
        self.bad_access: int | None = None
        if self.fill_table is None:
            self.uc.hook_add(unicorn.UC_HOOK_MEM_INVALID, self._on_bad_access)
        self.instructions = 0
        self.debug_exceptions = 0
        """BRK exceptions delivered to the guest's vectors (kprobe hits and single-step completions)."""
        if count_instructions:
            # A Python call per translated block: for separate counting runs only, never for timed ones.
            self.uc.hook_add(unicorn.UC_HOOK_BLOCK, self._count_block)
        self.cpu_data = machine.cpu_data_addr + index * abi.cpu_data.size
        self.uc.reg_write(a64.UC_ARM64_REG_TPIDR_EL1, self.cpu_data)
        self._raw = _RawRegs(self.uc)
        # Firmware's part (measured on unicorn 2.1.4): the engine resets with SCR_EL3 = 0, so EL1 counts as
        # AArch32 for an exception return and the guest's `eret` to EL1h is an illegal return (PSTATE.IL
        # set). With SCR_EL3.RW = 1 it returns to AArch64 EL1 as a real CPU does.
        # Only under the virtual TLB (our own fill maps the kernel's high addresses): under the emulated CPU TLB the
        # MMU is off, and with RW set the CPU checks the kernel's 0xffff8000… addresses as AArch64 physical
        # addresses — an address-size fault (exception 3) at the first instruction. Kprobes' `eret` therefore
        # needs the virtual TLB (the default).
        if self.fill_table is not None:
            self._cpr_write(_SCR_EL3, self._cpr_read(_SCR_EL3) | _SCR_EL3_RW)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.kicks_seen = 0
        self.stopped = threading.Event()

    def start(self, pc: int) -> None:
        self.thread = threading.Thread(target=self._run, args=(pc,), name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and not self.stopped.is_set()

    def reg(self, reg_id: int) -> int:
        """Read a register; only valid on this vCPU's thread (in a hook) or after it stopped."""
        value: int = self.uc.reg_read(reg_id)
        return value

    def _cpr_read(self, reg: tuple[int, int, int, int, int]) -> int:
        op0, op1, crn, crm, op2 = reg
        value: int = self.uc.reg_read(a64.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2))
        return value

    def _cpr_write(self, reg: tuple[int, int, int, int, int], value: int) -> None:
        op0, op1, crn, crm, op2 = reg
        self.uc.reg_write(a64.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2, value))

    def _take_debug_exception(self, pc: int, imm: int, vbar: int) -> None:
        """The CPU's exception entry for a BRK at EL1: what unicorn leaves undone (the guest runs the rest).

        ELR_EL1 = the BRK (a BRK's preferred return address is itself), SPSR_EL1 = PSTATE, ESR_EL1 = EC BRK64,
        IL, the immediate; PSTATE gets DAIF masked, IL/SS cleared; execution goes on at VBAR_EL1 + 0x200
        (current EL with SP_ELx) or + 0x000 (SP_EL0). Measured on unicorn 2.1.4: writing PC in the interrupt
        hook resumes there, and the guest's `mrs`/`msr` of ELR/SPSR/ESR_EL1 and `eret` behave (once SCR_EL3.RW
        is set, see __init__).
        """
        raw = self._raw
        pstate = raw.read(a64.UC_ARM64_REG_PSTATE)
        raw.write_spsr_el1(pstate)
        raw.write(a64.UC_ARM64_REG_ELR_EL1, pc)
        raw.write(a64.UC_ARM64_REG_ESR_EL1, (abi.ESR_ELX_EC_BRK64 << 26) | _ESR_IL | imm)
        raw.write(a64.UC_ARM64_REG_PSTATE, (pstate | _PSTATE_DAIF) & ~_PSTATE_IL_SS)
        raw.write(a64.UC_ARM64_REG_PC, vbar + (0x200 if pstate & _PSTATE_SPSEL else 0))
        self.debug_exceptions += 1

    def _count_block(self, _uc: unicorn.Uc, _address: int, size: int, _user_data: object) -> None:
        self.instructions += size // 4

    def _run(self, pc: int) -> None:
        try:
            while True:
                try:
                    self.uc.emu_start(pc, 0)
                    return
                except unicorn.UcError as exc:
                    if self.error is not None:
                        return
                    fault = self._fault(exc)
                    resume = self.machine._recover(self, fault)
                    if resume is None:
                        self.error = fault
                        return
                    # The kernel's fixup: a fresh frame on a stack it names, as an exception vector would enter
                    pc = resume.pc
                    self.uc.reg_write(a64.UC_ARM64_REG_SP, resume.sp)
                    self.uc.reg_write(a64.UC_ARM64_REG_X29, 0)
                    self.uc.reg_write(a64.UC_ARM64_REG_X30, 0)
                    self.bad_access = None
        except BaseException as exc:  # noqa: BLE001 - anything escaping a vCPU thread is reported, not lost
            self.error = exc
        finally:
            self.stopped.set()
            self.machine._vcpu_stopped(self)

    def _fault(self, exc: unicorn.UcError) -> GuestFault:
        """The fault as the host reports it: where the CPU was (pc, fp, lr, sp) and, for a bad access, the
        address it touched (Linux's far)."""
        # Under the virtual TLB a refused fill ends emu_start with UC_ERR_EXCEPTION (the only source of it: CPU
        # exceptions go to the interrupt hook); report the error the CPU TLB gives that access.
        refused = None
        if exc.errno == unicorn.UC_ERR_EXCEPTION and self.fill_table is not None:
            refused = refusal_error(self.fill_table)
        reason = str(refused or exc)
        where = self.reg(a64.UC_ARM64_REG_PC)
        fault = GuestFault(f"vCPU {self.index} faulted at pc={where:#x}: {reason}", cpu=self.index, pc=where,
                           reason=reason, fp=self.reg(a64.UC_ARM64_REG_X29),
                           lr=self.reg(a64.UC_ARM64_REG_X30), sp=self.reg(a64.UC_ARM64_REG_SP))
        if self.bad_access is not None:
            fault.details["address"] = self.bad_access
        elif refused is not None and self.fill_table is not None:
            # the fill callback sees pages, not accesses: the address is known to its 1 KiB page
            fault.details["page"] = self.fill_table.refused_page
        return fault

    def _on_bad_access(self, _uc: unicorn.Uc, _access: int, address: int, _size: int, _value: int,
                       _user_data: object) -> bool:
        self.bad_access = address
        return False  # not handled: the access faults

    def _on_interrupt(self, uc: unicorn.Uc, intno: int, _user_data: object) -> None:
        try:
            if intno == _EXCP_SWI:
                mem = self.machine.memory
                reason = mem.read_u64(self.cpu_data + _TRAP + abi.host_trap.offsetof("reason"))
                arg0 = mem.read_u64(self.cpu_data + _TRAP + abi.host_trap.offsetof("arg0"))
                arg1 = mem.read_u64(self.cpu_data + _TRAP + abi.host_trap.offsetof("arg1"))
                self.machine._dispatch(self, reason, arg0, arg1)
            elif intno == _EXCP_BKPT:
                pc = self._raw.read(a64.UC_ARM64_REG_PC)
                imm = (self.machine.memory.read_u32(pc) >> 5) & 0xFFFF
                if imm in _VECTORED_BRKS:
                    vbar = self._raw.read(a64.UC_ARM64_REG_VBAR_EL1)
                    if vbar:
                        self._take_debug_exception(pc, imm, vbar)
                        return
                what = "BUG()" if imm == _BUG_BRK_IMM else f"brk #{imm:#x}"
                raise GuestPanic(f"vCPU {self.index} hit {what} at pc={pc:#x}", cpu=self.index, pc=pc, imm=imm)
            else:
                pc = self.reg(a64.UC_ARM64_REG_PC)
                raise GuestFault(f"vCPU {self.index}: unexpected exception {intno} at pc={pc:#x}", cpu=self.index,
                                 pc=pc, exception=intno)
        except _StopVCpu:
            uc.emu_stop()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the host side via Machine.check()
            self.error = exc
            uc.emu_stop()


@dataclass(frozen=True)
class Resume:
    """Where a vCPU goes on after a fault the kernel recovered from: ``pc`` on a fresh stack at ``sp``."""

    pc: int
    sp: int


FaultHandler = Callable[["VCpu", GuestFault], Resume | None]


class _StopVCpu(Exception):
    """Raised inside a hook to end this vCPU's emu_start cleanly (shutdown)."""


_RUNNING: weakref.WeakSet[Machine] = weakref.WeakSet()
"""Machines started and not shut down, shut down at interpreter exit. Without that, a script that boots kernels
and returns ends with a segmentation fault: unicorn frees each engine with a ``weakref.finalize``, whose exit
hook releases the engines while their vCPU threads are still inside ``emu_start``."""


def _shut_down_at_exit() -> None:
    for machine in list(_RUNNING):
        machine.shutdown()


class Machine:
    """N vCPUs over one :class:`Memory`; see the module docstring for the protocol."""

    def __init__(self, memory: Memory, *, nr_cpus: int, cpu_data_addr: int, tcg_buffer_size: int = 32 << 20,
                 park_timeout: float = 10.0, count_instructions: bool = False,
                 tlb_mode: TlbMode = DEFAULT_TLB_MODE) -> None:
        if not 1 <= nr_cpus <= abi.MAX_CPUS:
            raise ValueError(f"nr_cpus must be between 1 and {abi.MAX_CPUS}, not {nr_cpus}")
        self.memory = memory
        self.tlb_mode = TlbMode(tlb_mode)
        self.nr_cpus = nr_cpus
        self.cpu_data_addr = cpu_data_addr
        self.park_timeout = park_timeout
        self._cond = threading.Condition()
        self._stop = _StopState()
        self._stop_lock = threading.Lock()
        self._exiting = False
        self._kicks = [0] * nr_cpus
        self._handlers: dict[int, HostCallHandler] = {abi.HC_PARK: self._on_park, abi.HC_IDLE: self._on_idle}
        self.pauses: collections.deque[Pause] = collections.deque(maxlen=PAUSES_KEPT)
        self.pauses_total = 0
        """Pauses recorded since boot (``pauses`` keeps the last ``PAUSES_KEPT``)."""
        self.on_vcpu_stopped: list[Callable[[VCpu], None]] = []
        self.on_fault: FaultHandler | None = None
        """Asked, on the faulting vCPU's thread, whether the kernel can go on (a fault in a job ends only that
        job); None (or no handler) and the vCPU stops with the fault as its error."""
        self.vcpus = [VCpu(self, i, tcg_buffer_size, count_instructions) for i in range(nr_cpus)]
        for v in self.vcpus:
            memory.write_u64(v.cpu_data + abi.cpu_data.offsetof("cpu"), v.index)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, primary_pc: int, secondary_pc: int) -> None:
        _RUNNING.add(self)
        # Exit hooks run last-registered first: registered again after this machine's engines (and with them
        # the finalizers' exit hook) exist, the shutdown runs before any engine is released.
        atexit.unregister(_shut_down_at_exit)
        atexit.register(_shut_down_at_exit)
        for v in self.vcpus:
            v.start(primary_pc if v.index == 0 else secondary_pc)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Park every vCPU and end its thread."""
        _RUNNING.discard(self)
        with self._cond:
            self._exiting = True
            self._cond.notify_all()
        for v in self.vcpus:
            self.memory.write_u64(v.cpu_data + abi.cpu_data.offsetof("stop_requested"), 1)
        for v in self.vcpus:
            if v.thread is not None:
                v.thread.join(timeout)

    def on_host_call(self, reason: int, handler: HostCallHandler) -> None:
        """Register the handler for a guest host call (runs on the trapping vCPU's thread)."""
        self._handlers[reason] = handler

    def check(self) -> None:
        """Raise the first error of a vCPU that died (fault, panic, exception in a hook)."""
        for v in self.vcpus:
            if v.error is not None:
                raise v.error

    def kick(self, cpu: int) -> None:
        """Tell an idle vCPU that the host posted work for it (job, wake-up, control change)."""
        with self._cond:
            self._kicks[cpu] += 1
            self._cond.notify_all()

    # -- stop-machine ----------------------------------------------------------------------------------------

    def stop_machine(self, callback: Callable[[], T], invalidate: Iterable[tuple[int, int]] = ()) -> T:
        """Run ``callback`` while every live vCPU is parked at a safe point, then drop stale translations.

        ``invalidate`` lists guest ranges [begin, end) whose translations each engine removes before it
        resumes (pass the text that the callback may write). If the callback raises, the vCPUs are released
        all the same and the exception propagates; the callback must leave memory consistent (validate
        before writing).
        """
        if threading.current_thread().name.startswith("vcpu"):
            raise RuntimeError("stop_machine called from a vCPU thread")
        ranges = tuple(invalidate)
        with self._stop_lock:
            t0 = time.perf_counter_ns()
            with self._cond:
                st = self._stop
                st.active, st.parked, st.resumed, st.ranges = True, {}, {}, ranges
                self._raise_flags(1)
                self._cond.notify_all()
                if not self._cond.wait_for(lambda: self._all(st.parked), self.park_timeout):
                    missing = [v.index for v in self.vcpus if v.alive and v.index not in st.parked]
                    self._release(st)
                    raise GuestError(f"vCPUs {missing} did not reach a safe point within {self.park_timeout} s",
                                     cpus=missing)
            try:
                result = callback()
            finally:
                t_applied = time.perf_counter_ns()
                with self._cond:
                    self._release(st)
                    # Wait for every vCPU to have invalidated: the next batch must not start before.
                    self._cond.wait_for(lambda: self._all(st.resumed), self.park_timeout)
                    parked, resumed = list(st.parked.values()), list(st.resumed.values())
                if parked and resumed:
                    self.pauses.append(Pause(min(parked) - t0, max(parked) - t0, t_applied - t0, max(resumed) - t0))
                    self.pauses_total += 1
            return result

    def _all(self, cpus: dict[int, int]) -> bool:
        return all(v.index in cpus or not v.alive for v in self.vcpus)

    def _raise_flags(self, value: int) -> None:
        for v in self.vcpus:
            self.memory.write_u64(v.cpu_data + abi.cpu_data.offsetof("stop_requested"), value)

    def _release(self, st: _StopState) -> None:
        self._raise_flags(0)
        st.active = False
        st.generation += 1
        self._cond.notify_all()

    def _park_here(self, vcpu: VCpu) -> None:
        """Called with self._cond held, on the vCPU's thread, while a stop-machine is active."""
        st = self._stop
        generation, ranges = st.generation, st.ranges
        st.parked[vcpu.index] = time.perf_counter_ns()
        self._cond.notify_all()
        self._cond.wait_for(lambda: st.generation != generation or self._exiting)
        if self._exiting:
            raise _StopVCpu
        if sum(end - begin for begin, end in ranges) > FLUSH_ALL_ABOVE:
            vcpu.uc.ctl_flush_tb()
        else:
            for begin, end in ranges:
                vcpu.uc.ctl_remove_cache(begin, end)
        st.resumed[vcpu.index] = time.perf_counter_ns()
        self._cond.notify_all()

    def _on_park(self, vcpu: VCpu, _arg0: int, _arg1: int) -> None:
        with self._cond:
            if self._exiting:
                raise _StopVCpu
            if self._stop.active:
                self._park_here(vcpu)

    def _on_idle(self, vcpu: VCpu, _arg0: int, _arg1: int) -> None:
        with self._cond:
            while True:
                if self._exiting:
                    raise _StopVCpu
                if self._stop.active and vcpu.index not in self._stop.parked:
                    self._park_here(vcpu)
                if self._kicks[vcpu.index] != vcpu.kicks_seen:
                    vcpu.kicks_seen = self._kicks[vcpu.index]
                    return
                self._cond.wait()

    def _dispatch(self, vcpu: VCpu, reason: int, arg0: int, arg1: int) -> None:
        handler = self._handlers.get(reason)
        if handler is None:
            raise GuestError(f"vCPU {vcpu.index} made unknown host call {reason}", cpu=vcpu.index, reason=reason)
        if vcpu.fill_table is not None:
            grow_tlb_if_churning(vcpu.uc, vcpu.fill_table)
        handler(vcpu, arg0, arg1)

    def _recover(self, vcpu: VCpu, fault: GuestFault) -> Resume | None:
        if self._exiting or self.on_fault is None:
            return None
        return self.on_fault(vcpu, fault)

    def _vcpu_stopped(self, vcpu: VCpu) -> None:
        with self._cond:
            self._cond.notify_all()
        for callback in self.on_vcpu_stopped:
            callback(vcpu)

    def pause_summary(self, last: int | None = None) -> dict[str, float]:
        """p50/p99/max of recent pauses (first vCPU parked to last resumed), in milliseconds."""
        items: Sequence[Pause] = list(self.pauses)[-last:] if last else list(self.pauses)
        if not items:
            return {"count": 0}
        values = sorted(p.pause_ns for p in items)

        def pct(q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))] / 1e6

        return {"count": len(values), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": values[-1] / 1e6}
