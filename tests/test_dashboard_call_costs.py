"""The dashboard's call-cost model against a counting kernel (exact guest instructions per call), and the host
table it builds from a retained state."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from clients.dashboard import call_costs as cc
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps
from daemon.kernel.kernel import Kernel, KernelConfig

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
CALLBACKS = {"nop": "ops_func_nop", "count": "ops_func_count"}


def insn_per_call(kernel: Kernel, calls: int) -> float:
    """Guest instructions per iteration of bench_tracee(n): (count(2n) - count(n)) / n, the vCPU idle before and
    after each run so both windows hold the same host-call path."""
    vcpu = kernel.machine.vcpus[0]
    kernel.call("bench_tracee", calls)  # translated first: the counts see execution only
    counts = []
    for n in (calls, 2 * calls):
        time.sleep(0.05)
        before = vcpu.instructions
        kernel.call("bench_tracee", n, timeout=300)
        time.sleep(0.05)
        counts.append(vcpu.instructions - before)
    return float(counts[1] - counts[0]) / calls


def test_the_model_is_what_a_counting_kernel_measures() -> None:
    k = Kernel(KernelConfig(nr_cpus=1, count_instructions=True, loadgens_per_cpu=0)).boot()
    try:
        ft = Ftrace(k)

        def extra(on_site: list[str], elsewhere: int = 0) -> float:
            ops = []
            for i, cb in enumerate(on_site + ["nop"] * elsewhere):
                o = FtraceOps(f"cost{i}", CALLBACKS[cb])
                ft.set_filter(o, "tracee_relevant" if i < len(on_site) else "tracee_irrelevant")
                ft.register(o)
                ops.append(o)
            try:
                return insn_per_call(k, 400)
            finally:
                for o in ops:
                    ft.unregister(o)

        base = extra([])
        body = cc.CALLBACK_BODY
        assert extra(["nop"]) - base == cc.direct(body["nop"])
        assert extra(["count"], elsewhere=2) - base == cc.direct(body["count"]), "alone on its site: CALL_OPS"
        assert extra(["count", "nop"]) - base == cc.listed([body["count"], body["nop"]], 0)
        assert extra(["nop", "nop", "nop"], elsewhere=2) - base == cc.listed([body["nop"]] * 3, 2)
    finally:
        k.shutdown()


def test_constants_taken_from_the_benchmarks_match_their_committed_results() -> None:
    lp = json.loads((RESULTS / "livepatch.json").read_text())
    extra = next(r["value"] for r in lp["results"] if r["measure"].startswith("extra per patched call"))
    assert cc.direct(cc.KLP_BODY) == extra
    ops = {r["case"]: r for r in json.loads((RESULTS / "ftrace_ops.json").read_text())["results"]}
    assert cc.DIRECT_TRAMPOLINE["in BL range"] == ops["direct, in BL range"]["call_ops_insn"]
    assert cc.DIRECT_TRAMPOLINE["out of range"] == ops["direct, out of range"]["call_ops_insn"]
    assert ops["R=10 I=0"]["list_insn"] == cc.listed([cc.CALLBACK_BODY["nop"]] * 10, 0)
    assert ops["R=1 I=100"]["list_insn"] == cc.listed([cc.CALLBACK_BODY["nop"]], 100)


def test_a_hosts_table_from_its_state() -> None:
    state: dict[str, Any] = {"components": {
        "ftrace": {"ops": [{"name": "a", "callback": "count", "filter": "x", "notrace": None, "functions": 3},
                           {"name": "b", "callback": "nop", "filter": "y", "notrace": None, "functions": 1}],
                   "hijacks": [{"name": "h", "mode": "direct", "function": "f", "sympos": 0, "target": "t"}],
                   "ops_registered": 4, "enabled_functions": 6},
        "livepatch": {"patches": [{"name": "p", "enabled": True, "funcs": ["f1"]},
                                  {"name": "off", "enabled": False, "funcs": ["f2"]}]}}}
    t = cc.table(state)
    assert t is not None
    rows = {r["name"]: r for r in t["rows"]}
    assert set(rows) == {"a", "b", "p", "h"}
    assert [rows[n]["direct"] for n in ("a", "b", "p")] == [45, 39, 56]
    assert rows["a"]["shared"] == cc.listed([12, 6], 2)
    assert rows["h"]["direct"] == 3
    assert (t["covered"], t["shared_sites"]) == (6, False)
    state["components"]["ftrace"]["enabled_functions"] = 5
    assert cc.table(state)["shared_sites"] is True  # type: ignore[index]
    assert cc.table({"components": {}}) is None
    assert cc.table(None) is None
    assert cc.table({"components": {"ftrace": {"ops": ["junk", {"name": "z"}]}}})["rows"][0]["direct"] == 39  # type: ignore[index]
