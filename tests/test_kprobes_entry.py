"""The host's half of a kprobe hit, on the real emulator and image: unicorn 2.1.4 reports a BRK to the interrupt
hook (intno 7, pc on the BRK, ESR_EL1/ELR_EL1 untouched), the host emulates only the CPU's exception entry, and
the guest's vectors, handlers and ``eret`` do the rest (daemon/emu/machine.py ``_take_debug_exception``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.arch.arm64.callsite import DataPatch, InsnPatch
from daemon.errors import GuestPanic, KprobeRefused
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.kprobes import decode
from daemon.kprobes.core import BRK_KPROBE, Kprobes
from tests.conftest import booted

PSTATE_IL = 1 << 20
DAIF = 0x3C0


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


def test_one_host_exception_entry_per_simulated_hit_two_per_stepped(kernel: Kernel) -> None:
    kp = Kprobes(kernel)
    vcpu = kernel.machine.vcpus[0]
    for target, mode, per_hit in (("kpt_leaf", "simulate:nop", 1), ("kpt_leaf+0x8", "step", 2),
                                  ("kpt_leaf+0x10", "simulate:br", 1)):
        p = kp.register("e", target)
        assert p.mode == mode
        before = vcpu.debug_exceptions
        for x in range(10):
            assert kernel.call("kpt_leaf", x, cpu=0) == 3 * x + 1
        assert vcpu.debug_exceptions - before == 10 * per_hit, mode
        assert kp.info(p)["hits"] == 10
        kp.unregister("e")


def test_eret_returns_to_el1h_with_the_interrupted_pstate(kernel: Kernel) -> None:
    """SPSR_EL1 saved by the host and restored by the guest's eret: a legal return (PSTATE.IL clear) to EL1h,
    DAIF as before the step (the slot ran masked, the single-step handler restored it), flags intact."""
    kp = Kprobes(kernel)
    p = kp.register("e", "kpt_leaf+0x8", record=True, post=True)
    assert p.mode == "step"
    for x in (1, 2):
        assert kernel.call("kpt_leaf", x, cpu=1) == 3 * x + 1
    hits = kp.drain()
    assert len(hits) == 4
    for pre, post in zip(hits[0::2], hits[1::2], strict=True):
        assert (pre.post, post.post) == (False, True)
        for h in (pre, post):
            assert h.regs["pstate"] & 0xF == 0b0101, "EL1h"
            assert not h.regs["pstate"] & PSTATE_IL, "legal exception return"
        assert pre.regs["pstate"] & DAIF == post.regs["pstate"] & DAIF
        assert pre.regs["pstate"] >> 28 == post.regs["pstate"] >> 28  # add does not set NZCV
        assert (pre.regs["sp"], pre.regs["x30"]) == (post.regs["sp"], post.regs["x30"])
    # after the eret the kernel goes on normally on that CPU (a call with no probe in the way)
    kp.unregister("e")
    assert kernel.call("work_chain", 1, cpu=1) == kernel.call("work_chain", 1, cpu=0)


def test_a_brk_that_is_not_a_kprobe_still_panics(kernel: Kernel) -> None:
    """Only BRK #4/#6 (#7 reserved for kretprobes) go to the guest's vectors; a compiler trap stays a panic."""
    with pytest.raises(GuestPanic, match=r"hit brk #0x1 at"):
        kernel.call("kpt_sysregs", 0xDEAD, cpu=1)
    kernel.machine.vcpus[1].error = None
    assert kernel.call("kpt_sysregs", 1, cpu=0) & 1


def test_a_kprobe_brk_nobody_registered_is_a_guest_panic(kernel: Kernel) -> None:
    """A BRK #4 with no kprobe at its address: the guest's handler finds none (Linux: DBG_HOOK_ERROR) and panics."""
    kp = Kprobes(kernel)
    p = kp.register("e", "kpt_leaf+0x8")
    # kprobe_table[p.index]: its armed flag cleared behind the host's back, the BRK left in the text
    kernel.memory.write_u64(kp.table + p.index * abi.kprobe.size + abi.kprobe.offsetof("flags"), 0)
    with pytest.raises(GuestPanic, match="unexpected debug exception"):
        kernel.call("kpt_leaf", 1, cpu=1)
    kernel.machine.vcpus[1].error = None


def test_exclusives_refused_ordered_and_cas_stepped_as_in_linux() -> None:
    """aarch64_insn_is_exclusive is 0x3F800000/0x08000000: LDXR/STXR/LDAXR/STLXR/LDXP are refused; LDAR, STLR and
    CAS (o2 = 1) are stepped out of line, and an LDAR does not open an LL/SC sequence for the atomic scan."""
    for excl in (0xC85F7C20, 0xC803FC20, 0xC85FFC20, 0xC87F0440, 0x885F7C20):  # ldxr, stlxr, ldaxr, ldxp, w ldxr
        with pytest.raises(KprobeRefused, match="exclusive"):
            decode.decode(excl)
    for ordered in (0xC8DFFC20, 0xC89FFC20, 0xC8E0FC41, 0x88DFFC20):  # ldar, stlr, casal, ldar w
        assert decode.decode(ordered) == abi.KP_STEP, hex(ordered)
    add = 0x8B010000  # add x0, x0, x1
    decode.check_atomic_context([0xC8DFFC20, add], 1)  # after an LDAR: allowed
    with pytest.raises(KprobeRefused, match="LL/SC"):
        decode.check_atomic_context([0xC85F7C20, add], 1)  # after an LDXR with no STXR yet: refused
    decode.check_atomic_context([0xC85F7C20, add, 0xC803FC20, add], 3)  # the STXR closed it


def test_a_hit_while_single_stepping_is_a_bug(kernel: Kernel) -> None:
    """kprobe_brk_handler with the CPU's status KPROBE_HIT_SS: "Failed to recover from reentered kprobes." and
    BUG() (a panic here). Staged behind the host's back: a second armed entry at the first probe's slot, whose
    instruction is replaced by BRK #4, so the step itself hits a probe."""
    kp = Kprobes(kernel)
    p = kp.register("a", "kpt_leaf+0x8")
    assert p.mode == "step"
    assert p.slot
    k = abi.kprobe
    fake = kp.table + 1 * k.size
    assert p.index == 0
    for f, v in (("addr", p.slot), ("opcode", p.opcode), ("kind", abi.KP_STEP), ("slot", 0), ("restore", 0),
                 ("flags", abi.KPF_ARMED)):
        kernel.memory.write_u64(fake + k.offsetof(f), v)
    kp.patcher.apply([InsnPatch(p.slot, p.opcode, BRK_KPROBE)], [DataPatch(kp.nr_addr, 2)])
    with pytest.raises(GuestPanic, match="Failed to recover from reentered kprobes"):
        kernel.call("kpt_leaf", 1, cpu=1)
    kernel.machine.vcpus[1].error = None
    assert kp.bugs() == 1
    assert kp.info(p)["hits"] == 1
