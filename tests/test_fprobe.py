"""fprobe on the real emulator and image: entry through an ftrace_ops and exit through the function-graph
return hook, with the ARGS only; SAVE_REGS refused; glob filters; stacking with function_graph and kretprobes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_ftrace import snapshot, work_chain
from test_function_graph import sleeping_worker

from daemon.errors import FilterNoMatch, FtraceError, KprobeExists, KprobeNotFound, KprobeRefused
from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.kernel.kernel import Kernel
from daemon.kprobes.core import Kprobes
from daemon.kprobes.fprobe import Fprobes
from daemon.kprobes.kretprobes import Kretprobes
from tests.conftest import booted


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


@pytest.fixture
def fp(kernel: Kernel) -> Fprobes:
    return Fprobes(Ftrace(kernel))


def fname(k: Kernel, addr: int) -> str:
    s = k.kallsyms.containing(addr)
    return s.name if s is not None else hex(addr)


def test_entry_args_and_exit_return_values(kernel: Kernel, fp: Fprobes) -> None:
    """kpt_calls(4) calls kpt_leaf twice: entries carry x0 and the return address, exits the return value and
    a duration, nested in order."""
    p = fp.register("f", "kpt_leaf kpt_calls", record=True)
    assert p.functions == 2
    assert kernel.call("kpt_calls", 4) == 13 + 16
    hits = fp.drain()
    assert [(h.exit, fname(kernel, h.ip), h.args[0] if not h.exit else h.retval) for h in hits] == [
        (False, "kpt_calls", 4), (False, "kpt_leaf", 4), (True, "kpt_leaf", 13), (False, "kpt_leaf", 5),
        (True, "kpt_leaf", 16), (True, "kpt_calls", 29)]
    assert {fname(kernel, h.ret) for h in hits if h.ip == hits[1].ip} == {"kpt_calls"}
    assert all(h.sp % 16 == 0 and h.lr == h.ret for h in hits if not h.exit)  # ARGS: sp and lr, no pstate/pc
    assert all(h.duration > 0 for h in hits if h.exit)
    info = fp.info(p)
    assert (info["hits"], info["exit_hits"], info["nmissed"]) == (3, 3, 0)


def test_entry_only_probe_hooks_no_return(kernel: Kernel, fp: Fprobes) -> None:
    p = fp.register("e", "kpt_leaf", exit=False, record=True)
    assert kernel.call("kpt_calls", 1) == 4 + 7
    assert [h.exit for h in fp.drain()] == [False, False]
    assert fp.info(p)["exit_hits"] == 0
    assert all(kernel.task(i).get("curr_ret_stack") == 0 for i in range(kernel.boot_params.get("nr_tasks")))


def test_save_regs_is_refused_and_if_supported_accepted(kernel: Kernel, fp: Fprobes) -> None:
    """arm64 has WITH_ARGS only: FTRACE_OPS_FL_SAVE_REGS is -EINVAL, for an fprobe and for any ops; the
    IF_SUPPORTED variant runs with ftrace_regs."""
    before = snapshot(fp.ftrace)
    with pytest.raises(FtraceError, match="SAVE_REGS") as exc:
        fp.register("r", "kpt_leaf", flags=("save_regs",))
    assert exc.value.errno == -22
    with pytest.raises(FtraceError, match="SAVE_REGS"):
        fp.ftrace.register(FtraceOps("o", "ops_func_count", flags=OpsFlag.SAVE_REGS))
    assert snapshot(fp.ftrace) == before
    assert fp.find("r") is None
    p = fp.register("r", "kpt_leaf", flags=("save_regs_if_supported",), record=True)
    assert kernel.call("kpt_leaf", 2) == 7
    assert [h.retval for h in fp.drain() if h.exit] == [7]
    assert fp.info(p)["flags"] == ["save_regs_if_supported"]


def test_glob_filters_and_bad_requests(kernel: Kernel, fp: Fprobes) -> None:
    p = fp.register("w", "work_step_*")
    assert p.functions == 3
    assert kernel.call("work_chain", 3) == work_chain(3)
    assert fp.info(p)["hits"] == 4
    assert fp.info(p)["exit_hits"] == 4
    with pytest.raises(KprobeExists):
        fp.register("w", "kpt_leaf")
    with pytest.raises(FilterNoMatch, match="matches no traceable function"):
        fp.register("x", "no_such_function_*")
    with pytest.raises(KprobeRefused, match="flag"):
        fp.register("x", "kpt_leaf", flags=("save_everything",))
    with pytest.raises(KprobeRefused, match="name"):
        fp.register("a b", "kpt_leaf")
    with pytest.raises(KprobeNotFound):
        fp.unregister("x")
    fp.unregister("w")
    assert kernel.call("work_chain", 3) == work_chain(3)


def test_fprobe_graph_tracer_and_kretprobe_on_one_function(kernel: Kernel, fp: Fprobes) -> None:
    """An fprobe's exit, function_graph's and a kretprobe's hijack all on kpt_leaf: three hooked returns per
    call, each handler sees the return value, the graph records stay paired."""
    kr = Kretprobes(Kprobes(kernel))
    kr.register("k", "kpt_leaf", record=True)
    fp.register("f", "kpt_leaf", record=True)
    tracer = FunctionGraphTracer(fp.ftrace, filter="kpt_leaf kpt_calls")
    tracer.start()
    assert kernel.call("kpt_calls", 4) == 29
    graph = tracer.stop()
    assert [(r.entry, fp.ftrace.symbol_name(r.ip)) for r in graph] == [
        (True, "kpt_calls"), (True, "kpt_leaf"), (False, "kpt_leaf"), (True, "kpt_leaf"), (False, "kpt_leaf"),
        (False, "kpt_calls")]
    assert [h.retval for h in fp.drain() if h.exit] == [13, 16]
    assert [h.regs["x0"] for h in kr.kprobes.drain()] == [13, 16]


def test_unregister_with_a_hooked_return_in_flight(kernel: Kernel, fp: Fprobes) -> None:
    """A sleeping task holds a return the fprobe hooked: after unregistering it still returns, unhandled, and
    the fprobe's table entry is not reused until it has."""
    p = fp.register("s", "sleeper_middle", record=True)
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 0)
    fut = kernel.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(kernel, flag)
    assert task.get("curr_ret_stack") == 1
    fp.unregister("s")
    q = fp.register("s2", "kpt_leaf")
    assert q.index != p.index
    kernel.memory.write_u64(flag, 2)
    kernel.machine.kick(1)
    assert fut.result(5) == 2 + 111
    assert [h.exit for h in fp.drain()] == [False]
    assert fp.register("s3", "kpt_calls").index == p.index
    kernel.machine.check()


def test_every_vcpu_under_fprobe_while_it_comes_and_goes(kernel: Kernel, fp: Fprobes) -> None:
    """Every vCPU loops over kpt_loop while an fprobe with an exit on the functions it calls is registered and
    unregistered 100 times: every result is right and no return is lost."""
    n = 6
    expect = kernel.call("kpt_loop", n)
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
        for _ in range(100):
            fp.register("l", "kpt_branches kpt_calls kpt_leaf kpt_testbit")
            fp.unregister("l")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert wrong == []
    kernel.machine.check()
    assert all(kernel.task(i).get("curr_ret_stack") == 0 for i in range(kernel.boot_params.get("nr_tasks")))
