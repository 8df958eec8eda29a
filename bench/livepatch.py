"""Livepatch costs on the emulated kernel.

    python -m bench.livepatch

- **call cost**: guest instructions of one call of ``klp_demo_target`` unpatched (its entry NOPs run) and
  live-patched (``mov x9, x30; bl ftrace_caller`` -> per-callsite ops -> ``klp_ftrace_handler`` sets
  ``fregs->pc`` -> ``ret x9`` into the replacement); exact counts from a counting run, as (c(2n) - c(n)) / n,
  plus ns per call from hook-free timed runs. Goal: at most 60 guest instructions more than the original.
- **load**: signed bundle -> ready (signature check, build-id and function checks, module load, relocations,
  ftrace records), and the module loader alone.
- **enable / disable**: request -> transition complete, with idle vCPUs and with every vCPU busy running the
  self-checking workload (load generators in mixed mode plus workers calling the patched function).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench import common
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
TIME_CALLS = 1_000_000
CYCLES = 50


def call_cost(bundle: PatchBundle) -> dict[str, float]:
    out: dict[str, float] = {}
    for counting in (True, False):
        with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, count_instructions=counting)) as k:
            lp = Livepatch(k, Ftrace(k))
            lp.load(bundle)
            for state in ("unpatched", "patched"):
                if state == "patched":
                    lp.enable(PATCH)
                if counting:
                    out[f"{state}_insn_per_call"] = common.guest_insn_per_call(k, "bench_klp_target", COUNT_CALLS)
                else:
                    out[f"{state}_ns_per_call"] = common.guest_ns_per_call(k, "bench_klp_target", TIME_CALLS)
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


def transition_times(bundle: PatchBundle, busy: bool) -> dict[str, float]:
    enable, disable = [], []
    with Kernel(KernelConfig(nr_cpus=2)) as k:
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = examples.build_example(PATCH, Path(tmp))
        cost = call_cost(bundle)
        loads = load_times(bundle, Path(tmp))
        idle = transition_times(bundle, busy=False)
        busy = transition_times(bundle, busy=True)
    extra = cost["patched_insn_per_call"] - cost["unpatched_insn_per_call"]
    rows = [
        {"measure": "call, unpatched", "value": cost["unpatched_insn_per_call"], "unit": "guest insn/iteration"},
        {"measure": "call, live-patched", "value": cost["patched_insn_per_call"], "unit": "guest insn/iteration"},
        {"measure": "extra per patched call (goal <= 60)", "value": extra, "unit": "guest insn"},
        {"measure": "call, unpatched", "value": cost["unpatched_ns_per_call"], "unit": "ns/iteration"},
        {"measure": "call, live-patched", "value": cost["patched_ns_per_call"], "unit": "ns/iteration"},
        {"measure": "load signed bundle -> ready, p50", "value": loads["load_p50_ms"], "unit": "ms"},
        {"measure": "load signed bundle -> ready, max", "value": loads["load_max_ms"], "unit": "ms"},
        {"measure": "module loader alone, p50", "value": loads["module_loader_p50_ms"], "unit": "ms"},
    ]
    for label, t in (("idle", idle), ("busy", busy)):
        rows += [{"measure": f"enable -> complete, {label}, p50", "value": t["enable_p50_ms"], "unit": "ms"},
                 {"measure": f"enable -> complete, {label}, p99", "value": t["enable_p99_ms"], "unit": "ms"},
                 {"measure": f"disable -> complete, {label}, p50", "value": t["disable_p50_ms"], "unit": "ms"},
                 {"measure": f"disable -> complete, {label}, p99", "value": t["disable_p99_ms"], "unit": "ms"}]
    common.write(
        "livepatch", {"patch": PATCH, "calls_counted": COUNT_CALLS, "calls_timed": TIME_CALLS, "cycles": CYCLES,
                      "vcpus_transition": 2, "vcpus_call_cost": 1},
        rows, {"value": "see unit"},
        notes="A live-patched call runs the entry's mov/bl, ftrace_caller with the per-callsite ops, "
              "klp_ftrace_handler and the replacement. Iterations include the benchmark loop itself. Busy: load "
              "generators in mixed mode and a worker per vCPU calling the patched function in a loop.")


if __name__ == "__main__":
    main()
