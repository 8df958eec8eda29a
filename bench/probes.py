"""bench.probes: what a BRK kprobe hit costs, simulated and stepped out of line, beside an unprobed call.

    python -m bench.probes [--n 2000]      (writes bench/results/probes.json and .md)

``kpt_loop(n)`` calls kpt_branches, kpt_calls (-> kpt_leaf twice), kpt_testbit and kpt_literal n times; the
probes sit in kpt_leaf, hit 2n times per loop. Measured per hit, as (cost(2n) - cost(n)) / (2n) so the host
call around the loop cancels out:

- **guest instructions per hit**: exact, from a counting run (block hook, 1 vCPU): the vector entry, the
  handlers and the eret, plus the slot's two instructions when stepped;
- **host traps per hit**: BRK exceptions the host delivered (1 simulated, 2 stepped: the slot's BRK #6; a
  kretprobe adds 1 with the BRK trampoline and none with the rethook one; ftrace-based cases take none);
- **ns per hit**: timed runs of ``kpt_loop(2n)`` without hooks, best of 5, minus the unprobed run (the host
  call around the loop is in both). The host's share is the CPU's exception entry that
  unicorn leaves undone (3 register reads and 5 writes through libunicorn, ~0.45 us each) and the trap itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import unicorn

from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import FunctionGraphTracer
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.tracer import FunctionTracer
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.kprobes.core import Kprobes
from daemon.kprobes.fprobe import Fprobes
from daemon.kprobes.kretprobes import Kretprobes

RESULTS = Path(__file__).resolve().parent / "results"

CASES: list[tuple[str, str | None, dict[str, bool]]] = [
    ("no probe", None, {}),
    ("ftrace ops, counting callback (CALL_OPS)", "ftrace:ops_func_count", {}),
    ("ftrace function tracer (ring record)", "ftrace:function_trace_call", {}),
    ("function_graph tracer (entry + return records)", "fgraph", {}),
    ("fprobe entry only (ftrace ops, args)", "fprobe:entry", {}),
    ("fprobe entry + exit (return_to_handler)", "fprobe:exit", {}),
    ("fprobe entry + exit, recording args and retval", "fprobe:exit", {"record": True}),
    ("kprobe simulated (ret)", "kpt_leaf+0x10", {}),
    ("kprobe stepped out of line (add)", "kpt_leaf+0x8", {}),
    ("kprobe stepped, record regs + post handler", "kpt_leaf+0x8", {"record": True, "post": True}),
    ("kretprobe, rethook trampoline (synthesized pt_regs)", "kret:rethook", {}),
    ("kretprobe, BRK trampoline (genuine pt_regs)", "kret:brk", {}),
    ("kretprobe, BRK trampoline, recording return regs", "kret:brk", {"record": True}),
]
"""(label, what to attach to kpt_leaf, its options). A kretprobe's entry is a kprobe at kpt_leaf+0, which
steps ftrace's ``mov x9, x30`` out of line: 2 traps, plus 1 for the BRK trampoline's return."""


def _attach(probes: tuple[Ftrace, Kprobes, Kretprobes, Fprobes], target: str,
            flags: dict[str, bool]) -> Callable[[], object]:
    """Attach one case to kpt_leaf; returns what detaches it."""
    ftrace, kp, kr, fp = probes
    record, post = flags.get("record", False), flags.get("post", False)
    if target == "ftrace:function_trace_call":
        tracer = FunctionTracer(ftrace, filter="kpt_leaf", entries_per_cpu=1 << 15)
        tracer.start()
        return tracer.stop
    if target == "fgraph":
        graph = FunctionGraphTracer(ftrace, filter="kpt_leaf", entries_per_cpu=1 << 15)
        graph.start()
        return graph.stop
    if target.startswith("ftrace:"):
        ops = FtraceOps("b", target.removeprefix("ftrace:"))
        ftrace.set_filter(ops, "kpt_leaf")
        ftrace.register(ops)
        return lambda: ftrace.unregister(ops)
    if target.startswith("fprobe:"):
        fp.register("b", "kpt_leaf", exit=target == "fprobe:exit", record=record)
        return lambda: fp.unregister("b")
    if target.startswith("kret:"):
        kr.register("b", "kpt_leaf", trampoline=target.removeprefix("kret:"), maxactive=4, record=record)
        return lambda: kr.unregister("b")
    kp.register("b", target, record=record, post=post)
    return lambda: kp.unregister("b")


def _run(k: Kernel, n: int) -> float:
    t = time.perf_counter_ns()
    k.call("kpt_loop", n, timeout=120)
    return float(time.perf_counter_ns() - t)


def measure(n: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for counting in (True, False):
        with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, count_instructions=counting)) as k:
            ftrace = Ftrace(k)  # before the kprobes: its init writes every function's first instruction
            kp = Kprobes(k)
            kr, fp = Kretprobes(kp), Fprobes(ftrace)
            probes = (ftrace, kp, kr, fp)
            v = k.machine.vcpus[0]
            for i, (label, target, flags) in enumerate(CASES):
                detach = _attach(probes, target, flags) if target is not None else None
                if counting:
                    costs = []
                    for m in (n, 2 * n):
                        i0, t0 = v.instructions, v.debug_exceptions
                        k.call("kpt_loop", m, timeout=120)
                        costs.append((v.instructions - i0, v.debug_exceptions - t0))
                    rows.append({"label": label, "insns_per_hit": (costs[1][0] - costs[0][0]) / (2 * n),
                                 "traps_per_hit": (costs[1][1] - costs[0][1]) / (2 * n)})
                else:
                    rows[i]["ns_per_hit"] = min(_run(k, 2 * n) for _ in range(5)) / (4 * n)
                if detach is not None:
                    detach()
                kp.drain()
                fp.drain()
    base_i, base_ns = float(rows[0]["insns_per_hit"]), float(rows[0]["ns_per_hit"])  # type: ignore[arg-type]
    for r in rows:
        r["extra_insns"] = float(r["insns_per_hit"]) - base_i  # type: ignore[arg-type]
        r["extra_ns"] = float(r["ns_per_hit"]) - base_ns  # type: ignore[arg-type]
    return rows


def table(rows: list[dict[str, object]]) -> str:
    out = ["| case | guest insns per kpt_leaf call | extra guest insns per hit | host traps per hit | ns per call "
           "| extra ns per hit |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['insns_per_hit']:.1f} | {r['extra_insns']:.1f} | "
                   f"{r['traps_per_hit']:.2f} | {r['ns_per_hit']:.0f} | {r['extra_ns']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    rows = measure(args.n)
    text = table(rows)
    print(text, end="")
    RESULTS.mkdir(exist_ok=True)
    load = os.getloadavg()[0]
    (RESULTS / "probes.json").write_text(json.dumps(
        {"n": args.n, "unicorn": unicorn.__version__, "nr_cpus": 1, "load_average": round(load, 2), "rows": rows},
        indent=2) + "\n")
    (RESULTS / "probes.md").write_text(
        "# bench.probes\n\n"
        f"`python -m bench.probes --n {args.n}` (unicorn {unicorn.__version__}, 1 vCPU, no load generators; load "
        f"average {load:.1f} on {os.cpu_count()} cores while measured). Guest instructions and host traps are exact "
        "and are the cost to read; ns depend on the machine's load (under a high load average even their ratios "
        "are not reliable)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
