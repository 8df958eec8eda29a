"""Read-only verbs under a mixed load: ``python -m bench.mixed_load``.

A private mosquitto (set_tcp_nodelay true) on a free loopback port, ``livepatchd serve`` as a separate process
(2 vCPUs, logs at warning), N clients (default 10, one MQTT 5 connection each, QoS 1) in this process, each
running this cycle as fast as replies come (a closed loop, no think time)::

    info, ftrace.ops.register (its own name, filter work_step_*), symbol.lookup, info, ftrace.ops.list,
    ftrace.ops.unregister, tasks, info

so 3 in 8 requests are ``info``, 2 in 8 change ftrace ops (stop-machine batches, desired state, fsync before
the PUBACK) and 3 in 8 are other reads. Reported per class: round trip p50/p99/mean as the clients see it, the
daemon's own time from its ``lpd_request_duration_seconds`` histogram, and requests/s.

Variants, in one run, alternating round by round so the machine's other load hits them alike (``--variants``):

* ``fast``: the daemon as shipped — the read fast path (``LIVEPATCHD_READ_FAST_PATH``, on: a mutating request's
  fsync runs in the journal's fsync thread, grouped, so the event loop never waits for it) and a 0.2 ms GIL
  switch interval (``LIVEPATCHD_GIL_SWITCH_INTERVAL_MS``: the loop gets the GIL back quickly from a handler
  thread that computes);
* ``fast-5ms``: the fast path with CPython's default 5 ms switch interval (what each change contributes);
* ``queued``: both off — the fsync inside the commit on the event loop, 5 ms: the daemon before;
* ``before``: the daemon of another revision (``--baseline-rev``, checked out in the work directory), default
  settings: a before/after comparison of a change in one run.

Each daemon first answers ``--quiet-requests`` sequential ``info`` requests of one client with nothing else
running (the "no load" row): the same daemon on the same machine at the same time, without the mixed load, so
the machine's own contention (other work on its 2 cores) is told apart from what the load costs. The daemon's
``lpd_request_stage_seconds`` (dispatch, service, reply per lane) says where a request's time goes inside it.

The loop is closed, so Little's law holds: the mean latency over all requests is clients / throughput; what
the fast path changes is *who* waits — reads less, the serialized changes more.

Writes bench/results/mixed_load.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import percentile, stop_daemon, write
from bench.mqtt_latency import histogram_quantiles, scrape, wait_online
from clients.sdk import LivepatchClient
from tests.mqtt_fixtures import REPO, DaemonProcess, Mosquitto, free_port

CLASSES = {"info": "info", "ftrace.ops.register": "ops", "ftrace.ops.unregister": "ops",
           "symbol.lookup": "read", "ftrace.ops.list": "read", "tasks": "read"}
VARIANTS: dict[str, dict[str, str]] = {"fast": {}, "before": {},
            "fast-5ms": {"LIVEPATCHD_GIL_SWITCH_INTERVAL_MS": "5"},
            "queued": {"LIVEPATCHD_READ_FAST_PATH": "0", "LIVEPATCHD_GIL_SWITCH_INTERVAL_MS": "5"}}
"""Settings per variant (see the module docstring); ``before`` runs ``--baseline-rev``'s daemon."""
QUIET_REQUESTS = 300
"""Sequential ``info`` requests of one client with nothing else running, per round and variant."""


def cycle(c: LivepatchClient, name: str) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    return [("info", c.info),
            ("ftrace.ops.register", lambda: c.ops_register(name, filter="work_step_*")),
            ("symbol.lookup", lambda: c.symbol("work_chain")),
            ("info", c.info),
            ("ftrace.ops.list", c.ops_list),
            ("ftrace.ops.unregister", lambda: c.ops_unregister(name)),
            ("tasks", c.tasks),
            ("info", c.info)]


async def load(url: str, host: str, clients: int, seconds: float, warmup_s: float
               ) -> tuple[dict[str, list[float]], float, int]:
    """Run the clients; latencies per verb class measured after ``warmup_s``, the measured window's length and
    the requests it completed."""
    samples: dict[str, list[float]] = {k: [] for k in set(CLASSES.values())}
    conns = [LivepatchClient(url, host, timeout=60) for _ in range(clients)]
    for c in conns:
        await c.__aenter__()
    try:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

        async def one(i: int, c: LivepatchClient) -> None:
            k = 0
            while True:
                for verb, do in cycle(c, f"mixed-{i}-{k}"):
                    t0 = time.perf_counter()
                    await do()
                    t1 = time.perf_counter()
                    if t0 >= measure_from and t1 <= stop_at:
                        samples[CLASSES[verb]].append(t1 - t0)
                k += 1
                if time.perf_counter() >= stop_at:  # end on a whole cycle: no ops left registered
                    return

        await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.__aexit__(None, None, None)
    return samples, seconds, sum(len(v) for v in samples.values())


def stage_quantiles(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per lane and stage of ``lpd_request_stage_seconds`` over the measured window: p50/p99 (bucket upper
    bounds) and the exact mean, in ms."""
    pattern = re.compile(r'lpd_request_stage_seconds_bucket\{lane="(\w+)",le="([^"]+)",stage="(\w+)"\}|'
                         r'lpd_request_stage_seconds_bucket\{lane="(\w+)",stage="(\w+)",le="([^"]+)"\}')
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key, value in after.items():
        m = pattern.fullmatch(key)
        if m is None:
            continue
        lane, le, stage = (m[1], m[2], m[3]) if m[1] else (m[4], m[6], m[5])
        if le != "+Inf":
            buckets.setdefault((lane, stage), []).append((float(le), value - before.get(key, 0.0)))
    out: dict[str, dict[str, float]] = {}
    for (lane, stage), rows in sorted(buckets.items()):
        rows.sort()
        tail = f'{{lane="{lane}",stage="{stage}"}}'
        count = after.get(f"lpd_request_stage_seconds_count{tail}", 0.0) - before.get(
            f"lpd_request_stage_seconds_count{tail}", 0.0)
        total = after.get(f"lpd_request_stage_seconds_sum{tail}", 0.0) - before.get(
            f"lpd_request_stage_seconds_sum{tail}", 0.0)
        if count <= 0:
            continue

        def q(frac: float, rows: list[tuple[float, float]] = rows, count: float = count) -> float:
            return next((le for le, cum in rows if cum >= frac * count), float("inf"))
        out[f"{lane}.{stage}"] = {"p50_ms": q(0.5) * 1e3, "p99_ms": q(0.99) * 1e3, "mean_ms": total / count * 1e3,
                                  "requests": int(count)}
    return out


async def quiet(url: str, host: str, requests: int) -> list[float]:
    """One client, sequential ``info``, nothing else running: the same daemon's latency without the load."""
    out = []
    async with LivepatchClient(url, host, timeout=60) as c:
        for _ in range(20):  # warm-up
            await c.info()
        for _ in range(requests):
            t0 = time.perf_counter()
            await c.info()
            out.append(time.perf_counter() - t0)
    return out


def stage_means(rounds: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Each stage's mean (ms) over the rounds, weighted by their request counts."""
    total: dict[str, float] = {}
    count: dict[str, float] = {}
    for stages in rounds:
        for key, q in stages.items():
            total[key] = total.get(key, 0.0) + q["mean_ms"] * q["requests"]
            count[key] = count.get(key, 0.0) + q["requests"]
    return {k: total[k] / count[k] for k in sorted(total) if count[k]}


def baseline_tree(stack: contextlib.ExitStack, work: Path, rev: str) -> Path:
    """A detached checkout of ``rev`` (its daemon is the ``before`` variant), removed at the end."""
    tree = work / f"baseline-{rev}"
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    stack.callback(subprocess.run, ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                   check=False, capture_output=True)
    return tree


def run_variant(work: Path, broker: Mosquitto, variant: str, args: argparse.Namespace,
                baseline: Path | None = None) -> dict[str, Any]:
    metrics_port = free_port()
    env, cwd = dict(VARIANTS[variant]), REPO
    if variant == "before":
        assert baseline is not None
        env["PYTHONPATH"], cwd = str(baseline), baseline
    daemon = DaemonProcess(work / variant, broker.url, host=f"mixed-{variant}", cwd=cwd,
                           LIVEPATCHD_METRICS_PORT=str(metrics_port), LIVEPATCHD_LOG_LEVEL="warning", **env)
    daemon.tmp.mkdir(parents=True, exist_ok=True)
    daemon.start()
    try:
        asyncio.run(wait_online(broker.url, daemon.host))
        alone = asyncio.run(quiet(broker.url, daemon.host, args.quiet_requests))
        before = scrape(metrics_port)
        samples, window, done = asyncio.run(load(broker.url, daemon.host, args.clients, args.seconds,
                                                 args.warmup_s))
        after = scrape(metrics_port)
        samples["quiet"] = alone
    finally:
        code = stop_daemon(daemon)
    own = {verb: histogram_quantiles(before, after, verb) for verb in ("info", "ftrace.ops.register")
           if f'lpd_request_duration_seconds_count{{verb="{verb}"}}' in after}
    return {"samples": samples, "window_s": window, "requests": done, "own": own, "exit": code,
            "stages": stage_quantiles(before, after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round and variant")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds at the start of each")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every variant once")
    parser.add_argument("--variants", default="fast,queued", help="comma-separated: fast, fast-5ms, queued, "
                        "before (needs --baseline-rev)")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose daemon is the 'before' variant "
                        "(checked out in the work directory; e.g. the commit before a change)")
    parser.add_argument("--quiet-requests", type=int, default=QUIET_REQUESTS, help="sequential info requests of "
                        "one client per round and variant, before the load starts (the same daemon unloaded)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep state and logs here (default: a "
                        "temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"--variants: choose among {', '.join(VARIANTS)} (got {args.variants!r})")
    if "before" in variants and not args.baseline_rev:
        parser.error("--variants before needs --baseline-rev")
    merged: dict[str, dict[str, Any]] = {v: {"samples": {}, "window_s": 0.0, "requests": 0, "own": [],
                                             "exit": [], "stages": []} for v in variants}
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lpd-bench-")))
        baseline = baseline_tree(stack, work, args.baseline_rev) if "before" in variants else None
        broker = Mosquitto(work / "broker")
        broker.start()
        try:
            for r in range(args.rounds):
                for variant in variants if r % 2 == 0 else reversed(variants):
                    got = run_variant(work / f"round{r}", broker, variant, args, baseline)
                    m = merged[variant]
                    for cls, values in got["samples"].items():
                        m["samples"].setdefault(cls, []).extend(values)
                    m["window_s"] += got["window_s"]
                    m["requests"] += got["requests"]
                    m["own"].append(got["own"])
                    m["exit"].append(got["exit"])
                    m["stages"].append(got["stages"])
        finally:
            broker.stop()
    load_after = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for variant in variants:
        m = merged[variant]
        for cls, label in (("quiet", "info, no load (1 client, sequential)"), ("info", "info"),
                           ("ops", "ftrace.ops register/unregister"),
                           ("read", "other reads (symbol.lookup, ops.list, tasks)")):
            values = m["samples"].get(cls, [])
            if not values:
                continue
            rate = len(values) / m["window_s"] if cls != "quiet" else len(values) / sum(values)
            rows.append({"variant": variant, "verbs": label, "p50_ms": percentile(values, 0.5) * 1e3,
                         "p99_ms": percentile(values, 0.99) * 1e3, "mean_ms": statistics.fmean(values) * 1e3,
                         "requests": len(values), "requests_per_s": rate})
        rows.append({"variant": variant, "verbs": "all", "p50_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0,
                     "requests": m["requests"], "requests_per_s": m["requests"] / m["window_s"]})
    own = {v: merged[v]["own"] for v in variants}
    exits = ", ".join(f"{v}: {merged[v]['exit']}" for v in variants)
    info_p99 = {r["variant"]: r["p99_ms"] for r in rows if r["verbs"] == "info"}
    quiet_p99 = {r["variant"]: r["p99_ms"] for r in rows if r["verbs"].startswith("info, no load")}
    verdict = "; ".join(f"{v}: info p99 {p:.2f} ms ({'met' if p <= 5 else 'NOT met'}; "
                        f"{p / quiet_p99[v]:.1f}x its p99 of {quiet_p99[v]:.2f} ms without the load)"
                        if quiet_p99.get(v) else f"{v}: info p99 {p:.2f} ms" for v, p in info_p99.items())
    stages = {v: stage_means(merged[v]["stages"]) for v in variants}
    where = "; ".join(f"{v}: " + ", ".join(f"{k} {ms:.2f}" for k, ms in st.items() if k.startswith("read."))
                      for v, st in stages.items() if st)
    notes = (f"Goal: info p99 <= 5 ms while the mixed load runs ({verdict}). {args.clients} clients in one "
             "process, closed loop, each cycling info, ops.register, symbol.lookup, info, ops.list, "
             "ops.unregister, tasks, info (MQTT 5, QoS 1); round trips from publish to reply as the clients see "
             "them. 'all' rows: every request completed in the measured windows (its latency columns unused). "
             "fast = the read fast path and a 0.2 ms GIL switch interval (the defaults); fast-5ms = the fast path "
             "with CPython's 5 ms; queued = neither (fsync on the event loop, 5 ms): the daemon before. "
             f"{args.rounds} round(s) of {args.seconds:g} s per variant, alternating. "
             "One 2-core machine runs mosquitto, the daemon (event loop + 2 vCPU threads) and the clients, shared "
             f"with other work (1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after). "
             f"Daemon exit codes: {exits}. Where a read's time goes in the daemon (mean ms per stage of "
             f"lpd_request_stage_seconds, read lane; the rest of a round trip is the broker, the sockets and the "
             f"event loop's delay in reading the request): {where or 'not measured'}. 'before' = the daemon at "
             f"{args.baseline_rev or '(not run)'}, same settings, in the same run.")
    write("mixed_load", {"clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup_s,
                         "rounds": args.rounds, "variants": variants, "qos": 1, "mqtt": "5"},
          rows, {"p50_ms": "ms", "p99_ms": "ms", "mean_ms": "ms", "requests_per_s": "req/s"}, notes,
          figures={"daemon_histogram": own, "stages": {v: merged[v]["stages"] for v in variants},
                   "load_average": {"before": list(load_before), "after": list(load_after)}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
