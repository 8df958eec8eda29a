"""Bounded resources under a long mixed load: ``python -m bench.soak`` (10 minutes; ``--minutes`` to shorten).

A private mosquitto on a free loopback port, ``livepatchd serve`` as a separate process (2 vCPUs, logs at
warning, default retention: ``journal_keep`` 10,000 requests, ``journal_keep_s`` 1 h), and N clients (default
10, MQTT 5, QoS 1) in this process running ``bench.mixed_load``'s cycle at full rate — info, ops.register (a new
name every cycle), symbol.lookup, info, ops.list, ops.unregister, tasks, info — so every ops name leaves a
tombstone in the desired state and every request a journal row. Every ``--sample-s`` seconds: the daemon's RSS,
the journal's database and WAL sizes, desired.sqlite3 (with its WAL), the journal's rows (its metric) and the
requests completed so far.

"Flat after warm-up" is checked, not assumed: each curve's maximum over the last half of the run is compared
with its maximum over the first half after the warm-up (``--warmup-min``). Writes bench/results/soak.json, .md
and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import RESULTS, stop_daemon, write
from bench.mixed_load import cycle
from bench.mqtt_latency import scrape, wait_online
from clients.sdk import LivepatchClient, ReplyError
from tests.mqtt_fixtures import DaemonProcess, Mosquitto, free_port

CURVES = {"rss_mib": "daemon RSS", "journal_mib": "journal.sqlite3", "wal_mib": "journal WAL",
          "desired_mib": "desired.sqlite3 (+ WAL)"}
GROWTH_LIMIT = 0.10  # a curve is flat when its late maximum is at most 10 % (and 1 MiB) above its early one


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def soak(url: str, daemon: DaemonProcess, metrics_port: int, *, clients: int, seconds: float,
               sample_s: float) -> tuple[list[dict[str, float]], dict[str, int]]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    host_dir = daemon.tmp / daemon.host
    counts = {"requests": 0, "errors": 0}
    samples: list[dict[str, float]] = []
    conns = [LivepatchClient(url, daemon.host, timeout=60) for _ in range(clients)]
    for c in conns:
        await c.__aenter__()
    start = time.monotonic()
    stop_at = start + seconds

    async def one(i: int, c: LivepatchClient) -> None:
        k = 0
        while time.monotonic() < stop_at:  # whole cycles: no ops left registered at the end
            for _verb, do in cycle(c, f"soak-{i}-{k}"):
                try:
                    await do()
                except ReplyError:
                    counts["errors"] += 1
                counts["requests"] += 1
            k += 1

    async def sampler() -> None:
        while True:
            metrics = await asyncio.to_thread(scrape, metrics_port)
            mib = 1 << 20
            samples.append({
                "t_s": round(time.monotonic() - start, 1), "requests": counts["requests"],
                "rss_mib": _rss(pid) / mib,
                "journal_mib": _size(host_dir / "journal.sqlite3") / mib,
                "wal_mib": _size(host_dir / "journal.sqlite3-wal") / mib,
                "desired_mib": (_size(host_dir / "desired.sqlite3") + _size(host_dir / "desired.sqlite3-wal")) / mib,
                "journal_rows": metrics.get("lpd_journal_rows", 0.0),
            })
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(sample_s)

    try:
        await asyncio.gather(sampler(), *(one(i, c) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.__aexit__(None, None, None)
    return samples, counts


def flatness(samples: list[dict[str, float]], warmup_s: float) -> dict[str, dict[str, float | bool]]:
    after = [s for s in samples if s["t_s"] >= warmup_s]
    half = len(after) // 2
    early, late = after[:half], after[half:]
    out: dict[str, dict[str, float | bool]] = {}
    for key in CURVES:
        e = max(s[key] for s in early) if early else 0.0
        lt = max(s[key] for s in late) if late else 0.0
        out[key] = {"early_max": e, "late_max": lt, "flat": lt <= max(e * (1 + GROWTH_LIMIT), e + 1.0)}
    return out


def plot(samples: list[dict[str, float]], warmup_s: float, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    ts = [s["t_s"] / 60 for s in samples]
    for ax, (key, label) in zip(axes.flat, CURVES.items(), strict=True):
        ax.plot(ts, [s[key] for s in samples], marker=".", linewidth=1)
        ax.axvline(warmup_s / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(label)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("minutes (dashed: end of warm-up)")
    fig.suptitle("livepatchd under a mixed load at full rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup-min", type=float, default=None,
                        help="minutes of warm-up excluded from the flatness check (default: a fifth of the run)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0:
        parser.error("--minutes and --sample-s must be positive")
    seconds = args.minutes * 60
    warmup_s = (args.warmup_min if args.warmup_min is not None else args.minutes / 5) * 60
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lpd-soak-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        metrics_port = free_port()
        daemon = DaemonProcess(work, broker.url, host="soak", LIVEPATCHD_METRICS_PORT=str(metrics_port),
                               LIVEPATCHD_LOG_LEVEL="warning")
        daemon.start()
        try:
            asyncio.run(wait_online(broker.url, daemon.host))
            samples, counts = asyncio.run(soak(broker.url, daemon, metrics_port, clients=args.clients, seconds=seconds,
                                               sample_s=args.sample_s))
        finally:
            code = stop_daemon(daemon)
            broker.stop()
            with contextlib.suppress(OSError):
                log_tail = daemon.log.read_text()[-2000:]
    load_after = os.getloadavg()
    flat = flatness(samples, warmup_s)
    rows: list[dict[str, Any]] = []
    last = samples[-1]
    for key, label in CURVES.items():
        f = flat[key]
        rows.append({"resource": label, "after_warmup_max_mib": f["early_max"], "last_half_max_mib": f["late_max"],
                     "at_end_mib": last[key], "flat": "yes" if f["flat"] else "NO"})
    verdict = "flat" if all(f["flat"] for f in flat.values()) else "NOT flat"
    rate = counts["requests"] / seconds
    notes = (f"{args.minutes:g} minutes, {args.clients} clients at full rate: {counts['requests']} requests "
             f"({rate:.0f} req/s), {counts['errors']} error replies; journal rows at the end "
             f"{last['journal_rows']:.0f}. After a {warmup_s / 60:g}-minute warm-up every curve is {verdict} "
             f"(flat: the last half's maximum at most {GROWTH_LIMIT:.0%} or 1 MiB above the first half's). "
             "One 2-core machine runs mosquitto, the daemon and the clients, shared with other work "
             f"(1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after). "
             f"Daemon exit code {code}. Curves: soak.png; every sample: soak.json.")
    write("soak", {"minutes": args.minutes, "clients": args.clients, "sample_s": args.sample_s,
                   "warmup_min": warmup_s / 60, "qos": 1, "mqtt": "5"},
          rows, {"after_warmup_max_mib": "MiB", "last_half_max_mib": "MiB", "at_end_mib": "MiB"}, notes,
          figures={"samples": samples, "counts": counts, "flatness": flat})
    plot(samples, warmup_s, RESULTS / "soak.png")
    if code != 0:
        print(log_tail)
    return 0 if verdict == "flat" and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
