"""The fleet runner over a real Mosquitto: many hosts (each a full daemon) in worker processes, every one with its
own MQTT identity, state dir and retained state; growing, shrinking; a crashed host back with its desired state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mqtt_fixtures import Mosquitto, run, wait_for
from test_service_patch import signed, signer

from clients.dashboard import FleetFeed
from clients.sdk import LivepatchClient
from daemon.fleet.plan import draw
from daemon.fleet.runner import FleetRunner, fleet_dir, request_size
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import load_image
from schemas.documents import StateDoc
from schemas.fleet import FleetSection, FleetSpec, LabelsSection


def overrides(tmp: Path, url: str, **more: Any) -> dict[str, Any]:
    return {"broker_url": url, "state_dir": str(tmp), "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
            "log_level": "warning", **more}


@contextlib.asynccontextmanager
async def running(runner: FleetRunner, url: str) -> AsyncIterator[FleetFeed]:
    """The runner and an observer of every host's retained documents, both stopped on the way out."""
    feed = FleetFeed(url)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(runner.run())
        follow = tg.create_task(feed.run())
        try:
            yield feed
        finally:
            runner.stop()
            await asyncio.wait_for(asyncio.shield(task), 60)
            follow.cancel()


async def info_of(url: str, hosts: list[str]) -> dict[str, str]:
    async def one(host: str) -> tuple[str, str]:
        async with LivepatchClient(url, host, protocol="3.1.1") as c:
            info = await c.info()
            return info.host, info.kernel_build_id
    return dict(await asyncio.gather(*(one(h) for h in hosts)))


def test_fleet_of_hosts_in_workers_answers_grows_and_shrinks(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"f{uuid.uuid4().hex[:6]}"
    spec = FleetSpec(hosts=20, prefix=prefix, seed=7, labels={"zone": {"eu": 0.5, "us": 0.5}})
    plans = {p.host: p for p in draw(spec, 24)}
    build_id = load_image(IMAGE_PATH)[0].build_id
    runner = FleetRunner(spec, overrides(tmp_path, mosquitto.url), workers=2)

    async def scenario() -> None:
        async with running(runner, mosquitto.url) as feed:
            await wait_for(lambda: runner.all_online, 90)
            hosts = sorted(runner.online)
            assert hosts == spec.host_ids()
            assert await info_of(mosquitto.url, hosts) == dict.fromkeys(hosts, build_id)
            await wait_for(lambda: all((feed.hosts.get(h) or _no).state for h in hosts))
            for h in hosts:
                state = feed.hosts[h].state
                assert state is not None
                assert state["kernel"]["release"] == "6.1-lp1"
                assert state["components"]["labels"] == plans[h].labels
                assert state["components"]["fleet"]["workload"] == "idle"
                doc = StateDoc.model_validate(state)
                assert isinstance(doc.section("labels"), LabelsSection)
                assert isinstance(doc.section("fleet"), FleetSection)
                assert (tmp_path / h / "journal.sqlite3").is_file()
                assert (tmp_path / h / "desired.sqlite3").is_file()
            assert {plans[h].labels["zone"] for h in hosts} == {"eu", "us"}
            assert sorted(runner.where[h] for h in hosts) == [0] * 10 + [1] * 10, "spread evenly over the workers"

            await wait_for(lambda: _status(tmp_path)["online"] == 20, 10)
            status = _status(tmp_path)
            assert [w["hosts"] for w in status["workers"]] == [10, 10]
            assert all(w["rss_mb"] > 0 for w in status["workers"])

            request_size(tmp_path, 24)  # the control file, as `livepatchd fleet scale 24` writes it
            await wait_for(lambda: runner.target == 24 and runner.all_online, 60)
            grown = spec.host_ids(24)[20:]
            assert await info_of(mosquitto.url, grown) == dict.fromkeys(grown, build_id)

            runner.resize(18)
            gone = spec.host_ids(24)[18:]
            await wait_for(lambda: all(_offline(feed, h) == "shutdown" for h in gone), 30)
            await wait_for(lambda: sorted(runner.online) == spec.host_ids(18), 10)
            assert all((tmp_path / h / "journal.sqlite3").is_file() for h in gone), "a removed host's state stays"
            assert await info_of(mosquitto.url, spec.host_ids(18)[-2:]) == dict.fromkeys(spec.host_ids(18)[-2:],
                                                                                           build_id)
        assert _status(tmp_path)["stopped"] is True
        await wait_for(lambda: all(_offline(feed, h) == "shutdown" for h in spec.host_ids(18)), 10)

    run(scenario())


def test_crashed_host_boots_again_with_its_desired_state(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}"
    spec = FleetSpec(hosts=3, prefix=prefix)
    runner = FleetRunner(spec, overrides(tmp_path, mosquitto.url, trusted_keys=[str(signer().public_path)]),
                         workers=0)
    victim = spec.host_ids()[1]

    async def scenario() -> None:
        async with running(runner, mosquitto.url) as feed, \
                LivepatchClient(mosquitto.url, victim, protocol="3.1.1") as c:
            await wait_for(lambda: runner.all_online, 60)
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            await c.patch_enable("livepatch_cmdline", wait=True)
            patched = (await c.call_read("proc_cmdline_read")).text
            assert "livepatch" in patched

            runner.crash(victim, reboot_after_s=0.5)
            await wait_for(lambda: _offline(feed, victim) == "connection_lost", 20)  # the last will
            assert feed.hosts[victim].status["boot_seq"] == 1  # type: ignore[index]
            await wait_for(lambda: runner.online.get(victim) == 2, 30)
            assert runner.crashes == {victim: 1}
            info = await c.patch_info("livepatch_cmdline")
            assert (info.enabled, info.desired_enabled) == (True, True), "re-applied at boot, as serve does"
            assert (await c.call_read("proc_cmdline_read")).text == patched
            others = [h for h in spec.host_ids() if h != victim]
            assert all(runner.online[h] == 1 for h in others), "the other hosts did not notice"

    run(scenario())


class _No:
    state: None = None
    status: None = None


_no = _No()


def _offline(feed: FleetFeed, host: str) -> str | None:
    docs = feed.hosts.get(host)
    status = docs.status if docs is not None else None
    return str(status["reason"]) if status is not None and status["state"] == "offline" else None


def _status(tmp: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((fleet_dir(tmp) / "status.json").read_text())
    return doc
