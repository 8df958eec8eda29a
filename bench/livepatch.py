"""Livepatch costs on the emulated kernel.

    python -m bench.livepatch [--tlb virtual,cpu] [--rounds 7]

- **call cost**: guest instructions of one call of ``klp_demo_target`` unpatched (its entry NOPs run) and
  live-patched (``mov x9, x30; bl ftrace_caller`` -> per-callsite ops -> ``klp_ftrace_handler`` sets
  ``fregs->pc`` -> ``ret x9`` into the replacement); exact counts from a counting run, as (c(2n) - c(n)) / n,
  plus ns per call from hook-free timed runs on a kernel per TLB mode (``--tlb``, default both: Unicorn's
  virtual TLB, the default, and its CPU TLB), the modes taking turns sample by sample; the median of
  ``--rounds`` samples, in CPU time of the vCPU thread and in wall time. Goal: at most 60 guest instructions
  more than the original.
- **load**: signed bundle -> ready (signature check, build-id and function checks, module load, relocations,
  ftrace records), and the module loader alone.
- **enable / disable**: request -> transition complete, with idle vCPUs and with every vCPU busy running the
  self-checking workload (load generators in mixed mode plus workers calling the patched function); once per
  TLB mode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from bench import common
from daemon.emu.tlb import TlbMode
from daemon.ftrace.core import Ftrace
from daemon.guest import abi
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.livepatch import examples
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import StallPolicy
from patchformat import signing
from patchformat.bundle import PatchBundle

PATCH = "livepatch_demo_target"
COUNT_CALLS = 2_000
TIME_CALLS = 200_000
CYCLES = 50
ROUNDS = 7


def call_cost(bundle: PatchBundle, tlbs: list[TlbMode], rounds: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, count_instructions=True)) as k:
        lp = Livepatch(k, Ftrace(k))
        lp.load(bundle)
        out["unpatched_insn_per_call"] = common.guest_insn_per_call(k, "bench_klp_target", COUNT_CALLS)
        lp.enable(PATCH)
        out["patched_insn_per_call"] = common.guest_insn_per_call(k, "bench_klp_target", COUNT_CALLS)
    timing = {t: Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, tlb_mode=t)).boot() for t in tlbs}
    try:
        patches = {t: Livepatch(k, Ftrace(k)) for t, k in timing.items()}
        for lp in patches.values():
            lp.load(bundle)
        for state in ("unpatched", "patched"):
            for t, k in timing.items():
                if state == "patched":
                    patches[t].enable(PATCH)
                k.call("bench_klp_target", TIME_CALLS // 10, timeout=300)  # translate first
            ns = common.alternating_medians(
                {str(t): partial(common.guest_ns_sample, k, "bench_klp_target", TIME_CALLS) for t, k in timing.items()},
                rounds)
            for t in tlbs:
                out[f"{state}_{t}_ns_per_call"] = ns[str(t)]["vcpu"]
                out[f"{state}_{t}_wall_ns_per_call"] = ns[str(t)]["wall"]
    finally:
        for k in timing.values():
            k.shutdown()
    return out


def load_times(bundle: PatchBundle, workdir: Path) -> dict[str, float]:
    key = signing.generate_key()
    signed = signing.sign(bundle, key)
    signed.save(workdir / "p.lpb")
    admit, module = [], []
    with Kernel(KernelConfig(nr_cpus=2)) as k:
        lp = Livepatch(k, Ftrace(k), trusted_keys=[key.public_key()])
        for _ in range(CYCLES):
            start = time.perf_counter_ns()
            lp.load(PatchBundle.load(workdir / "p.lpb"))
            admit.append(time.perf_counter_ns() - start)
            module.append(lp.patch(PATCH).module.load_ns)
            lp.unload(PATCH)
    return {"load_p50_ms": statistics.median(admit) / 1e6, "load_max_ms": max(admit) / 1e6,
            "module_loader_p50_ms": statistics.median(module) / 1e6}


def transition_times(bundle: PatchBundle, busy: bool, tlb: TlbMode) -> dict[str, float]:
    enable, disable = [], []
    with Kernel(KernelConfig(nr_cpus=2, tlb_mode=tlb)) as k:
        lp = Livepatch(k, Ftrace(k), policy=StallPolicy(retry_interval=0.005))
        lp.load(bundle)
        futures = []
        if busy:
            k.set_load(abi.LOADGEN_MIX)
            counts = k.host_buffer.alloc(24 * 2)
            k.memory.write(counts, bytes(48))
            futures = [k.submit("klp_check_loop", 50_000_000, counts + 24 * c, cpu=c) for c in range(2)]
            time.sleep(0.1)
        for _ in range(CYCLES):
            start = time.perf_counter_ns()
            lp.enable(PATCH, timeout=30)
            enable.append(time.perf_counter_ns() - start)
            start = time.perf_counter_ns()
            lp.disable(PATCH, timeout=30)
            disable.append(time.perf_counter_ns() - start)
        if busy:
            k.set_load(abi.LOADGEN_OFF)
            wrong = sum(k.memory.read_u64(counts + 24 * c + 16) for c in range(2))
            errors = k.load_stats()["errors"]
            if errors or wrong or any(f.done() for f in futures):
                raise RuntimeError(f"load did not hold: {errors} workload errors, {wrong} wrong results")
            # the checkers are still running: shutting the kernel down parks and ends them
    return {"enable_p50_ms": statistics.median(enable) / 1e6,
            "enable_p99_ms": common.percentile([e / 1e6 for e in enable], 0.99),
            "disable_p50_ms": statistics.median(disable) / 1e6,
            "disable_p99_ms": common.percentile([d / 1e6 for d in disable], 0.99)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.livepatch")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes of the timed runs")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed samples per mode (median; default {ROUNDS})")
    args = parser.parse_args(argv)
    tlbs = [TlbMode(m) for m in args.tlb.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = examples.build_example(PATCH, Path(tmp))
        cost = call_cost(bundle, tlbs, args.rounds)
        loads = load_times(bundle, Path(tmp))
        transitions = {(t, busy): transition_times(bundle, busy, t) for busy in (False, True) for t in tlbs}
    extra = cost["patched_insn_per_call"] - cost["unpatched_insn_per_call"]
    rows: list[dict[str, object]] = [
        {"measure": "call, unpatched", "tlb": "-", "value": cost["unpatched_insn_per_call"],
         "unit": "guest insn/iteration"},
        {"measure": "call, live-patched", "tlb": "-", "value": cost["patched_insn_per_call"],
         "unit": "guest insn/iteration"},
        {"measure": "extra per patched call (goal <= 60)", "tlb": "-", "value": extra, "unit": "guest insn"}]
    for state, label in (("unpatched", "call, unpatched"), ("patched", "call, live-patched")):
        for t in tlbs:
            rows.append({"measure": label, "tlb": str(t), "value": cost[f"{state}_{t}_ns_per_call"],
                         "unit": "vCPU ns/iteration"})
        if len(tlbs) > 1:
            first, last = (cost[f"{state}_{t}_ns_per_call"] for t in (tlbs[0], tlbs[-1]))
            rows.append({"measure": f"{label}: {tlbs[-1]} / {tlbs[0]}", "tlb": "-", "value": last / first,
                         "unit": "x (vCPU time)"})
        for t in tlbs:
            rows.append({"measure": label, "tlb": str(t), "value": cost[f"{state}_{t}_wall_ns_per_call"],
                         "unit": "wall ns/iteration"})
    rows += [
        {"measure": "load signed bundle -> ready, p50", "tlb": str(tlbs[0]), "value": loads["load_p50_ms"],
         "unit": "ms"},
        {"measure": "load signed bundle -> ready, max", "tlb": str(tlbs[0]), "value": loads["load_max_ms"],
         "unit": "ms"},
        {"measure": "module loader alone, p50", "tlb": str(tlbs[0]), "value": loads["module_loader_p50_ms"],
         "unit": "ms"},
    ]
    for (tlb, busy), t in transitions.items():
        label = "busy" if busy else "idle"
        rows += [{"measure": f"enable -> complete, {label}, p50", "tlb": str(tlb), "value": t["enable_p50_ms"],
                  "unit": "ms"},
                 {"measure": f"enable -> complete, {label}, p99", "tlb": str(tlb), "value": t["enable_p99_ms"],
                  "unit": "ms"},
                 {"measure": f"disable -> complete, {label}, p50", "tlb": str(tlb), "value": t["disable_p50_ms"],
                  "unit": "ms"},
                 {"measure": f"disable -> complete, {label}, p99", "tlb": str(tlb), "value": t["disable_p99_ms"],
                  "unit": "ms"}]
    common.write(
        "livepatch", {"patch": PATCH, "calls_counted": COUNT_CALLS, "calls_timed": TIME_CALLS, "rounds": args.rounds,
                      "cycles": CYCLES, "vcpus_transition": 2, "vcpus_call_cost": 1,
                      "tlb_modes": [str(t) for t in tlbs]},
        rows, {"value": "see unit"},
        notes="A live-patched call runs the entry's mov/bl, ftrace_caller with the per-callsite ops, "
              "klp_ftrace_handler and the replacement. Iterations include the benchmark loop itself. Busy: load "
              "generators in mixed mode and a worker per vCPU calling the patched function in a loop. "
              "Call ns: median of the timed samples, the TLB modes alternating sample by "
              "sample, in CPU time of the vCPU thread (waiting for a core of this shared 2-core host does not "
              "count) and in wall time. tlb: virtual = Unicorn's virtual TLB with the native fill (the default), "
              "cpu = its CPU TLB.")


if __name__ == "__main__":
    main()
