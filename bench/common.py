"""Shared benchmark plumbing: machine facts, percentiles, and writing results/<name>.json and .md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
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
            "packages": versions, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


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
              f"{m['packages']['unicorn']}; {m['date']}. Parameters: `{json.dumps(params)}`", ""]
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
    kernel.call(fn, calls)  # translate first: the counts then see execution only
    counts = []
    for n in (calls, 2 * calls):
        time.sleep(0.05)
        before = vcpu.instructions
        kernel.call(fn, n, timeout=300)
        time.sleep(0.05)
        counts.append(vcpu.instructions - before)
    return float(counts[1] - counts[0]) / calls


def guest_ns_per_call(kernel: Any, fn: str, calls: int, repeats: int = 3) -> float:
    """Wall ns per iteration of ``fn(n)`` on a hook-free kernel: (t(2n) - t(n)) / n, best of ``repeats``."""
    kernel.call(fn, max(calls // 10, 1), timeout=300)
    best = float("inf")
    for _ in range(repeats):
        spent = []
        for n in (calls, 2 * calls):
            start = time.perf_counter_ns()
            kernel.call(fn, n, timeout=300)
            spent.append(time.perf_counter_ns() - start)
        best = min(best, (spent[1] - spent[0]) / calls)
    return best


def stop_daemon(daemon: Any) -> int:
    """Stop a benchmark's daemon process (SIGTERM, then SIGKILL if it hangs); its exit code (-9 when killed)."""
    import subprocess  # noqa: PLC0415 - only the daemon benchmarks need it

    try:
        code: int = daemon.terminate()
    except subprocess.TimeoutExpired:  # never leave it running
        daemon.kill()
        code = -9
    return code
