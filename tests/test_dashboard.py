"""The fleet dashboard in a real browser (Debian's chromium driven by Playwright) against real daemons on a
private mosquitto: the fleet grid, a host's view, a state change, a stopped host, a broker restart and a
dashboard restart, and a foreign document that must not break the page."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, free_port, running_mosquitto
from playwright.sync_api import Browser, Page, expect, sync_playwright

from clients.dashboard import FleetFeed, create_app
from clients.dashboard.controls import OperatorControls
from clients.sdk import LivepatchClient

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return path


class DashboardServer:
    """The dashboard app under uvicorn in a thread, startable again on the same port."""

    def __init__(self, broker_url: str, port: int, controls: OperatorControls | None = None) -> None:
        self.broker_url, self.port, self.controls = broker_url, port, controls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> DashboardServer:
        app = create_app(FleetFeed(self.broker_url), batch_s=0.1, controls=self.controls)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="on", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "dashboard did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.should_exit = True
        self._thread.join(20)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """Its own broker: the test restarts it."""
    yield from running_mosquitto(tmp_path_factory.mktemp("dash-mosquitto"))


@pytest.fixture(scope="module")
def hosts(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonThread]]:
    ds = [DaemonThread(daemon_settings(tmp_path_factory.mktemp(f"dash-h{i}"), broker.url, nr_cpus=1,
                                       host_id=f"dash-{i}")).start() for i in range(3)]
    yield ds
    for d in ds:
        if d._thread.is_alive():  # one is stopped by a test
            d.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    p = browser.new_page(viewport={"width": 1280, "height": 900})
    yield p
    p.close()


def in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to its end on a loop of its own (Playwright's sync API owns this thread's loop)."""
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)
    t = threading.Thread(target=main)
    t.start()
    t.join(60)
    if errors:
        raise errors[0]


def cell(page: Page, host: str) -> str:
    return f'#groups .cell[data-host="{host}"]'


def test_the_fleet_page_is_live(broker: Mosquitto, hosts: list[DaemonThread], page: Page) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    dash = DashboardServer(broker.url, free_port()).start()
    try:
        page.goto(dash.url)
        for d in hosts:
            expect(page.locator(cell(page, d.host))).to_have_attribute("data-state", "online", timeout=15_000)
        expect(page.locator('[data-count="online"]')).to_contain_text("online 3")
        expect(page.locator("#banner")).to_be_hidden()
        page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)

        # A state change on a host reaches the open page (ops registered over MQTT → the host's ftrace section).
        target = hosts[0].host
        page.click(cell(page, target))
        expect(page.locator("#host-name")).to_have_text(target)

        async def register() -> None:
            async with LivepatchClient(broker.url, target) as c:
                await c.ops_register("dash_ops", filter="work_step_*")
        in_thread(register())
        expect(page.locator("#host-body")).to_contain_text("dash_ops", timeout=5_000)
        # its call cost: a count ops alone on its sites (CALL_OPS), 45 guest instructions per call
        cost = page.locator('#cost-table tr.cost[data-name="dash_ops"] [data-field="direct"]')
        expect(cost).to_have_text("45 insn", timeout=5_000)
        expect(page.locator("#cost-plot .bars path")).not_to_have_count(0, timeout=10_000)
        expect(page.locator("#latency-empty")).to_be_visible()

        # a function_graph trace: the host's trace stream feeds the tail and the call-latency plot
        async def trace() -> None:
            async with LivepatchClient(broker.url, target) as c:
                await c.trace_start("work_*", tracer="function_graph")
                for n in range(4):
                    await c.call("work_chain", n + 2)
        in_thread(trace())
        expect(page.locator("#trace-tail")).to_contain_text("work_chain() {", timeout=10_000)
        expect(page.locator("#latency-plot .scatterlayer .point")).not_to_have_count(0, timeout=10_000)
        expect(page.locator("#cost-note")).to_contain_text("1 more ops", timeout=5_000)  # the tracer's
        page.locator("#host-view").screenshot(path=str(SHOTS / "host-trace.png"))

        # paused, the tail holds still while the host keeps tracing; resumed, it shows the latest lines
        page.click("#trace-pause")
        expect(page.locator("#trace-info")).to_contain_text("paused")
        held = page.locator("#trace-tail").inner_text()

        async def more() -> None:
            async with LivepatchClient(broker.url, target) as c:
                for n in range(3):
                    await c.call("work_chain", 10 + n)
        in_thread(more())
        time.sleep(1.0)
        assert page.locator("#trace-tail").inner_text() == held
        page.click("#trace-pause")
        expect(page.locator("#trace-tail")).not_to_have_text(held, timeout=5_000)

        async def untrace() -> None:
            async with LivepatchClient(broker.url, target) as c:
                await c.trace_stop()
        in_thread(untrace())
        page.screenshot(path=str(SHOTS / "host.png"), full_page=True)

        # A foreign document on a host's state topic is skipped; the page keeps working.
        async def foreign() -> None:
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                await c.publish(f"livepatch/v1/{target}/events", b"\x00not json", qos=1)
                await c.publish("livepatch/v1/intruder/state", json.dumps([1, 2]).encode(), qos=1)
        in_thread(foreign())

        # A host that stops turns offline (its retained death).
        hosts[2].stop()
        expect(page.locator(cell(page, hosts[2].host))).to_have_attribute("data-state", "offline", timeout=10_000)
        expect(page.locator('[data-count="offline"]')).to_contain_text("offline 1")

        # Broker restart: a banner while it is down, the view rebuilt from retained documents after.
        broker.stop()
        expect(page.locator("#banner")).to_contain_text("broker", timeout=15_000)
        page.screenshot(path=str(SHOTS / "broker-down.png"))
        broker.start()
        expect(page.locator("#banner")).to_be_hidden(timeout=20_000)
        expect(page.locator(cell(page, hosts[0].host))).to_have_attribute("data-state", "online", timeout=20_000)

        # Dashboard restart: the page says so, reconnects by itself and rebuilds from the new server's snapshot.
        dash.stop()
        expect(page.locator("#banner")).to_contain_text("dashboard server", timeout=15_000)
        dash = DashboardServer(broker.url, dash.port).start()
        expect(page.locator("#banner")).to_be_hidden(timeout=20_000)
        for d in hosts[:2]:
            expect(page.locator(cell(page, d.host))).to_have_attribute("data-state", "online", timeout=15_000)
        # the test broker keeps no persistence: the stopped host's retained death went with the restart
        expect(page.locator("#groups .cell")).to_have_count(2)
    finally:
        dash.stop()


def test_feed_deltas_carry_only_what_changed() -> None:
    feed = FleetFeed("mqtt://127.0.0.1:1")
    feed.ingest("livepatch/v1/a/status", json.dumps({"state": "online", "boot_seq": 1}).encode())
    feed.ingest("livepatch/v1/b/status", json.dumps({"state": "online", "boot_seq": 1}).encode())
    cursor = feed.snapshot()["cursor"]
    assert feed.delta(cursor) is None
    feed.ingest("livepatch/v1/b/state", json.dumps({"version": 5, "components": {}}).encode())
    feed.ingest("livepatch/v1/b/state", json.dumps({"version": 4, "components": {"late": {}}}).encode())
    feed.ingest("livepatch/v1/b/events", b"{broken")
    feed.ingest("livepatch/v1/b/state", b"[]")
    delta = feed.delta(cursor)
    assert delta is not None
    assert list(delta["hosts"]) == ["b"]
    assert delta["hosts"]["b"]["state"] == {"version": 5, "components": {}}
    assert delta["events"] == []
    feed.ingest("livepatch/v1/a/status", b"")  # a cleared retained status: the host is gone
    assert "a" not in feed.snapshot()["hosts"]


def test_dashboard_command_refuses_a_bad_listen_address() -> None:
    from daemon.cli import main  # noqa: PLC0415
    assert main(["dashboard", "--listen", "nowhere"]) == 2




def test_rollout_board_waves_abort_and_history() -> None:
    from clients.dashboard.rollouts import RolloutBoards  # noqa: PLC0415

    boards = RolloutBoards()
    counts = {"QUEUED": 2, "SUCCEEDED": 1, "FAILED": 1}
    doc = {"name": "r", "state": "RUNNING", "version": 2, "current_wave": 0, "created_at": 100.0, "updated_at": 101.0,
           "waves": [{"index": 0, "hosts": 4, "state": "running", "counts": counts}], "counts": counts}
    assert boards.ingest("livepatch/v1/_orchestrator/rollout/r", doc) == "r"
    assert boards.ingest("livepatch/v1/_orchestrator/rollout/r", {**doc, "version": 1, "state": "PAUSED"}) is None
    assert boards.ingest("livepatch/v1/_orchestrator/rollout/x", {"no": "counts"}) is None
    report = {"spec": {"waves": {"success_threshold": 75, "approval": [0]},
                       "abort": {"action": "rollback", "criteria": [{"failure_type": "FAILED", "threshold_pct": 40,
                                                                     "min_executed": 2}]}},
              "hosts": [{"host": f"h{i}", "wave": 0, "state": s, "stalled": False, "history": [[0.5, s]]}
                        for i, s in enumerate(["QUEUED", "QUEUED", "SUCCEEDED", "FAILED"])],
              "events": [{"event": "started", "t": 0.2}]}
    assert boards.seed("r", report)
    view = boards.view()["r"]
    assert view["waves"][0]["success_pct"] == 25.0  # of the wave's hosts (the engine's rule: not yet run counts)
    assert view["waves"][0]["threshold_pct"] == 75.0
    assert view["waves"][0]["approval"] is True
    crit = view["abort"][0]
    assert (crit["bad"], crit["executed"], crit["pct"], crit["armed"], crit["tripped"]) == (1, 2, 50.0, True, True)
    assert view["history"][0] == [100.5, {"FAILED": 1, "QUEUED": 2, "SUCCEEDED": 1}]
    # an execution change after seeding adds a point from every host's execution
    boards.ingest("livepatch/v1/_orchestrator/events", {"kind": "execution", "rollout": "r", "host": "h0",
                                                        "state": "SUCCEEDED", "wave": 0, "version": 3,
                                                        "details": {}, "updated_at": 102.0})
    assert boards.view()["r"]["history"][-1] == [102.0, {"FAILED": 1, "QUEUED": 1, "SUCCEEDED": 2}]
    assert boards.view()["r"]["abort"][0]["pct"] == 33.3
    assert boards.ingest("livepatch/v1/_orchestrator/rollout/r", None) == "r"
    assert boards.view() == {}


def test_feed_trace_tail_is_bounded_and_counts_missed_batches() -> None:
    from clients.dashboard.feed import LATENCY_TAIL, TRACE_TAIL  # noqa: PLC0415

    feed = FleetFeed("mqtt://127.0.0.1:1")

    def batch(seq: int, lines: int, session: int = 1) -> bytes:
        records = [{"kind": "return", "function": "work_chain", "time": seq + i / 1000, "duration_ns": 1000 + i}
                   for i in range(lines)]
        return json.dumps({"host": "a", "boot_seq": 1, "session": session, "seq": seq, "time": 0.0,
                           "lines": [f"line {seq}.{i}" for i in range(lines)], "records": records,
                           "written": lines, "dropped": 0}).encode()

    feed.ingest("livepatch/v1/a/trace", batch(1, 3))
    cursor = feed.snapshot()["cursor"]
    feed.ingest("livepatch/v1/a/trace", batch(4, 2))  # batches 2 and 3 never came
    feed.ingest("livepatch/v1/a/trace", b"\x00not json")
    feed.ingest("livepatch/v1/a/trace", json.dumps({"lines": "not a list"}).encode())
    delta = feed.delta(cursor)
    assert delta is not None
    tail = delta["traces"]["a"]
    assert tail["lines"] == ["line 4.0", "line 4.1"], "only what came after the cursor"
    assert tail["latency"] == [[4.0, "work_chain", 1000], [4.001, "work_chain", 1001]]
    assert tail["lost_batches"] == 2
    assert delta["hosts"] == {}, "a trace batch is no host document: the grid is not touched"
    feed.ingest("livepatch/v1/a/trace", batch(1, TRACE_TAIL + LATENCY_TAIL, session=2))  # a new session: no gap
    snap = feed.snapshot()["traces"]["a"]
    assert len(snap["lines"]) == TRACE_TAIL
    assert len(snap["latency"]) == LATENCY_TAIL
    assert snap["lost_batches"] == 2
    assert snap["session"]["session"] == 2


def test_rehearse_control_refuses_bad_input_before_asking() -> None:
    from clients.dashboard.controls import ControlRefused  # noqa: PLC0415

    controls = OperatorControls("mqtt://127.0.0.1:1")  # nothing listens there: a refusal must come first
    bodies: list[dict[str, Any]] = [{"spec": "x"}, {"spec": {}, "faults": {}}, {"spec": {}, "seed": -1},
                                    {"spec": {}, "seed": True}]
    for body in bodies:
        async def ask(b: dict[str, Any] = body) -> None:
            await controls.rollout("rehearse", b)
        with pytest.raises(ControlRefused) as e:
            in_thread(ask())  # the browser fixture's loop may own this thread
        assert e.value.code == "bad_request", body
