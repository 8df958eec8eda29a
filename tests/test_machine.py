"""The SMP machine on the real image: boot, host jobs on every vCPU, faults and panics, idle stop-machine."""

from __future__ import annotations

import time

import pytest

from daemon.errors import GuestFault, GuestPanic, SymbolError
from daemon.guest import abi
from daemon.kernel.kernel import Kernel, KernelConfig


@pytest.mark.parametrize("nr_cpus", [1, 2, 4])
def test_boot_and_call_on_every_cpu(nr_cpus: int) -> None:
    """Every CPU's workers run host jobs; getpid returns the pid of the worker that ran it."""
    with Kernel(KernelConfig(nr_cpus=nr_cpus, workers_per_cpu=2)) as k:
        tasks = k.tasks()
        assert [t.kind for t in tasks].count("idle") == nr_cpus
        workers = {t.pid: t.cpu for t in tasks if t.kind == "worker"}
        assert len(workers) == 2 * nr_cpus
        for cpu in range(nr_cpus):
            pid = k.call("__arm64_sys_getpid", 0, cpu=cpu)
            assert workers[pid] == cpu
            assert k.call("getpid_loop", 1000, cpu=cpu) == 1000


def test_many_concurrent_jobs_queue_and_complete(kernel: Kernel) -> None:
    """More jobs than workers: the extra ones wait for a free worker; all results are right."""
    futures = [kernel.submit("work_step_c", x, cpu=x % 2) for x in range(50)]
    expected = [((x ^ (x >> 7)) * 0x2545F4914F6CDD1D) & (2**64 - 1) for x in range(50)]
    assert [f.result(10) for f in futures] == expected


def test_cmdline_rendering(kernel: Kernel) -> None:
    assert kernel.read_string("proc_cmdline_read") == "console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1\n"


def test_unknown_function_is_refused(kernel: Kernel) -> None:
    with pytest.raises(SymbolError):
        kernel.call("does_not_exist")


def test_guest_bug_stops_only_that_cpu(kernel: Kernel) -> None:
    """BUG() (brk #0x800) on CPU 1 fails that call with GuestPanic; CPU 0 keeps serving."""
    with pytest.raises(GuestPanic, match="BUG"):
        kernel.call("lkdtm_BUG", 0, cpu=1)
    assert kernel.call("work_chain", 1, cpu=0) == kernel.call("work_chain", 1, cpu=0)
    with pytest.raises(GuestPanic):
        kernel.machine.check()
    kernel.machine.vcpus[1].error = None  # acknowledged; the fixture's final check concerns the live CPUs


def test_guest_panic_message_reaches_the_host(kernel: Kernel) -> None:
    with pytest.raises(GuestPanic, match=r"lkdtm_PANIC \(0x2a\)") as err:
        kernel.call("lkdtm_PANIC", 42, cpu=0)
    assert err.value.details["message"] == "lkdtm_PANIC"
    kernel.machine.vcpus[0].error = None


def test_unmapped_read_becomes_a_guest_fault(kernel: Kernel) -> None:
    with pytest.raises(GuestFault, match="faulted at pc=") as err:
        kernel.call("lkdtm_READ_UNMAPPED", 0x1000, cpu=1)
    assert err.value.code == "guest_fault"
    assert kernel.kallsyms.containing(err.value.details["pc"]).name == "lkdtm_READ_UNMAPPED"
    kernel.machine.vcpus[1].error = None


def test_stop_machine_parks_idle_and_busy_cpus(kernel: Kernel) -> None:
    """Idle CPUs park from their idle wait, busy ones at schedule(); the callback sees everyone parked."""
    seen = []
    kernel.machine.stop_machine(lambda: seen.append(kernel.load_stats()["calls"]))
    kernel.set_load(abi.LOADGEN_CORPUS)
    time.sleep(0.05)

    def frozen() -> bool:
        a = kernel.load_stats()["calls"]
        time.sleep(0.02)
        return kernel.load_stats()["calls"] == a

    assert kernel.machine.stop_machine(frozen) is True
    kernel.set_load(abi.LOADGEN_OFF)
    assert len(seen) == 1
    assert kernel.machine.pause_summary()["count"] == 2
