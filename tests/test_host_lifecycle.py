"""Every thread of a host ends with it, and a process that forgets to shut its kernels down still exits cleanly.

A host's background work (klp's transition driver, the trace drainer) runs as jobs of its kernel's one host
worker, which ``Kernel.shutdown`` stops and joins; the vCPU threads are joined too. Booting and stopping hosts
in a loop, with that work running when they stop, leaves exactly the threads there were before.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from mqtt_fixtures import REPO, DaemonThread, Mosquitto, run
from test_service_patch import Sleeper, kernel_of, quiet_policy, signed, trusting_settings

from clients.sdk import LivepatchClient
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.kernel.worker import HostWorker


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _settle(baseline: set[threading.Thread], timeout: float = 10.0) -> set[threading.Thread]:
    """The threads beyond ``baseline`` once those ending on their own (a client's resolver) have ended."""
    end = time.monotonic() + timeout
    while (extra := _threads() - baseline) and time.monotonic() < end:
        time.sleep(0.05)
    return extra


def test_no_thread_outlives_its_host(mosquitto: Mosquitto, tmp_path: Path) -> None:
    baseline = _threads()
    for round_ in range(3):
        d = DaemonThread(trusting_settings(tmp_path / str(round_), mosquitto.url)).start()
        quiet_policy(d)
        kernel = kernel_of(d)
        sleeper = Sleeper(kernel)

        async def busy(d: DaemonThread) -> None:
            async with LivepatchClient(d.url, d.host, timeout=30) as c:
                await c.patch_load(signed("livepatch_sleeper").to_bytes())
                change = await c.patch_enable("livepatch_sleeper")
                assert not change.completed, "the sleeper holds the transition up: its driver keeps running"
                await c.trace_start("work_step_*")
        run(busy(d))
        assert sorted(kernel.worker.jobs) == ["ftrace.trace-drainer", "klp-transition"]
        running = {t.name for t in _threads() - baseline}
        assert {"kworker", "vcpu0", "vcpu1"} <= running
        assert not any(name in running for name in ("patch-watch", "klp-transition", "ftrace.trace-drainer")), \
            "no thread of its own per activity"
        d.stop()  # with the transition still stalled and the trace still running
        assert not any(v.alive for v in kernel.machine.vcpus)
        assert kernel.worker.jobs == []
        extra = _settle(baseline)
        assert extra == set(), f"round {round_}: {sorted(t.name for t in extra)} outlived the host"
        del sleeper  # its guest call died with the kernel


def test_a_kernel_has_one_worker_thread_for_all_its_jobs() -> None:
    worker = HostWorker("kworker-test")
    runs: list[str] = []
    a = worker.every(0.01, lambda: runs.append("a") is None and runs.count("a") < 3, name="a")
    b = worker.every(0.01, lambda: runs.append("b") is None, name="b")
    deadline = time.monotonic() + 5
    while not a.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.done, "a job ends when it returns False"
    assert runs.count("a") == 3
    assert worker.jobs == ["b"]
    assert [t for t in threading.enumerate() if t.name == "kworker-test"] == [worker.thread]
    b.cancel()
    assert b.done
    failing = worker.every(0.01, lambda: 1 // 0 == 0, name="failing")
    deadline = time.monotonic() + 5
    while not failing.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(failing.error, ZeroDivisionError), "a failing job ends, its error kept"
    worker.stop()
    assert worker.thread is not None
    assert not worker.thread.is_alive()
    late = worker.every(0.01, lambda: True, name="late")
    assert late.done, "a stopped worker takes no job"


def test_kernel_shutdown_stops_its_worker() -> None:
    k = Kernel(KernelConfig(nr_cpus=1)).boot()
    job = k.worker.every(0.01, lambda: True, name="forever")
    time.sleep(0.05)
    k.shutdown()
    assert job.done
    assert k.worker.thread is not None
    assert not k.worker.thread.is_alive()


FORGETFUL = textwrap.dedent("""
    from daemon.kernel.kernel import Kernel, KernelConfig

    kernels = [Kernel(KernelConfig(nr_cpus=1)).boot() for _ in range(6)]
    kernels[0].worker.every(0.01, lambda: True, name="still-running")
    print("booted", len(kernels), flush=True)
""")


def test_a_script_that_boots_kernels_and_returns_exits_cleanly() -> None:
    for _ in range(3):  # the crash it had came 2 runs out of 3
        done = subprocess.run([sys.executable, "-c", FORGETFUL], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=False)
        assert (done.returncode, done.stdout) == (0, "booted 6\n"), done.stderr[-3000:]


def test_no_thread_outlives_a_host_with_probes_armed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The same with kprobes, kretprobes (both trampolines) and an fprobe armed and hit when the host stops."""
    baseline = _threads()
    for round_ in range(2):
        d = DaemonThread(trusting_settings(tmp_path / str(round_), mosquitto.url, allow_any_call=True)).start()
        kernel = kernel_of(d)

        async def probed(d: DaemonThread) -> None:
            async with LivepatchClient(d.url, d.host, timeout=30) as c:
                await c.kprobe_register("entry", "kpt_calls", record=True)
                await c.kretprobe_register("leafret", "kpt_leaf", trampoline="brk")
                await c.kretprobe_register("rh", "kpt_recurse", trampoline="rethook")
                await c.fprobe_register("steps", "work_step_*", record=True)
                await c.call("kpt_calls", 4, cpu=1)
                await c.call("kpt_recurse", 2)
                await c.call("work_step_c", 1)
                assert (await c.kretprobe_list()).probes[0].hits >= 1
        run(probed(d))
        d.stop()  # every probe still armed
        assert not any(v.alive for v in kernel.machine.vcpus)
        assert kernel.worker.jobs == []
        extra = _settle(baseline)
        assert extra == set(), f"round {round_}: {sorted(t.name for t in extra)} outlived the host"


PROBED = textwrap.dedent("""
    from daemon.ftrace.core import Ftrace
    from daemon.kernel.kernel import Kernel, KernelConfig
    from daemon.kprobes.core import Kprobes
    from daemon.kprobes.fprobe import Fprobes
    from daemon.kprobes.kretprobes import Kretprobes

    kernels, keep = [], []
    for i in range(4):
        k = Kernel(KernelConfig(nr_cpus=1)).boot()
        ftrace = Ftrace(k)  # first, as a daemon builds them: it owns the mcount sites
        kprobes = Kprobes(k)
        kprobes.register("entry", "kpt_calls")
        Kretprobes(kprobes).register("ret", "kpt_leaf", trampoline="rethook" if i % 2 else "brk")
        Fprobes(ftrace).register("steps", "work_step_*")
        k.call("kpt_calls", 3)
        kernels.append(k)
    print("probed", len(kernels), flush=True)
""")


def test_a_script_that_arms_probes_and_returns_exits_cleanly() -> None:
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", PROBED], cwd=REPO, capture_output=True, text=True,
                              timeout=180, check=False)
        assert (done.returncode, done.stdout) == (0, "probed 4\n"), done.stderr[-3000:]
