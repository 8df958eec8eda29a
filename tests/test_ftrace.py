"""ftrace on the real emulated kernel: records, ops, filters, CALL_OPS/list switching, IPMODIFY, direct calls,
tracers and the tracefs views — in the spirit of the kernel's ftrace selftests."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from daemon.arch.arm64 import callsite, insn
from daemon.errors import BadDirectCall, FilterNoMatch, FtraceBusy, FtraceError, OpsStateError
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.ftrace.records import RecFlag
from daemon.ftrace.tracer import FunctionProfiler, FunctionTracer
from daemon.guest import abi
from daemon.kernel.kernel import Kernel

MASK64 = (1 << 64) - 1
MUL = 0x2545F4914F6CDD1D


def step_c(x: int) -> int:
    return ((x ^ (x >> 7)) * MUL) & MASK64


def work_chain(x: int, c: object = step_c) -> int:
    """work_chain(x) = work_step_a(x) + work_step_c(x), with step_c replaceable (for redirect tests)."""
    fc = c if callable(c) else step_c
    b = (fc((x * 3 + 3) & MASK64) + 5) & MASK64
    return ((b ^ 0x55) + fc(x)) & MASK64


def counting(name: str, **kw: object) -> FtraceOps:
    return FtraceOps(name, "ops_func_count", **kw)  # type: ignore[arg-type]


def site_state(ft: Ftrace, name: str) -> tuple[int, int, int]:
    """(word at rec->ip - 4, word at rec->ip, literal) as guest memory holds them."""
    rec = ft.record(name)
    mem = ft.kernel.memory
    return mem.read_u32(rec.ip - 4), mem.read_u32(rec.ip), mem.read_u64(callsite.literal_addr(rec.ip))


def snapshot(ft: Ftrace) -> tuple[bytes, int, int]:
    k = ft.kernel
    return (k.memory.read(k.text.base, k.text.size), k.memory.read_u64(ft.list_head), k.heap.free_bytes)


# -- records ---------------------------------------------------------------------------------------------------


def test_records_cover_every_patchable_function(ftrace: Ftrace) -> None:
    assert len(ftrace.records) >= 10_000
    assert len(ftrace.records) == len(ftrace.kernel.image.mcount_loc())
    words = ftrace.kernel.memory.words(ftrace.kernel.text)
    base = ftrace.kernel.text.base
    ips = np.array([r.ip for r in ftrace.records], dtype=np.uint64)
    idx = ((ips - np.uint64(base)) // np.uint64(4)).astype(np.intp)
    assert (words[idx - 1] == insn.MOV_X9_LR).all(), "ftrace_init_nop writes mov x9, x30 at every site"
    assert (words[idx] == insn.NOP).all()
    assert {ftrace.kernel.memory.read_u64(callsite.literal_addr(r.ip)) for r in ftrace.records} == {ftrace.nop_ops}
    assert all(r.flags == 0 for r in ftrace.records)


def test_available_filter_functions_lists_traceable_not_notrace(ftrace: Ftrace) -> None:
    names = tracefs.available_filter_functions(ftrace).splitlines()
    assert len(names) == len(ftrace.records)
    for traced in ("cmdline_proc_show", "__arm64_sys_getpid", "work_step_a", "sleeper_inner"):
        assert traced in names
    for untraced in ("ftrace_caller", "ftrace_ops_list_func", "function_trace_call", "schedule", "bench_tracee"):
        assert untraced not in names
    assert names.count("corpus_helper") == 16, "static duplicates appear once per definition"


# -- filters ---------------------------------------------------------------------------------------------------


def test_filter_syntax_like_set_ftrace_filter(ftrace: Ftrace) -> None:
    steps = {r.ip for n in ("work_step_a", "work_step_b", "work_step_c") for r in ftrace.by_name[n]}
    assert ftrace.select("work_step_*") == steps
    assert ftrace.select("work_step_* !work_step_b") == steps - {ftrace.record("work_step_b").ip}
    assert ftrace.select(["work_step_a", "work_step_c"]) == steps - {ftrace.record("work_step_b").ip}
    a = ftrace.record("work_step_a")
    assert ftrace.select(f"{callsite.func_addr(a.ip):#x}") == {a.ip}, "a function address selects its record"
    assert ftrace.select(f"{a.ip:#x}") == {a.ip}, "so does rec->ip"
    assert len(ftrace.select("corpus_helper")) == 16
    assert len(ftrace.select("*alloc*")) > 100
    with pytest.raises(FilterNoMatch) as err:
        ftrace.select("no_such_function")
    assert err.value.code == "ftrace_filter_no_match"
    assert err.value.details["pattern"] == "no_such_function"
    with pytest.raises(FilterNoMatch):
        ftrace.select("work_step_* !nope_*")
    with pytest.raises(FilterNoMatch):
        ftrace.select("0xdeadbeef")


def test_bad_filter_leaves_ops_unchanged(ftrace: Ftrace) -> None:
    ops = counting("a")
    ftrace.set_filter(ops, "work_step_a")
    ftrace.register(ops)
    before = snapshot(ftrace)
    with pytest.raises(FilterNoMatch):
        ftrace.set_filter(ops, "work_step_b nonexistent_fn")
    assert ops.filter == {ftrace.record("work_step_a").ip}
    assert snapshot(ftrace) == before


# -- tracing exactly the calls made ----------------------------------------------------------------------------


def test_function_tracer_records_exactly_the_calls(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    tracer = FunctionTracer(ftrace, filter="work_step_*")
    tracer.start()
    for x in (1, 2, 3):
        assert k.call("work_chain", x, cpu=1) == work_chain(x)
    records = tracer.stop()
    names = [(ftrace.symbol_name(r.ip), ftrace.symbol_name(r.parent_ip)) for r in records]
    one_call = [("work_step_a", "work_chain"), ("work_step_b", "work_step_a"), ("work_step_c", "work_step_b"),
                ("work_step_c", "work_chain")]
    assert names == one_call * 3
    assert {r.cpu for r in records} == {1}
    assert all(r.ip == ftrace.record(n).ip for r, (n, _) in zip(records, names, strict=True))
    worker_pids = {t.pid for t in k.tasks() if t.kind == "worker" and t.cpu == 1}
    assert {r.pid for r in records} <= worker_pids
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    assert tracer.dropped == 0
    assert tracer.read == 12
    assert ftrace.kernel.memory.read_u64(tracer._rb_field(1, "entries")) == 0, "rings detached after stop"
    text = tracefs.trace(ftrace, records)
    lines = text.splitlines()
    assert lines[0] == "# tracer: function"
    assert lines[2] == "# entries-in-buffer/entries-written: 12/12   #P:2"
    body = [ln for ln in lines if not ln.startswith("#")]
    assert len(body) == 12
    pat = re.compile(r"^ {0,16}\S+-\d+ +\[001\] \.\.\.\.\. +\d+\.\d{6}: work_step_[abc] <-work_(step_[ab]|chain)$")
    assert all(pat.match(ln) for ln in body), body[:3]


def test_trace_timestamps_follow_the_guest_clock(ftrace: Ftrace) -> None:
    tracer = FunctionTracer(ftrace, filter="work_step_a")
    tracer.start()
    ftrace.kernel.call("work_chain", 1)
    time.sleep(0.2)
    ftrace.kernel.call("work_chain", 1)
    first, second = tracer.stop()
    assert 0.1 < second.seconds - first.seconds < 2.0


def test_only_one_function_tracer(ftrace: Ftrace) -> None:
    a = FunctionTracer(ftrace, filter="work_step_a")
    a.start()
    with pytest.raises(FtraceBusy):
        FunctionTracer(ftrace, filter="work_step_b").start()
    a.stop()
    b = FunctionTracer(ftrace, filter="work_step_b", entries_per_cpu=2)
    b.start()
    for _ in range(3):
        ftrace.kernel.call("work_chain", 4, cpu=0)
    assert len(b.drain()) == 2
    assert b.dropped == 1, "a full ring drops the newest entries and counts them"
    b.stop()


def test_function_profiler_counts_per_function(ftrace: Ftrace) -> None:
    prof = FunctionProfiler(ftrace, filter="work_step_* __arm64_sys_getpid")
    prof.start()
    for cpu in (0, 1):
        ftrace.kernel.call("work_chain", 7, cpu=cpu)
    ftrace.kernel.call("getpid_loop", 25)
    prof.stop()
    report = {line.name: line.hits for line in prof.report()}
    assert report == {"work_step_a": 2, "work_step_b": 2, "work_step_c": 4, "__arm64_sys_getpid": 25}
    table = tracefs.function_stat(prof.report())
    assert table.splitlines()[2].split() == ["__arm64_sys_getpid", "25"]
    prof.close()


# -- ops on one site: CALL_OPS and the list ---------------------------------------------------------------------


def test_two_ops_share_a_site_then_back_to_per_callsite_ops(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    a, b = counting("a"), counting("b")
    ftrace.set_filter(a, "work_step_b")
    ftrace.set_filter(b, "work_step_b work_step_c")
    rec = ftrace.record("work_step_b")

    ftrace.register(a)
    assert site_state(ftrace, "work_step_b") == (insn.MOV_X9_LR, insn.gen_branch(rec.ip, ftrace.caller, link=True),
                                                  a.addr)
    assert rec.flags & RecFlag.CALL_OPS_EN
    assert rec.count == 1
    ops_line = f"\tops: {a.addr:#x} ({k.kallsyms.describe(k.kallsyms.addr('ops_func_count'))})"
    assert tracefs.enabled_functions(ftrace) == f"work_step_b (1)       O   {ops_line}\n"
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(b)) == (1, 0)

    ftrace.register(b)
    assert site_state(ftrace, "work_step_b")[2] == ftrace.list_ops, "a shared site calls through ftrace_list_ops"
    assert rec.count == 2
    assert not rec.flags & RecFlag.CALL_OPS_EN
    assert site_state(ftrace, "work_step_c")[2] == b.addr
    assert tracefs.enabled_functions(ftrace).splitlines()[0] == "work_step_c (1)       O   " + \
        f"\tops: {b.addr:#x} ({k.kallsyms.describe(k.kallsyms.addr('ops_func_count'))})"
    assert "work_step_b (2)           \n" in tracefs.enabled_functions(ftrace)
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(b)) == (2, 3)

    ftrace.unregister(b)
    assert site_state(ftrace, "work_step_b")[2] == a.addr, "back to per-callsite ops"
    assert site_state(ftrace, "work_step_c") == (insn.MOV_X9_LR, insn.NOP, ftrace.nop_ops)
    assert tracefs.enabled_functions(ftrace) == f"work_step_b (1)       O   {ops_line}\n"
    assert "work_step_c (0)" in tracefs.enabled_functions(ftrace, touched=True)
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(b)) == (3, 3)
    ftrace.unregister(a)
    assert tracefs.enabled_functions(ftrace) == ""
    assert site_state(ftrace, "work_step_b") == (insn.MOV_X9_LR, insn.NOP, ftrace.nop_ops)


def test_recursion_ops_and_forced_list_use_the_list_function(kernel: Kernel) -> None:
    ft = Ftrace(kernel, force_list=True)
    a = counting("a")
    ft.set_filter(a, "work_step_a")
    ft.register(a)
    assert site_state(ft, "work_step_a")[2] == ft.list_ops
    assert tracefs.enabled_functions(ft) == "work_step_a (1)           \n"
    kernel.call("work_chain", 2)
    assert ft.ops_hits(a) == 1
    ft.unregister(a)
    r = counting("r", flags=OpsFlag.RECURSION)
    ft.force_list = False
    ft.set_filter(r, "work_step_a")
    ft.register(r)
    assert site_state(ft, "work_step_a")[2] == ft.list_ops, "a RECURSION ops needs the assist (list) path"


def test_filters_and_notrace_on_a_registered_ops(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    a = counting("a")
    ftrace.set_filter(a, "work_step_*")
    ftrace.set_notrace(a, "work_step_c")
    ftrace.register(a)
    k.call("work_chain", 1)
    assert ftrace.ops_hits(a) == 2
    ftrace.set_notrace(a, None)
    k.call("work_chain", 1)
    assert ftrace.ops_hits(a) == 2 + 4
    ftrace.set_filter(a, "work_step_b")
    assert tracefs.enabled_functions(ftrace).startswith("work_step_b (1)")
    assert len(tracefs.enabled_functions(ftrace).splitlines()) == 1
    k.call("work_chain", 1)
    assert ftrace.ops_hits(a) == 7
    ftrace.set_filter(a, "work_step_c", reset=False)
    k.call("work_chain", 1)
    assert ftrace.ops_hits(a) == 10


def test_an_ops_without_filter_traces_every_function(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    every = counting("every")
    ftrace.set_notrace(every, "corpus_*")
    ftrace.register(every)
    enabled = tracefs.enabled_functions(ftrace).splitlines()
    functions = [ln for ln in enabled if not ln.startswith("\t")]
    assert len(functions) == len(ftrace.records) - len(ftrace.select("corpus_*"))
    assert k.call("work_chain", 9) == work_chain(9)
    assert k.read_string("proc_cmdline_read").startswith("console=")
    assert ftrace.ops_hits(every) >= 4
    ftrace.unregister(every)
    assert tracefs.enabled_functions(ftrace) == ""


# -- bad requests change nothing --------------------------------------------------------------------------------


def test_duplicate_and_unknown_ops(ftrace: Ftrace) -> None:
    a = counting("a")
    ftrace.set_filter(a, "work_step_a")
    ftrace.register(a)
    before = snapshot(ftrace)
    with pytest.raises(OpsStateError):
        ftrace.register(a)
    with pytest.raises(OpsStateError):
        ftrace.unregister(counting("never"))
    with pytest.raises(FtraceError):
        ftrace.register(FtraceOps("bad", 0xDEAD0000))
    assert snapshot(ftrace) == before


def test_ipmodify_conflict_is_ebusy_and_writes_nothing(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    stub = k.kallsyms.addr("ftrace_stub")
    first = FtraceOps("hijack1", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, private=stub)
    ftrace.set_filter(first, "work_step_c")
    ftrace.register(first)
    assert k.call("work_chain", 11) == work_chain(11, c=lambda x: x), "work_step_c now returns its argument"
    assert "work_step_c (1)   I   O M " in tracefs.enabled_functions(ftrace)
    before = snapshot(ftrace)
    second = FtraceOps("hijack2", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, private=stub)
    ftrace.set_filter(second, "work_step_b work_step_c")
    with pytest.raises(FtraceBusy) as err:
        ftrace.register(second)
    assert err.value.errno == -16
    assert err.value.details["owner"] == "hijack1"
    assert not second.registered
    assert snapshot(ftrace) == before
    with pytest.raises(FtraceError):
        ftrace.register(FtraceOps("all", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY))
    withnotrace = FtraceOps("nt", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, filter=second.filter,
                            notrace=frozenset({ftrace.record("work_step_a").ip}))
    with pytest.raises(FtraceError):
        ftrace.register(withnotrace)
    grow = counting("grow")
    ftrace.set_filter(grow, "work_step_c")
    ftrace.register(grow)  # tracing a modified function is fine
    assert k.call("work_chain", 11) == work_chain(11, c=lambda x: x)
    assert ftrace.ops_hits(grow) == 2
    ftrace.unregister(first)
    assert k.call("work_chain", 11) == work_chain(11)
    assert "M" in tracefs.enabled_functions(ftrace), "MODIFIED sticks once an IPMODIFY ops has been attached"


# -- kernel.ftrace_enabled ------------------------------------------------------------------------------------


def test_ftrace_enabled_sysctl_turns_every_site_off_and_back(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    a = counting("a")
    ftrace.set_filter(a, "work_step_b work_step_c")
    ftrace.register(a)
    shared = counting("shared")
    ftrace.set_filter(shared, "work_step_c")
    ftrace.register(shared)
    enabled_before = tracefs.enabled_functions(ftrace)
    states_before = [site_state(ftrace, f) for f in ("work_step_b", "work_step_c")]
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(shared)) == (3, 2)

    ftrace.set_enabled(False)
    nop = (insn.MOV_X9_LR, insn.NOP, ftrace.nop_ops)
    assert [site_state(ftrace, f) for f in ("work_step_b", "work_step_c")] == [nop, nop]
    assert tracefs.enabled_functions(ftrace) == ""  # nothing ENABLED...
    assert (ftrace.record("work_step_b").count, ftrace.record("work_step_c").count) == (1, 2)  # ...still counted
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(shared)) == (3, 2)
    late = counting("late")  # an ops registered meanwhile waits for the sysctl too
    ftrace.set_filter(late, "work_step_a")
    ftrace.register(late)
    assert site_state(ftrace, "work_step_a") == nop
    assert ftrace.set_enabled(False) is None  # already off: no batch

    ftrace.set_enabled(True)
    assert [site_state(ftrace, f) for f in ("work_step_b", "work_step_c")] == states_before
    assert site_state(ftrace, "work_step_a")[2] == late.addr
    again = [line for line in tracefs.enabled_functions(ftrace).splitlines() if not line.startswith("work_step_a")]
    assert again == enabled_before.splitlines()
    k.call("work_chain", 1)
    assert (ftrace.ops_hits(a), ftrace.ops_hits(shared), ftrace.ops_hits(late)) == (6, 4, 1)


def test_permanent_ops_and_ftrace_enabled_exclude_each_other(ftrace: Ftrace) -> None:
    """kernel.ftrace_enabled=0 refuses a PERMANENT ops (-EBUSY), and a PERMANENT ops refuses the sysctl."""
    k = ftrace.kernel
    stub = k.kallsyms.addr("ftrace_stub")
    perm = FtraceOps("klp-like", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY | OpsFlag.PERMANENT, private=stub)
    ftrace.set_filter(perm, "work_step_c")
    ftrace.set_enabled(False)
    before = snapshot(ftrace)
    with pytest.raises(FtraceBusy) as err:
        ftrace.register(perm)
    assert err.value.errno == -16
    assert not perm.registered
    assert snapshot(ftrace) == before
    ftrace.set_enabled(True)
    ftrace.register(perm)
    assert k.call("work_chain", 5) == work_chain(5, c=lambda x: x)
    before = snapshot(ftrace)
    with pytest.raises(FtraceBusy, match="PERMANENT"):
        ftrace.set_enabled(False)
    assert ftrace.enabled
    assert snapshot(ftrace) == before
    ftrace.unregister(perm)
    ftrace.set_enabled(False)
    assert not ftrace.enabled


# -- direct calls -----------------------------------------------------------------------------------------------


def direct_hits(k: Kernel) -> int:
    return sum(k.memory.read_u64(k.kallsyms.addr("direct_hits") + 8 * c) for c in range(abi.MAX_CPUS))


def far_veneer(k: Kernel, target: str, offset: int = 0x10_0000) -> int:
    """A PLT-style veneer to ``target`` in module text: a direct trampoline out of BL range of the kernel."""
    addr = abi.MODULES_VADDR + offset
    k.memory.write(addr, b"".join(w.to_bytes(4, "little") for w in insn.gen_plt_entry(addr, k.kallsyms.addr(target))))
    assert k.is_text(addr)
    return addr


def test_direct_call_in_range_branches_straight_to_the_trampoline(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    tramp = k.kallsyms.addr("my_tramp")
    d = FtraceOps("direct")
    ftrace.set_filter(d, "work_step_b")
    ftrace.register_direct(d, "my_tramp")
    rec = ftrace.record("work_step_b")
    assert site_state(ftrace, "work_step_b")[1] == insn.gen_branch(rec.ip, tramp, link=True)
    assert rec.flags & RecFlag.DIRECT_EN
    assert k.call("work_chain", 3) == work_chain(3)
    assert direct_hits(k) == 1
    line = tracefs.enabled_functions(ftrace)
    assert line.startswith("work_step_b (1)     D O M ")
    assert line.endswith(f"\n\tdirect-->{k.kallsyms.describe(tramp)}\n")

    other = counting("other")
    ftrace.set_filter(other, "work_step_b")
    ftrace.register(other)
    assert site_state(ftrace, "work_step_b")[1:] == (insn.gen_branch(rec.ip, ftrace.caller, link=True),
                                                     ftrace.list_ops)
    assert k.call("work_chain", 3) == work_chain(3)
    assert direct_hits(k) == 2, "list path: call_direct_funcs, then the late jump to the trampoline"
    assert ftrace.ops_hits(other) == 1
    ftrace.unregister(other)
    assert site_state(ftrace, "work_step_b")[1] == insn.gen_branch(rec.ip, tramp, link=True)
    ftrace.unregister_direct(d)
    assert k.call("work_chain", 3) == work_chain(3)
    assert direct_hits(k) == 2


def test_direct_call_out_of_range_goes_through_ftrace_caller(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    far = far_veneer(k, "my_tramp")
    rec = ftrace.record("work_step_c")
    assert not insn.reachable_by_bl(rec.ip, far)
    d = FtraceOps("far")
    ftrace.set_filter(d, "work_step_c")
    ftrace.register_direct(d, far)
    assert site_state(ftrace, "work_step_c")[1:] == (insn.gen_branch(rec.ip, ftrace.caller, link=True), d.addr)
    assert not rec.flags & RecFlag.DIRECT_EN
    assert k.call("work_chain", 5) == work_chain(5)
    assert direct_hits(k) == 2, "ftrace_caller's fast path jumps to ops->direct_call"
    # modify: to an in-range trampoline and back, without unregistering
    ftrace.modify_direct(d, "my_tramp")
    assert site_state(ftrace, "work_step_c")[1] == insn.gen_branch(rec.ip, k.kallsyms.addr("my_tramp"), link=True)
    assert k.call("work_chain", 5) == work_chain(5)
    assert direct_hits(k) == 4
    ftrace.modify_direct(d, "ftrace_stub_direct_tramp")
    assert k.call("work_chain", 5) == work_chain(5)
    assert direct_hits(k) == 4
    ftrace.modify_direct(d, far)
    assert k.call("work_chain", 5) == work_chain(5)
    assert direct_hits(k) == 6
    ftrace.unregister_direct(d)


def test_bad_direct_calls(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    before = snapshot(ftrace)
    for target in ("no_such_tramp", abi.HEAP_VADDR + 0x1000, k.kallsyms.addr("my_tramp") + 2):
        d = FtraceOps("d")
        ftrace.set_filter(d, "work_step_a")
        with pytest.raises(BadDirectCall):
            ftrace.register_direct(d, target)
        assert not d.registered
        assert not d.flags & OpsFlag.DIRECT
    with pytest.raises(FtraceError):
        ftrace.register_direct(FtraceOps("nofilter"), "my_tramp")
    assert snapshot(ftrace) == before
    a = FtraceOps("a")
    ftrace.set_filter(a, "work_step_a")
    ftrace.register_direct(a, "my_tramp")
    b = FtraceOps("b")
    ftrace.set_filter(b, "work_step_a")
    with pytest.raises(FtraceBusy):
        ftrace.register_direct(b, "ftrace_stub_direct_tramp")
    hijack = FtraceOps("h", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, private=k.kallsyms.addr("ftrace_stub"))
    ftrace.set_filter(hijack, "work_step_a")
    with pytest.raises(FtraceBusy):
        ftrace.register(hijack)


# -- under load -------------------------------------------------------------------------------------------------


def test_everything_holds_while_all_vcpus_run_the_workload(loaded: Ftrace) -> None:
    ft = loaded
    k = ft.kernel
    stub = k.kallsyms.addr("ftrace_stub")
    tracer = FunctionTracer(ft, filter="work_step_* cmdline_proc_show", entries_per_cpu=1 << 14)
    tracer.start()
    drained = 0
    start = k.load_stats()["calls"]
    for i in range(40):
        every = counting("every")
        ft.set_notrace(every, "work_step_c")
        ft.register(every)
        d = FtraceOps("direct")
        ft.set_filter(d, "__arm64_sys_getpid")
        ft.register_direct(d, "my_tramp" if i % 2 else far_veneer(k, "my_tramp"))
        hijack = FtraceOps("h", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, private=stub)
        ft.set_filter(hijack, "lkdtm_READ_UNMAPPED")  # not in the load: only its site changes
        ft.register(hijack)
        drained += len(tracer.drain())
        ft.unregister(every)
        ft.unregister_direct(d)
        ft.unregister(hijack)
    drained += len(tracer.stop())
    k.set_load(abi.LOADGEN_OFF)
    time.sleep(0.02)
    k.machine.check()
    stats = k.load_stats()
    assert stats["errors"] == 0, "every workload call returned its expected result"
    assert stats["calls"] - start > 10_000
    assert drained > 100
    # the host drains slower than four traced functions on every vCPU fill 16K-entry rings: entries are
    # dropped (and counted), but every entry written reaches the host
    assert drained == tracer.written
    assert direct_hits(k) > 0
    assert tracefs.enabled_functions(ft) == ""
    assert k.memory.read_u64(ft.list_head) == ft.list_end


def test_appending_a_negated_term_removes_it_like_set_ftrace_filter(ftrace: Ftrace) -> None:
    """echo '!work_step_b' >> set_ftrace_filter: the function leaves the existing filter."""
    ops = counting("a")
    ftrace.set_filter(ops, "work_step_*")
    ftrace.register(ops)
    ftrace.set_filter(ops, "!work_step_b", reset=False)
    assert ops.filter == {ftrace.record("work_step_a").ip, ftrace.record("work_step_c").ip}
    ftrace.set_notrace(ops, "work_step_c")
    ftrace.set_notrace(ops, "work_step_a", reset=False)
    ftrace.set_notrace(ops, "!work_step_c", reset=False)
    assert ops.notrace == {ftrace.record("work_step_a").ip}
    assert tracefs.enabled_functions(ftrace).startswith("work_step_c (1)")
