"""The frame-pointer unwinder: real sleeping tasks on the real kernel, and corrupted stacks."""

from __future__ import annotations

import time

import pytest

from daemon.emu.memory import Backing, Memory, Perm, Region
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.kernel.unwind import unwind


def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


def test_task_asleep_in_nested_call(kernel: Kernel) -> None:
    """A worker asleep three patchable frames deep unwinds reliably through all of them."""
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 0)
    future = kernel.submit("sleeper_outer", flag, cpu=1)
    sleeper = None

    def asleep() -> bool:
        nonlocal sleeper
        for i in range(kernel.boot_params.get("nr_tasks")):
            t = kernel.task(i)
            if t.get("kind") == abi.TASK_KIND_WORKER and t.get("wait_addr") == flag and \
                    t.get("state") == abi.TASK_INTERRUPTIBLE:
                sleeper = t
                return True
        return False

    wait_until(asleep)
    assert sleeper is not None
    trace = kernel.stack_of(sleeper)
    names = [kernel.kallsyms.containing(pc).name for pc in trace.pcs]  # type: ignore[union-attr]
    assert trace.reliable, trace.reason
    assert names == ["schedule", "wait_on_interruptible", "sleeper_inner", "sleeper_middle", "sleeper_outer",
                     "worker_main", "ret_from_fork"]
    kernel.memory.write_u64(flag, 5)
    kernel.machine.kick(1)
    assert future.result(5) == 5 + 1 + 10 + 100


def test_parked_running_task_unwinds_from_its_trap_frame(kernel: Kernel) -> None:
    """Inside stop_machine, an idle CPU's current task (swapper) unwinds from cpu_data.trap."""
    idle = kernel.task(0)
    trace = kernel.machine.stop_machine(lambda: kernel.stack_of(idle))
    # return addresses are symbolized at the call (pc - 4), like %pB: a noreturn call ends its function
    pcs = [trace.pcs[0]] + [pc - 4 for pc in trace.pcs[1:]]
    names = [kernel.kallsyms.containing(pc).name for pc in pcs]  # type: ignore[union-attr]
    assert trace.reliable, trace.reason
    # parked from schedule() or from the idle host call: either way CPU 0's idle loop runs on the boot stack
    assert names[names.index("cpu_idle"):][:2] == ["cpu_idle", "start_kernel"]
    assert names[-1] == "secondary_entry"  # the entry code both CPUs share ends with `blr x19`


@pytest.fixture
def stack() -> tuple[Memory, int, int]:
    mem = Memory()
    mem.add(Region("stack", 0x10000, 0x4000, Perm.RW, Backing(0x4000)))
    lo, hi = 0x10000, 0x14000
    mem.write_u64(hi - 16, 0)
    mem.write_u64(hi - 8, 0)
    # two frames: f1 at hi-64 -> f2 at hi-32 -> final
    mem.write_u64(hi - 64, hi - 32)
    mem.write_u64(hi - 56, 0x1004)
    mem.write_u64(hi - 32, hi - 16)
    mem.write_u64(hi - 24, 0x2004)
    return mem, lo, hi


def is_text(addr: int) -> bool:
    return 0x1000 <= addr < 0x3000


def test_synthetic_reliable(stack: tuple[Memory, int, int]) -> None:
    mem, lo, hi = stack
    t = unwind(mem, pc=0x1100, fp=hi - 64, stack_lo=lo, stack_hi=hi, is_text=is_text)
    assert t.reliable
    assert t.pcs == (0x1100, 0x1004, 0x2004)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        ((-64, 0x13FF8), "misaligned"),
        ((-64, 0x20000), "outside the task stack"),
        ((-32, 0x14000 - 64), "does not move up"),
        ((-56, 0x9999), "not in kernel text"),
        ((-16, 7), "final frame record is corrupt"),
    ],
)
def test_synthetic_unreliable(stack: tuple[Memory, int, int], corrupt: tuple[int, int], reason: str) -> None:
    mem, lo, hi = stack
    mem.write_u64(hi + corrupt[0], corrupt[1])
    t = unwind(mem, pc=0x1100, fp=hi - 64, stack_lo=lo, stack_hi=hi, is_text=is_text)
    assert not t.reliable
    assert reason in t.reason
