"""What the layers above use of the kernel object instead of its machine: stop_machine, task_refs, host calls."""

from __future__ import annotations

import threading

from daemon.guest import abi
from daemon.kernel.clock import ticks_to_us
from daemon.kernel.kernel import Kernel


def test_stop_machine_runs_the_callback_with_every_cpu_parked(kernel: Kernel) -> None:
    before = kernel.machine.pauses_total
    seen: list[str] = []

    def parked() -> int:
        seen.append(threading.current_thread().name)
        return 42
    text = (kernel.text.base, kernel.text.base + 4096)
    assert kernel.stop_machine(parked, invalidate=[text]) == 42
    assert kernel.machine.pauses_total == before + 1
    assert seen == [threading.current_thread().name], "on the caller's thread, once"
    assert kernel.call("work_step_a", 3) == kernel.call("work_step_a", 3), "the CPUs run again"


def test_task_refs_are_the_task_table(kernel: Kernel) -> None:
    refs = kernel.task_refs()
    assert [r.addr for r in refs] == [t.addr for t in kernel.tasks()]
    assert [r.get("pid") for r in refs] == [t.pid for t in kernel.tasks()]


def test_cpus_online_and_alive(kernel: Kernel) -> None:
    assert kernel.cpus_online == list(range(kernel.config.nr_cpus))
    assert kernel.cpus_alive


def test_ticks_to_us() -> None:
    assert ticks_to_us(abi.CNTFRQ_HZ) == 1_000_000
    three_us = 3 * abi.CNTFRQ_HZ / 1_000_000  # 187.5 ticks at 62.5 MHz
    assert ticks_to_us(int(three_us) + 1) == 3
    assert ticks_to_us(int(three_us)) == 2, "rounded down"
