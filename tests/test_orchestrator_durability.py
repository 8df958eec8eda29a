"""kill -9 of the orchestrator mid-wave (SQLite), and of one of two workers sharing PostgreSQL: no host execution
lost or driven twice, and the rollout completes. The orchestrators are real processes (`livepatchd
orchestrator`); the hosts are real fleet hosts over a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import running
from test_orchestrator import SLEEPER, bundle_file, fleet_runner, spec_doc
from test_rollout_store import _pg_url

from clients.rollout.store import Store
from clients.sdk import LivepatchClient, RequestTimeout, RolloutClient
from schemas.topics import ORCHESTRATOR_SERVICE


def start_worker(url: str, db: str, worker: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "daemon.cli", "orchestrator", "--broker", url, "--db", db, "--worker", worker,
           "--poll", "0.1", "--lease", "2"]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())


async def answering(url: str) -> None:
    """Until an orchestrator answers (it subscribes a moment after it starts)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with RolloutClient(url, protocol="3.1.1", timeout=1.0) as r:
                await r.rollouts()
                return
        except RequestTimeout:
            if time.monotonic() > deadline:
                raise


async def succeeded(url: str, name: str) -> int:
    async with RolloutClient(url, protocol="3.1.1", timeout=10) as r:
        return (await r.rollout_status(name)).rollout.counts.get("SUCCEEDED", 0)


async def start_rollout(url: str, prefix: str, n: int, tmp: Path) -> None:
    """Once an orchestrator answers and has seen the n hosts: create and start the rollout."""
    await answering(url)
    async with RolloutClient(url, protocol="3.1.1", timeout=30) as r:
        await wait_for_fleet(r, prefix, n, tmp)
        await r.create(_rollout(tmp, prefix))
        await r.start("dur1")


async def until_succeeded(url: str, n: int, within: float, log: Path) -> None:
    deadline = time.monotonic() + within
    while await succeeded(url, "dur1") < n:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.05)


def kill_9(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


def check_once_each(store: Store, name: str, hosts: list[str]) -> set[str]:
    """Every host: SUCCEEDED, its versions 2..n each written once, and it went into its transition once."""
    execs = {e.host: e for e in store.executions(name)}
    assert Counter(e.state.value for e in execs.values()) == {"SUCCEEDED": len(hosts)}
    steps = store.steps(name)
    owners = set()
    for h in hosts:
        mine = [(v, o, s) for host, v, o, s in steps if host == h]
        versions = sorted(v for v, _, _ in mine)
        assert versions == list(range(2, execs[h].version + 1)), f"{h}: a version lost or written twice"
        assert sum(s == "TRANSITIONING" for _, _, s in mine) == 1, f"{h}: enabled more than once"
        owners |= {o for _, o, _ in mine}
    return owners


async def patched_everywhere(url: str, hosts: list[str]) -> None:
    for h in hosts:
        async with LivepatchClient(url, h, protocol="3.1.1") as c:
            on = [p.name for p in (await c.patch_list()).patches if p.enabled]
            assert on == [SLEEPER], h


def _rollout(tmp: Path, prefix: str) -> dict[str, Any]:
    return spec_doc("dur1", prefix, bundle_file(tmp, SLEEPER), SLEEPER, waves={"count": 2},
                    rate={"per_minute": 90})


def test_kill_9_mid_wave_then_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 10)
    prefix = hosts[0].rsplit("-", 1)[0]
    db = str(tmp_path / "orch.sqlite3")
    log = tmp_path / "orch.log"

    async def scenario() -> None:
        async with running(runner, mosquitto.url):
            await wait_for(lambda: len(runner.online) == 10, 60)
            first = start_worker(mosquitto.url, db, "w1", log)
            second: subprocess.Popen[bytes] | None = None
            try:
                await start_rollout(mosquitto.url, prefix, 10, tmp_path)
                await until_succeeded(mosquitto.url, 3, 60, log)
                kill_9(first)
                second = start_worker(mosquitto.url, db, "w2", log)
                await answering(mosquitto.url)
                await until_succeeded(mosquitto.url, 10, 90, log)
                await patched_everywhere(mosquitto.url, hosts)
            finally:
                for p in (first, second):
                    if p is not None and p.poll() is None:
                        p.terminate()
                        p.wait(20)
        store = Store(db)
        try:
            owners = check_once_each(store, "dur1", hosts)
            assert {"w1", "w2"} <= owners, "the restarted orchestrator carried on the killed one's rollout"
            assert store.rollout("dur1").state == "COMPLETED"  # type: ignore[union-attr]
        finally:
            store.close()

    run(scenario())


async def wait_for_fleet(r: RolloutClient, prefix: str, n: int, tmp: Path) -> None:
    """Until the orchestrator has seen every host's retained state (a dry run plans against it)."""
    deadline = time.monotonic() + 30
    bundle = bundle_file(tmp, SLEEPER)
    while True:
        try:
            dry = await r.dry_run(spec_doc("probe", prefix, bundle, SLEEPER))
            if sum(len(w) for w in dry.waves) == n:
                return
        except Exception:  # noqa: BLE001 - not all hosts seen yet: the plan may refuse or be short
            pass
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


def test_two_workers_on_postgresql_one_killed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    url = _pg_url()
    assert url is not None, "PostgreSQL is not running: .ci/run starts it"
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 12)
    prefix = hosts[0].rsplit("-", 1)[0]
    log = tmp_path / "orch.log"

    async def scenario() -> None:
        async with running(runner, mosquitto.url):
            await wait_for(lambda: len(runner.online) == 12, 60)
            a = start_worker(mosquitto.url, url, "wa", log)
            b = start_worker(mosquitto.url, url, "wb", log)
            try:
                await start_rollout(mosquitto.url, prefix, 12, tmp_path)
                await until_succeeded(mosquitto.url, 4, 60, log)
                kill_9(a)
                await until_succeeded(mosquitto.url, 12, 90, log)
                await patched_everywhere(mosquitto.url, hosts)
            finally:
                for p in (a, b):
                    if p.poll() is None:
                        p.terminate()
                        p.wait(20)
        store = Store(url)
        try:
            owners = check_once_each(store, "dur1", hosts)
            assert {"wa", "wb"} <= owners, "both workers drove host steps"
            with store.tx() as t:
                handled = Counter(row[0] for row in t.run("SELECT worker FROM requests WHERE verb <> ''"))
            assert sum(handled.values()) >= 3  # create, start, status polls: each by exactly one worker (its PK)
        finally:
            store.close()

    run(scenario())


async def service_doc(url: str, want: dict[str, str], within: float = 20.0) -> dict[str, Any]:
    """The retained service document, once it is ``want`` (read by fresh subscriptions, as a dashboard would)."""
    host, port = url.removeprefix("mqtt://").split(":")
    deadline = time.monotonic() + within
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with aiomqtt.Client(host, int(port), protocol=aiomqtt.ProtocolVersion.V311) as c:
            await c.subscribe(ORCHESTRATOR_SERVICE, qos=1)
            try:
                async with asyncio.timeout(1.0):
                    async for m in c.messages:
                        doc = json.loads(m.payload) if isinstance(m.payload, bytes) else {}
                        break
            except TimeoutError:
                pass
        if doc == want:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"the retained service document is {doc}, not {want}")


def test_service_document_is_the_last_will(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """online at start; kill -9: the broker publishes the will (offline); with two workers, the one left says
    online again when the other dies; a clean stop says offline."""
    log = tmp_path / "orch.log"

    async def scenario() -> None:
        a = start_worker(mosquitto.url, str(tmp_path / "a.sqlite3"), "wa", log)
        b: subprocess.Popen[bytes] | None = None
        try:
            await service_doc(mosquitto.url, {"state": "online", "worker": "wa"})
            kill_9(a)
            await service_doc(mosquitto.url, {"state": "offline", "worker": "wa"})

            a = start_worker(mosquitto.url, str(tmp_path / "a.sqlite3"), "wa", log)
            await service_doc(mosquitto.url, {"state": "online", "worker": "wa"})
            b = start_worker(mosquitto.url, str(tmp_path / "b.sqlite3"), "wb", log)
            await service_doc(mosquitto.url, {"state": "online", "worker": "wb"})
            kill_9(b)
            await service_doc(mosquitto.url, {"state": "online", "worker": "wa"})  # wa still serves

            a.terminate()
            assert a.wait(20) == 0, log.read_text()[-2000:]
            await service_doc(mosquitto.url, {"state": "offline", "worker": "wa"})
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(10)

    run(scenario())
