"""Guest instructions per second, per vCPU and in total, with 1, 2 and 4 vCPUs running workload loops.

    python -m bench.guest_throughput [--tlb virtual,cpu] [--rounds 5]

Each case runs ``--rounds`` times per TLB mode (``--tlb``, default both) on kernels booted side by side, the
modes and vCPU counts taking turns round by round in the same process, so the rows compare Unicorn's virtual TLB
(the default) with its CPU TLB under the same load; each figure is the median of its rounds. ``scaling`` is
the total throughput against one vCPU of the same mode (wall time: what the cores actually gave), and
``vcpu_ns_per_call`` the CPU time of the vCPU threads per call (waiting for a core shared with other work on
the host does not count; it grows with n only through contention between the vCPUs themselves), so
``scaling_vcpu_time`` = n x vcpu_ns_per_call(1) / vcpu_ns_per_call(n) is the scaling the vCPUs would reach with
a free core each.

Instruction counts come from a separate counting run (a block hook on one vCPU) of the same deterministic
guest function: the count of f(2n) minus f(n) is the exact cost of n iterations. The timed runs have no
hooks at all, so no Python runs while they are measured. Two workloads:

- ``getpid``: a loop calling the getpid-like syscall (a hot path: a handful of functions, all translated)
- ``corpus``: random calls over the 10,240-function corpus with every result checked (a cold path: far
  more translated blocks than Unicorn's jump cache holds, so most calls look their target up)
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import common
from daemon.emu.tlb import TlbMode
from daemon.kernel.kernel import Kernel, KernelConfig

WORKLOADS = {"getpid": ("getpid_loop", 20_000_000), "corpus": ("bench_corpus", 2_000_000)}
CPUS = (1, 2, 4)


def instructions_per_iteration(fn: str) -> float:
    with Kernel(KernelConfig(nr_cpus=1, count_instructions=True)) as k:
        v = k.machine.vcpus[0]
        counts = []
        for n in (2000, 4000):
            before = v.instructions
            k.call(fn, n, 7, timeout=300)
            counts.append(v.instructions - before)
        return (counts[1] - counts[0]) / 2000


def timed(k: Kernel, fn: str, iterations: int) -> tuple[float, float]:
    """Wall seconds for every vCPU to run ``fn(iterations)`` at once, and the vCPU threads' CPU ns per call."""
    threads = [v.thread for v in k.machine.vcpus]
    clocks = [time.pthread_getcpuclockid(t.ident) for t in threads if t is not None and t.ident is not None]
    cpu_before = [time.clock_gettime_ns(c) for c in clocks]
    start = time.perf_counter()
    futures = [k.submit(fn, iterations, 7, cpu=c) for c in range(len(clocks))]
    for f in futures:
        f.result(600)
    wall = time.perf_counter() - start
    cpu = sum(time.clock_gettime_ns(c) - b for c, b in zip(clocks, cpu_before, strict=True))
    return wall, cpu / (iterations * len(clocks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.guest_throughput")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes, run alternately")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per case (median; default 5)")
    args = parser.parse_args(argv)
    modes = [TlbMode(m) for m in args.tlb.split(",")]
    rows = []
    for name, (fn, iterations) in WORKLOADS.items():
        per_iter = instructions_per_iteration(fn)
        variants = [(n, mode) for n in CPUS for mode in modes]
        kernels = {v: Kernel(KernelConfig(nr_cpus=v[0], tlb_mode=v[1])).boot() for v in variants}
        samples: dict[tuple[int, TlbMode], list[tuple[float, float]]] = {v: [] for v in variants}
        try:
            for v, k in kernels.items():  # warm the translation caches
                for c in range(v[0]):
                    k.call(fn, iterations // 20, 7, cpu=c, timeout=120)
            for r in range(args.rounds):
                for v in variants if r % 2 == 0 else reversed(variants):
                    samples[v].append(timed(kernels[v], fn, iterations))
        finally:
            for k in kernels.values():
                k.shutdown()
        for n, mode in variants:
            wall = statistics.median(s[0] for s in samples[(n, mode)])
            one = statistics.median(s[0] for s in samples[(1, mode)])
            vcpu_ns = statistics.median(s[1] for s in samples[(n, mode)])
            vcpu_one = statistics.median(s[1] for s in samples[(1, mode)])
            per_cpu = per_iter * iterations / wall
            rows.append({"workload": name, "tlb": str(mode), "vcpus": n, "insn_per_call": round(per_iter, 2),
                         "ns_per_call": wall / iterations * 1e9,
                         "vcpu_ns_per_call": vcpu_ns,
                         "minsn_per_s_per_vcpu": per_cpu / 1e6, "minsn_per_s_total": per_cpu * n / 1e6,
                         "scaling": round(n * one / wall, 2), "scaling_vcpu_time": round(n * vcpu_one / vcpu_ns, 2)})
    for r in rows:  # the same case, the other mode: how many times faster the first mode is
        other = [o for o in rows if (o["workload"], o["vcpus"]) == (r["workload"], r["vcpus"]) and o is not r]
        r[f"x_{modes[-1]}"] = round(float(other[0]["vcpu_ns_per_call"]) / float(r["vcpu_ns_per_call"]), 2) \
            if other and r["tlb"] == str(modes[0]) else "-"
    common.write(
        "guest_throughput",
        {"workloads": {k: {"function": f, "iterations_per_vcpu": i} for k, (f, i) in WORKLOADS.items()},
         "vcpus": list(CPUS), "tlb_modes": [str(m) for m in modes], "rounds": args.rounds},
        rows,
        {"insn_per_call": "guest instructions", "ns_per_call": "wall ns", "vcpu_ns_per_call": "vCPU CPU ns",
         "minsn_per_s_per_vcpu": "M insn/s", "minsn_per_s_total": "M insn/s",
         "scaling": "x one vCPU, wall", "scaling_vcpu_time": "x one vCPU if each had a core",
         f"x_{modes[-1]}": f"{modes[-1]} / {modes[0]}, vCPU time"},
        notes="Guest instructions per second with no hooks during the timed runs; instructions per call from a "
              "separate counting run. Medians of the rounds, the variants taking turns round by round. The "
              "machine has 2 cores shared with other work (noisy; the load average at the end is on the machine "
              "line): 4 vCPUs share them, and 2 vCPUs get 2 cores only when nothing else runs. "
              "tlb: virtual = Unicorn's virtual TLB with the native fill (the default), cpu = its CPU TLB.")


if __name__ == "__main__":
    main()
