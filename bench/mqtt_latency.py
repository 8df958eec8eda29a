"""MQTT request->reply latency and throughput of livepatchd: ``python -m bench.mqtt_latency``.

A private mosquitto (set_tcp_nodelay true) on a free loopback port, ``livepatchd serve`` as a separate
process (2 vCPUs, logs at warning), clients in this process through the SDK, QoS 1 throughout. Measured:

* ``info`` round trip (publish request -> reply received) with MQTT 5 (response topic + correlation data)
  and with MQTT 3.1.1 (``reply_to`` in the payload), sequential;
* the same round trip against a bare echo responder (aiomqtt, its own process): the broker + client cost
  with no daemon, so ``info - echo`` is the daemon's whole cost as seen from outside;
* the daemon's own time per request, from its ``lpd_request_duration_seconds`` histogram (parse, journal
  accept, handler, journal answer; p50/p99 are bucket upper bounds, mean is exact);
* sustained ``info`` requests/s with 10 concurrent clients (one connection each).

On a machine with two or more cores, broker and daemon are pinned to CPU 0 and the clients to CPU 1
(``--no-pin`` to compare): the tails then come from the work done, not from threads migrating mid-request.

Writes bench/results/mqtt_latency.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import percentile, write
from clients.sdk import LivepatchClient
from tests.mqtt_fixtures import DaemonProcess, Mosquitto

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

ECHO = """
import asyncio, socket, sys, aiomqtt
async def main(port):
    async with aiomqtt.Client("127.0.0.1", port, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                              protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe("bench/echo/req", qos=1)
        print("ready", flush=True)
        async for m in c.messages:
            await c.publish("bench/echo/rep", m.payload, qos=1)
asyncio.run(main(int(sys.argv[1])))
"""


def ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(values, 0.50) * 1e3, "p99_ms": percentile(values, 0.99) * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3}


async def sequential_info(url: str, host: str, protocol: str, n: int, warmup: int, *,
                          timeout: float | None = None) -> list[float]:
    """``n`` sequential ``info`` round trips (seconds each), after ``warmup`` unmeasured ones."""
    options = {} if timeout is None else {"timeout": timeout}
    async with LivepatchClient(url, host, protocol=protocol, **options) as c:  # type: ignore[arg-type]
        assert c.mqtt_version == protocol
        for _ in range(warmup):
            await c.info()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.info()
            samples.append(time.perf_counter() - t0)
    return samples


async def echo_round_trips(port: int, n: int, warmup: int) -> list[float]:
    async with aiomqtt.Client("127.0.0.1", port, socket_options=NODELAY,
                              protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe("bench/echo/rep", qos=1)
        samples = []
        messages = c.messages
        payload = json.dumps({"request_id": "x" * 32, "reply_to": "bench/echo/rep"})
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await c.publish("bench/echo/req", payload, qos=1)
            await anext(messages)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


async def throughput(url: str, host: str, clients: int, seconds: float) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    counts = [0] * clients

    async def one(i: int, c: LivepatchClient, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await c.info()
            latencies.append(time.perf_counter() - t0)
            counts[i] += 1

    conns = [LivepatchClient(url, host) for _ in range(clients)]
    for c in conns:
        await c.__aenter__()
    try:
        for c in conns:
            await c.info()
        start = time.perf_counter()
        await asyncio.gather(*(one(i, c, start + seconds) for i, c in enumerate(conns)))
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            await c.__aexit__(None, None, None)
    return sum(counts), elapsed, latencies


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def histogram_quantiles(before: dict[str, float], after: dict[str, float], verb: str) -> dict[str, float]:
    """Quantiles (bucket upper bounds) and the exact mean of the daemon's histogram over the measured window."""
    prefix = 'lpd_request_duration_seconds_bucket{le="'
    buckets = []
    for key, value in after.items():
        if key.startswith(prefix) and key.endswith(f'",verb="{verb}"}}'):
            le = key[len(prefix):].split('"', 1)[0]
            if le != "+Inf":
                buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    count_key, sum_key = (f'lpd_request_duration_seconds_{k}{{verb="{verb}"}}' for k in ("count", "sum"))
    count = after[count_key] - before.get(count_key, 0.0)
    total = after[sum_key] - before.get(sum_key, 0.0)

    def q(frac: float) -> float:
        return next(le for le, cum in buckets if cum >= frac * count)
    return {"p50_ms": q(0.50) * 1e3, "p99_ms": q(0.99) * 1e3, "mean_ms": total / count * 1e3, "requests": int(count)}


async def wait_online(url: str, host: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with LivepatchClient(url, host) as c:
        while time.monotonic() < deadline:
            status = await c.status(wait=0.5)
            if status is not None and status.state == "online":
                return
    raise RuntimeError("daemon did not come online")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per latency run")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests at the start of each round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the three sequential runs")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the throughput run")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin broker and daemon to CPU 0, the clients to CPU 1 (default: on)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lpd-bench-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        metrics_port = Mosquitto(work / "unused").port  # a free port
        daemon = DaemonProcess(work, broker.url, host="bench", LIVEPATCHD_METRICS_PORT=str(metrics_port),
                               LIVEPATCHD_LOG_LEVEL="warning").start()
        echo = subprocess.Popen([sys.executable, "-c", ECHO, str(broker.port)], stdout=subprocess.PIPE)
        if args.pin and len(os.sched_getaffinity(0)) >= 2:
            # broker and daemon on one core, the clients (this process, the echo peer) on the other: the
            # scheduler no longer migrates them mid-request, the main source of run-to-run p99 noise here
            for proc in (broker.proc, daemon.proc):
                if proc is not None:
                    for tid in os.listdir(f"/proc/{proc.pid}/task"):  # every thread, not just the main one
                        os.sched_setaffinity(int(tid), {0})
            os.sched_setaffinity(echo.pid, {1})
            os.sched_setaffinity(0, {1})
        try:
            assert echo.stdout is not None
            assert echo.stdout.readline().strip() == b"ready"
            asyncio.run(wait_online(broker.url, daemon.host))
            rows: list[dict[str, Any]] = []
            load_before = os.getloadavg()
            # Interleaved rounds: load from elsewhere on the machine hits the three runs alike.
            v5: list[float] = []
            v311: list[float] = []
            bare: list[float] = []
            per_round = max(1, args.requests // args.rounds)
            round_p99: dict[str, list[float]] = {"5": [], "3.1.1": []}
            before = scrape(metrics_port)
            for _ in range(args.rounds):
                for protocol, samples in (("5", v5), ("3.1.1", v311)):
                    got = asyncio.run(sequential_info(broker.url, daemon.host, protocol, per_round, args.warmup))
                    samples.extend(got)
                    round_p99[protocol].append(percentile(got, 0.99) * 1e3)
                bare += asyncio.run(echo_round_trips(broker.port, per_round, args.warmup))
            after = scrape(metrics_port)
            rows.append({"measurement": "info round trip, MQTT 5, QoS 1", **ms(v5), "requests": len(v5),
                         "requests_per_s": len(v5) / sum(v5)})
            rows.append({"measurement": "info round trip, MQTT 3.1.1, QoS 1", **ms(v311), "requests": len(v311),
                         "requests_per_s": len(v311) / sum(v311)})
            rows.append({"measurement": "echo round trip (broker + client, no daemon), QoS 1", **ms(bare),
                         "requests": len(bare), "requests_per_s": len(bare) / sum(bare)})
            own = histogram_quantiles(before, after, "info")
            rows.append({"measurement": "daemon time per info request (its histogram, both runs)",
                         "p50_ms": own["p50_ms"], "p99_ms": own["p99_ms"], "mean_ms": own["mean_ms"],
                         "requests": own["requests"], "requests_per_s": 0.0})
            rows.append({"measurement": "daemon cost seen from outside (info MQTT 5 minus echo)",
                         **{k: rows[0][k] - rows[2][k] for k in ("p50_ms", "p99_ms", "mean_ms")},
                         "requests": len(v5), "requests_per_s": 0.0})
            total, elapsed, lat = asyncio.run(throughput(broker.url, daemon.host, args.clients, args.seconds))
            rows.append({"measurement": f"sustained info, {args.clients} concurrent clients (MQTT 5)", **ms(lat),
                         "requests": total, "requests_per_s": total / elapsed})
            load_after = os.getloadavg()
        finally:
            echo.kill()
            echo.wait()
            code = daemon.terminate()
            broker.stop()
    p99 = rows[0]["p99_ms"]
    spread = "; ".join(f"MQTT {proto}: {min(v):.2f}-{max(v):.2f} ms" for proto, v in round_p99.items())
    notes = (f"Goal: info p99 <= 2 ms at QoS 1 (MQTT 5: {p99:.2f} ms, {'met' if p99 <= 2 else 'NOT met'}; "
             f"p99 of each of the {args.rounds} rounds of {per_round} requests: {spread}); daemon "
             f"overhead < 1 ms (its own time: mean {rows[3]['mean_ms']:.3f} ms, p99 <= {rows[3]['p99_ms']:.2f} ms). "
             "Everything on one 2-core machine: mosquitto, the daemon (event loop + 2 vCPU threads) and the clients "
             f"share it (1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after). "
             "requests_per_s of the sequential runs = 1 / mean latency. The daemon's own time: from the message "
             "taken off its queue to the reply ready to publish (JSON, validation, journal accept and answer, "
             f"handler, metrics). Daemon exit code {code}.")
    write("mqtt_latency", {"requests": args.requests, "rounds": args.rounds, "warmup": args.warmup,
                           "clients": args.clients,
                           "seconds": args.seconds, "qos": 1, "tcp_nodelay": True},
          rows, {"p50_ms": "ms", "p99_ms": "ms", "mean_ms": "ms", "requests_per_s": "req/s"}, notes,
          figures={"info_p99_ms_per_round": round_p99})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
