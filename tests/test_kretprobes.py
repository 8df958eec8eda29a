"""kretprobes on the real emulator and image: both trampolines, per-CPU instance pools, the unwinder's
translation of hijacked returns, unregistering with returns in flight, and stacking with ftrace and livepatch."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_function_graph import sleeping_worker
from test_livepatch import bundles, wait_until  # noqa: F401  (the compiled example patches, module-scoped)

from daemon.errors import KprobeExists, KprobeNotFound, KprobeRefused
from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer
from daemon.kernel.kernel import Kernel
from daemon.kernel.unwind import unwind
from daemon.kprobes.core import Kprobes
from daemon.kprobes.kretprobes import Kretprobes
from daemon.livepatch import sysfs
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import StallPolicy
from patchformat.bundle import PatchBundle
from tests.conftest import booted

TRAMPOLINES = ["brk", "rethook"]
SLEEPER_STACK = ["schedule", "wait_on_interruptible", "sleeper_inner", "sleeper_middle", "sleeper_outer",
                 "worker_main", "ret_from_fork"]


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


@pytest.fixture
def kr(kernel: Kernel) -> Kretprobes:
    return Kretprobes(Kprobes(kernel))


def recurse(n: int) -> int:
    return 1 if n == 0 else n * 2 + recurse(n - 1)


def names(k: Kernel, pcs: tuple[int, ...]) -> list[str]:
    return [s.name if (s := k.kallsyms.containing(pc)) is not None else hex(pc) for pc in pcs]


@pytest.mark.parametrize("trampoline", TRAMPOLINES)
def test_return_values_of_nested_and_recursive_calls_on_every_vcpu(kernel: Kernel, kr: Kretprobes,
                                                                  trampoline: str) -> None:
    """kpt_recurse(5) nests six returns of one function; kpt_calls' return encloses two of kpt_leaf's. Every
    vCPU runs them at once: each return's x0 is recorded, innermost first, and every result is unchanged."""
    rec = kr.register("rec", "kpt_recurse", trampoline=trampoline, record=True)
    calls = kr.register("calls", "kpt_calls", trampoline=trampoline, record=True)
    leaf = kr.register("leaf", "kpt_leaf", trampoline=trampoline, record=True)
    results: dict[int, list[int]] = {}

    def run(cpu: int) -> None:
        results[cpu] = [kernel.call("kpt_recurse", 5, cpu=cpu), kernel.call("kpt_calls", 4 + cpu, cpu=cpu)]

    threads = [threading.Thread(target=run, args=(c,)) for c in range(kernel.config.nr_cpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for cpu in range(kernel.config.nr_cpus):
        x = 4 + cpu
        assert results[cpu] == [recurse(5), x * 3 + 1 + (x + 1) * 3 + 1]
    hits = kr.kprobes.drain()
    assert all(h.kind == "ret" for h in hits)
    for cpu in range(kernel.config.nr_cpus):
        mine = [(h.probe, h.regs["x0"]) for h in hits if h.cpu == cpu]
        x = 4 + cpu
        assert mine == [("rec", recurse(n)) for n in range(6)] + [
            ("leaf", x * 3 + 1), ("leaf", (x + 1) * 3 + 1), ("calls", x * 3 + 1 + (x + 1) * 3 + 1)], cpu
    ends = {kernel.kallsyms.containing(h.regs["pc"]).name for h in hits}  # type: ignore[union-attr]
    assert ends == {"kpt_recurse", "kpt_calls", "worker_main"}  # pc is the real return address, in the caller
    assert all(h.regs["x30"] == kr.trampolines[trampoline] for h in hits)  # what the `ret` jumped through
    assert all(h.duration > 0 for h in hits)
    for rp, n in ((rec, 6), (calls, 1), (leaf, 2)):
        info = kr.info(rp)
        assert (info["hits"], info["entries"], info["nmissed"], info["in_use"]) == (n * kernel.config.nr_cpus,) * 2 \
            + (0, 0)
    kernel.machine.check()


def test_the_two_trampolines_differ_in_pstate_and_exceptions(kernel: Kernel, kr: Kretprobes) -> None:
    """The BRK trampoline takes a debug exception per return (a genuine SPSR); the rethook one takes none and
    synthesizes pstate from NZCV, DAIF, CurrentEL and SPSel only."""
    seen = {}
    entry_traps = 0
    for tramp in TRAMPOLINES:
        rp = kr.register("r", "kpt_leaf", trampoline=tramp, record=True)
        entry_traps = 2 if rp.kprobe.mode == "step" else 1  # the entry BRK (and its single-step BRK)
        before = sum(v.debug_exceptions for v in kernel.machine.vcpus)
        assert kernel.call("kpt_leaf", 7) == 22
        seen[tramp] = (sum(v.debug_exceptions for v in kernel.machine.vcpus) - before, kr.kprobes.drain())
        kr.unregister("r")
    brk_exc, (brk_hit,) = seen["brk"]
    rh_exc, (rh_hit,) = seen["rethook"]
    assert brk_exc == entry_traps + 1  # the trampoline's BRK
    assert rh_exc == entry_traps
    assert brk_hit.regs["x0"] == rh_hit.regs["x0"] == 22
    assert rh_hit.regs["pstate"] & ~0xF00003CD == 0  # only NZCV | DAIF | EL | SPSel bits can be set
    assert rh_hit.regs["pstate"] & 0xC == 0x4
    assert brk_hit.regs["pstate"] & 0xF == 0x5


def test_maxactive_exhaustion_counts_nmissed(kernel: Kernel, kr: Kretprobes) -> None:
    """Two instances per CPU and six nested calls: the two outermost are hooked, four entries are missed, and
    every call still returns its value."""
    rp = kr.register("rec", "kpt_recurse", maxactive=2, record=True)
    assert kernel.call("kpt_recurse", 5) == recurse(5)
    info = kr.info(rp)
    assert (info["entries"], info["hits"], info["nmissed"], info["in_use"]) == (6, 2, 4, 0)
    assert [h.regs["x0"] for h in kr.kprobes.drain()] == [recurse(4), recurse(5)]
    assert kernel.call("kpt_recurse", 1) == recurse(1)  # the instances came back
    assert kr.info(rp)["nmissed"] == 4


def test_backtrace_through_hijacked_frames_shows_the_real_callers(kernel: Kernel, kr: Kretprobes) -> None:
    """A worker asleep in sleeper_inner with both sleeper_inner's and sleeper_middle's returns hijacked (one per
    trampoline): the unwinder translates both, as kretprobe_find_ret_addr; the raw frame records hold the
    trampolines instead of the callers."""
    kr.register("inner", "sleeper_inner", trampoline="brk")
    kr.register("middle", "sleeper_middle", trampoline="rethook")
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 0)
    fut = kernel.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(kernel, flag)
    assert len(kernel.kretprobe_instances_of(task)) == 2
    trace = kernel.stack_of(task)
    assert trace.reliable, trace.reason
    assert names(kernel, trace.pcs) == SLEEPER_STACK
    raw = unwind(kernel.memory, pc=task.get("cpu_context.pc"), fp=task.get("cpu_context.fp"),
                 stack_lo=task.get("stack_lo"), stack_hi=task.get("stack_hi"), is_text=kernel.is_text)
    raw_names = names(kernel, raw.pcs)
    assert "__kretprobe_trampoline" in raw_names
    assert "arch_rethook_trampoline" in raw_names
    assert "sleeper_middle" not in raw_names
    assert "sleeper_outer" not in raw_names
    kernel.memory.write_u64(flag, 5)
    kernel.machine.kick(1)
    assert fut.result(5) == 5 + 111
    assert kernel.kretprobe_instances_of(task) == []


def test_unregister_while_returns_are_hijacked(kernel: Kernel, kr: Kretprobes) -> None:
    """Unregistered while a sleeping task holds one of its instances: the return still goes back to the real
    caller, without the handler, and the entry and its pool are reused only after that return."""
    rp = kr.register("mid", "sleeper_middle", record=True, maxactive=1)
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 0)
    fut = kernel.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(kernel, flag)
    assert kr.in_use(rp.index) == 1
    kr.unregister("mid")
    assert kr.find("mid") is None
    other = kr.register("mid2", "sleeper_middle")
    assert other.index != rp.index, "the entry with a live instance is not reused"
    kr.unregister("mid2")
    assert kernel.stack_of(task).reliable
    kernel.memory.write_u64(flag, 1)
    kernel.machine.kick(1)
    assert fut.result(5) == 1 + 111
    assert kr.kprobes.drain() == []  # no handler ran for the unregistered probe
    assert kr.in_use(rp.index) == 0
    assert kr.register("again", "sleeper_middle").index == rp.index  # reaped and reused
    kernel.machine.check()


def test_bad_requests(kernel: Kernel, kr: Kretprobes) -> None:
    with pytest.raises(KprobeRefused, match="function's entry"):
        kr.register("r", "kpt_leaf+0x8")
    with pytest.raises(KprobeRefused, match="trampoline"):
        kr.register("r", "kpt_leaf", trampoline="int3")
    with pytest.raises(KprobeRefused, match="maxactive"):
        kr.register("r", "kpt_leaf", maxactive=0)
    with pytest.raises(KprobeRefused, match="notrace"):
        kr.register("r", "schedule")
    kr.register("r", "kpt_leaf")
    with pytest.raises(KprobeExists):
        kr.register("r", "kpt_calls")
    with pytest.raises(KprobeExists):
        kr.kprobes.register("r", "kpt_calls")  # one name space for kprobes and kretprobes
    with pytest.raises(KprobeNotFound):
        kr.unregister("nope")
    assert kernel.call("kpt_leaf", 1) == 4


@pytest.fixture
def lp(kernel: Kernel) -> Livepatch:
    return Livepatch(kernel, Ftrace(kernel), policy=StallPolicy(retry_interval=0.02, signal_after=None))


def test_kretprobe_graph_return_and_livepatch_stack_on_one_function(
        lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:  # noqa: F811
    """sleeper_inner's return hijacked by a kretprobe *and* hooked by function_graph (return_to_handler returns
    into the trampoline): the task asleep inside still shows sleeper_middle, so the patch replacing
    sleeper_middle waits for it; released, every return comes back in order with the right values, and the
    kretprobe on the old sleeper_middle keeps firing once the patch redirects it (its BRK precedes the ftrace
    site), seeing the replacement's return value."""
    k = lp.kernel
    kr = Kretprobes(Kprobes(k))
    kr.register("inner", "sleeper_inner", record=True)
    kr.register("middle", "sleeper_middle", trampoline="rethook", record=True)
    tracer = FunctionGraphTracer(lp.ftrace, filter="sleeper_*")
    tracer.start()
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    fut = k.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(k, flag)
    trace = k.stack_of(task)
    assert trace.reliable, trace.reason
    assert names(k, trace.pcs) == SLEEPER_STACK
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.3), "the sleeper is inside sleeper_middle: the transition must wait"
    view = sysfs.patch_view(lp, "livepatch_sleeper")
    assert list(view["progress"]["blocked"].values()) == ["sleeping on function sleeper_middle"]
    k.memory.write_u64(flag, 5)
    k.machine.kick(1)
    assert fut.result(5) == 5 + 1 + 10 + 100
    assert lp.wait(5)
    assert [(h.probe, h.regs["x0"]) for h in kr.kprobes.drain()] == [("inner", 6), ("middle", 16)]
    graph = [(r.entry, lp.ftrace.symbol_name(r.ip)) for r in tracer.stop()]
    assert graph[-1] == (False, "sleeper_outer")
    assert graph.count((False, "sleeper_inner")) == 1
    k.memory.write_u64(flag, 7)
    assert k.call("sleeper_outer", flag) == 7 + 1 + 20 + 100  # the replacement runs
    assert [(h.probe, h.regs["x0"]) for h in kr.kprobes.drain()] == [("inner", 8), ("middle", 28)]
    lp.disable("livepatch_sleeper")
    k.machine.check()
