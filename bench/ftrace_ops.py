"""The CALL_OPS benchmark of samples/ftrace/ftrace-ops.c, on the emulated kernel.

    python -m bench.ftrace_ops [--tlb virtual,cpu]

``bench_tracee(n)`` calls the traced function ``tracee_relevant`` n times. R ops (callback ``ops_func_nop``)
filter on it and I ops filter on ``tracee_irrelevant``; each (R, I) of the kernel's published table runs
twice: with per-callsite ops (CALL_OPS) and forced through ``ftrace_list_ops`` (a kernel without CALL_OPS).

- **guest instructions per call**: exact, from a separate counting run (block hook on the only vCPU):
  cost(2n) - cost(n) over n calls, so the host call around it cancels out;
- **ns per call**: timed runs with no hook at all, again as (t(2n) - t(n)) / n; the median of ``ROUNDS``
  samples per TLB mode, the modes taking turns sample by sample on kernels booted side by side.

Also measured: an untraced call (R = I = 0: the two entry NOPs run) and direct calls to
``ftrace_stub_direct_tramp``, in BL range and out of it (a veneer in module text: through ftrace_caller).
The kernel's own numbers (M1 under HVF, Mark Rutland's cover letter) are reproduced next to ours, with the
ratio of our per-callsite ns to theirs. Timed runs repeat on a kernel per TLB mode (``--tlb``, default both:
Unicorn's virtual TLB, the default, and its CPU TLB), alternating sample by sample in one process; ``x_cpu``
is how many times faster the first mode is than the last.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

from bench import common
from daemon.arch.arm64 import insn
from daemon.emu.tlb import TlbMode
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.guest import abi
from daemon.kernel.kernel import Kernel, KernelConfig

CASES = [(0, 0), (0, 1), (0, 2), (0, 10), (0, 100), (1, 0), (1, 1), (1, 2), (1, 10), (1, 100), (2, 0), (10, 0),
         (100, 0)]
CALLS = 100_000
COUNT_CALLS = 2_000
ROUNDS = 5

# Per-call ns published with the CALL_OPS series (kernel-mechanics §2.6): (before, after) by (R, I).
KERNEL_NS = {
    (0, 0): (0.95, 0.95), (0, 1): (0.94, 0.94), (0, 2): (0.94, 0.94), (0, 10): (0.94, 0.94),
    (0, 100): (0.94, 0.94), (1, 0): (14.32, 2.81), (1, 1): (64.68, 2.81), (1, 2): (75.10, 2.81),
    (1, 10): (237.87, 2.81), (1, 100): (1064.43, 2.81), (2, 0): (64.56, 65.03), (10, 0): (227.17, 186.81),
    (100, 0): (1032.94, 1035.50),
}

Setup = Callable[[Ftrace], list[FtraceOps]]


def ops_case(relevant: int, irrelevant: int) -> Setup:
    def setup(ft: Ftrace) -> list[FtraceOps]:
        out = []
        for i in range(relevant + irrelevant):
            ops = FtraceOps(f"ops{i}", "ops_func_nop")
            ft.set_filter(ops, "tracee_relevant" if i < relevant else "tracee_irrelevant")
            ft.register(ops)
            out.append(ops)
        return out
    return setup


def direct_case(far: bool) -> Setup:
    def setup(ft: Ftrace) -> list[FtraceOps]:
        k = ft.kernel
        target = k.kallsyms.addr("ftrace_stub_direct_tramp")
        if far:  # a veneer in module text, out of BL range of kernel text
            addr = abi.MODULES_VADDR + 0x20_0000
            k.memory.write(addr, b"".join(w.to_bytes(4, "little") for w in insn.gen_plt_entry(addr, target)))
            target = addr
        ops = FtraceOps("direct")
        ft.set_filter(ops, "tracee_relevant")
        ft.register_direct(ops, target)
        return [ops]
    return setup


@contextmanager
def attached(ft: Ftrace, setup: Setup) -> Iterator[None]:
    ops = setup(ft)
    try:
        yield
    finally:
        for o in ops:
            if o.flags & OpsFlag.DIRECT:
                ft.unregister_direct(o)
            else:
                ft.unregister(o)


def insn_per_call(ft: Ftrace, setup: Setup) -> float:
    with attached(ft, setup):
        return common.guest_insn_per_call(ft.kernel, "bench_tracee", COUNT_CALLS)


def ns_per_call(fts: dict[TlbMode, Ftrace], setup: Setup, rounds: int) -> dict[TlbMode, common.Sample]:
    """Median ns per iteration on each TLB mode's kernel, the modes alternating sample by sample."""
    with ExitStack() as stack:
        for ft in fts.values():
            stack.enter_context(attached(ft, setup))
            ft.kernel.call("bench_tracee", CALLS // 10, timeout=300)  # translate first
        medians = common.alternating_medians(
            {str(t): partial(common.guest_ns_sample, ft.kernel, "bench_tracee", CALLS) for t, ft in fts.items()},
            rounds)
    return {t: medians[str(t)] for t in fts}


def kernels(count: bool, tlb: TlbMode = TlbMode.VIRTUAL) -> dict[str, Ftrace]:
    out = {}
    for mode, force in (("call_ops", False), ("list", True)):
        k = Kernel(KernelConfig(nr_cpus=1, count_instructions=count, loadgens_per_cpu=0, tlb_mode=tlb)).boot()
        out[mode] = Ftrace(k, force_list=force)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ftrace_ops")
    parser.add_argument("--tlb", default="virtual,cpu", help="comma-separated TLB modes of the timed runs")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed samples per mode (median; default {ROUNDS})")
    args = parser.parse_args(argv)
    tlbs = [TlbMode(m) for m in args.tlb.split(",")]
    cases: list[tuple[str, Setup, tuple[int, int] | None]] = [
        (f"R={r} I={i}", ops_case(r, i), (r, i)) for r, i in CASES]
    cases += [("direct, in BL range", direct_case(False), None), ("direct, out of range", direct_case(True), None)]
    counting = kernels(True)
    timing = {tlb: kernels(False, tlb) for tlb in tlbs}
    rows = []
    base: dict[str, tuple[float, float]] = {}
    try:
        for label, setup, ri in cases:
            row: dict[str, object] = {"case": label}
            before, after = KERNEL_NS.get(ri, (None, None)) if ri else (None, None)
            for mode in ("call_ops", "list"):
                ipc = insn_per_call(counting[mode], setup)
                base.setdefault(mode, (ipc, 0.0))
                row[f"{mode}_insn"] = round(ipc - base[mode][0], 2)
                ns = ns_per_call({tlb: timing[tlb][mode] for tlb in tlbs}, setup, args.rounds)
                for tlb in tlbs:
                    row[f"{mode}_{tlb}_ns"] = round(ns[tlb]["vcpu"], 2)
                if len(tlbs) > 1:
                    row[f"{mode}_x_{tlbs[-1]}"] = _ratio(ns[tlbs[-1]]["vcpu"], ns[tlbs[0]]["vcpu"])
                for tlb in tlbs:
                    row[f"{mode}_{tlb}_wall_ns"] = round(ns[tlb]["wall"], 2)
                if mode == "call_ops":
                    for tlb in tlbs:
                        row[f"x_linux_{tlb}"] = _ratio(ns[tlb]["vcpu"], after) if after else "-"
            row["linux_before_ns"] = before if before is not None else "-"
            row["linux_after_ns"] = after if after is not None else "-"
            rows.append(row)
            print(row, flush=True)
    finally:
        for ft in (*counting.values(), *(f for t in timing.values() for f in t.values())):
            ft.kernel.shutdown()
    baseline = {m: {"insn_per_iteration": b[0]} for m, b in base.items()}
    common.write(
        "ftrace_ops",
        {"calls_timed": CALLS, "calls_counted": COUNT_CALLS, "rounds": args.rounds, "cases": CASES, "vcpus": 1,
         "callback": "ops_func_nop", "baseline_untraced": baseline, "tlb_modes": [str(t) for t in tlbs]},
        rows,
        {"call_ops_insn": "guest insn/call over untraced", "list_insn": "guest insn/call over untraced",
         **{f"{m}_{t}_ns": f"vCPU ns/iteration, {t} TLB" for m in ("call_ops", "list") for t in tlbs},
         **{f"{m}_{t}_wall_ns": f"wall ns/iteration, {t} TLB" for m in ("call_ops", "list") for t in tlbs},
         **{f"{m}_x_{tlbs[-1]}": f"{m}_{tlbs[-1]}_ns / {m}_{tlbs[0]}_ns" for m in ("call_ops", "list")},
         **{f"x_linux_{t}": f"call_ops_{t}_ns / linux_after_ns" for t in tlbs},
         "linux_before_ns": "ns/call, M1 (list)", "linux_after_ns": "ns/call, M1 (CALL_OPS)"},
        notes="samples/ftrace/ftrace-ops.c on the emulated kernel: R ops on the tracee, I ops on another function. "
              "*_insn: exact extra guest instructions per call relative to an untraced call (R=I=0), from a "
              "counting run; *_ns: ns per loop iteration (call + loop) in CPU time of the vCPU thread (waiting for "
              "a core does not count; *_wall_ns: the same runs' wall time), hook-free timed runs, (t(2n) - t(n)) "
              f"/ n, median of {args.rounds} samples per TLB mode, the modes alternating sample by sample (a "
              "2-core host shared with other work: compare within a row; the R=0 rows are within noise of each "
              "other). 'list' forces every site through ftrace_list_ops (no CALL_OPS). Linux columns: per-call "
              "ns from the CALL_OPS cover letter (M1; before = list function, after = CALL_OPS). TLB: virtual = "
              "Unicorn's virtual TLB with the native fill (the default), cpu = its CPU TLB; x_cpu = how many "
              "times faster the virtual TLB is (vCPU time).")
    plot(rows)


def plot(rows: list[dict[str, object]]) -> None:
    import matplotlib  # noqa: PLC0415 - plotting is optional for the measurement itself

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"R=1, I varies": [r for r in rows if str(r["case"]).startswith("R=1 ")],
              "R varies, I=0": [r for r in rows if str(r["case"]) in ("R=1 I=0", "R=2 I=0", "R=10 I=0", "R=100 I=0")]}
    for ax, (title, sel) in zip(axes, series.items(), strict=True):
        xs = [int(str(r["case"]).split("I=")[1]) if "I varies" in title else int(str(r["case"])[2:].split()[0])
              for r in sel]
        for key, label in (("call_ops_insn", "per-callsite ops"), ("list_insn", "forced list")):
            ax.plot(xs, [float(str(r[key])) for r in sel], marker="o", label=label)
        ax.set_xscale("symlog")
        ax.set_yscale("symlog")
        ax.set_xlabel("irrelevant ops" if "I varies" in title else "relevant ops")
        ax.set_ylabel("extra guest instructions per call")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("ftrace CALL_OPS vs ftrace_ops_list_func on the emulated arm64 kernel")
    fig.tight_layout()
    fig.savefig(common.RESULTS / "ftrace_ops.png", dpi=110)


def _ratio(a: float, b: float) -> float | str:
    return round(a / b, 1) if b > 0 else "-"


if __name__ == "__main__":
    main()
