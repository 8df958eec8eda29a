"""Shared benchmark plumbing: machine facts, percentiles, and writing results/<name>.json and .md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("unicorn", "numpy", "ziglang"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform(),
            "packages": versions, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write(name: str, params: dict[str, Any], rows: list[dict[str, Any]], units: dict[str, str],
          notes: str = "", *, figures: dict[str, Any] | None = None) -> Path:
    """Write results/<name>.json (everything; ``figures``: measurements that fit no row) and results/<name>.md
    (a table), and print the table."""
    RESULTS.mkdir(exist_ok=True)
    doc = {"benchmark": name, "parameters": params, "units": units, "results": rows, "machine": machine_info(),
           "notes": notes, **({"figures": figures} if figures else {})}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    cols = list(rows[0])
    header = [f"{c} ({units[c]})" if c in units else c for c in cols]
    lines = [f"# {name}", "", notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    m = doc["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, unicorn "
              f"{m['packages']['unicorn']}; {m['date']}, load average {m['loadavg']}. "
              f"Parameters: `{json.dumps(params)}`", ""]
    table = "\n".join(lines)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return path


def guest_insn_per_call(kernel: Any, fn: str, calls: int) -> float:
    """Exact guest instructions per iteration of ``fn(n)``: (count(2n) - count(n)) / n on a counting kernel.

    The vCPU is let reach its idle wait before and after each run, so both windows hold the same host-call
    path (wake, run the job, report, go idle) and only the ``calls`` extra iterations differ.
    """
    vcpu = kernel.machine.vcpus[0]
    kernel.call(fn, calls, timeout=300)  # translate first: the counts then see execution only
    counts = []
    for n in (calls, 2 * calls):
        time.sleep(0.05)
        before = vcpu.instructions
        kernel.call(fn, n, timeout=300)
        time.sleep(0.05)
        counts.append(vcpu.instructions - before)
    return float(counts[1] - counts[0]) / calls


Sample = dict[str, float]
"""One timed sample: ``wall`` ns and ``vcpu`` ns (CPU time of the vCPU thread) per iteration."""


def _thread_cpu_ns(kernel: Any, cpu: int) -> int:
    thread = kernel.machine.vcpus[cpu].thread
    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))


def guest_ns_sample(kernel: Any, fn: str, calls: int, *args: int, cpu: int = 0) -> Sample:
    """Ns per iteration of ``fn(n, *args)`` as (t(2n) - t(n)) / n (the host call cancels): wall time, and the
    CPU time of the vCPU's thread, which waiting for a core shared with other work on the host does not inflate."""
    wall, vcpu = [], []
    for n in (calls, 2 * calls):
        start, start_cpu = time.perf_counter_ns(), _thread_cpu_ns(kernel, cpu)
        kernel.call(fn, n, *args, cpu=cpu, timeout=300)
        wall.append(time.perf_counter_ns() - start)
        vcpu.append(_thread_cpu_ns(kernel, cpu) - start_cpu)
    return {"wall": (wall[1] - wall[0]) / calls, "vcpu": (vcpu[1] - vcpu[0]) / calls}


def alternating_medians(sample: Mapping[str, Callable[[], Sample]], rounds: int) -> dict[str, Sample]:
    """Median of ``rounds`` samples per variant (each measure on its own), the variants taking turns (AB, BA,
    ...) so that a burst of load from other work on the host falls on every variant alike."""
    names = list(sample)
    got: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            got[name].append(sample[name]())
    return {n: {k: statistics.median(s[k] for s in v) for k in v[0]} for n, v in got.items()}


def stop_daemon(daemon: Any) -> int:
    """Stop a benchmark's daemon process (SIGTERM, then SIGKILL if it hangs); its exit code (-9 when killed)."""
    import subprocess  # noqa: PLC0415 - only the daemon benchmarks need it

    try:
        code: int = daemon.terminate()
    except subprocess.TimeoutExpired:  # never leave it running
        daemon.kill()
        code = -9
    return code
