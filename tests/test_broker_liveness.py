"""Liveness without a last will, and discovery without retained wildcards (private Mosquitto, real daemons).

A broker node that dies takes its connections' wills with it: the retained ``online`` stays. The daemon beats
instead (its status again every ``heartbeat_s``), and clients call a host whose beat is older than
``STALE_AFTER_BEATS`` periods ``stale``. To stop a daemon's beats while its connection stays open (what a dead
broker node looks like from the rest of the cluster), the test freezes the daemon process with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from mqtt_fixtures import REPO, DaemonProcess, Mosquitto, run

from clients.sdk import LivepatchClient
from schemas import STALE_AFTER_BEATS, StatusDoc
from schemas.discovery import DISCOVER, DiscoverRequest

BEAT_S = 0.3


def lpctl(broker: str, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "--broker", broker, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def beating(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("beating"), mosquitto.url, LIVEPATCHD_HEARTBEAT_S=str(BEAT_S))
    d.start()
    d.wait_online(60)
    yield d
    d.kill()


def test_the_status_beats(beating: DaemonProcess, mosquitto: Mosquitto) -> None:
    async def main() -> list[StatusDoc]:
        seen: list[StatusDoc] = []
        async with LivepatchClient(mosquitto.url, beating.host) as c:
            async with asyncio.timeout(5):
                async for doc in c.statuses():
                    seen.append(doc)
                    if len(seen) == 3:
                        return seen
        return seen
    seen = run(main())
    assert [d.state for d in seen] == ["online"] * 3
    beats = [d.beat for d in seen]
    assert beats == sorted(beats)
    assert beats[-1] >= 2
    assert all(d.heartbeat_s == BEAT_S for d in seen)
    assert all(d.heartbeat_at is not None and abs(time.time() - d.heartbeat_at) < 5 for d in seen)
    assert all(d.liveness(time.time()) == "online" for d in seen)


def test_a_frozen_host_turns_stale_then_online_again(beating: DaemonProcess, mosquitto: Mosquitto) -> None:
    assert beating.proc is not None
    os.kill(beating.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(STALE_AFTER_BEATS * BEAT_S + 0.6)
        code, out, _ = lpctl(mosquitto.url, "--json", "hosts")
        assert code == 0
        assert json.loads(out)[beating.host]["liveness"] == "stale"
        code, out, _ = lpctl(mosquitto.url, "hosts")
        assert f"{beating.host}" in out
        assert "stale" in out
        code, out, _ = lpctl(mosquitto.url, "--host", beating.host, "status")
        assert code == 4
        assert f"{beating.host}: stale" in out

        async def sdk_view() -> str | None:
            async with LivepatchClient(mosquitto.url, beating.host) as c:
                return await c.liveness()
        assert run(sdk_view()) == "stale"
    finally:
        os.kill(beating.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while True:
        code, out, _ = lpctl(mosquitto.url, "--host", beating.host, "status")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 0
    assert f"{beating.host}: online" in out
    assert "last heartbeat" in out


def test_discovery_finds_the_online_hosts(beating: DaemonProcess, mosquitto: Mosquitto) -> None:
    async def main() -> dict[str, StatusDoc]:
        async with LivepatchClient(mosquitto.url) as c:
            return await c.discover(1.0)
    found = run(main())
    assert beating.host in found
    doc = found[beating.host]
    assert doc.state == "online"
    assert doc.heartbeat_at is not None
    assert time.time() - doc.heartbeat_at < 1.0 + 0.5  # made when asked (the collection lasted 1 s)


def test_discovery_answers_nowhere_but_a_discovery_reply_topic(beating: DaemonProcess, mosquitto: Mosquitto) -> None:
    target = f"livepatch/v1/{beating.host}/request/call"
    async def main() -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as c:
            await c.subscribe(target, qos=0)
            await c.subscribe(f"{DISCOVER}/reply/#", qos=0)
            for reply_to in (target, f"{DISCOVER}/reply/a/b", f"{DISCOVER}/reply/+"):
                await c.publish(DISCOVER, json.dumps({"request_id": "x", "reply_to": reply_to}), qos=0)
            await c.publish(DISCOVER, b"not json", qos=0)
            await c.publish(DISCOVER, DiscoverRequest(request_id="ok", reply_to=f"{DISCOVER}/reply/probe")
                            .model_dump_json(), qos=0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for m in c.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        host = json.loads(payload).get("host", "?") if payload.startswith(b"{") else "?"
                        got.append((m.topic.value, host))
        return got
    got = run(main())
    # other daemons on this broker answer too; this one answered the valid request only, once
    assert [topic for topic, host in got if host == beating.host] == [f"{DISCOVER}/reply/probe"]
    assert all(topic == f"{DISCOVER}/reply/probe" for topic, _ in got)


def test_the_will_has_no_time(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, mosquitto.url)
    d.start()
    d.wait_online(60)
    d.kill()  # kill -9: the broker publishes the will

    async def main() -> StatusDoc:
        async with LivepatchClient(mosquitto.url, d.host) as c:
            doc: StatusDoc | None = None

            async def offline() -> bool:
                nonlocal doc
                doc = await c.status(0.5)
                return doc is not None and doc.state == "offline"
            async with asyncio.timeout(30):
                while not await offline():
                    pass
            assert doc is not None
            return doc
    will = run(main())
    assert (will.reason, will.time, will.heartbeat_at) == ("connection_lost", None, None)
    assert will.liveness(time.time()) == "offline"


