"""One patch across a fleet of real simulated hosts, by the orchestrator: time to 100%, hosts/s, orchestrator
CPU and RSS per host, MQTT messages per host; and a faulty fleet where an abort criterion trips and the rollback
leaves no host patched.

``python -m bench.rollout [--hosts 200] [--waves 4] [--fault-hosts 100]``: a private Mosquitto; ``livepatchd
fleet`` (real hosts: each a full daemon with its own emulated kernel, in one worker process per core);
``livepatchd orchestrator`` as its own process (its CPU and RSS read from /proc); an observer counting every
request and reply on the hosts' topics. Phase 1: a fault-free fleet, waves of equal size, no rate limit, all
SUCCEEDED. Phase 2: a fleet with 5% uninterruptible stalls and 2% crashes (by count, seeded), an abort
criterion on STALLED with action rollback. Writes ``bench/results/rollout.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import RESULTS, write

TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Observer:
    """Counts host requests and replies, and knows which hosts are online (retained statuses)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: Counter[str] = Counter()
        self.online: dict[str, bool] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.counting = False

    async def run(self) -> None:
        host, port = self.url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port), identifier=f"bench-obs-{os.getpid()}",
                                  protocol=aiomqtt.ProtocolVersion.V311, max_queued_incoming_messages=0) as c:
            for t in ("livepatch/v1/+/status", "livepatch/v1/+/state", "livepatch/v1/+/request/#",
                      "livepatch/v1/+/reply/#"):
                await c.subscribe(t, qos=0)
            async for m in c.messages:
                parts = m.topic.value.split("/")
                h, kind = parts[2], parts[3]
                if h.startswith("_"):
                    continue
                if kind == "status" and m.payload:
                    self.online[h] = json.loads(m.payload).get("state") == "online"
                elif kind == "state" and m.payload:
                    self.states[h] = json.loads(m.payload)
                elif self.counting and kind in ("request", "reply"):
                    self.messages[h] += 1

    def patched(self, patch: str) -> list[str]:
        out = []
        for h, doc in self.states.items():
            lp = (doc.get("components") or {}).get("livepatch") or {}
            if any(p.get("name") == patch and p.get("enabled") for p in lp.get("patches") or []):
                out.append(h)
        return out


def bundle(work: Path) -> tuple[Path, Path, str]:
    """A signed example patch for the shipped kernel build, and the public key the hosts trust."""
    from daemon.guest.build import IMAGE_PATH  # noqa: PLC0415
    from daemon.kernel.kernel import load_image  # noqa: PLC0415
    from daemon.livepatch import examples  # noqa: PLC0415
    from patchformat import signing  # noqa: PLC0415

    build_id = load_image(IMAGE_PATH)[0].build_id
    key = signing.generate_key()
    signing.save_public_key(key.public_key(), work / "bench.pub")
    b = signing.sign(examples.build_examples(work / "ex", build_id)["livepatch_sleeper"], key)
    path = work / "sleeper.lpb"
    path.write_bytes(b.to_bytes())
    return path, work / "bench.pub", build_id


async def phase(url: str, work: Path, name: str, n: int, waves: int, fleet_spec: dict[str, Any],  # noqa: PLR0917
                rollout: dict[str, Any], bundle_path: Path, pub: Path, build_id: str,
                profile: Path | None = None) -> dict[str, Any]:
    from clients.sdk import RolloutClient  # noqa: PLC0415

    spec_file = work / f"{name}-fleet.json"
    spec_file.write_text(json.dumps({"hosts": n, "prefix": name, **fleet_spec}))
    log = (work / f"{name}.log").open("ab")
    fleet = subprocess.Popen([sys.executable, "-m", "daemon.cli", "fleet", "--spec", str(spec_file), "--broker", url,
                              "--state-dir", str(work / name), "--trusted-key", str(pub), "--log-level", "error",
                              "--no-dashboard"],  # nothing else on the machine while it is measured
                             stdout=log, stderr=subprocess.STDOUT)
    profiler = ["-m", "pyinstrument", "-r", "text", "-o", str(profile), "--show-all"] if profile else []
    orch = subprocess.Popen([sys.executable, *profiler, "-m", "daemon.cli", "orchestrator", "--broker", url, "--db",
                             str(work / f"{name}.sqlite3"), "--poll", "0.2", "--worker", name],
                            stdout=log, stderr=subprocess.STDOUT)
    obs = Observer(url)
    watcher = asyncio.get_running_loop().create_task(obs.run())
    t_fleet = time.perf_counter()
    try:
        while sum(obs.online.get(f"{name}-{i:04d}", False) for i in range(n)) < n:
            if fleet.poll() is not None:
                raise RuntimeError(f"the fleet exited: see {work / name}.log")
            await asyncio.sleep(0.5)
        online_s = time.perf_counter() - t_fleet
        async with RolloutClient(url, protocol="3.1.1", timeout=60) as r:
            spec = {"name": name, "patch": "livepatch_sleeper", "bundles": {build_id: str(bundle_path)},
                    "targets": {"globs": [f"{name}-*"]}, "waves": {"count": waves}, **rollout}
            while True:  # the orchestrator has seen every host's retained state
                try:
                    dry = await r.dry_run(spec)
                    if sum(len(w) for w in dry.waves) == n:
                        break
                except Exception:  # noqa: BLE001 - not every host seen yet
                    pass
                await asyncio.sleep(0.5)
            await r.create(spec)
            cpu0, obs.counting = cpu_s(orch.pid), True
            t0 = time.perf_counter()
            await r.start(name)
            final = None
            async for doc in r.watch(name):
                final = doc
                if doc.state in ("COMPLETED", "CANCELED", "ROLLED_BACK"):
                    break
            elapsed = time.perf_counter() - t0
            cpu = cpu_s(orch.pid) - cpu0
            obs.counting = False
            await asyncio.sleep(2)  # the last state documents
            report = (await r.report(name)).report
        assert final is not None
        return {"name": name, "hosts": n, "online_s": round(online_s, 1), "state": final.state,
                "counts": final.counts, "elapsed_s": round(elapsed, 2), "hosts_per_s": round(n / elapsed, 1),
                "orch_cpu_s": round(cpu, 2), "orch_cpu_ms_per_host": round(1000 * cpu / n, 2),
                "orch_rss_mb": round(rss_mb(orch.pid), 1), "orch_peak_rss_mb": round(rss_mb(orch.pid, "VmHWM"), 1),
                "mqtt_msgs_per_host": round(sum(obs.messages.values()) / n, 1),
                "patched_after": sum(h.startswith(f"{name}-") for h in obs.patched("livepatch_sleeper")),
                "report": report}
    finally:
        watcher.cancel()
        for p in (orch, fleet):
            p.terminate()
        for p in (orch, fleet):
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()


def check_abort(report: dict[str, Any], threshold: float, min_executed: int) -> dict[str, Any]:
    """Replay the criterion over the audit trail: the trip must come at the first moment the arithmetic says."""
    hosts = report["hosts"]
    ab = report.get("abort") or {}
    t_trip = ab.get("t")
    if t_trip is None:
        return {"tripped": False}
    # each host counts from the moment it is executed (done) or stalled, in that order of time
    marks = []
    for h in hosts:
        stalled = next((t for t, s in h["history"] if s == "STALLED"), None)
        done = next((t for t, s in h["history"] if s in ("SUCCEEDED", "VERIFIED", "FAILED", "TIMED_OUT",
                                                         "REJECTED", "REVERTED")), None)
        times = [t for t in (stalled, done) if t is not None]
        if times:
            marks.append((min(times), stalled is not None))
    marks.sort()
    bad, first_ok = 0, None
    for pool, (t, was_stalled) in enumerate(marks, start=1):
        bad += was_stalled
        if pool >= min_executed and 100.0 * bad / pool >= threshold:
            first_ok = t
            break
    return {"tripped": True, "trip_t": t_trip, "first_t_by_arithmetic": first_ok, "reason": ab.get("reason")}


async def amain(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="lpd-rollout-bench-"))
    port = _free_port()
    (work / "m.conf").write_text(f"listener {port} 127.0.0.1\nset_tcp_nodelay true\npersistence false\n"
                                 "allow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 0\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "m.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"mqtt://127.0.0.1:{port}"
    try:
        path, pub, build_id = bundle(work)
        clean = await phase(url, work, "clean", args.hosts, args.waves, {}, {}, path, pub, build_id, args.profile)
        if args.profile is not None or args.clean_only:  # a trial, not the measurement: nothing is written
            print({k: v for k, v in clean.items() if k != "report"}, flush=True)
            if args.profile is not None:
                print(f"profile of the orchestrator: {args.profile}")
            shutil.rmtree(work, ignore_errors=True)
            return 0
        print({k: v for k, v in clean.items() if k != "report"}, flush=True)
        faulty = await phase(
            url, work, "faulty", args.fault_hosts, 2,
            {"seed": 11, "faults": [
                {"kind": "stall", "count": max(1, round(0.05 * args.fault_hosts)), "mode": "uninterruptible"},
                {"kind": "crash", "count": max(1, round(0.02 * args.fault_hosts)), "when": "transition",
                 "reboot_after_s": 2}]},
            {"stall": {"wait_s": 3, "then_wait_s": 3}, "timeouts": {"enable_s": 5},
             "rate": {"per_minute": 600}, "abort": {"action": "rollback", "criteria": [
                 {"failure_type": "STALLED", "threshold_pct": 4, "min_executed": 20}]}},
            path, pub, build_id)
        print({k: v for k, v in faulty.items() if k != "report"}, flush=True)
    finally:
        broker.terminate()
        broker.wait(10)
    arithmetic = check_abort(faulty["report"], 4, 20)
    rows = [{k: v for k, v in r.items() if k not in ("report", "counts")} | {"final_counts": json.dumps(r["counts"])}
            for r in (clean, faulty)]
    (RESULTS / "rollout-report-faulty.json").write_text(json.dumps(faulty["report"], indent=1, sort_keys=True))
    write("rollout", {"hosts": args.hosts, "waves": args.waves, "fault_hosts": args.fault_hosts,
                      "fleet_workers": os.cpu_count(), "broker": "mosquitto"}, rows,
          {"online_s": "s", "elapsed_s": "s", "hosts_per_s": "hosts/s", "orch_cpu_s": "s",
           "orch_cpu_ms_per_host": "ms", "orch_rss_mb": "MB", "orch_peak_rss_mb": "MB",
           "mqtt_msgs_per_host": "msgs"},
          "Real fleet hosts (livepatchd fleet, one worker process per core) and livepatchd orchestrator as separate "
          "processes on one shared 2-core machine: the hosts' own work (load, relocate, enable, transition) shares "
          "the cores with the orchestrator, so hosts/s is an end-to-end figure for this machine. elapsed: from "
          "rollout.start to the final RolloutDoc. mqtt_msgs: host requests + replies seen by an observer during the "
          "rollout, per host. faulty: 5% uninterruptible stalls, 2% crashes at enable; abort on STALLED >= 4% "
          "with >= 20 executed, action rollback; patched_after: hosts with the patch enabled at the end.",
          figures={"abort_arithmetic": arithmetic})
    try:
        from clients.rollout import report as rendering  # noqa: PLC0415

        rendering.plot(clean["report"], RESULTS / "rollout.png")
        rendering.plot(faulty["report"], RESULTS / "rollout-faulty.png")
    except ImportError:
        pass
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__)
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--fault-hosts", type=int, default=100)
    parser.add_argument("--clean-only", action="store_true", help="run the fault-free phase only, print its "
                        "figures and write nothing")
    parser.add_argument("--profile", type=Path, default=None, help="run the clean phase's orchestrator under "
                        "pyinstrument (pip install pyinstrument), write its text profile here, and stop there")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
