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
a shorter path); and ns per loop iteration from hook-free timed runs on a kernel per TLB mode (``--tlb``,
default both: Unicorn's virtual TLB, the default, and its CPU TLB), the modes taking turns sample by sample in
one process. Each timed sample starts the tracer on fresh rings (no entry dropped: checked), times n and 2n
iterations, and stops it; the figure is the median of ``--rounds`` samples, in CPU time of the vCPU thread
(waiting for a core shared with other work does not count) and in wall time.

    python -m bench.tracers [--tlb virtual,cpu] [--rounds 5]

Writes bench/results/tracers.json and .md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bench import common
from daemon.emu.tlb import TlbMode
from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.tracer import FunctionTracer
from daemon.kernel.kernel import Kernel, KernelConfig

CALLS = 2_000
RING = 1 << 15  # entries per CPU: more than the 2 x (CALLS + 2 CALLS + CALLS) entries function_graph writes
TIME_CALLS = 10_000
TIME_RING = 1 << 16  # more than the 2 x (TIME_CALLS / 20 + TIME_CALLS + 2 TIME_CALLS) of a timed sample
ROUNDS = 5


def _nop(ft: Ftrace, ring: int = 0) -> Callable[[], object]:
    ops = FtraceOps("nop", "ops_func_nop")
    ft.set_filter(ops, "tracee_relevant")
    ft.register(ops)
    return lambda: ft.unregister(ops)


def _tracer(kind: type[FunctionTracer] | type[FunctionGraphTracer], **graph: str
            ) -> Callable[[Ftrace, int], Callable[[], object]]:
    def attach(ft: Ftrace, ring: int = RING) -> Callable[[], object]:
        tracer = kind(ft, filter="tracee_relevant bench_tracee_caller" if graph else "tracee_relevant",
                      entries_per_cpu=ring, **graph)
        tracer.start()

        def detach() -> None:
            dropped = tracer.dropped
            tracer.stop()
            if dropped:  # a full ring takes a shorter path: the figure would not be the tracer's
                raise RuntimeError(f"{kind.__name__}: {dropped} entries dropped during a measurement")
        return detach
    return attach


LOOP = "bench_tracee"
# (case, how to attach it, the loop calling tracee_relevant)
Attach = Callable[[Ftrace, int], Callable[[], object]]
CASES: list[tuple[str, Attach | None, str]] = [
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


def timed_sample(ft: Ftrace, attach: Attach | None, loop: str) -> common.Sample:
    detach = attach(ft, TIME_RING) if attach is not None else None
    try:
        ft.kernel.call(loop, TIME_CALLS // 20, timeout=300)  # translate the traced path first
        return common.guest_ns_sample(ft.kernel, loop, TIME_CALLS)
    finally:
        if detach is not None:
            detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracers")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes of the timed runs")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed samples per mode (median; default {ROUNDS})")
    args = parser.parse_args(argv)
    tlbs = [TlbMode(m) for m in args.tlb.split(",")]
    rows: list[dict[str, object]] = []
    for path, force_list in (("per-callsite ops", False), ("list function", True)):
        kernel = Kernel(KernelConfig(nr_cpus=1, count_instructions=True, loadgens_per_cpu=0)).boot()
        timing = {t: Ftrace(Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, tlb_mode=t)).boot(),
                            force_list=force_list) for t in tlbs}
        try:
            ft = Ftrace(kernel, force_list=force_list)
            base = common.guest_insn_per_call(kernel, LOOP, CALLS)
            for name, attach, loop in CASES:
                if attach is None:
                    per_call = base
                else:
                    detach = attach(ft, RING)
                    try:
                        per_call = common.guest_insn_per_call(kernel, loop, CALLS)
                    finally:
                        detach()
                ns = common.alternating_medians(
                    {str(t): lambda f=f, a=attach, lp=loop: timed_sample(f, a, lp) for t, f in timing.items()},
                    args.rounds)
                row: dict[str, object] = {"case": name, "path": path, "insn_per_call": per_call,
                                          "extra_insn_per_call": per_call - base}
                row.update({f"{t}_ns": round(ns[str(t)]["vcpu"], 1) for t in tlbs})
                if len(tlbs) > 1:
                    last, first = ns[str(tlbs[-1])]["vcpu"], ns[str(tlbs[0])]["vcpu"]
                    row[f"x_{tlbs[-1]}"] = round(last / first, 1) if first > 0 else "-"
                row.update({f"{t}_wall_ns": round(ns[str(t)]["wall"], 1) for t in tlbs})
                rows.append(row)
                print(row, flush=True)
        finally:
            kernel.shutdown()
            for f in timing.values():
                f.kernel.shutdown()
    extra = {str(r["case"]): r["extra_insn_per_call"] for r in rows if r["path"] == "per-callsite ops"}
    graph, function = extra["function_graph tracer"], extra["function tracer"]
    inside, outside = (extra[f"function_graph, call {w} set_graph_function"] for w in ("inside", "outside"))
    notes = ("Extra guest instructions per call of tracee_relevant over an untraced call (exact counts, one vCPU). "
             f"function_graph costs {graph:.0f} more than an untraced call with per-callsite ops "
             f"({graph - function:.0f} more than the function tracer): the entry callback, a ret_stack push, two "
             "ring entries and the return through return_to_handler. With set_graph_function, a call inside it "
             f"costs {inside:.0f} (the graph tests are a few loads: the task is already inside, no hash lookup) "
             f"and a call outside it {outside:.0f} (one hash lookup; nothing pushed, recorded or hooked).")
    notes += (" Timed: ns per loop iteration (call + loop), median of the alternating samples, in CPU time of the "
              "vCPU thread (*_ns) and wall time (*_wall_ns) on a 2-core host shared with other work (compare "
              "within a row). virtual = Unicorn's virtual TLB with the native fill (the default), cpu = its CPU "
              "TLB; x_cpu = how many times faster the virtual TLB is (vCPU time).")
    params = {"calls": CALLS, "ring_entries_per_cpu": RING, "nr_cpus": 1, "calls_timed": TIME_CALLS,
              "ring_entries_timed": TIME_RING, "rounds": args.rounds, "tlb_modes": [str(t) for t in tlbs]}
    common.write("tracers", params,
                 rows, {"insn_per_call": "guest insn", "extra_insn_per_call": "guest insn",
                        **{f"{t}_ns": f"vCPU ns/iteration, {t} TLB" for t in tlbs},
                        **{f"{t}_wall_ns": f"wall ns/iteration, {t} TLB" for t in tlbs}}, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
