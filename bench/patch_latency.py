"""Live-patch request latency through mosquitto at QoS 1: ``python -m bench.patch_latency``.

A private mosquitto (set_tcp_nodelay true) on a free loopback port, ``livepatchd serve`` as a separate process
(2 vCPUs, logs at warning) trusting a fresh Ed25519 key, the SDK in this process (MQTT 5). The example patch
``livepatch_cmdline`` is compiled and signed once; then, per cycle:

* ``patch.load`` of the signed bundle (base64, ~3.9 KB): signature verified, object checked against the
  manifest and the kernel, relocated into the module area, its functions added as ftrace records, journaled;
* ``patch.enable``, replying once the transition has started (no wait): func pushed, klp ftrace ops
  registered (a stop-machine batch), tasks marked, first completion attempt, desired state journaled — the
  reply does not wait for stragglers (whether the first attempt already completed is counted);
* ``patch.disable`` with ``wait: true`` (to the end of the unpatching transition), then ``patch.unload``
  (not timed).

Also an ``info`` round trip for reference, and the daemon's own time per verb from its
``lpd_request_duration_seconds`` histogram.

What durability costs, in the same run (``--no-durability-variant`` to skip it): the cycles run again, alternating
round by round, against a second daemon started with ``LIVEPATCHD_UNSAFE_SKIP_FSYNC=1`` (neither the journal row
nor the desired state fsynced before the PUBACK: a benchmark's setting only), and the ratio of the two is
reported.

``--baseline-tree PATH`` (e.g. a ``git worktree add --detach`` of an older commit) compares two versions of the
daemon instead: a second durable daemon started from that source tree (its own ``PYTHONPATH``, working directory,
guest image, and a bundle built and signed by that tree's code for that image), rounds alternating between the
two, and the ratio this tree / base per verb (p50, p99, mean). On a shared machine that ratio is the number to
read. Writes bench/results/patch_latency.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import stop_daemon, write
from bench.mqtt_latency import histogram_quantiles, ms, scrape, wait_online
from clients.sdk import LivepatchClient
from tests.mqtt_fixtures import REPO, DaemonProcess, Mosquitto, free_port

PATCH = "livepatch_cmdline"

BUILD = """
import sys
from pathlib import Path
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import load_image
from daemon.livepatch import examples, signing
work = Path(sys.argv[1])
key = signing.generate_key()
signing.save_public_key(key.public_key(), work / "bench.pub")
bundle = signing.sign(examples.build_example(sys.argv[2], work / "build", load_image(IMAGE_PATH)[0].build_id), key)
(work / "bundle.bin").write_bytes(bundle.to_bytes())
"""


def build_bundle(tree: Path, work: Path) -> tuple[bytes, Path]:
    """The signed example bundle and its public key, built by ``tree``'s own code for ``tree``'s guest image (two
    versions of the tree may ship different images: a bundle names the build it patches)."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", BUILD, str(work), PATCH], cwd=tree, check=True,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    return (work / "bundle.bin").read_bytes(), work / "bench.pub"


async def cycles(url: str, host: str, bundle: bytes, n: int, warmup: int) -> dict[str, Any]:
    load: list[float] = []
    enable: list[float] = []
    disable: list[float] = []
    info: list[float] = []
    completed_at_reply = 0
    async with LivepatchClient(url, host, timeout=60) as c:
        assert c.mqtt_version == "5"
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await c.patch_load(bundle)
            t1 = time.perf_counter()
            change = await c.patch_enable(PATCH)
            t2 = time.perf_counter()
            if not change.completed:
                await c.wait_transition(PATCH, timeout=30, poll_s=0.005)
            t3 = time.perf_counter()
            await c.patch_disable(PATCH, wait=True)
            t4 = time.perf_counter()
            await c.patch_unload(PATCH)
            t5 = time.perf_counter()
            await c.info()
            t6 = time.perf_counter()
            if i >= warmup:
                load.append(t1 - t0)
                enable.append(t2 - t1)
                disable.append(t4 - t3)
                info.append(t6 - t5)
                completed_at_reply += change.completed
    return {"load": load, "enable": enable, "disable": disable, "info": info, "completed": completed_at_reply}


def _merge(into: dict[str, Any], got: dict[str, Any]) -> None:
    for key, value in got.items():
        into[key] = into.get(key, 0 if key == "completed" else []) + value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.patch_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300, help="measured load/enable/disable/unload cycles")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured cycles first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per daemon, alternating (cycles split)")
    parser.add_argument("--durability-variant", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure a daemon that skips the fsyncs (default: on; off with --baseline-tree)")
    parser.add_argument("--baseline-tree", type=Path, default=None, metavar="PATH",
                        help="compare with a durable daemon run from this source tree instead (rounds alternating; "
                             "reports this tree / baseline per verb)")
    args = parser.parse_args(argv)
    if args.baseline_tree is not None:
        variants = ["durable", "base"]
    else:
        variants = ["durable", "no fsync"] if args.durability_variant else ["durable"]
    trees = {v: args.baseline_tree.resolve() if v == "base" else REPO for v in variants}
    with tempfile.TemporaryDirectory(prefix="lpd-bench-") as tmp:
        work = Path(tmp)
        bundles = {v: build_bundle(tree, work / f"bundle-{v.replace(' ', '-')}") for v, tree in trees.items()}
        raw = bundles["durable"][0]
        broker = Mosquitto(work / "broker")
        broker.start()
        daemons: dict[str, tuple[DaemonProcess, int]] = {}
        try:
            for variant in variants:
                metrics_port = free_port()
                extra = {"LIVEPATCHD_UNSAFE_SKIP_FSYNC": "1"} if variant == "no fsync" else {}
                if variant == "base":
                    extra = {"PYTHONPATH": str(trees[variant])}
                daemons[variant] = (DaemonProcess(
                    work / variant.replace(" ", "-"), broker.url, host=f"bench-{variant.replace(' ', '-')}",
                    cwd=trees[variant], LIVEPATCHD_METRICS_PORT=str(metrics_port), LIVEPATCHD_LOG_LEVEL="warning",
                    LIVEPATCHD_TRUSTED_KEYS=str(bundles[variant][1]), **extra), metrics_port)
                daemons[variant][0].tmp.mkdir(parents=True, exist_ok=True)
                daemons[variant][0].start()
            for daemon, _port in daemons.values():
                asyncio.run(wait_online(broker.url, daemon.host))
            load_before = os.getloadavg()
            got: dict[str, dict[str, Any]] = {v: {} for v in variants}
            before = {v: scrape(port) for v, (_d, port) in daemons.items()}
            per_round = max(1, args.cycles // args.rounds)
            for r in range(args.rounds):
                for variant in variants if r % 2 == 0 else reversed(variants):
                    daemon = daemons[variant][0]
                    _merge(got[variant], asyncio.run(cycles(broker.url, daemon.host, bundles[variant][0], per_round,
                                                            args.warmup if r == 0 else 0)))
            after = {v: scrape(port) for v, (_d, port) in daemons.items()}
            load_after = os.getloadavg()
        finally:
            codes = {}
            for variant, (daemon, _port) in daemons.items():
                codes[variant] = stop_daemon(daemon)
            broker.stop()
    rows: list[dict[str, Any]] = []
    for variant in variants:
        g = got[variant]
        n = len(g["enable"])
        tag = "" if variant == "durable" else f" [{variant}]"
        rows += [
            {"measurement": f"patch.enable round trip, reply at transition start (MQTT 5, QoS 1){tag}",
             **ms(g["enable"]), "requests": n},
            {"measurement": f"patch.load round trip, signed bundle (MQTT 5, QoS 1){tag}", **ms(g["load"]),
             "requests": n},
            {"measurement": f"patch.disable round trip, wait: true (to the end of the transition){tag}",
             **ms(g["disable"]), "requests": n},
            {"measurement": f"info round trip, same runs (reference){tag}", **ms(g["info"]), "requests": n},
        ]
        for verb in ("patch.enable", "patch.load", "patch.disable"):
            own = histogram_quantiles(before[variant], after[variant], verb)
            rows.append({"measurement": f"daemon time per {verb} (its histogram, warm-up included){tag}",
                         "p50_ms": own["p50_ms"], "p99_ms": own["p99_ms"], "mean_ms": own["mean_ms"],
                         "requests": own["requests"]})
    enable = rows[0]
    g = got["durable"]
    n = len(g["enable"])
    cost = ""
    ratios: dict[str, float] = {}
    versus: dict[str, dict[str, float]] = {}
    if "base" in got:
        base = got["base"]
        for verb in ("load", "enable", "disable", "info"):
            versus[f"patch.{verb}" if verb != "info" else "info"] = {
                k: ms(g[verb])[k] / ms(base[verb])[k] for k in ("p50_ms", "p99_ms", "mean_ms")}
        for name, r in versus.items():
            rows.append({"measurement": f"{name} round trip: this tree / base", **r, "requests": n})
        cost = (f"Against the source tree {trees['base']} (its own daemon, guest image and bundle; rounds "
                "alternating, both durable), this tree / base: " + ", ".join(
                    f"{v} p50 {r['p50_ms']:.2f}x, p99 {r['p99_ms']:.2f}x, mean {r['mean_ms']:.2f}x"
                    for v, r in versus.items()) + ". ")
    if "no fsync" in got:
        fast = got["no fsync"]
        for verb in ("load", "enable", "disable"):
            ratios[verb] = ms(g[verb])["mean_ms"] / ms(fast[verb])["mean_ms"]
        cost = ("What durability costs (same run, alternating rounds; mean round trip durable / without the "
                "fsyncs): " + ", ".join(f"patch.{v} {r:.2f}x ({ms(g[v])['mean_ms'] - ms(fast[v])['mean_ms']:+.2f} ms)"
                                        for v, r in ratios.items()) + ". ")
    notes = (f"patch.enable p50 {enable['p50_ms']:.2f} ms, p99 {enable['p99_ms']:.2f} ms from publish to reply; "
             f"the transition had already completed at the reply in {g['completed']} of {n} cycles (the first "
             "completion attempt runs inside the enable, in a stop-machine pause, and no task sleeps in "
             "cmdline_proc_show: nothing is left for the reply to wait on; stragglers would be left to the "
             "transition driver). The enable is several stop-machine pauses (transition init, the klp ftrace "
             "ops registered as one update batch, tasks marked, the completion attempt, func_stack end) plus "
             "the desired state's SQLite write. Durable (the default): the journal row fsynced before the PUBACK "
             "(group fsync beside the event loop), the desired state with synchronous=FULL. " + cost +
             "Daemon p50/p99 are histogram bucket upper bounds; means are "
             "exact. One 2-core machine runs mosquitto, the daemons (event loop + 2 vCPU threads each; the idle "
             "one waits) and the client, shared with other work "
             f"(1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after). "
             f"Daemon exit codes {codes}.")
    write("patch_latency", {"cycles": args.cycles, "rounds": args.rounds, "warmup": args.warmup, "patch": PATCH,
                            "qos": 1, "mqtt": "5", "bundle_bytes": len(raw), "tcp_nodelay": True,
                            "variants": variants,
                            "baseline_tree": str(trees["base"]) if "base" in trees else None},
          rows, {"p50_ms": "ms", "p99_ms": "ms", "mean_ms": "ms"}, notes,
          figures={**({"durable_over_no_fsync_mean": ratios} if ratios else {}),
                   **({"this_tree_over_base": versus} if versus else {})} or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
