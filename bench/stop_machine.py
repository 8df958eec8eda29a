"""Stop-machine pause for text-patching batches of 1, 100, 1,000 and 10,000 call sites, under load.

    python -m bench.stop_machine [--tlb virtual,cpu]

Every vCPU runs the self-checking corpus load while the host applies batches that flip the first N call
sites between NOP and ``BL count_tramp``. The pause is measured from raising the stop flags until every vCPU
has dropped its stale translations and resumed; it is split into park (all vCPUs at a safe point), apply
(compare and write, vectorised) and resume (per-engine invalidation and wake-up). Goal: a 10,000-site batch
pauses the vCPUs for at most 5 ms p99 on this 2-core machine. Both TLB modes (``--tlb``, default both) have a
kernel booted side by side; they take turns batch size by batch size over ``ROUNDS`` rounds, the load running
only on the kernel being measured, so a burst of other work on the host falls on both alike: a text change drops
translations, not TLB entries, and the modes should pause alike.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import common
from daemon.arch.arm64 import callsite
from daemon.emu.machine import Pause
from daemon.emu.tlb import TlbMode
from daemon.guest import abi
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.stress_patching import SiteToggler

SIZES = (1, 100, 1_000, 10_000)
REPEATS = 300
ROUNDS = 3
NR_CPUS = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stop_machine")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes, taking turns")
    modes = [TlbMode(m) for m in parser.parse_args(argv).tlb.split(",")]
    kernels = {m: Kernel(KernelConfig(nr_cpus=NR_CPUS, tlb_mode=m)).boot() for m in modes}
    try:
        togglers = {m: SiteToggler.create(k) for m, k in kernels.items()}
        pauses: dict[tuple[TlbMode, int], list[Pause]] = {(m, n): [] for m in modes for n in SIZES}
        for r in range(ROUNDS):
            for size in SIZES:
                for mode in modes if r % 2 == 0 else reversed(modes):
                    pauses[(mode, size)] += batches(kernels[mode], togglers[mode], size, REPEATS // ROUNDS)
        calls = errors = 0
        for k in kernels.values():
            stats = k.load_stats()
            k.machine.check()
            calls, errors = calls + int(stats["calls"]), errors + int(stats["errors"])
    finally:
        for k in kernels.values():
            k.shutdown()
    if errors:
        raise SystemExit(f"load generators saw {errors} wrong results")
    rows = [row(mode, size, pauses[(mode, size)]) for mode in modes for size in SIZES]
    write(rows, modes, calls, errors)


def batches(kernel: Kernel, toggler: SiteToggler, size: int, repeats: int) -> list[Pause]:
    """``repeats`` batches flipping the first ``size`` sites on and off, with the corpus load on every vCPU."""
    tramp = kernel.kallsyms.addr("count_tramp")
    ips = toggler.rec_ips[:size]
    on = [callsite.make_call(ip, tramp) for ip in ips]
    off = [callsite.make_nop(ip, tramp) for ip in ips]
    kernel.set_load(abi.LOADGEN_CORPUS)
    time.sleep(0.2)
    start = kernel.machine.pauses_total
    for i in range(repeats):
        toggler.patcher.apply(on if i % 2 == 0 else off)
        time.sleep(0.001)
    if repeats % 2:
        toggler.patcher.apply(off)
    got = list(kernel.machine.pauses)[-(kernel.machine.pauses_total - start):][:repeats]
    kernel.set_load(abi.LOADGEN_OFF)
    time.sleep(0.05)
    return got


def row(mode: TlbMode, size: int, pauses: list[Pause]) -> dict[str, object]:
    total = [p.pause_ns / 1e6 for p in pauses]
    park = [(p.parked_ns - p.first_parked_ns) / 1e6 for p in pauses]
    apply = [(p.applied_ns - p.parked_ns) / 1e6 for p in pauses]
    resume = [(p.resumed_ns - p.applied_ns) / 1e6 for p in pauses]
    request = [p.resumed_ns / 1e6 for p in pauses]
    p50 = common.percentile(total, 0.5)
    return {"tlb": str(mode), "sites": size, "pause_p50": p50, "pause_p99": common.percentile(total, 0.99),
            "pause_max": max(total), "park_p50": common.percentile(park, 0.5),
            "apply_p50": common.percentile(apply, 0.5), "resume_p50": common.percentile(resume, 0.5),
            "sites_per_s": size / (p50 / 1e3), "request_to_resumed_p50": common.percentile(request, 0.5),
            "request_to_resumed_p99": common.percentile(request, 0.99)}


def write(rows: list[dict[str, object]], modes: list[TlbMode], calls: int, errors: int) -> None:
    common.write(
        "stop_machine",
        {"sizes": list(SIZES), "repeats": REPEATS, "rounds": ROUNDS, "vcpus": NR_CPUS, "load": "corpus, every vCPU",
         "tlb_modes": [str(m) for m in modes]},
        rows,
        {"pause_p50": "ms", "pause_p99": "ms", "pause_max": "ms", "park_p50": "ms", "apply_p50": "ms",
         "resume_p50": "ms", "sites_per_s": "sites/s", "request_to_resumed_p50": "ms", "request_to_resumed_p99": "ms"},
        notes=f"Modes taking turns batch size by batch size over {ROUNDS} rounds (the load only on the kernel "
              f"measured). Pause = first vCPU parked -> last vCPU resumed after invalidating its own engine "
              f"(timed on the vCPU "
              f"threads): park = first to last parked, apply = compare and write, resume = release, invalidation "
              f"and wake-up. request_to_resumed adds the wait for every vCPU to reach a safe point. "
              f"tlb: virtual = Unicorn's virtual TLB with the native fill (the default), cpu = its CPU TLB. "
              f"Load generators made {calls} checked calls during the run, {errors} wrong.")
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in zip(modes, ("-", "--"), strict=False):
        sel = [r for r in rows if r["tlb"] == str(mode)]
        xs = [float(str(r["sites"])) for r in sel]
        for key, label in (("pause_p50", "p50"), ("pause_p99", "p99")):
            ax.plot(xs, [float(str(r[key])) for r in sel], marker="o", linestyle=style, label=f"{label}, {mode} TLB")
    ax.axhline(5.0, color="grey", linestyle="--", label="goal: 5 ms p99 at 10,000 sites")
    ax.set_xscale("log")
    ax.set_xlabel("call sites per batch")
    ax.set_ylabel("pause (ms)")
    ax.set_title(f"Stop-machine pause, {NR_CPUS} vCPUs under load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(common.RESULTS / "stop_machine.png", dpi=100)


if __name__ == "__main__":
    main()
