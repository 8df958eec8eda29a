"""The MQTT bridge's two lanes: a read is dispatched at once while changes fill theirs, changes past the lane's
limit wait in a bounded backlog (then the receive loop waits), in order; and each request's stages are timed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

from clients.sdk import LivepatchClient
from daemon.mqtt.lanes import Lanes, Start, lane_of


def test_lane_of_follows_the_schema() -> None:
    assert lane_of("info") == "read"
    assert lane_of("ftrace.ops.list") == "read"
    assert lane_of("ftrace.ops.register") == "change"
    assert lane_of("patch.enable") == "change"
    assert lane_of("no.such.verb") == "read"  # refused at once by the service: nothing to hold back


def test_a_read_never_waits_for_a_full_change_lane() -> None:
    async def main() -> None:
        lanes = Lanes(reads=4, changes=1, backlog=2)
        lanes.spawn = lambda coro: asyncio.get_running_loop().create_task(coro)
        release = asyncio.Event()
        order: list[str] = []

        def change(name: str) -> Start:
            async def run() -> None:
                order.append(f"{name} started")
                await release.wait()
                order.append(f"{name} done")
            return run

        async def read() -> None:
            order.append("read")

        await lanes.submit("change", change("c1"))
        await lanes.submit("change", change("c2"))  # parked: the lane holds one
        await lanes.submit("change", change("c3"))  # parked: the backlog holds two
        assert (lanes.running("change"), lanes.parked) == (1, 2)
        await asyncio.wait_for(lanes.submit("read", read), 1)  # not held by the changes
        await asyncio.sleep(0)
        assert "read" in order
        fourth = asyncio.ensure_future(lanes.submit("change", change("c4")))
        await asyncio.sleep(0.05)
        assert not fourth.done(), "a full backlog makes the receive loop wait (the broker keeps the rest)"
        release.set()
        await asyncio.wait_for(fourth, 2)
        while lanes.active or lanes.parked:
            await asyncio.sleep(0.01)
        started = [e.split()[0] for e in order if e.endswith("started")]
        assert started == ["c1", "c2", "c3", "c4"]
        assert lanes.running("change") == lanes.running("read") == 0

    run(main())


def test_parked_changes_are_dropped_unstarted() -> None:
    async def main() -> None:
        lanes = Lanes(reads=1, changes=1, backlog=5)
        lanes.spawn = lambda coro: asyncio.get_running_loop().create_task(coro)
        gate = asyncio.Event()
        started: list[int] = []

        def change(i: int) -> Start:
            async def run() -> None:
                started.append(i)
                await gate.wait()
            return run

        for i in range(3):
            await lanes.submit("change", change(i))
        assert lanes.drop_parked() == 2
        gate.set()
        await asyncio.sleep(0.05)
        assert started == [0]

    run(main())


def test_every_request_is_timed_by_stage(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonThread(daemon_settings(tmp_path, mosquitto.url)).start()
    try:
        async def main() -> None:
            async with LivepatchClient(mosquitto.url, d.host) as c:
                for _ in range(5):
                    await c.info()
                await c.ops_register("lanes-test", filter="work_step_*")
                await c.ops_unregister("lanes-test")
        run(main())
        bridge = d.daemon.bridge
        assert bridge is not None
        registry = bridge.service.metrics.registry
        for lane, count in (("read", 5), ("change", 2)):
            for stage in ("dispatch", "service", "reply"):
                got = registry.get_sample_value("lpd_request_stage_seconds_count", {"lane": lane, "stage": stage})
                assert got is not None
                assert got >= count, (lane, stage, got)
    finally:
        d.stop()
