"""Compare-then-write text patching in stop-machine batches, on the real kernel."""

from __future__ import annotations

import time

import pytest

from daemon.arch.arm64 import callsite, insn
from daemon.arch.arm64.callsite import InsnPatch
from daemon.arch.arm64.patching import TextPatcher
from daemon.errors import PatchMisaligned, PatchMismatch, PatchReadFault, PatchWriteFault
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.stress_patching import SiteToggler


def rec_ip(kernel: Kernel, name: str) -> int:
    return kernel.kallsyms.addr(name) + 4


def text_snapshot(kernel: Kernel) -> bytes:
    return kernel.memory.read(kernel.text.base, kernel.text.size)


def test_site_states_compiled_disabled_enabled(kernel: Kernel) -> None:
    """NOP;NOP -> MOV X9,LR;NOP -> MOV X9,LR;BL, and back."""
    p = TextPatcher(kernel)
    ip, tramp = rec_ip(kernel, "work_step_c"), kernel.kallsyms.addr("count_tramp")
    assert (p.read_insn(ip - 4), p.read_insn(ip)) == (insn.NOP, insn.NOP)
    p.apply([callsite.init_nop(ip)])
    assert (p.read_insn(ip - 4), p.read_insn(ip)) == (insn.MOV_X9_LR, insn.NOP)
    p.apply([callsite.make_call(ip, tramp)])
    assert insn.decode_branch(p.read_insn(ip), ip) == (tramp, True)
    p.apply([callsite.make_nop(ip, tramp)])
    assert p.read_insn(ip) == insn.NOP
    assert callsite.literal_addr(ip) == kernel.kallsyms.addr("work_step_c") - 8


def test_enabled_site_calls_the_trampoline_and_returns_correctly(kernel: Kernel) -> None:
    """A BL'd site runs count_tramp once per call and the function still returns the right value."""
    p = TextPatcher(kernel)
    ip, tramp = rec_ip(kernel, "work_step_c"), kernel.kallsyms.addr("count_tramp")
    before = kernel.call("work_step_c", 77, cpu=0)
    p.apply([callsite.init_nop(ip)])
    p.apply([callsite.make_call(ip, tramp)])
    hits = kernel.cpu(0).get("trace_hits")
    assert [kernel.call("work_step_c", 77, cpu=0) for _ in range(5)] == [before] * 5
    assert kernel.cpu(0).get("trace_hits") - hits == 5


def test_mismatch_anywhere_writes_nothing(kernel: Kernel) -> None:
    """One wrong 'old' word among 1,000 sites: PatchMismatch (-EINVAL), text byte-identical."""
    p = TextPatcher(kernel)
    ips = [callsite.ftrace_call_adjust(e) for e in kernel.image.mcount_loc()[:1000]]
    batch = [callsite.init_nop(ip) for ip in ips]
    batch[500] = InsnPatch(batch[500].addr, insn.RET, insn.MOV_X9_LR)
    before = text_snapshot(kernel)
    with pytest.raises(PatchMismatch) as err:
        p.apply(batch)
    assert err.value.errno == -22
    assert err.value.details["count"] == 1
    assert err.value.details["mismatches"][0]["address"] == hex(batch[500].addr)
    assert text_snapshot(kernel) == before
    kernel.call("work_chain", 3)  # still serving


@pytest.mark.parametrize(
    ("where", "error", "errno"),
    [("unmapped", PatchReadFault, -14), ("rodata", PatchWriteFault, -1), ("misaligned", PatchMisaligned, -22)],
)
def test_bad_addresses_write_nothing(kernel: Kernel, where: str, error: type[Exception], errno: int) -> None:
    p = TextPatcher(kernel)
    good = [callsite.init_nop(rec_ip(kernel, "work_step_a"))]
    addr = {"unmapped": 0x4000_0000, "rodata": kernel.kallsyms.addr("corpus_params"),
            "misaligned": rec_ip(kernel, "work_step_b") + 2}[where]
    before = text_snapshot(kernel)
    pauses = len(kernel.machine.pauses)
    with pytest.raises(error) as err:
        p.apply([*good, InsnPatch(addr, insn.NOP, insn.NOP)])
    assert err.value.errno == errno  # type: ignore[attr-defined]
    assert text_snapshot(kernel) == before
    assert len(kernel.machine.pauses) == pauses, "address errors are caught before stopping the vCPUs"


def test_read_insn_fault(kernel: Kernel) -> None:
    with pytest.raises(PatchReadFault):
        TextPatcher(kernel).read_insn(0x10)


def test_stale_translation_regression(kernel: Kernel) -> None:
    """Unicorn keeps running translated code after a host write; the patcher's invalidation fixes that.

    First, prove the emulator hazard: write BL into a hot, already-translated site *without* removing
    translations — calls still skip the trampoline. Then apply the same edit through TextPatcher: every call
    is counted.
    """
    ip, tramp = rec_ip(kernel, "work_step_c"), kernel.kallsyms.addr("count_tramp")
    p = TextPatcher(kernel)
    p.apply([callsite.init_nop(ip)])
    for _ in range(3):
        kernel.call("work_step_c", 1, cpu=0)  # translate the disabled site
    hits = kernel.cpu(0).get("trace_hits")
    bl = insn.gen_branch(ip, tramp, link=True)
    kernel.machine.stop_machine(lambda: kernel.memory.write_u32(ip, bl), invalidate=())
    for _ in range(3):
        kernel.call("work_step_c", 1, cpu=0)
    assert kernel.cpu(0).get("trace_hits") == hits, "the stale translation should still run the NOP"
    kernel.machine.stop_machine(lambda: kernel.memory.write_u32(ip, insn.NOP), invalidate=())
    p.apply([callsite.make_call(ip, tramp)])
    for _ in range(3):
        kernel.call("work_step_c", 1, cpu=0)
    assert kernel.cpu(0).get("trace_hits") == hits + 3


def test_toggle_every_site_1000_times_under_load(kernel: Kernel) -> None:
    """All vCPUs run self-checking corpus calls while every site flips NOP <-> BL 1,000 times.

    Zero wrong results, zero faults, and the trampoline's hit count equals the traced calls the load
    generators made while sites were enabled: no vCPU ever ran a half-applied batch.
    """
    toggler = SiteToggler.create(kernel)
    assert len(toggler.rec_ips) >= 10_000
    kernel.set_load(abi.LOADGEN_CORPUS)
    time.sleep(0.05)
    calls_per_epoch = []
    for _ in range(1000):
        before = kernel.load_stats()["calls"]
        toggler.toggle()
        time.sleep(0.0005)
        calls_per_epoch.append(kernel.load_stats()["calls"] - before)
    if toggler.enabled:
        toggler.toggle()
    kernel.set_load(abi.LOADGEN_OFF)
    time.sleep(0.02)
    kernel.machine.check()
    stats = kernel.load_stats()
    assert stats["errors"] == 0
    assert stats["trace_hits"] == stats["expect_hits"]
    assert stats["expect_hits"] > 10_000
    assert sum(1 for c in calls_per_epoch if c > 0) > 500, "the load must run between batches"
