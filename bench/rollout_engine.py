"""The orchestrator's own CPU per host, without MQTT: the rollout engine taking one patch to N twin hosts
(``clients.rollout.rehearse``: the engine, its SQLite store and the seeded twins on a simulated clock), this tree
against another revision's engine in the same run, rounds alternating.

``python -m bench.rollout_engine [--hosts 1000] [--rounds 3] [--baseline-rev 99d6cfd]``: each round runs one
child process per revision (the baseline's ``clients`` and ``schemas`` from ``git archive``), which reports the
process CPU time of the rehearsal divided by the hosts. Writes ``bench/results/rollout_engine.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
from clients.rollout.plan import HostInfo
from clients.rollout.rehearse import rehearse
from schemas.rollout import RolloutSpec

build = "a1" * 20
n = int(sys.argv[1])
path = Path(tempfile.mkdtemp()) / "b.lpb"
path.write_text(json.dumps({"format": "livepatchd-bundle/1", "manifest": {"name": "fix", "build_id": build},
                            "object": "", "signature": {"key_id": "k" * 64, "value": "x"}}))
fleet = {f"h-{i:04d}": HostInfo(f"h-{i:04d}", build) for i in range(n)}
spec = RolloutSpec.model_validate({"name": "r", "patch": "fix", "bundles": {build: str(path)},
                                   "targets": {"globs": ["*"]}, "waves": {"count": 4}, "verify": False})
t0 = time.process_time()
doc = asyncio.run(rehearse(spec, fleet, [], 0))
print(json.dumps({"cpu_s": time.process_time() - t0, "succeeded": doc["counts"].get("SUCCEEDED", 0)}))
"""


def one(tree: Path, hosts: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(hosts)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=True)
    got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_engine", description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-rev", default="99d6cfd", help="the revision to compare with (git)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="lpd-engine-base-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev, "clients", "schemas"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        runs: dict[str, list[float]] = {"baseline": [], "this tree": []}
        for _ in range(args.rounds):
            for label, tree in (("baseline", base), ("this tree", ROOT)):
                got = one(tree, args.hosts)
                assert got["succeeded"] == args.hosts, got
                runs[label].append(1000 * got["cpu_s"] / args.hosts)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [{"engine": k, "cpu_ms_per_host_median": round(med[k], 3),
             "cpu_ms_per_host_runs": " ".join(f"{x:.3f}" for x in v)} for k, v in runs.items()]
    write("rollout_engine", {"hosts": args.hosts, "rounds": args.rounds, "baseline_rev": args.baseline_rev,
                             "waves": 4}, rows, {"cpu_ms_per_host_median": "ms"},
          "The rollout engine alone (store, decisions, per-host steps) taking one patch to N twin hosts on a "
          "simulated clock, no MQTT: process CPU per host, this tree against the baseline revision, rounds "
          "alternating in one run. The end-to-end orchestrator figure (bench.rollout) adds the MQTT and event-loop "
          "work per message.",
          figures={"ratio_baseline_over_this": round(med["baseline"] / med["this tree"], 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
