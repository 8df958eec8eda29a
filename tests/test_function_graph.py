"""The function_graph tracer on the real emulated kernel: exact entry/return sequences, durations, the tracefs
format, filters, clean start/stop, coexistence with other ops and livepatch, load on every vCPU, and the
unwinder seeing through hooked returns (a livepatch transition still waits for a task inside a patched
function)."""

from __future__ import annotations

import re
import time

import pytest
from test_ftrace import snapshot, work_chain
from test_livepatch import bundles, wait_until  # noqa: F401  (the compiled example patches, module-scoped)

from daemon.errors import FilterNoMatch, FtraceBusy, GuestPanic
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer, GraphRecord
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.tracer import FunctionTracer
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.kernel.structs import StructRef
from daemon.kernel.unwind import unwind
from daemon.livepatch import sysfs
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import StallPolicy
from patchformat.bundle import PatchBundle

CHAIN = [("work_chain", 0), ("work_step_a", 1), ("work_step_b", 2), ("work_step_c", 3)]


def events(ft: Ftrace, records: list[GraphRecord]) -> list[tuple[str, str, int]]:
    return [("ent" if r.entry else "ret", ft.symbol_name(r.ip), r.depth) for r in records]


def one_chain(outer: int = 0) -> list[tuple[str, str, int]]:
    """work_chain -> work_step_a -> work_step_b -> work_step_c, then work_step_c again from work_chain."""
    ent = [("ent", n, d + outer) for n, d in CHAIN]
    ret = [("ret", n, d + outer) for n, d in reversed(CHAIN[1:])]
    return ent + ret + [("ent", "work_step_c", 1 + outer), ("ret", "work_step_c", 1 + outer),
                        ("ret", "work_chain", outer)]


def check_nesting(records: list[GraphRecord], *, complete: bool) -> int:
    """Per task: every return closes the innermost open entry (same function and depth), depth counts the open
    entries, and a call's interval holds its children's. Returns how many calls were closed."""
    open_: dict[int, list[GraphRecord]] = {}
    closed = 0
    for r in records:
        stack = open_.setdefault(r.pid, [])
        if r.entry:
            assert r.depth == len(stack), r
            if stack:
                assert r.ts >= stack[-1].ts
                assert r.cpu == stack[-1].cpu
            stack.append(r)
            continue
        ent = stack.pop()
        assert (ent.ip, ent.depth, ent.cpu) == (r.ip, r.depth, r.cpu), (ent, r)
        assert r.duration == r.ts - ent.ts >= 0
        closed += 1
    if complete:
        assert all(not s for s in open_.values()), open_
    return closed


# -- exact sequences ----------------------------------------------------------------------------------------------


def test_entry_and_return_of_every_call_with_depths(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    for x in (1, 2, 3):
        assert k.call("work_chain", x, cpu=1) == work_chain(x), "return values survive return_to_handler"
    records = tracer.stop()
    assert events(ftrace, records) == one_chain() * 3
    assert {r.cpu for r in records} == {1}
    assert len({r.pid for r in records}) == 1
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    check_nesting(records, complete=True)
    parents = {ftrace.symbol_name(r.ip): ftrace.symbol_name(r.parent_ip) for r in records if r.entry}
    assert parents == {"work_chain": "worker_main", "work_step_a": "work_chain", "work_step_b": "work_step_a",
                       "work_step_c": "work_chain"}
    for r in records:
        if not r.entry:  # a return's parent_ip is where it went back to: inside its caller
            assert ftrace.symbol_name(r.parent_ip) == {"work_chain": "worker_main", "work_step_a": "work_chain",
                                                       "work_step_b": "work_step_a"}.get(
                ftrace.symbol_name(r.ip), "work_step_b" if r.depth == 3 else "work_chain")
    assert tracer.dropped == 0
    assert tracer.overrun == 0
    assert tracer.hooked() == {}


def test_durations_nest_parent_covers_children(ftrace: Ftrace) -> None:
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    for _ in range(5):
        ftrace.kernel.call("work_chain", 7, cpu=0)
    records = tracer.stop()
    rets = [r for r in records if not r.entry]
    assert all(r.duration >= 0 for r in rets)
    for i in range(0, len(rets), 5):  # c, b, a, c, chain per call
        c1, b, a, c2, chain = (r.duration for r in rets[i:i + 5])
        assert b >= c1
        assert a >= b
        assert chain >= a + c2
    assert tracer.read == len(records) == 5 * 10


def test_function_graph_output_format(ftrace: Ftrace) -> None:
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    ftrace.kernel.call("work_chain", 3, cpu=1)
    records = tracer.stop()
    lines = tracefs.function_graph(ftrace, records).splitlines()
    assert lines[:4] == ["# tracer: function_graph", "#", "# CPU  DURATION                  FUNCTION CALLS",
                         "# |     |   |                     |   |   |   |"]
    no_dur = r" 1\)               \|  "
    dur = r" 1\) [ +!#*@$] [ \d]*\d+\.\d{3} us +\|  "
    expect = [no_dur + r"work_chain\(\) \{", no_dur + r"  work_step_a\(\) \{", no_dur + r"    work_step_b\(\) \{",
              dur + r"      work_step_c\(\);", dur + r"    \}", dur + r"  \}", dur + r"  work_step_c\(\);", dur + r"\}"]
    body = lines[4:]
    assert len(body) == len(expect), body
    for line, pat in zip(body, expect, strict=True):
        assert re.fullmatch(pat, line), (line, pat)
        assert line.index("|") == 18, line
    # the duration column, as the kernel prints it
    assert tracefs.graph_duration(123) == "  0.123 us    "
    assert tracefs.graph_duration(34_568) == "+ 34.568 us   "
    assert tracefs.graph_duration(123_456) == "! 123.456 us  "
    assert tracefs.graph_duration(12_345_678) == "* 12345.67 us "


def test_a_printer_fed_in_chunks_closes_braces_across_them(ftrace: Ftrace) -> None:
    """What a trace session does with each drain: an entry at the end of a chunk opens a brace (its return is
    not there to make a leaf), and the return in the next chunk closes it without naming it again."""
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    ftrace.kernel.call("work_chain", 3, cpu=1)
    records = tracer.stop()
    whole = tracefs.GraphPrinter(ftrace).feed(records)
    printer = tracefs.GraphPrinter(ftrace)
    split = printer.feed(records[:4]) + printer.feed(records[4:])  # after work_step_c's entry
    assert [(ln.kind, ln.record.depth) for ln in whole] == [("entry", 0), ("entry", 1), ("entry", 2), ("call", 3),
                                                             ("return", 2), ("return", 1), ("call", 1), ("return", 0)]
    assert [(ln.kind, ln.record.depth) for ln in split] == [("entry", 0), ("entry", 1), ("entry", 2), ("entry", 3),
                                                             ("return", 3), ("return", 2), ("return", 1), ("call", 1),
                                                             ("return", 0)]
    assert split[3].text.endswith("|        work_step_c() {\n")
    assert split[4].text.endswith("|        }\n")  # matched: no /* work_step_c */
    assert split[4].duration_ns == whole[3].duration_ns
    assert "".join(ln.text for ln in whole) == tracefs.function_graph(ftrace, records).split("|   |   |   |\n", 1)[1]


def test_unmatched_return_names_its_function(ftrace: Ftrace) -> None:
    """A return whose entry was not seen (drained earlier, or dropped) closes with ``} /* func */``."""
    tracer = FunctionGraphTracer(ftrace, filter="work_chain work_step_a")
    tracer.start()
    ftrace.kernel.call("work_chain", 3, cpu=1)
    records = tracer.stop()
    text = tracefs.function_graph(ftrace, records[2:])  # without work_chain's and work_step_a's entries
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body[0].endswith("|    } /* work_step_a */")
    assert body[1].endswith("|  } /* work_chain */")


def test_filter_and_notrace(ftrace: Ftrace) -> None:
    tracer = FunctionGraphTracer(ftrace, filter="work_*", notrace="work_step_b")
    tracer.start()
    ftrace.kernel.call("work_chain", 5, cpu=1)
    records = tracer.stop()
    assert events(ftrace, records) == [
        ("ent", "work_chain", 0), ("ent", "work_step_a", 1), ("ent", "work_step_c", 2), ("ret", "work_step_c", 2),
        ("ret", "work_step_a", 1), ("ent", "work_step_c", 1), ("ret", "work_step_c", 1), ("ret", "work_chain", 0)]
    only_c = FunctionGraphTracer(ftrace, filter="work_step_c")
    only_c.start()
    ftrace.kernel.call("work_chain", 5, cpu=0)
    assert events(ftrace, only_c.stop()) == [("ent", "work_step_c", 0), ("ret", "work_step_c", 0)] * 2


# -- set_graph_function / set_graph_notrace -----------------------------------------------------------------------

A_SUBTREE = [("ent", "work_step_a", 0), ("ent", "work_step_b", 1), ("ent", "work_step_c", 2),
             ("ret", "work_step_c", 2), ("ret", "work_step_b", 1), ("ret", "work_step_a", 0)]


def graph_state(k: Kernel) -> set[tuple[int, int]]:
    """(curr_ret_stack, graph_state) of every task."""
    return {(t.get("curr_ret_stack"), t.get("graph_state")) for t in map(k.task, range(k.boot_params.get("nr_tasks")))}


def graph_trace(ftrace: Ftrace, calls: int = 2, **exprs: str) -> list[tuple[str, str, int]]:
    """Every function hooked; ``calls`` calls of work_chain on CPU 1 under the given graph expressions."""
    tracer = FunctionGraphTracer(ftrace, **exprs)
    tracer.start()
    assert len(tracer.ops.hashes["filter"].ips) == 0, "no set_ftrace_filter: every function is hooked"
    for x in range(calls):
        assert ftrace.kernel.call("work_chain", x, cpu=1) == work_chain(x)
    records = tracer.stop()
    assert tracer.dropped == tracer.overrun == 0
    assert check_nesting(records, complete=True) == len(records) // 2
    return events(ftrace, records)


def test_graph_function_records_only_what_runs_inside_it(ftrace: Ftrace) -> None:
    """set_graph_function=work_step_a: work_step_a and everything it calls, at depths counted from the task's
    ret_stack (work_chain, outside, is not even hooked), not work_chain nor the work_step_c it calls itself."""
    assert graph_trace(ftrace, graph_function="work_step_a") == A_SUBTREE * 2
    assert graph_trace(ftrace, graph_function="work_step_* !work_step_b !work_step_c") == A_SUBTREE * 2
    assert graph_trace(ftrace, graph_function="work_chain") == one_chain() * 2
    leaf = [("ent", "work_step_c", 0), ("ret", "work_step_c", 0)]
    assert graph_trace(ftrace, graph_function="work_step_c") == leaf * 4, "inside b, and from work_chain"
    assert graph_state(ftrace.kernel) == {(0, 0)}


def test_graph_notrace_leaves_out_a_function_and_what_it_calls(ftrace: Ftrace) -> None:
    assert graph_trace(ftrace, graph_notrace="work_step_b") == [
        ("ent", "work_chain", 0), ("ent", "work_step_a", 1), ("ret", "work_step_a", 1), ("ent", "work_step_c", 1),
        ("ret", "work_step_c", 1), ("ret", "work_chain", 0)] * 2
    assert graph_trace(ftrace, graph_notrace="work_chain") == []
    assert graph_state(ftrace.kernel) == {(0, 0)}


def test_graph_function_and_notrace_together(ftrace: Ftrace) -> None:
    assert graph_trace(ftrace, graph_function="work_chain", graph_notrace="work_step_b") == [
        ("ent", "work_chain", 0), ("ent", "work_step_a", 1), ("ret", "work_step_a", 1), ("ent", "work_step_c", 1),
        ("ret", "work_step_c", 1), ("ret", "work_chain", 0)] * 2
    assert graph_trace(ftrace, graph_function="work_step_a", graph_notrace="work_step_c") == [
        ("ent", "work_step_a", 0), ("ent", "work_step_b", 1), ("ret", "work_step_b", 1),
        ("ret", "work_step_a", 0)] * 2
    assert graph_trace(ftrace, graph_function="work_step_a", graph_notrace="work_step_a") == [], "notrace wins"
    assert graph_state(ftrace.kernel) == {(0, 0)}


def test_graph_filters_combine_with_set_ftrace_filter(ftrace: Ftrace) -> None:
    """Only hooked functions are recorded, and a graph function that is not hooked is never entered: its calls
    are not seen (as in the kernel)."""
    tracer = FunctionGraphTracer(ftrace, filter="work_step_b work_step_c", graph_function="work_step_a")
    tracer.start()
    ftrace.kernel.call("work_chain", 3, cpu=1)
    assert tracer.stop() == []
    tracer = FunctionGraphTracer(ftrace, filter="work_step_*", notrace="work_step_b", graph_function="work_step_a")
    tracer.start()
    ftrace.kernel.call("work_chain", 3, cpu=1)
    assert events(ftrace, tracer.stop()) == [("ent", "work_step_a", 0), ("ent", "work_step_c", 1),
                                             ("ret", "work_step_c", 1), ("ret", "work_step_a", 0)]


def test_graph_filters_start_stop_leave_everything_as_before(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    before = snapshot(ftrace)
    for exprs in ({"graph_function": "work_step_a"}, {"graph_notrace": "work_step_b"},
                  {"graph_function": "work_*", "graph_notrace": "work_step_c", "filter": "work_* proc_*"}):
        tracer = FunctionGraphTracer(ftrace, **exprs)
        assert snapshot(ftrace) == before, "nothing written before start"
        tracer.start()
        assert tracer.ops.private
        assert snapshot(ftrace) != before
        assert k.call("work_chain", 11, cpu=1) == work_chain(11)
        assert k.read_string("proc_cmdline_read").startswith("console=")
        tracer.stop()
        assert tracer.ops.private == 0
        assert snapshot(ftrace) == before, "text, list head and heap exactly as before"
        assert graph_state(k) == {(0, 0)}
        assert ftrace.ring_owner is None


def test_bad_graph_expressions_are_refused_with_nothing_changed(ftrace: Ftrace) -> None:
    before = snapshot(ftrace)
    for exprs in ({"graph_function": "nope_*"}, {"graph_notrace": "work_step_a !nope"},
                  {"graph_function": "work_step_a", "graph_notrace": "0x1234"},
                  {"graph_function": "proc_cmdline_show_unknown"}):
        with pytest.raises(FilterNoMatch) as err:
            FunctionGraphTracer(ftrace, **exprs)
        assert err.value.code == "ftrace_filter_no_match"
        assert snapshot(ftrace) == before
        assert ftrace.ring_owner is None
        assert ftrace.ops == []
    assert graph_trace(ftrace, graph_function="work_step_a") == A_SUBTREE * 2


def test_start_stop_leaves_sites_and_ops_list_as_before(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    before = snapshot(ftrace)
    for filt in ("work_*", None):
        tracer = FunctionGraphTracer(ftrace, filter=filt, notrace="corpus_*")
        tracer.start()
        assert snapshot(ftrace) != before
        assert k.call("work_chain", 11, cpu=1) == work_chain(11)
        assert k.read_string("proc_cmdline_read").startswith("console=")
        records = tracer.stop()
        assert check_nesting(records, complete=True) >= 5
        assert snapshot(ftrace) == before, "text, list head and heap exactly as before"
        assert tracefs.enabled_functions(ftrace) == ""
        assert tracer.hooked() == {}
        assert all(k.memory.read_u64(tracer._rb_field(c, "entries")) == 0 for c in range(2))


def test_only_one_tracer_owns_the_rings(ftrace: Ftrace) -> None:
    before = snapshot(ftrace)
    fn = FunctionTracer(ftrace, filter="work_step_a")
    fn.start()
    with pytest.raises(FtraceBusy, match="function tracer"):
        FunctionGraphTracer(ftrace, filter="work_*").start()
    fn.stop()
    assert snapshot(ftrace) == before
    graph = FunctionGraphTracer(ftrace, filter="work_*")
    graph.start()
    mid = snapshot(ftrace)
    with pytest.raises(FtraceBusy, match="function_graph tracer"):
        FunctionTracer(ftrace, filter="work_step_a").start()
    with pytest.raises(FtraceBusy):
        FunctionGraphTracer(ftrace, filter="work_step_b").start()
    assert snapshot(ftrace) == mid
    graph.stop()
    assert snapshot(ftrace) == before


def test_full_ret_stack_leaves_calls_unhooked_and_counts_them(ftrace: Ftrace) -> None:
    """A task whose ret_stack is full (FTRACE_RETFUNC_DEPTH) runs the call unhooked and counts a miss."""
    k = ftrace.kernel
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    workers = [t for t in k.tasks() if t.kind == "worker" and t.cpu == 1]
    for t in workers:  # as if each worker were FTRACE_RETFUNC_DEPTH hooked calls deep
        k.memory.write_u64(t.addr + abi.task_struct.offsetof("curr_ret_stack"), abi.FTRACE_RETFUNC_DEPTH)
    assert k.call("work_chain", 2, cpu=1) == work_chain(2)
    for t in workers:
        k.memory.write_u64(t.addr + abi.task_struct.offsetof("curr_ret_stack"), 0)
    assert tracer.overrun == 5, "five calls, none hooked"
    assert k.call("work_chain", 2, cpu=1) == work_chain(2)
    records = tracer.stop()
    assert events(ftrace, records) == one_chain()


def sleeping_worker(k: Kernel, flag: int) -> StructRef:
    """The worker that went to sleep on ``flag`` (waits for it to get there)."""
    found: list[StructRef] = []

    def asleep() -> bool:
        found[:] = [t for t in map(k.task, range(k.boot_params.get("nr_tasks")))
                    if t.get("kind") == abi.TASK_KIND_WORKER and t.get("wait_addr") == flag
                    and t.get("state") == abi.TASK_INTERRUPTIBLE]
        return bool(found)

    wait_until(asleep)
    return found[0]


def test_frame_pointer_mismatch_is_a_guest_panic(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    tracer = FunctionGraphTracer(ftrace, filter="sleeper_*")
    tracer.start()
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    fut = k.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(k, flag)
    top = task.addr + abi.task_struct.offsetof("ret_stack") + 2 * abi.ftrace_ret_stack.size
    k.memory.write_u64(top + abi.ftrace_ret_stack.offsetof("fp"), 0xBAD0)
    k.memory.write_u64(flag, 1)
    k.machine.kick(1)
    with pytest.raises(GuestPanic, match="frame pointer mismatch"):
        fut.result(5)
    k.machine.vcpus[1].error = None  # acknowledged: the fixture's final check concerns the live CPUs
    tracer.stop()


# -- with other ops, livepatch, and load -------------------------------------------------------------------------


def test_coexists_with_other_ops_on_the_same_sites(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    count = FtraceOps("count", "ops_func_count")
    ftrace.set_filter(count, "work_step_*")
    ftrace.register(count)
    tracer = FunctionGraphTracer(ftrace, filter="work_*")
    tracer.start()
    enabled = tracefs.enabled_functions(ftrace)
    assert "work_step_a (2)           \n" in enabled, "shared sites call the list function (no per-site ops)"
    assert "work_chain (1)       O   \tops:" in enabled
    assert k.call("work_chain", 4, cpu=1) == work_chain(4)
    records = tracer.stop()
    assert events(ftrace, records) == one_chain()
    assert ftrace.ops_hits(count) == 4
    assert k.call("work_chain", 4, cpu=1) == work_chain(4)
    assert ftrace.ops_hits(count) == 8
    ftrace.unregister(count)


@pytest.fixture
def lp(kernel: Kernel) -> Livepatch:
    return Livepatch(kernel, Ftrace(kernel), policy=StallPolicy(retry_interval=0.02, signal_after=None))


def test_traces_the_livepatched_call_through_klp(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:  # noqa: F811
    """The old function's entry hooks the return; klp redirects to the replacement, whose own entry is traced
    too (its return address is already return_to_handler); both returns unwind in order."""
    k = lp.kernel
    lp.load(bundles["livepatch_cmdline"])
    lp.enable("livepatch_cmdline")
    tracer = FunctionGraphTracer(lp.ftrace, filter="proc_cmdline_read cmdline_proc_show livepatch_cmdline_proc_show")
    tracer.start()
    assert k.read_string("proc_cmdline_read") == "livepatch_cmdline: this has been live patched\n"
    records = tracer.stop()
    assert events(lp.ftrace, records) == [
        ("ent", "proc_cmdline_read", 0), ("ent", "cmdline_proc_show", 1), ("ent", "livepatch_cmdline_proc_show", 2),
        ("ret", "livepatch_cmdline_proc_show", 2), ("ret", "cmdline_proc_show", 1), ("ret", "proc_cmdline_read", 0)]
    check_nesting(records, complete=True)
    body = [ln.split("|", 1)[1] for ln in tracefs.function_graph(lp.ftrace, records).splitlines()[4:]]
    assert body == ["  proc_cmdline_read() {", "    cmdline_proc_show() {", "      livepatch_cmdline_proc_show();",
                    "    }", "  }"]
    lp.disable("livepatch_cmdline")


def test_hooked_returns_do_not_hide_a_task_from_the_transition(
        lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:  # noqa: F811
    """A task asleep in sleeper_inner, called from sleeper_middle (which the patch replaces), blocks the
    transition with function_graph hooking every sleeper_* return, exactly as without the tracer."""
    k = lp.kernel
    tracer = FunctionGraphTracer(lp.ftrace, filter="sleeper_*")
    tracer.start()
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    fut = k.submit("sleeper_outer", flag, cpu=1)
    task = sleeping_worker(k, flag)
    assert tracer.hooked() == {task.get("pid"): 3}

    trace = k.stack_of(task)
    assert trace.reliable, trace.reason
    assert k.kallsyms.addr("return_to_handler") not in trace.pcs
    names = [k.kallsyms.containing(pc).name for pc in trace.pcs]  # type: ignore[union-attr]
    assert names == ["schedule", "wait_on_interruptible", "sleeper_inner", "sleeper_middle", "sleeper_outer",
                     "worker_main", "ret_from_fork"]
    # what the frame records hold: without the translation the callers vanish behind return_to_handler
    raw = unwind(k.memory, pc=task.get("cpu_context.pc"), fp=task.get("cpu_context.fp"),
                 stack_lo=task.get("stack_lo"), stack_hi=task.get("stack_hi"), is_text=k.is_text)
    raw_names = [k.kallsyms.containing(pc).name for pc in raw.pcs]  # type: ignore[union-attr]
    assert raw_names.count("return_to_handler") == 3
    assert "sleeper_middle" not in raw_names

    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.3), "the sleeper is inside sleeper_middle: the transition must wait"
    view = sysfs.patch_view(lp, "livepatch_sleeper")
    assert list(view["progress"]["blocked"].values()) == ["sleeping on function sleeper_middle"]
    assert int(next(iter(view["progress"]["blocked"]))) == task.get("pid")

    k.memory.write_u64(flag, 5)
    k.machine.kick(1)
    assert fut.result(5) == 5 + 1 + 10 + 100, "the original sleeper_middle finished, its returns unhooked"
    assert lp.wait(5)
    records = tracer.stop()
    assert events(lp.ftrace, records) == [("ent", "sleeper_outer", 0), ("ent", "sleeper_middle", 1),
                                          ("ent", "sleeper_inner", 2), ("ret", "sleeper_inner", 2),
                                          ("ret", "sleeper_middle", 1), ("ret", "sleeper_outer", 0)]
    assert records[-1].duration > 0.25 * abi.CNTFRQ_HZ, "sleeper_outer's duration spans the sleep"


def test_stopping_while_a_task_sleeps_with_hooked_returns(ftrace: Ftrace) -> None:
    """Returns hooked before stop still go through return_to_handler afterwards, into detached rings."""
    k = ftrace.kernel
    before = snapshot(ftrace)
    tracer = FunctionGraphTracer(ftrace, filter="sleeper_*")
    tracer.start()
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    fut = k.submit("sleeper_outer", flag, cpu=1)
    sleeping_worker(k, flag)
    records = tracer.stop()
    assert [r.entry for r in records] == [True] * 3
    assert snapshot(ftrace) == before
    assert list(tracer.hooked().values()) == [3]
    k.memory.write_u64(flag, 5)
    k.machine.kick(1)
    assert fut.result(5) == 116
    assert tracer.hooked() == {}


def test_under_load_on_every_vcpu(loaded: Ftrace) -> None:
    """Every vCPU runs the mixed workload (work_chain ~10 events per 20 us per CPU) while another ops comes and
    goes on a traced site; the rings are sized to hold the whole run, so nothing may be dropped."""
    ft = loaded
    k = ft.kernel
    before_calls = k.load_stats()["calls"]
    tracer = FunctionGraphTracer(ft, filter="work_* cmdline_proc_show proc_cmdline_read", entries_per_cpu=1 << 18)
    tracer.start()
    records: list[GraphRecord] = []
    other = FtraceOps("count", "ops_func_count")
    ft.set_filter(other, "work_step_b")
    for _ in range(3):
        ft.register(other)
        records += tracer.drain()
        ft.unregister(other)
    records += tracer.stop()
    k.set_load(abi.LOADGEN_OFF)
    time.sleep(0.02)
    k.machine.check()
    stats = k.load_stats()
    assert stats["errors"] == 0, "every workload call returned its expected result"
    assert stats["calls"] > before_calls
    assert tracer.dropped == 0
    assert tracer.overrun == 0
    assert tracer.written == tracer.read == len(records)
    assert {r.cpu for r in records} == set(range(k.config.nr_cpus))
    closed = check_nesting(records, complete=False)  # calls in flight at stop may lack their return
    assert closed > 100
    chains = [r for r in records if not r.entry and ft.symbol_name(r.ip) == "work_chain"]
    assert chains
    assert all(r.depth == 0 for r in chains)
    text = tracefs.function_graph(ft, records)
    assert "work_step_c();" in text
    assert k.memory.read_u64(ft.list_head) == ft.list_end
    assert tracefs.enabled_functions(ft) == ""
