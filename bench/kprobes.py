"""The cost of one kprobe hit on the emulated kernel, by the way the probed instruction is handled.

    python -m bench.kprobes

``getpid_loop(n)`` calls ``__arm64_sys_getpid`` n times (``nop; nop; mrs x8, sp_el0; ldr; ldr; ret``); one probe
on it at a time:

- **simulate:nop** at ``+0`` (the entry NOP of a kernel without ftrace initialised): one BRK exception, the
  guest's handler simulates and erets to the next instruction;
- **simulate:br** on the ``ret``: one exception, the handler sets pc = x30;
- **step** on ``mrs x8, sp_el0`` (``+8``): two exceptions, the probe's BRK and the slot's ``BRK #6`` after the
  instruction ran out of line;
- **step+record+post**: the same with the register ring written by the pre and the post handler.

Per hit: exact guest instructions (counting run, (c(2n) - c(n)) / n, minus the unprobed call), wall ns
(hook-free timed runs: median of 5, minus the unprobed call; noisy on a shared machine) and host-emulated
exception entries (``VCpu.debug_exceptions``: the one host step per exception, unicorn not running guest
vectors itself).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench import common
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.kprobes.core import Kprobes

FN = "getpid_loop"
COUNT_CALLS = 2_000
TIME_CALLS = 20_000
CASES: dict[str, tuple[str, dict[str, bool]] | None] = {
    "unprobed": None,
    "simulate:nop": ("__arm64_sys_getpid", {}),
    "simulate:br": ("__arm64_sys_getpid+0x14", {}),
    "step": ("__arm64_sys_getpid+0x8", {}),
    "step+record+post": ("__arm64_sys_getpid+0x8", {"record": True, "post": True}),
}


def _ns_per_call(kernel: Kernel, repeats: int = 5) -> float:
    """Median wall ns per iteration of ``FN(TIME_CALLS)``: a hit costs thousands of times the call, so a plain
    ratio, not the (t(2n) - t(n)) / n difference, which a busy machine's noise swamps."""
    kernel.call(FN, TIME_CALLS // 10, timeout=300)
    spent = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        kernel.call(FN, TIME_CALLS, timeout=300)
        spent.append((time.perf_counter_ns() - start) / TIME_CALLS)
    return statistics.median(spent)


def measure() -> list[dict[str, Any]]:
    raw: dict[str, dict[str, float]] = {name: {} for name in CASES}
    for counting in (True, False):
        with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0, count_instructions=counting)) as k:
            kp = Kprobes(k)
            vcpu = k.machine.vcpus[0]
            for name, case in CASES.items():
                p = None
                if case is not None:
                    target, flags = case
                    p = kp.register("bench", target, record=flags.get("record", False), post=flags.get("post", False))
                    raw[name]["mode"] = p.mode  # type: ignore[assignment]
                if counting:
                    before = vcpu.debug_exceptions
                    raw[name]["insn"] = common.guest_insn_per_call(k, FN, COUNT_CALLS)
                    hits = kp.info(p)["hits"] if p is not None else 0
                    raw[name]["exc"] = (vcpu.debug_exceptions - before) / hits if hits else 0.0
                else:
                    raw[name]["ns"] = _ns_per_call(k)
                if p is not None:
                    kp.unregister("bench")
                    kp.drain()
    base = raw["unprobed"]
    return [{"probe": name, "mode": str(r.get("mode", "-")), "insn_per_hit": round(r["insn"] - base["insn"], 1),
             "ns_per_hit": round(r["ns"] - base["ns"], 1), "host_exception_entries_per_hit": round(r["exc"], 2),
             "call_insn": round(r["insn"], 1), "call_ns": round(r["ns"], 1)} for name, r in raw.items()]


def main() -> None:
    rows = measure()
    common.write(
        "kprobes", {"function": FN, "count_calls": COUNT_CALLS, "time_calls": TIME_CALLS, "nr_cpus": 1}, rows,
        {"insn_per_hit": "guest insn", "ns_per_hit": "ns", "call_insn": "guest insn", "call_ns": "ns"},
        notes="One kprobe on __arm64_sys_getpid, per hit beyond the unprobed call. Each BRK exception costs one "
              "host step (unicorn reports the BRK to the interrupt hook; the host writes ELR/SPSR/ESR_EL1, masks "
              "DAIF and sets pc = VBAR_EL1 + 0x200); everything else is guest code (kprobes_entry.S, kprobes.c).")


if __name__ == "__main__":
    main()
