"""What a traced call costs with each tracer, on the emulated kernel: ``python -m bench.tracers``.

``bench_tracee(n)`` calls ``tracee_relevant`` n times; the tracer's filter selects that function only. Cases:
untraced (the two entry NOPs run), a nop ops (``ops_func_nop``), the function tracer (one ring entry per call)
and the function_graph tracer (entry and return entries, the return hooked through ``return_to_handler``),
each with per-callsite ops (CALL_OPS) and forced through ``ftrace_list_ops`` (a kernel without CALL_OPS).
Then function_graph with set_graph_function / set_graph_notrace (the call hooked in every case): a call inside
the graph function (``bench_tracee_caller(n)``, a traced caller of the same loop, is the graph function), a
call of the graph function itself, a call outside it (the graph function is ``tracee_irrelevant``: the call is
neither pushed nor hooked) and a set_graph_notrace function (pushed and hooked, nothing recorded).

Measured: exact guest instructions per call, from a counting run on one vCPU (cost(2n) - cost(n) over n calls,
so the host call around it cancels out), with rings large enough that no entry is dropped (a full ring takes
a shorter path). Wall time per call is not reported here: with unicorn 2.1.4 every guest store takes a slow
path (bench.ftrace_ops reports ns per call for the ops cases).

Writes bench/results/tracers.json and .md.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import common
from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.tracer import FunctionTracer
from daemon.kernel.kernel import Kernel, KernelConfig

CALLS = 2_000
RING = 1 << 15  # entries per CPU: more than the 2 x (CALLS + 2 CALLS + CALLS) entries function_graph writes


def _nop(ft: Ftrace) -> Callable[[], object]:
    ops = FtraceOps("nop", "ops_func_nop")
    ft.set_filter(ops, "tracee_relevant")
    ft.register(ops)
    return lambda: ft.unregister(ops)


def _tracer(kind: type[FunctionTracer] | type[FunctionGraphTracer], **graph: str
            ) -> Callable[[Ftrace], Callable[[], object]]:
    def attach(ft: Ftrace) -> Callable[[], object]:
        tracer = kind(ft, filter="tracee_relevant bench_tracee_caller" if graph else "tracee_relevant",
                      entries_per_cpu=RING, **graph)
        tracer.start()
        return tracer.stop
    return attach


LOOP = "bench_tracee"
# (case, how to attach it, the loop calling tracee_relevant)
CASES: list[tuple[str, Callable[[Ftrace], Callable[[], object]] | None, str]] = [
    ("untraced", None, LOOP), ("nop ops", _nop, LOOP), ("function tracer", _tracer(FunctionTracer), LOOP),
    ("function_graph tracer", _tracer(FunctionGraphTracer), LOOP),
    ("function_graph, call inside set_graph_function", _tracer(FunctionGraphTracer,
                                                                graph_function="bench_tracee_caller"),
     "bench_tracee_caller"),
    ("function_graph, call of the set_graph_function", _tracer(FunctionGraphTracer, graph_function="tracee_relevant"),
     LOOP),
    ("function_graph, call outside set_graph_function", _tracer(FunctionGraphTracer,
                                                                 graph_function="tracee_irrelevant"), LOOP),
    ("function_graph, call of a set_graph_notrace", _tracer(FunctionGraphTracer, graph_notrace="tracee_relevant"),
     LOOP)]


def main() -> int:
    rows: list[dict[str, object]] = []
    for path, force_list in (("per-callsite ops", False), ("list function", True)):
        kernel = Kernel(KernelConfig(nr_cpus=1, count_instructions=True, loadgens_per_cpu=0)).boot()
        try:
            ft = Ftrace(kernel, force_list=force_list)
            base = common.guest_insn_per_call(kernel, LOOP, CALLS)
            for name, attach, loop in CASES:
                if attach is None:
                    per_call = base
                else:
                    detach = attach(ft)
                    try:
                        per_call = common.guest_insn_per_call(kernel, loop, CALLS)
                    finally:
                        detach()
                rows.append({"case": name, "path": path, "insn_per_call": per_call,
                             "extra_insn_per_call": per_call - base})
        finally:
            kernel.shutdown()
    extra = {str(r["case"]): r["extra_insn_per_call"] for r in rows if r["path"] == "per-callsite ops"}
    graph, function = extra["function_graph tracer"], extra["function tracer"]
    inside, outside = (extra[f"function_graph, call {w} set_graph_function"] for w in ("inside", "outside"))
    notes = ("Extra guest instructions per call of tracee_relevant over an untraced call (exact counts, one vCPU). "
             f"function_graph costs {graph:.0f} more than an untraced call with per-callsite ops "
             f"({graph - function:.0f} more than the function tracer): the entry callback, a ret_stack push, two "
             "ring entries and the return through return_to_handler. With set_graph_function, a call inside it "
             f"costs {inside:.0f} (the graph tests are a few loads: the task is already inside, no hash lookup) "
             f"and a call outside it {outside:.0f} (one hash lookup; nothing pushed, recorded or hooked).")
    common.write("tracers", {"calls": CALLS, "ring_entries_per_cpu": RING, "nr_cpus": 1}, rows,
                 {"insn_per_call": "guest insn", "extra_insn_per_call": "guest insn"}, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
