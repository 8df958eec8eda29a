"""Fleet cost against its size: resident memory and time until every host is online, for N hosts in ONE process.

``python -m bench.fleet_scale [--sizes 10,50,100] [--broker mqtt://...]``: for each N, a fresh process runs a
``HostSet`` of N idle 1-vCPU hosts (each a full daemon: kernel, service, journal, MQTT session) on one loop
against the broker (a private Mosquitto when none is given), and reports its RSS before the hosts, once all are
online, and per host, plus the start time. Writes ``bench/results/fleet_scale.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, write


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_size(n: int, broker: str, state: str) -> dict[str, Any]:
    """In this (child) process: N hosts, measured."""
    from daemon.app import configure_logging  # noqa: PLC0415
    from daemon.fleet.plan import draw, parse_spec  # noqa: PLC0415
    from daemon.fleet.worker import HostSet, use_executor  # noqa: PLC0415
    from daemon.settings import Settings  # noqa: PLC0415

    configure_logging("error")
    base_rss = rss_mb()
    spec = parse_spec({"hosts": n, "prefix": f"bench{n}"})

    async def main() -> dict[str, Any]:
        use_executor(asyncio.get_running_loop())
        hosts = HostSet(Settings(broker_url=broker, state_dir=Path(state), log_level="error"))
        t0 = time.perf_counter()
        for plan in draw(spec):
            hosts.add(plan)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hosts.run())
            while sum(h.online for h in hosts.hosts.values()) < n:
                await asyncio.sleep(0.05)
            online_s = time.perf_counter() - t0
            await asyncio.sleep(2)  # settle: first publishes, janitors
            total = rss_mb()
            hosts.stop()
        return {"hosts": n, "online_s": round(online_s, 2), "rss_base_mb": round(base_rss, 1),
                "rss_total_mb": round(total, 1), "rss_per_host_mb": round((total - base_rss) / n, 2),
                "rss_total_per_host_mb": round(total / n, 2)}

    return asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__)
    parser.add_argument("--sizes", default="10,50,100")
    parser.add_argument("--broker")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's own run
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.broker, args.state)))
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
            out = subprocess.run([sys.executable, "-m", "bench.fleet_scale", "--one", str(n), "--broker", broker,
                                  "--state", str(work / f"s{n}")], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    write("fleet_scale", {"sizes": args.sizes, "broker": "mosquitto" if proc else "given", "nr_cpus": 1,
                          "workload": "idle", "processes": 1}, rows,
          {"online_s": "s", "rss_base_mb": "MB", "rss_total_mb": "MB", "rss_per_host_mb": "MB",
           "rss_total_per_host_mb": "MB"},
          "N idle 1-vCPU hosts in one process (HostSet on one loop), each a full daemon over Mosquitto. rss_base: "
          "the process with the daemon imported, before any host; per host: (total - base) / N. online_s: from the "
          "first add to every host online (boot, ftrace records, restore, connect). Measured on a shared 2-core "
          "machine under other load: times are upper bounds.")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        ns = [r["hosts"] for r in rows]
        a.plot(ns, [r["rss_total_mb"] for r in rows], "o-")
        a.set(xlabel="hosts in one process", ylabel="RSS (MB)", title="memory")
        b.plot(ns, [r["online_s"] for r in rows], "o-")
        b.set(xlabel="hosts in one process", ylabel="s", title="start to all online")
        fig.tight_layout()
        fig.savefig(RESULTS / "fleet_scale.png", dpi=100)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
