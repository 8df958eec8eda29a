"""Several probes on one address (Linux's aggr_kprobe): one BRK and one slot, every probe's handlers run and
count; the instruction comes back only with the last one. A kprobe and a kretprobe share a function's entry."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_function_graph import sleeping_worker

from daemon.kernel.kernel import Kernel
from daemon.kprobes.core import BRK_KPROBE, Kprobes
from daemon.kprobes.kretprobes import Kretprobes
from tests.conftest import booted


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


@pytest.fixture
def kp(kernel: Kernel) -> Kprobes:
    return Kprobes(kernel)


def test_probes_on_one_stepped_address_share_brk_and_slot(kernel: Kernel, kp: Kprobes) -> None:
    addr = kernel.kallsyms.addr("kpt_leaf") + 8
    original = kernel.memory.read_u32(addr)
    a = kp.register("a", "kpt_leaf+0x8", record=True)
    b = kp.register("b", "kpt_leaf+0x8", post=True)
    c = kp.register("c", addr, record=True, post=True)
    assert a.slot == b.slot == c.slot != 0
    assert (a.opcode, b.opcode, c.opcode) == (original,) * 3
    assert kernel.call("kpt_leaf", 5) == 16
    assert [(i["hits"], i["post_hits"]) for i in kp.describe()] == [(1, 0), (1, 1), (1, 1)]
    hits = kp.drain()
    assert [(h.probe, h.kind) for h in hits] == [("a", "pre"), ("c", "pre"), ("c", "post")]
    assert all(h.regs["x0"] == 5 for h in hits)
    kp.unregister("a")  # the first (the one the guest finds) goes: the others still fire, through the same slot
    assert kernel.memory.read_u32(addr) == BRK_KPROBE
    assert kernel.call("kpt_leaf", 6) == 19
    assert [(i["name"], i["hits"], i["post_hits"]) for i in kp.describe()] == [("b", 2, 2), ("c", 2, 2)]
    kp.unregister("c")
    kp.unregister("b")
    assert kernel.memory.read_u32(addr) == original
    assert kernel.call("kpt_leaf", 6) == 19
    d = kp.register("d", "kpt_leaf+0x8")
    assert d.slot == a.slot, "the shared slot was freed with the last probe"
    kernel.machine.check()


def test_probes_on_one_simulated_address_each_run_their_handlers(kernel: Kernel, kp: Kprobes) -> None:
    kp.register("count", "kpt_leaf+0x10")
    inj = kp.register("inj", "kpt_leaf+0x10", set_reg=0, set_val=0x77)  # at the ret: x0 replaced
    assert inj.mode == "simulate:br"
    kp.register("rec", "kpt_leaf+0x10", record=True)
    assert kernel.call("kpt_leaf", 1) == 0x77
    assert [h.regs["x0"] for h in kp.drain()] == [0x77]  # after inj's handler, in table order
    kp.unregister("inj")
    assert kernel.call("kpt_leaf", 1) == 4
    assert [i["hits"] for i in kp.describe()] == [2, 2]


def test_a_kprobe_and_a_kretprobe_on_one_entry(kernel: Kernel, kp: Kprobes) -> None:
    kr = Kretprobes(kp)
    kp.register("entry", "kpt_leaf", record=True)
    kr.register("ret", "kpt_leaf", record=True)
    assert kernel.call("kpt_calls", 2) == 7 + 10
    hits = kp.drain()
    assert [(h.probe, h.kind, h.regs["x0"]) for h in hits] == [
        ("entry", "pre", 2), ("ret", "ret", 7), ("entry", "pre", 3), ("ret", "ret", 10)]
    assert kr.info(kr.get("ret"))["entries"] == 2
    kr.unregister("ret")
    assert kernel.call("kpt_leaf", 2) == 7
    assert kp.info(kp.get("entry"))["hits"] == 3
    assert kernel.memory.read_u32(kernel.kallsyms.addr("kpt_leaf")) == BRK_KPROBE
    kp.unregister("entry")
    assert kp.describe() == []


def test_probes_joining_and_leaving_one_address_under_load(kernel: Kernel, kp: Kprobes) -> None:
    """Every vCPU loops over kpt_loop while three probes join and leave one stepped and one simulated address
    300 times: results stay right, nothing is a BUG, the instructions come back."""
    n = 6
    expect = kernel.call("kpt_loop", n)
    sites = ["kpt_leaf+0x8", "kpt_leaf+0x10"]
    words = [kernel.memory.read_u32(kp.resolve(s)[0]) for s in sites]
    stop = threading.Event()
    wrong: list[int] = []

    def load(cpu: int) -> None:
        while not stop.is_set():
            got = kernel.call("kpt_loop", n, cpu=cpu, timeout=30)
            if got != expect:
                wrong.append(got)

    threads = [threading.Thread(target=load, args=(c,)) for c in range(kernel.config.nr_cpus)]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            name = f"a{i % 3}"
            if i >= 3:
                kp.unregister(name)
            kp.register(name, sites[(i // 3) % 2], record=i % 2 == 0, post=i % 5 == 0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for p in kp.describe():
        kp.unregister(p["name"])
    kernel.machine.check()
    assert wrong == []
    assert kp.bugs() == 0
    assert [kernel.memory.read_u32(kp.resolve(s)[0]) for s in sites] == words


def test_two_kretprobes_on_one_function_chain_their_trampolines(kernel: Kernel, kp: Kprobes) -> None:
    """Both hijack the same return (the second saves the first's trampoline): the return goes through both, each
    handler sees the value, and a sleeping task's backtrace translates the chain down to the real caller."""
    kr = Kretprobes(kp)
    kr.register("a", "sleeper_inner", record=True)
    kr.register("b", "sleeper_inner", trampoline="rethook", record=True)
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 0)
    fut = kernel.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(kernel, flag)
    trace = kernel.stack_of(task)
    assert trace.reliable, trace.reason
    assert [s.name for pc in trace.pcs if (s := kernel.kallsyms.containing(pc)) is not None][2:4] == [
        "sleeper_inner", "sleeper_middle"]
    assert all(pc not in kr.trampolines.values() for pc in trace.pcs)
    kernel.memory.write_u64(flag, 3)
    kernel.machine.kick(1)
    assert fut.result(5) == 3 + 111
    assert [(h.probe, h.regs["x0"]) for h in kp.drain()] == [("b", 4), ("a", 4)]
    assert kernel.kretprobe_instances_of(task) == []
