"""``livepatchd stress-patching``: boot the emulated kernel, run its workload, toggle every call site under load.

What it shows, end to end on the real machine: the image boots on N vCPUs; every patchable function is
initialised from *compiled* to *disabled* in one stop-machine batch; load generators on every vCPU call the
10,000-function corpus and check each result while the host flips every call site between NOP and
``BL count_tramp`` in batches; at the end, the hits counted by the trampoline equal the traced calls the load
generators made while sites were enabled, and no result was wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from daemon.arch.arm64 import callsite
from daemon.arch.arm64.callsite import DataPatch, InsnPatch
from daemon.arch.arm64.patching import TextPatcher
from daemon.guest import abi
from daemon.kernel.kernel import Kernel, KernelConfig


@dataclass
class SiteToggler:
    """Flips every record between disabled (NOP) and enabled (BL count_tramp), arming the hit count with it."""

    kernel: Kernel
    patcher: TextPatcher
    rec_ips: list[int]
    enabled: bool = False
    _plans: dict[bool, list[InsnPatch]] = field(default_factory=dict)

    @classmethod
    def create(cls, kernel: Kernel) -> SiteToggler:
        rec_ips = [callsite.ftrace_call_adjust(e) for e in kernel.image.mcount_loc()]
        patcher = TextPatcher(kernel)
        patcher.apply([callsite.init_nop(ip) for ip in rec_ips])
        return cls(kernel, patcher, rec_ips)

    def plan(self, enable: bool) -> list[InsnPatch]:
        if enable not in self._plans:
            tramp = self.kernel.kallsyms.addr("count_tramp")
            make = callsite.make_call if enable else callsite.make_nop
            self._plans[enable] = [make(ip, tramp) for ip in self.rec_ips]
        return self._plans[enable]

    def toggle(self) -> int:
        enable = not self.enabled
        armed = DataPatch(self.kernel.boot_params.addr_of("count_armed"), int(enable))
        result = self.patcher.apply(self.plan(enable), [armed])
        self.enabled = enable
        return result.pause_ns


def run_stress_patching(nr_cpus: int = 2, toggles: int = 200, gap_ms: float = 2.0) -> int:
    print(f"booting the emulated arm64 kernel on {nr_cpus} vCPUs ...")
    with Kernel(KernelConfig(nr_cpus=nr_cpus)) as kernel:
        img = kernel.image
        print(f"  image {img.path.name}: build id {img.build_id[:16]}, {len(kernel.kallsyms)} symbols, "
              f"{len(img.mcount_loc())} patchable call sites")
        print(f"  /proc/cmdline: {kernel.read_string('proc_cmdline_read').strip()}")
        pids = {kernel.call('__arm64_sys_getpid', 0, cpu=c) for c in range(nr_cpus)}
        print(f"  getpid() from each CPU's workers: {sorted(pids)}")
        t0 = time.perf_counter()
        toggler = SiteToggler.create(kernel)
        print(f"  ftrace_init_nop on {len(toggler.rec_ips)} sites in one batch: "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
        kernel.set_load(abi.LOADGEN_CORPUS)
        time.sleep(0.2)
        print(f"toggling all {len(toggler.rec_ips)} sites NOP <-> BL count_tramp {toggles} times under load ...")
        pauses: list[int] = []
        start = time.perf_counter()
        for _ in range(toggles):
            pauses.append(toggler.toggle())
            time.sleep(gap_ms / 1e3)
        if toggler.enabled:
            pauses.append(toggler.toggle())
        elapsed = time.perf_counter() - start
        kernel.set_load(abi.LOADGEN_OFF)
        time.sleep(0.05)
        stats = kernel.load_stats()
        kernel.machine.check()
        pauses.sort()
        p50, p99 = pauses[len(pauses) // 2] / 1e6, pauses[int(len(pauses) * 0.99)] / 1e6
        print(f"  batches applied:        {len(pauses)} ({len(pauses) * len(toggler.rec_ips)} site writes "
              f"in {elapsed:.2f} s)")
        print(f"  stop-machine pause:     p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {pauses[-1] / 1e6:.2f} ms")
        print(f"  corpus calls served:    {stats['calls']} in {stats['rounds']} rounds, wrong results: "
              f"{stats['errors']}")
        print(f"  trampoline hits:        {stats['trace_hits']} (expected from traced calls: "
              f"{stats['expect_hits']})")
        ok = stats["errors"] == 0 and stats["trace_hits"] == stats["expect_hits"]
        print("result: " + ("OK — every result correct, every traced call counted once" if ok else "FAILED"))
        return 0 if ok else 1
