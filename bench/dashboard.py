"""The fleet dashboard in a real browser over N hosts: ``python -m bench.dashboard [--hosts 1000]``.

A private mosquitto holds N hosts' retained ``status`` and ``state`` (copies of a real fleet host's documents,
as ``bench.hosts_listing`` makes them); the dashboard (``clients.dashboard``, in this process under uvicorn)
follows them and headless Debian ``chromium`` driven by Playwright opens the page. Measured:

* **first render**: from the navigation's start to every host's cell on the page (``performance.now()`` in the
  page, polled every animation frame);
* **state-change latency**: a host's state document republished (a patch enabled, or disabled again) to its cell
  showing the new state, publish time (``time.time()`` here) against the page's ``Date.now()`` (one machine, one
  clock), ``--samples`` times;
* **main thread busy** while ``--rate`` hosts/s change state (and a rollout document changes 5 times/s, so the
  progress plot redraws): the Chrome DevTools Protocol's ``Performance.getMetrics`` ``TaskDuration`` over the
  wall time, for ``--load-s`` seconds.

Writes bench/results/dashboard.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import uvicorn
from playwright.sync_api import sync_playwright

from bench.common import write
from bench.hosts_listing import publish, real_documents
from clients.dashboard import FleetFeed, create_app
from tests.mqtt_fixtures import Mosquitto, free_port

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage"]
PATCH = {"name": "livepatch_cmdline", "enabled": True, "transition": False, "replace": False, "stack_order": 1,
         "forced": False, "replaced": False, "funcs": ["proc_cmdline_read"]}


class Server:
    def __init__(self, url: str) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(FleetFeed(url)), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


class Publisher:
    """One MQTT connection on a loop of its own: state documents with or without the patch enabled."""

    def __init__(self, port: int, state: dict[str, Any]) -> None:
        self.port, self.state = port, state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        async def make() -> aiomqtt.Client:
            client = aiomqtt.Client("127.0.0.1", port, identifier=f"bench-dash-{uuid.uuid4().hex[:6]}",
                                    max_queued_outgoing_messages=0)
            await client.__aenter__()
            return client
        self.client: aiomqtt.Client = self._run(make())
        self.version = time.time_ns() // 1000  # above every earlier run's (the feed drops older versions)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def doc(self, host: str, patched: bool) -> str:
        self.version += 1
        comps = self.state["components"]
        lp = {**comps["livepatch"], "patches": [PATCH] if patched else [], "transition": None}
        return json.dumps({**self.state, "host": host, "version": self.version,
                           "components": {**comps, "livepatch": lp}})

    async def _states(self, changes: list[tuple[str, bool]]) -> None:
        for host, patched in changes:
            await self.client.publish(f"livepatch/v1/{host}/state", self.doc(host, patched), qos=0, retain=True)

    def states(self, changes: list[tuple[str, bool]]) -> float:
        """Publish; the time (Unix seconds) just before the first."""
        at = time.time()
        self._run(self._states(changes))
        return at

    def rollout(self, version: int, done: int, total: int) -> None:
        doc = {"name": "bench", "state": "RUNNING", "version": version, "current_wave": 0,
               "waves": [{"index": 0, "hosts": total, "state": "running",
                          "counts": {"SUCCEEDED": done, "QUEUED": total - done}}],
               "counts": {"SUCCEEDED": done, "QUEUED": total - done}, "reason": None,
               "created_at": time.time() - version, "updated_at": time.time()}
        self._run(self.client.publish("livepatch/v1/_orchestrator/rollout/bench", json.dumps(doc), qos=0,
                                      retain=True))

    def close(self) -> None:
        self._run(self.client.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def measure(url: str, port: int, ids: list[str], state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Debian's chromium is not installed (apt-get install chromium)")
    pub = Publisher(port, state)
    out: dict[str, Any] = {}
    try:
        with Server(url) as srv, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
            renders = []
            for _ in range(args.rounds):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{srv.port}/", wait_until="commit")
                handle = page.wait_for_function(
                    f"document.querySelectorAll('#groups .cell').length >= {len(ids)} && performance.now()",
                    polling="raf", timeout=60_000)
                renders.append(float(handle.json_value()) / 1000.0)
                page.close()
            out["first_render_s"] = renders

            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{srv.port}/")
            page.wait_for_function(f"document.querySelectorAll('#groups .cell').length >= {len(ids)}",
                                   timeout=60_000)
            latencies = []
            for i in range(args.samples):
                host = ids[(i * 37) % len(ids)]
                want = "patched" if (i // len(ids)) % 2 == 0 else "online"
                sel = f'#groups .cell[data-host="{host}"]'
                at = pub.states([(host, want == "patched")])
                seen = page.wait_for_function(
                    f"(() => {{ const c = document.querySelector('{sel}'); "
                    f"return c && c.dataset.state === '{want}' && Date.now(); }})()",
                    polling="raf", timeout=10_000)
                latencies.append(float(seen.json_value()) / 1000.0 - at)
                time.sleep(0.3)
            out["state_change_s"] = latencies

            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")

            def task_s() -> float:
                metrics = cdp.send("Performance.getMetrics")["metrics"]
                return float(next(m["value"] for m in metrics if m["name"] == "TaskDuration"))
            busy0, wall0 = task_s(), time.perf_counter()
            tick, per_tick = 0.1, max(1, round(args.rate * 0.1))
            n_ticks = int(args.load_s / tick)
            changed = 0
            start = time.perf_counter()
            for k in range(n_ticks):
                batch = [(ids[(changed + j) % len(ids)], ((changed + j) // len(ids)) % 2 == 1) for j in range(per_tick)]
                pub.states(batch)
                changed += per_tick
                if k % 2 == 0:
                    pub.rollout(k + 1, min(changed, len(ids)), len(ids))
                delay = start + (k + 1) * tick - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            time.sleep(0.5)
            busy1, wall1 = task_s(), time.perf_counter()
            out["busy_fraction"] = (busy1 - busy0) / (wall1 - wall0)
            out["load_changes"] = changed
            out["load_wall_s"] = wall1 - wall0
            browser.close()
    finally:
        pub.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, action="append", help="repeatable (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="first renders per size")
    parser.add_argument("--samples", type=int, default=20, help="state changes timed per size")
    parser.add_argument("--rate", type=float, default=50.0, help="hosts changing per second during the load")
    parser.add_argument("--load-s", type=float, default=10.0)
    args = parser.parse_args()
    sizes = args.hosts or [1000]
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lpd-bench-dash-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            status, state = real_documents(broker.url, Path(tmp) / "fleet")
            published: list[str] = []
            for n in sorted(sizes):
                published += asyncio.run(publish(broker.url, status, state, n - len(published)))
                got = measure(broker.url, broker.port, published, state, args)
                figures[str(n)] = got
                lat = sorted(got["state_change_s"])
                rows.append({"hosts": n + 1, "first_render_median_s": statistics.median(got["first_render_s"]),
                             "first_render_max_s": max(got["first_render_s"]),
                             "state_change_p50_s": statistics.median(lat),
                             "state_change_max_s": lat[-1],
                             "busy_pct_at_rate": 100.0 * got["busy_fraction"]})
        finally:
            broker.stop()
    size = len(json.dumps(state)) + len(json.dumps(status))
    write("dashboard", {"hosts": sizes, "rounds": args.rounds, "samples": args.samples, "rate_per_s": args.rate,
                        "load_s": args.load_s, "server_batch_s": 0.2, "page_render_s": 0.25}, rows,
          {"first_render_median_s": "s", "first_render_max_s": "s", "state_change_p50_s": "s",
           "state_change_max_s": "s", "busy_pct_at_rate": "%"},
          notes=f"Goals (1,000 hosts): first render <= 2 s, state change on the page <= 1 s after its MQTT publish, "
                f"main thread busy <= 50% while {args.rate:g} hosts/s change. Hosts: copies of a real fleet host's "
                f"retained documents (~{size} bytes per host) on a private mosquitto, plus that real host (offline); "
                "headless Debian chromium via Playwright; dashboard server, publisher and browser on one shared "
                f"2-core machine (1-minute load average at the end: {os.getloadavg()[0]:.2f}). The server sends at "
                "most one batch per 200 ms, the page renders at most every 250 ms: the state-change figure "
                "includes both intervals.", figures=figures)


if __name__ == "__main__":
    main()
