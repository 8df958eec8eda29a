"""Fleet cost against its size, for N idle 1-vCPU hosts in ONE process: memory, time to all online, idle CPU, and
one ``info`` round trip to any host of the idle fleet.

``python -m bench.fleet_scale [--sizes 10,100,500,1000] [--quiet-s 60] [--broker mqtt://...]``: for each N, a
fresh process runs a ``HostSet`` of N idle hosts (each a full daemon: kernel, ftrace, service, journal, MQTT
session) on one loop against the broker (a private Mosquitto when none is given). Per N:

* ``online_s``: from the first host added to every host online;
* ``rss_*``: the process's RSS before any host, once all are online, and per host;
* ``idle_cpu_pct``: the fleet process's CPU time (user + system, every thread: loop, vCPUs, executor) over
  ``--quiet-s`` seconds of nothing happening once all are online, as % of one core; ``broker_cpu_pct`` the same
  for the private Mosquitto over the same window;
* ``info_p50_ms`` / ``info_p99_ms``: one ``info`` request/reply (SDK, from this parent process) to a random
  host of the idle fleet: ``--info-hosts`` hosts, ``--info-rounds`` requests each, one at a time, after the quiet
  window (a connected client per host; connecting is not timed).

Run the 1,000-host size alone on a shared machine (it needs ~10 GB). Writes
``bench/results/fleet_scale.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, percentile, write

TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def one_size(n: int, broker: str, state: str, quiet_s: float, broker_pid: int | None) -> None:
    """In this (child) process: N hosts, measured; JSON lines out, ``done`` in (the parent's info round trips
    run between the two)."""
    from daemon.app import configure_logging  # noqa: PLC0415
    from daemon.fleet.plan import draw, parse_spec  # noqa: PLC0415
    from daemon.fleet.worker import HostSet, use_executor  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    configure_logging("error")
    base_rss = rss_mb()
    spec = parse_spec({"hosts": n, "prefix": f"bench{n}"})

    def say(doc: dict[str, Any]) -> None:
        print(json.dumps(doc), flush=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        use_executor(loop)
        hosts = HostSet(Settings(broker_url=broker, state_dir=Path(state), log_level="error"))
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for plan in draw(spec):
            hosts.add(plan)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hosts.run())
            while sum(h.online for h in hosts.hosts.values()) < n:
                await asyncio.sleep(0.05)
            online_s = time.perf_counter() - t0
            boot_cpu_s = time.process_time() - cpu0
            await asyncio.sleep(2)  # settle: first publishes, janitors
            total = rss_mb()
            c0, b0, w0 = time.process_time(), proc_cpu_s(broker_pid) if broker_pid else 0.0, time.perf_counter()
            await asyncio.sleep(quiet_s)
            wall = time.perf_counter() - w0
            idle = 100 * (time.process_time() - c0) / wall
            brk = 100 * (proc_cpu_s(broker_pid) - b0) / wall if broker_pid else None
            say({"phase": "idle", "online": sum(h.online for h in hosts.hosts.values())})
            await loop.run_in_executor(None, sys.stdin.readline)  # the parent's info round trips
            say({"phase": "result", "hosts": n, "online_s": round(online_s, 2), "boot_cpu_s": round(boot_cpu_s, 1),
                 "rss_base_mb": round(base_rss, 1), "rss_total_mb": round(total, 1),
                 "rss_per_host_mb": round((total - base_rss) / n, 2), "rss_total_per_host_mb": round(total / n, 2),
                 "idle_cpu_pct": round(idle, 1), "broker_cpu_pct": None if brk is None else round(brk, 1)})
            hosts.stop()

    asyncio.run(main())


async def info_round_trips(broker: str, hosts: list[str], rounds: int) -> list[float]:
    from clients.sdk import LivepatchClient  # noqa: PLC0415

    times = []
    for host in hosts:
        async with LivepatchClient(broker, host) as c:
            await c.info()  # the first one subscribes and warms up: not counted
            for _ in range(rounds):
                t0 = time.perf_counter()
                await c.info()
                times.append((time.perf_counter() - t0) * 1000)
    return times


def measure(n: int, broker: str, work: Path, args: argparse.Namespace, broker_pid: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.fleet_scale", "--one", str(n), "--broker", broker, "--state",
           str(work / f"s{n}"), "--quiet-s", str(args.quiet_s)]
    if broker_pid is not None:
        cmd += ["--broker-pid", str(broker_pid)]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        idle = json.loads(child.stdout.readline())
        if idle.get("phase") != "idle":
            raise RuntimeError(f"fleet_scale child: {idle}")
        sample = random.Random(n).sample([f"bench{n}-{i:04d}" for i in range(n)], min(n, args.info_hosts))
        times = asyncio.run(info_round_trips(broker, sample, args.info_rounds))
        child.stdin.write("done\n")
        child.stdin.flush()
        row: dict[str, Any] = json.loads(child.stdout.readline())
    finally:
        child.stdin.close()
        if child.wait(300) != 0:
            raise RuntimeError(f"fleet_scale child for {n} hosts exited with {child.returncode}")
    row.pop("phase")
    row.update(info_p50_ms=round(percentile(times, 0.5), 2), info_p99_ms=round(percentile(times, 0.99), 2),
               info_n=len(times))
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__)
    parser.add_argument("--sizes", default="10,100,500,1000")
    parser.add_argument("--broker")
    parser.add_argument("--quiet-s", type=float, default=60.0, help="the idle window measured (default 60 s)")
    parser.add_argument("--info-hosts", type=int, default=200, help="hosts the info round trips go to")
    parser.add_argument("--info-rounds", type=int, default=5, help="info requests to each of them")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's own run
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        one_size(args.one, args.broker, args.state, args.quiet_s, args.broker_pid)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lpd-fleet-bench-"))
    broker, proc = args.broker, None
    if broker is None:
        port = _free_port()
        (work / "m.conf").write_text(f"listener {port} 127.0.0.1\nset_tcp_nodelay true\npersistence false\n"
                                     "allow_anonymous true\nmax_queued_messages 10000\n")
        proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "m.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        broker = f"mqtt://127.0.0.1:{port}"
    rows = []
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(measure(n, broker, work, args, proc.pid if proc is not None else None))
            print(rows[-1], flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    write("fleet_scale", {"sizes": args.sizes, "broker": "mosquitto" if proc else "given", "nr_cpus": 1,
                          "workload": "idle", "processes": 1, "quiet_s": args.quiet_s, "info_hosts": args.info_hosts,
                          "info_rounds": args.info_rounds}, rows,
          {"online_s": "s", "boot_cpu_s": "s", "rss_base_mb": "MB", "rss_total_mb": "MB", "rss_per_host_mb": "MB",
           "rss_total_per_host_mb": "MB", "idle_cpu_pct": "% of a core", "broker_cpu_pct": "% of a core",
           "info_p50_ms": "ms", "info_p99_ms": "ms"},
          "N idle 1-vCPU hosts in one process (HostSet on one loop), each a full daemon over Mosquitto. rss_base: "
          "the process with the daemon imported, before any host; per host: (total - base) / N. online_s: from the "
          "first add to every host online (boot, ftrace records, restore, connect); boot_cpu_s: the process's CPU "
          "time over that span. idle_cpu_pct: the fleet process's CPU time over the quiet window, every thread, "
          "as % of one core (broker_cpu_pct: Mosquitto's, same window). info: one request/reply to a random host "
          "of the idle fleet, from another process. Measured on a shared 2-core machine under other load: times "
          "are upper bounds.")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.5))
        ns = [r["hosts"] for r in rows]
        a.plot(ns, [r["rss_total_mb"] for r in rows], "o-")
        a.set(xlabel="hosts in one process", ylabel="RSS (MB)", title="memory")
        b.plot(ns, [r["online_s"] for r in rows], "o-")
        b.set(xlabel="hosts in one process", ylabel="s", title="start to all online")
        c.plot(ns, [r["idle_cpu_pct"] for r in rows], "o-", label="fleet process")
        c.plot(ns, [r["broker_cpu_pct"] or 0 for r in rows], "s--", label="mosquitto")
        c.set(xlabel="hosts in one process", ylabel="% of one core", title="idle CPU")
        c.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "fleet_scale.png", dpi=100)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
