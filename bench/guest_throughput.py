"""Guest instructions per second, per vCPU and in total, with 1, 2 and 4 vCPUs running workload loops.

    python -m bench.guest_throughput [--tlb virtual,cpu]

Each case runs once per TLB mode (``--tlb``, default both), the modes alternating in the same process, so the
rows compare Unicorn's virtual TLB (the default) with its CPU TLB under the same load.

Instruction counts come from a separate counting run (a block hook on one vCPU) of the same deterministic
guest function: the count of f(2n) minus f(n) is the exact cost of n iterations. The timed runs have no
hooks at all, so no Python runs while they are measured. Two workloads:

- ``getpid``: a loop calling the getpid-like syscall (a hot path: a handful of functions, all translated)
- ``corpus``: random calls over the 10,240-function corpus with every result checked (a cold path: far
  more translated blocks than Unicorn's jump cache holds, so most calls look their target up)
"""

from __future__ import annotations

import argparse
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
            k.call(fn, n, 7)
            counts.append(v.instructions - before)
        return (counts[1] - counts[0]) / 2000


def timed(fn: str, iterations: int, nr_cpus: int, mode: TlbMode) -> float:
    with Kernel(KernelConfig(nr_cpus=nr_cpus, tlb_mode=mode)) as k:
        for c in range(nr_cpus):  # warm the translation caches
            k.call(fn, iterations // 20, 7, cpu=c, timeout=120)
        start = time.perf_counter()
        futures = [k.submit(fn, iterations, 7, cpu=c) for c in range(nr_cpus)]
        for f in futures:
            f.result(600)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.guest_throughput")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes, run alternately")
    modes = [TlbMode(m) for m in parser.parse_args(argv).tlb.split(",")]
    rows = []
    for name, (fn, iterations) in WORKLOADS.items():
        per_iter = instructions_per_iteration(fn)
        for n in CPUS:
            for mode in modes:
                wall = timed(fn, iterations, n, mode)
                per_cpu = per_iter * iterations / wall
                rows.append({"workload": name, "tlb": str(mode), "vcpus": n, "insn_per_call": round(per_iter, 2),
                             "ns_per_call": wall / iterations * 1e9, "minsn_per_s_per_vcpu": per_cpu / 1e6,
                             "minsn_per_s_total": per_cpu * n / 1e6})
    common.write(
        "guest_throughput",
        {"workloads": {k: {"function": f, "iterations_per_vcpu": i} for k, (f, i) in WORKLOADS.items()},
         "vcpus": list(CPUS), "tlb_modes": [str(m) for m in modes]},
        rows,
        {"insn_per_call": "guest instructions", "ns_per_call": "ns", "minsn_per_s_per_vcpu": "M insn/s",
         "minsn_per_s_total": "M insn/s"},
        notes="Guest instructions per second with no hooks during the timed runs; instructions per call from a "
              "separate counting run. The machine has 2 cores (shared with other work: noisy): 4 vCPUs share "
              "them. tlb: virtual = Unicorn's virtual TLB with the native fill (the default), cpu = its CPU TLB, "
              "the two alternating in one run.")


if __name__ == "__main__":
    main()
