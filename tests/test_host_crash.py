"""A host object that crashes: the broker publishes its last will, and the same state dir boots it again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clients.sdk import LivepatchClient
from daemon.app import Daemon
from tests.mqtt_fixtures import Mosquitto, daemon_settings, next_status, run, wait_for


def test_crash_fires_the_will_and_the_host_reboots(mosquitto: Mosquitto, tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, mosquitto.url, nr_cpus=1, tcg_buffer_size_mb=4, kernel_release="6.1-lp1")

    async def scenario() -> None:
        first = Daemon(settings)
        task = asyncio.create_task(first.run())
        async with LivepatchClient(mosquitto.url, settings.host_id) as c:
            await wait_for(lambda: first.bridge is not None and first.bridge.online.is_set())
            assert first.service is not None
            boot_seq = first.service.boot_seq
            state = (await c.info())
            assert state is not None
            first.crash()
            await asyncio.wait_for(task, 30)
            assert first.crashed
            will = await next_status(c, "offline", boot_seq)
            assert will.reason == "connection_lost"
            second = Daemon(settings)
            task2 = asyncio.create_task(second.run())
            await next_status(c, "online", boot_seq + 1)
            doc = await c.state()
            assert doc.kernel.release == "6.1-lp1"
            second.stop()
            await asyncio.wait_for(task2, 30)

    run(scenario())
