"""``FleetClient`` and ``lpctl hosts`` over a real Mosquitto and an 8-host fleet: filters (labels, build, status,
patched), the table and --json, foreign or invalid retained documents skipped (logged, no stream ended), the
change stream, and bad selectors refused with exit 2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_fixtures import Mosquitto, logs_to_stderr, run, wait_for
from test_service_patch import signed, signer
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import FleetClient, HostChange, HostFilter, LivepatchClient
from daemon.fleet.runner import FleetRunner
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import load_image
from schemas.fleet import FleetSpec, HostOverride

cli = CliRunner()
PATCH = "livepatch_cmdline"


class Fleet:
    """A fleet runner on its own loop in a thread (the tests' loops stay free for clients)."""

    def __init__(self, spec: FleetSpec, overrides: dict[str, Any]) -> None:
        logs_to_stderr()  # stdout belongs to the lpctl under test
        self.spec = spec
        self.runner = FleetRunner(spec, overrides, workers=0)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="fleet-runner", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.runner.run()
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001  (reported by the fixture)
            self.error = exc

    def start(self) -> Fleet:
        self.thread.start()
        run(wait_for(lambda: self.error is not None or self.runner.all_online, 120))
        if self.error is not None:
            raise RuntimeError("the fleet did not start") from self.error
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.runner.stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the fleet did not stop"
        if self.error is not None:
            raise RuntimeError("the fleet failed") from self.error


@pytest.fixture(scope="module")
def fleet(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prefix = f"h{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{i:04d}" for i in range(8)]
    zones = ["eu", "eu", "eu", "us", "us", "us", "ap", "ap"]
    tiers = ["web", "db"] * 4
    spec = FleetSpec.model_validate({
        "hosts": 8, "prefix": prefix, "seed": 3,
        "overrides": {h: HostOverride(labels={"zone": z, "tier": t}) for h, z, t in zip(ids, zones, tiers,
                                                                                           strict=True)},
        "faults": [{"kind": "slow", "hosts": [ids[6]], "delay_s": 0.05}, {"kind": "reject", "hosts": [ids[7]]}]})
    overrides = {"broker_url": mosquitto.url, "state_dir": str(tmp_path_factory.mktemp("fleet")),
                 "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "log_level": "warning",
                 "trusted_keys": [str(signer().public_path)]}
    f = Fleet(spec, overrides).start()
    yield f
    f.stop()


def ids_of(fleet: Fleet) -> list[str]:
    return fleet.spec.host_ids()


def lpctl(url: str, *args: str) -> tuple[int, str, str]:
    result = cli.invoke(app, ["--broker", url, *args], env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


async def listing(url: str, host_filter: HostFilter | None = None) -> list[str]:
    async with FleetClient(url) as fleet:
        return [r.id for r in await fleet.hosts(host_filter)]


def mine(fleet: Fleet, found: list[str]) -> list[str]:
    """The hosts of this test's fleet among ``found`` (the session's broker has other tests' hosts too)."""
    return [h for h in found if h in set(ids_of(fleet))]


def test_filters_select_the_right_hosts(fleet: Fleet, mosquitto: Mosquitto) -> None:
    ids = ids_of(fleet)
    build_id = load_image(IMAGE_PATH)[0].build_id

    async def scenario() -> None:
        async with FleetClient(mosquitto.url) as c:
            records = {r.id: r for r in await c.hosts() if r.id in ids}
        assert sorted(records) == ids
        for r in records.values():
            assert (r.status, r.build_id, r.release, r.boot_seq) == ("online", build_id, "6.1-lp1", 1)
            assert r.patches == ()
            assert r.transition is None
        assert records[ids[0]].labels == {"zone": "eu", "tier": "web"}
        assert records[ids[6]].faults == ("slow",)
        assert records[ids[7]].faults == ("reject",)
        assert records[ids[0]].faults == ()

        url = mosquitto.url
        assert mine(fleet, await listing(url, HostFilter(labels={"zone": "eu"}))) == ids[0:3]
        assert mine(fleet, await listing(url, HostFilter(labels={"zone": "us", "tier": "db"}))) == [ids[3], ids[5]]
        assert mine(fleet, await listing(url, HostFilter(labels={"zone": "mars"}))) == []
        assert mine(fleet, await listing(url, HostFilter(build="6.1-lp1"))) == ids
        assert mine(fleet, await listing(url, HostFilter(build=build_id[:10]))) == ids
        assert mine(fleet, await listing(url, HostFilter(build="6.6-lp1"))) == []
        assert mine(fleet, await listing(url, HostFilter(state="online"))) == ids
        assert mine(fleet, await listing(url, HostFilter(state="offline"))) == []
        assert mine(fleet, await listing(url, HostFilter(patched=PATCH))) == []

    run(scenario())


def test_patched_filter_and_change_stream(fleet: Fleet, mosquitto: Mosquitto) -> None:
    """A host enabling a patch enters a ``patched`` selection (``added``), disabling it leaves it (``removed``);
    the heartbeats in between are not changes."""
    ids = ids_of(fleet)
    target = ids[1]

    async def scenario() -> None:
        async with FleetClient(mosquitto.url) as fleet_client, \
                LivepatchClient(mosquitto.url, target, protocol="3.1.1") as host:
            await fleet_client.hosts()
            stream = fleet_client.changes(HostFilter(patched=PATCH))
            await host.patch_load(signed(PATCH).to_bytes())
            await host.patch_enable(PATCH, wait=True)
            async with asyncio.timeout(20):
                change: HostChange = await anext(stream)
                while change.host not in ids:  # the session broker keeps other tests' hosts (their wills, states)
                    change = await anext(stream)
            assert (change.kind, change.host) == ("added", target)
            assert change.record.patched(PATCH)
            assert mine(fleet, await listing(mosquitto.url, HostFilter(patched=PATCH))) == [target]
            code, out, _ = await asyncio.to_thread(lpctl, mosquitto.url, "hosts", "--patched", PATCH)
            assert code == 0
            assert target in out
            assert PATCH in out
            assert ids[0] not in out

            follower = asyncio.ensure_future(asyncio.to_thread(
                lpctl, mosquitto.url, "--json", "hosts", "--patched", PATCH, "--follow", "--seconds", "6"))
            await asyncio.sleep(2.0)  # it has listed and follows
            await host.patch_disable(PATCH, wait=True)
            code, out, _ = await follower
            assert code == 0
            listed, *followed = (json.loads(line) for line in out.splitlines())
            followed = [f for f in followed if f["host"] in ids]  # not other tests' hosts on the session broker
            assert [h for h in listed if h in ids] == [target]
            assert {f["host"] for f in followed} == {target}
            assert [f["change"] for f in followed][-1:] == ["removed"], "changed while disabling, then removed"
            assert followed[-1]["patches"][0]["name"] == PATCH
            async with asyncio.timeout(20):
                change = await anext(stream)
                while change.kind == "changed" or change.host not in ids:  # the disabling transition's states
                    assert change.host == target or change.host not in ids
                    change = await anext(stream)
            assert (change.kind, change.host) == ("removed", target)
            assert not change.record.patched(PATCH)
            await host.patch_unload(PATCH)
            await stream.aclose()

    run(scenario())


def test_lpctl_hosts_table_and_json(fleet: Fleet, mosquitto: Mosquitto) -> None:
    ids = ids_of(fleet)
    code, out, _ = lpctl(mosquitto.url, "hosts", "--label", "zone=us")
    assert code == 0
    header = out.splitlines()[1]
    for column in ("host", "build", "labels", "status", "patches", "transition", "faults"):
        assert column in header
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert [h for h in rows if h in ids] == ids[3:6]
    assert all(ids[i] not in out for i in (0, 1, 2, 6, 7))
    assert "6.1-lp1" in rows[ids[3]]
    assert "tier=db,zone=us" in rows[ids[3]]
    assert "online (boot 1)" in rows[ids[3]]

    code, out, _ = lpctl(mosquitto.url, "hosts", "--label", "zone=ap", "--label", "tier=web")
    assert code == 0
    assert ids[6] in out
    assert ids[7] not in out
    assert "slow" in out

    code, out, _ = lpctl(mosquitto.url, "--json", "hosts", "--state", "online", "--build", "6.1-lp1")
    assert code == 0
    doc = json.loads(out)
    assert set(ids) <= set(doc)
    one = doc[ids[7]]
    assert (one["liveness"], one["state"], one["release"], one["faults"]) == ("online", "online", "6.1-lp1",
                                                                               ["reject"])
    assert one["labels"] == {"zone": "ap", "tier": "db"}
    assert (one["patches"], one["transition"], one["boot_seq"]) == ([], None, 1)

    code, out, _ = lpctl(mosquitto.url, "hosts", "--label", "zone=nowhere")
    assert (code, out.strip()) == (0, "no hosts match")


async def _publish(url: str, items: list[tuple[str, bytes]], *, retain: bool = True) -> None:
    port = int(url.rsplit(":", 1)[1])
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"foreign-{uuid.uuid4().hex[:8]}") as c:
        for topic, payload in items:
            await c.publish(topic, payload, qos=1, retain=retain)


def test_foreign_and_invalid_documents_are_skipped(fleet: Fleet, mosquitto: Mosquitto,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ids = ids_of(fleet)
    bad = [f"x{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    valid_status = json.dumps({"host": bad[3], "state": "online", "boot_seq": 1, "reason": "started", "time": 1.0,
                               "version": "0.1.0"}).encode()
    foreign = [
        (f"livepatch/v1/{bad[0]}/status", b"not json at all"),
        (f"livepatch/v1/{bad[1]}/state", json.dumps({"hello": "world"}).encode()),
        # a valid status that names another host than its topic
        (f"livepatch/v1/{bad[2]}/status", valid_status),
        (f"livepatch/v1/{bad[3]}/state", json.dumps({"host": bad[3], "version": 1, "boot_seq": 1, "time": 1.0,
                                                     "kernel": {"build_id": "ab", "nr_cpus": 1, "booted_at": 1.0},
                                                     "components": {"livepatch": {"patches": "nope"}}}).encode()),
    ]

    async def scenario() -> None:
        await _publish(mosquitto.url, foreign)
        try:
            async with FleetClient(mosquitto.url) as c:
                found = {r.id for r in await c.hosts()}
                assert set(ids) <= found
                assert not found & set(bad[:3])
                assert c.skipped >= 4
                # a stream outlives documents that do not validate: the valid one after them arrives
                stream = c.changes(HostFilter(labels={}), initial=False)
                waiting = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.1)
                await _publish(mosquitto.url, [(f"livepatch/v1/{bad[3]}/status", b"\xff\xfe"),
                                               (f"livepatch/v1/{bad[3]}/status", b"[1, 2]")], retain=False)
                await _publish(mosquitto.url, [(f"livepatch/v1/{bad[3]}/status", valid_status)], retain=False)
                async with asyncio.timeout(10):
                    change = await waiting
                assert (change.kind, change.host, change.record.status) == ("added", bad[3], "online")
                assert change.record.state_doc is None, "its invalid state was skipped"
                await stream.aclose()
        finally:
            await _publish(mosquitto.url, [(t, b"") for t, _ in foreign])  # clear the retained documents

    with caplog.at_level(logging.WARNING, logger="clients.sdk.fleet"):
        run(scenario())
    skipped = [r.getMessage() for r in caplog.records if "skipped a document" in r.getMessage()]
    assert any(bad[0] in m for m in skipped)
    assert any(bad[2] in m and "names host" in m for m in skipped)
    assert any(bad[3] in m and "StateDoc" in m for m in skipped)
    code, out, _ = lpctl(mosquitto.url, "--json", "hosts")
    assert code == 0
    assert not set(json.loads(out)) & set(bad)


@pytest.mark.parametrize(("args", "says"), [
    (["hosts", "--label", "zone"], "NAME=VALUE"),
    (["hosts", "--label", "=eu"], "NAME=VALUE"),
    (["hosts", "--state", "sleeping"], "'sleeping' is not one of"),
    (["hosts", "--wait", "0"], "--wait"),
    (["fleet", "scale", "-1", "--state-dir", "/nonexistent"], "-1"),
    (["fleet", "up"], "--state-dir"),
])
def test_bad_selectors_exit_2(args: list[str], says: str) -> None:
    code, _, err = lpctl("mqtt://127.0.0.1:1", *args)
    assert code == 2, err
    assert says in err


def test_filter_model_refuses_an_unknown_state() -> None:
    with pytest.raises(ValueError, match="not one of"):
        HostFilter(state="sleeping")  # type: ignore[arg-type]
    with contextlib.suppress(ValueError):
        HostFilter(build="")
        raise AssertionError("an empty build is refused")


def test_no_hosts_on_an_empty_broker(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        code, out, _ = lpctl(broker.url, "hosts", "--wait", "0.1")
        assert (code, out.strip()) == (0, "no hosts have announced themselves on this broker")
    finally:
        broker.stop()


def test_every_one_of_more_retained_hosts_than_mosquittos_qos1_queue(tmp_path: Path) -> None:
    """Mosquitto hands a QoS 1 subscriber at most 1,020 retained messages (inflight + queue) and drops the rest:
    FleetClient subscribes at QoS 0 and sees all 1,100 hosts' statuses and states."""
    broker = Mosquitto(tmp_path)
    broker.start()
    prefix = f"m{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{i:04d}" for i in range(1100)]
    docs: list[tuple[str, bytes]] = []
    for i, h in enumerate(ids):
        docs.append((f"livepatch/v1/{h}/status", json.dumps({
            "host": h, "state": "online", "boot_seq": 1, "reason": "started", "time": 1.0, "version": "0"}).encode()))
        docs.append((f"livepatch/v1/{h}/state", json.dumps({
            "host": h, "version": 1, "boot_seq": 1, "time": 1.0,
            "kernel": {"build_id": "ab" * 10, "release": "6.1-lp1", "nr_cpus": 1, "booted_at": 1.0},
            "components": {"labels": {"zone": "eu" if i % 2 else "us"}}}).encode()))

    async def scenario() -> None:
        await _publish(broker.url, docs)
        async with FleetClient(broker.url) as c:
            found = await c.hosts()
            assert [r.id for r in found] == ids
            assert all(r.release == "6.1-lp1" for r in found)
            assert len(c.records(HostFilter(labels={"zone": "eu"}))) == 550

    try:
        run(scenario())
    finally:
        broker.stop()


def test_a_host_that_stops_beating_turns_stale_in_the_stream(mosquitto: Mosquitto) -> None:
    """No document comes (a broker node died with the host's connection: no last will), yet the stream says when
    the host's last heartbeat got older than three periods."""
    host = f"s{uuid.uuid4().hex[:6]}"
    topic = f"livepatch/v1/{host}/status"
    beat_at = time.time()
    beat = {"host": host, "state": "online", "boot_seq": 1, "reason": "started", "time": beat_at,
            "version": "0", "beat": 4, "heartbeat_at": beat_at, "heartbeat_s": 0.5}

    async def scenario() -> None:
        await _publish(mosquitto.url, [(topic, json.dumps(beat).encode())])
        try:
            async with FleetClient(mosquitto.url) as c:
                await c.hosts(quiet=0.2)
                record = c.record(host)
                assert record is not None
                assert record.status == "online"
                stream = c.changes(HostFilter(state="stale"), liveness_every_s=0.1)
                async with asyncio.timeout(10):
                    change = await anext(stream)
                assert (change.kind, change.host, change.record.status) == ("added", host, "stale")
                assert time.time() - beat_at >= 1.5
                await stream.aclose()
        finally:
            await _publish(mosquitto.url, [(topic, b"")])

    run(scenario())
