"""How long ``lpctl hosts`` and ``FleetClient.hosts()`` take over N hosts: ``python -m bench.hosts_listing``.

A private mosquitto holds N hosts' retained ``status`` and ``state``: the documents of a real fleet host (one
``livepatchd fleet`` host booted here, its retained documents read back), copied for each host id with its own
labels, so the broker hands out what N real hosts would have left (the hosts themselves are not running: this
measures the listing, not the fleet; ``bench.fleet_scale`` runs real fleets). Measured, ``--rounds`` times each:

* ``lpctl hosts`` (the table), ``lpctl --json hosts`` and ``lpctl hosts --label zone=eu``, each a new process
  (wall clock from exec to exit: Python start, imports, connect, retained delivery, the quiet period, output);
* ``FleetClient.hosts()`` in this process (connect, subscribe, retained delivery, the quiet period).

Every listing ends after ``--wait`` (default 0.5 s, lpctl's default) without a new retained document, so that
period is part of each figure. Writes bench/results/hosts_listing.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import write
from clients.sdk import FleetClient, HostFilter
from daemon.fleet.runner import FleetRunner
from schemas.fleet import FleetSpec
from tests.mqtt_fixtures import Mosquitto

REPO = Path(__file__).resolve().parent.parent
ZONES = ("eu", "us", "ap", "sa")


def real_documents(url: str, state_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The retained status and state of one real fleet host (booted, read back, stopped)."""
    spec = FleetSpec(hosts=1, prefix=f"b{uuid.uuid4().hex[:6]}", labels={"zone": {"eu": 1.0}})
    runner = FleetRunner(spec, {"broker_url": url, "state_dir": str(state_dir), "log_level": "warning"}, workers=0)
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        await runner.run()
    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not runner.all_online:
        if time.monotonic() > deadline:
            raise RuntimeError("the fleet host did not come online")
        time.sleep(0.05)
    host = spec.host_ids()[0]

    async def read() -> tuple[dict[str, Any], dict[str, Any]]:
        async with FleetClient(url) as fleet:
            while True:
                record = fleet.record(host) if await fleet.hosts(quiet=0.3) else None
                if record is not None and record.status_doc is not None and record.state_doc is not None:
                    return (record.status_doc.model_dump(mode="json"), record.state_doc.model_dump(mode="json"))
    docs = asyncio.run(read())
    loop_box[0].call_soon_threadsafe(runner.stop)
    thread.join(60)
    return docs


async def publish(url: str, status: dict[str, Any], state: dict[str, Any], n: int) -> list[str]:
    prefix = f"l{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    port = int(url.rsplit(":", 1)[1])
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{prefix}", max_queued_outgoing_messages=0) as c:
        for i, host in enumerate(ids):
            labels = {"zone": ZONES[i % len(ZONES)], "tier": "web" if i % 3 else "db"}
            state_doc = {**state, "host": host, "components": {**state["components"], "labels": labels}}
            await c.publish(f"livepatch/v1/{host}/status", json.dumps({**status, "host": host, "time": time.time(),
                                                                       "heartbeat_at": time.time()}),
                            qos=1, retain=True)
            await c.publish(f"livepatch/v1/{host}/state", json.dumps(state_doc), qos=1, retain=True)
    return ids


def lpctl(url: str, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clients.cli.main", "--broker", url, *args], cwd=REPO,
                          capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"})
    return time.perf_counter() - started, done.stdout


async def sdk(url: str, host_filter: HostFilter | None) -> tuple[float, int]:
    started = time.perf_counter()
    async with FleetClient(url) as fleet:
        found = await fleet.hosts(host_filter)
    return time.perf_counter() - started, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lpd-bench-hosts-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            status, state = real_documents(broker.url, Path(tmp) / "fleet")
            ids = asyncio.run(publish(broker.url, status, state, args.hosts))
            total = args.hosts + 1  # and the real host, offline now
            eu = sum(1 for i in range(args.hosts) if ZONES[i % len(ZONES)] == "eu") + 1
            rows: list[dict[str, Any]] = []
            cases: list[tuple[str, tuple[str, ...], int]] = [
                ("lpctl hosts (table)", ("hosts",), total), ("lpctl --json hosts", ("--json", "hosts"), total),
                ("lpctl hosts --label zone=eu", ("hosts", "--label", "zone=eu"), eu)]
            for name, argv, want in cases:
                times = []
                for _ in range(args.rounds):
                    took, out = lpctl(broker.url, *argv)
                    shown = len(json.loads(out)) if "--json" in argv else out.count(ids[0][:7])
                    assert shown == want - 1 or shown == want, (name, shown, want)
                    times.append(took)
                rows.append({"measurement": name, "hosts_listed": want, "median_s": statistics.median(times),
                             "max_s": max(times)})
            for name, flt, want in (("FleetClient.hosts()", None, total),
                                    ("FleetClient.hosts(zone=eu)", HostFilter(labels={"zone": "eu"}), eu)):
                times = []
                for _ in range(args.rounds):
                    took, count = asyncio.run(sdk(broker.url, flt))
                    assert count == want, (name, count, want)
                    times.append(took)
                rows.append({"measurement": name, "hosts_listed": want, "median_s": statistics.median(times),
                             "max_s": max(times)})
            size = len(json.dumps(state)) + len(json.dumps(status))
        finally:
            broker.stop()
    load = os.getloadavg()[0]
    write("hosts_listing", {"hosts": args.hosts, "rounds": args.rounds, "quiet_s": 0.5}, rows,
          {"median_s": "s", "max_s": "s"},
          notes=f"Goal: lpctl hosts over 1,000 hosts <= 2 s. {args.hosts} hosts' retained status + state (copies of "
                f"a real fleet host's documents, ~{size} bytes per host) on a private mosquitto, plus that real host. "
                "lpctl figures are whole processes (Python start and imports included); every figure "
                "includes the 0.5 s quiet period that ends a listing. 1-minute load average at the end: "
                f"{load:.2f} (a shared 2-core machine).")


if __name__ == "__main__":
    main()
