"""The dashboard's Rollouts and Stalls views in a real browser (Debian's chromium driven by Playwright) against a
fleet of real hosts and the orchestrator, over the shipped Mosquitto configuration with its ACL
(deploy/mosquitto.conf + deploy/livepatchd.acl): an operator starts a rollout from the page, watches hosts go
from QUEUED to SUCCEEDED, pauses and resumes it, sees the stalled host with its blocking task and the
patch.check prediction, and rolls back; an observer's page offers no controls, its server refuses a control,
and an observer's control request forged straight onto the broker is dropped by the ACL."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mqtt_fixtures import free_port
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_dashboard import CHROMIUM_FLAGS, SHOTS, DashboardServer, chromium_path
from test_fleet import overrides
from test_orchestrator import BUILD, bundle_file
from test_service_deploy import ShippedMosquitto
from test_service_patch import signer

from clients.dashboard.controls import OperatorControls
from clients.rollout.service import Orchestrator
from clients.sdk import RequestTimeout, RolloutClient
from daemon.fleet.runner import FleetRunner
from schemas.fleet import FleetSpec

T = TypeVar("T")
N_HOSTS = int(os.environ.get("LPD_DASH_TEST_HOSTS", "50"))
PEOPLE = {"operator": "op-secret", "observer": "obs-secret"}
"""Listener 1883 as shipped (a client's id is its user name: one connection per account)."""
SERVICES = {"livepatchd": "daemon-secret", "orchestrator": "orch-secret", "dashboard": "dash-secret"}
"""Listener 1884 as shipped: the accounts holding several connections (the fleet's hosts, the orchestrator's two,
the dashboard's feeds)."""
PATCH = "livepatch_sleeper"  # the stall fault sleeps in the function it replaces


def creds(broker: ShippedMosquitto, user: str) -> str:
    if user in SERVICES:
        return broker.services_url(user, SERVICES[user])
    return broker.url.replace("mqtt://", f"mqtt://{user}:{PEOPLE[user]}@")


class Loop:
    """An asyncio loop in a thread of its own (Playwright's sync API owns the test's thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="scenario-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedMosquitto]:
    """deploy/mosquitto.conf and deploy/livepatchd.acl as shipped (ports and paths replaced)."""
    broker = ShippedMosquitto(tmp_path_factory.mktemp("dash-acl") / "broker", PEOPLE, SERVICES)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


def post(url: str, body: dict[str, Any], header: bool = True) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          **({"x-livepatchd-control": "1"} if header else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def exec_count(page: Page, name: str, state: str) -> int:
    el = page.locator(f'.rollout[data-rollout="{name}"] [data-exec-count="{state}"]')
    if el.count() == 0:
        return 0
    return int(el.inner_text().split()[-1])


def test_rollouts_from_the_page(secured: ShippedMosquitto, browser: Browser, tmp_path: Path) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    prefix = f"d{uuid.uuid4().hex[:5]}"
    spec = FleetSpec.model_validate({"hosts": N_HOSTS, "prefix": prefix, "labels": {"zone": {"eu": 0.5, "us": 0.5}},
                                     "faults": [{"kind": "stall", "hosts": [], "count": 1,
                                                 "mode": "uninterruptible"}]})
    runner = FleetRunner(spec, overrides(tmp_path / "hosts", creds(secured, "livepatchd"),
                                         trusted_keys=[str(signer().public_path)], transition_stall_s=0.3),
                         workers=0)
    orch = Orchestrator(creds(secured, "orchestrator"), str(tmp_path / "orch.sqlite3"), worker="w1", poll_s=0.1)
    bundle = bundle_file(tmp_path, PATCH)
    loop = Loop()
    stop = asyncio.Event()
    ready = threading.Event()
    fleet_task = loop.submit(runner.run())
    orch_task = loop.submit(orch.serve(ready=ready.set, stop=stop))
    assert ready.wait(60), "the orchestrator did not start"
    observer_url = creds(secured, "observer")  # a person's account: one connection (the forged requests below)
    dashboard_url = creds(secured, "dashboard")  # the dashboard's service account: its feeds
    dash = DashboardServer(dashboard_url, free_port(),
                           controls=OperatorControls(creds(secured, "operator"))).start()
    watcher = DashboardServer(dashboard_url, free_port()).start()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(dash.url)
        expect(page.locator("#role")).to_have_text("operator")
        expect(page.locator('#groups .cell[data-state="online"]')).to_have_count(N_HOSTS, timeout=240_000)
        deadline = time.monotonic() + 60
        while len(orch.driver._states) < N_HOSTS:  # the orchestrator has every host's retained state
            assert time.monotonic() < deadline
            time.sleep(0.1)

        # start a rollout from the page: a dry run, then create and start
        rollout = {"name": "r-dash", "patch": PATCH, "bundles": {BUILD: bundle}, "targets": {"globs": [f"{prefix}-*"]},
                   "waves": {"count": 2, "success_threshold": 50},
                   "rate": {"per_minute": 240},
                   "stall": {"wait_s": 1, "then_wait_s": 40, "action": "revert"},
                   "abort": {"action": "rollback", "criteria": [
                       {"failure_type": "ALL", "threshold_pct": 50, "min_executed": 4},
                       {"failure_type": "STALLED", "threshold_pct": 30, "min_executed": 4, "scope": "wave"}]}}
        page.click("#rollout-new summary")
        page.fill("#spec", json.dumps(rollout, indent=1))
        page.click("#spec-dry-run")
        expect(page.locator("#control-result")).to_contain_text("dry run: waves", timeout=30_000)
        page.click("#spec-create-start")
        box = page.locator('.rollout[data-rollout="r-dash"]')
        expect(box).to_be_visible(timeout=30_000)
        expect(box.locator('[data-exec-count="QUEUED"]')).to_be_visible(timeout=30_000)
        expect(box).to_have_attribute("data-state", "RUNNING", timeout=30_000)
        expect(box.locator('[data-exec-count="SUCCEEDED"]')).to_be_visible(timeout=60_000)
        expect(box.locator(".abort")).to_have_count(2, timeout=10_000)
        expect(box.locator(".wave")).to_have_count(2)

        # pause: nothing new starts (hosts in flight finish); resume: it goes on
        box.locator('[data-control="pause"]').click()
        expect(box).to_have_attribute("data-state", "PAUSED", timeout=15_000)
        expect(box.locator('[data-control="pause"]')).to_have_count(0)
        time.sleep(2.0)
        held = exec_count(page, "r-dash", "QUEUED")
        time.sleep(1.5)
        assert exec_count(page, "r-dash", "QUEUED") == held, "a paused rollout starts no host"
        assert held > 0
        page.screenshot(path=str(SHOTS / "rollout-paused.png"), full_page=True)
        box.locator('[data-control="resume"]').click()
        expect(box).not_to_have_attribute("data-state", "PAUSED", timeout=15_000)

        # the stalled host: blocking task from its stall event; patch.check's prediction beside it
        # (live while the transition is blocked; "was:" once the stall policy reverted it)
        stall_row = page.locator("#stalls .stall", has_text="sleeper").first
        expect(stall_row).to_be_visible(timeout=120_000)
        expect(stall_row.locator(".actual")).to_contain_text("sleeper")
        stalled_host = stall_row.get_attribute("data-host")
        if stall_row.get_attribute("data-live") == "1":
            stall_row.locator('button[data-verb="transition"]').click()  # the operator asks the host, task by task
            expect(page.locator(f'#stalls .stall[data-host="{stalled_host}"] .actual')).to_contain_text(
                "patch.transition", timeout=30_000)
        page.locator("#stalls-view").screenshot(path=str(SHOTS / "stalls.png"))

        expect(box).to_have_attribute("data-state", "COMPLETED", timeout=240_000)
        assert exec_count(page, "r-dash", "SUCCEEDED") == N_HOSTS - 1
        assert exec_count(page, "r-dash", "REVERTED") == 1
        assert exec_count(page, "r-dash", "QUEUED") == 0
        expect(page.locator('#groups .cell[data-state="patched"]')).to_have_count(N_HOSTS - 1, timeout=30_000)
        page.locator("#rollouts-view").screenshot(path=str(SHOTS / "rollouts.png"))

        # a patched host's view: its patches (sysfs view) and proof-of-effect counters
        patched = page.locator('#groups .cell[data-state="patched"]').first
        patched.click()
        expect(page.locator(f'#host-patches tr[data-patch="{PATCH}"]')).to_contain_text("enabled")
        expect(page.locator(f'#host-patches tr[data-patch="{PATCH}"] .effect')).to_contain_text("calls",
                                                                                             timeout=30_000)
        # its call-cost table: the live patch's klp_ftrace_handler, called directly from its site (CALL_OPS)
        expect(page.locator(f'#cost-table tr.cost[data-name="{PATCH}"] [data-field="direct"]')).to_have_text(
            "56 insn", timeout=10_000)
        page.locator("#host-view").screenshot(path=str(SHOTS / "host-patched.png"))

        # an observer: no controls on its page, its server refuses them, and the broker drops a forged request
        obs = browser.new_page(viewport={"width": 1400, "height": 1000})
        obs.goto(watcher.url)
        expect(obs.locator('.rollout[data-rollout="r-dash"]')).to_have_attribute("data-state", "COMPLETED",
                                                                                  timeout=30_000)
        expect(obs.locator("#role")).to_contain_text("observer")
        assert obs.locator("[data-control]").count() == 0
        assert obs.locator("button.check").count() == 0
        expect(obs.locator("#rollout-new")).to_be_hidden()
        obs.screenshot(path=str(SHOTS / "observer.png"), full_page=True)
        obs.close()
        status, reply = post(f"{watcher.url}api/control/rollback", {"name": "r-dash"})
        assert status == 403
        assert reply["error"]["code"] == "not_operator"
        status, reply = post(f"{dash.url}api/control/rollback", {"name": "r-dash"}, header=False)
        assert status == 400, "a control without the page's header (another origin) is refused"

        async def forge() -> None:
            async with RolloutClient(observer_url, protocol="3.1.1", timeout=2, client_id="observer") as r:
                assert (await r.rollout_status("r-dash")).rollout.state == "COMPLETED"  # reading is allowed
                with pytest.raises(RequestTimeout):
                    await r.rollback("r-dash")
                with pytest.raises(RequestTimeout):
                    await r.request("rollout.cancel", {"name": "r-dash"})
        loop.run(forge())
        assert orch.engine.doc("r-dash").state == "COMPLETED", "the forged rollback never reached the orchestrator"

        # roll back from the page: every host back to unpatched
        box.locator('[data-control="rollback"]').click()
        expect(box).to_have_attribute("data-state", "ROLLED_BACK", timeout=120_000)
        expect(page.locator('#groups .cell[data-state="patched"]')).to_have_count(0, timeout=30_000)
        expect(page.locator('#groups .cell[data-state="online"]')).to_have_count(N_HOSTS)
        page.locator("#rollouts-view").screenshot(path=str(SHOTS / "rollout-rolled-back.png"))

        # a rehearsal (every host unpatched again): the spec against a simulated twin of its targets, two of them
        # stalling; its report on the page with the timeline (hosts per state over simulated time, the waves'
        # starts, the events)
        page.fill("#spec", json.dumps({**rollout, "name": "r-rehearsed"}))
        page.fill("#rehearse-faults", json.dumps([{"kind": "stall", "count": 2, "mode": "uninterruptible"}]))
        page.fill("#rehearse-seed", "7")
        page.click("#spec-rehearse")
        expect(page.locator("#control-result")).to_have_text("rehearse: ok", timeout=120_000)
        rehearsal = page.locator("#rehearsal-view")
        expect(rehearsal).to_be_visible(timeout=120_000)
        expect(page.locator("#rehearsal-title")).to_contain_text("r-rehearsed")
        expect(page.locator("#rehearsal-summary")).to_contain_text("stall on 2 host(s)")
        expect(page.locator("#rehearsal-waves .rehearsal-wave")).to_have_count(2)
        expect(page.locator("#rehearsal-timeline .rehearsal-event").first).to_be_visible()
        expect(page.locator("#rehearsal-timeline")).to_contain_text("started")
        expect(page.locator("#rehearsal-plot .scatterlayer .trace")).not_to_have_count(0, timeout=10_000)
        assert "r-rehearsed" not in orch.engine.store.names(), "a rehearsal creates no rollout"
        rehearsal.screenshot(path=str(SHOTS / "rehearsal.png"))
        status, reply = post(f"{watcher.url}api/control/rehearse", {"spec": rollout})
        assert (status, reply["error"]["code"]) == (403, "not_operator")

        # predicted beside actual: a second rollout asks patch.check before each enable and skips the host whose
        # transition would stall; the stalls view shows that prediction beside what the first rollout met there
        page.fill("#spec", json.dumps({**rollout, "name": "r-predict", "waves": {"count": 1},
                                       "rate": {"per_minute": 6000}, "abort": {},
                                       "stall": {"wait_s": 1, "then_wait_s": 5, "predict": "skip"}}))
        page.click("#spec-create-start")
        second = page.locator('.rollout[data-rollout="r-predict"]')
        expect(second).to_have_attribute("data-state", "COMPLETED", timeout=120_000)
        assert exec_count(page, "r-predict", "REMOVED") == 1
        row = page.locator(f'#stalls .stall[data-host="{stalled_host}"]')
        expect(row.locator(".predicted")).to_contain_text("would stall", timeout=15_000)
        expect(row.locator(".predicted")).to_contain_text("sleeper")
        expect(row.locator(".actual")).to_contain_text("sleeper")
        page.locator("#stalls-view").screenshot(path=str(SHOTS / "stalls-predicted.png"))
    finally:
        page.close()
        dash.stop()
        watcher.stop()
        loop.loop.call_soon_threadsafe(stop.set)
        orch_task.result(60)
        loop.loop.call_soon_threadsafe(runner.stop)
        fleet_task.result(120)
        loop.close()
