"""deploy/livepatchd.acl and the orchestrator's topics: the daemon account's '+' grants would match the pseudo host
``_orchestrator``; a daemon account must not forge what the dashboard and operators read there (rollout events and
documents) nor read the orchestrator's requests, while hosts keep working on the same account."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from mqtt_fixtures import DaemonThread, daemon_settings, run
from test_service_deploy import ShippedMosquitto

from clients.sdk import LivepatchClient

PEOPLE = {"operator": "op-secret", "observer": "obs-secret"}
SERVICES = {"livepatchd": "daemon-secret", "orchestrator": "orch-secret"}
"""The daemon account on the service listener: the test holds a second connection on it (the forger)."""
USERS = {**PEOPLE, **SERVICES}
ORCH = "livepatch/v1/_orchestrator"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    """deploy/mosquitto.conf and deploy/livepatchd.acl as shipped (ports and paths replaced)."""
    broker = ShippedMosquitto(tmp_path / "broker", PEOPLE, SERVICES)
    broker.start()
    yield broker
    broker.stop()


def _client(broker: ShippedMosquitto, user: str, ident: str) -> aiomqtt.Client:
    port = broker.services_port if user in SERVICES else broker.port
    return aiomqtt.Client("127.0.0.1", port, username=user, password=USERS[user], identifier=ident,
                          protocol=aiomqtt.ProtocolVersion.V311)


async def _collect(client: aiomqtt.Client, got: list[tuple[str, bytes]], until: str) -> None:
    async for m in client.messages:
        got.append((str(m.topic), m.payload if isinstance(m.payload, bytes) else b""))
        if str(m.topic) == until:
            return


def test_a_daemon_account_cannot_write_or_read_orchestrator_topics(secured: ShippedMosquitto,
                                                                    tmp_path: Path) -> None:
    services = f"mqtt://127.0.0.1:{secured.services_port}"
    lpd = DaemonThread(daemon_settings(tmp_path / "state", services, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        host = lpd.host

        async def main() -> None:
            seen: list[tuple[str, bytes]] = []  # what an operator (and so the dashboard) reads
            heard: list[tuple[str, bytes]] = []  # what a daemon-account subscriber reads of requests
            async with _client(secured, "operator", "acl-op") as op, \
                    _client(secured, "livepatchd", "acl-forger") as forger, \
                    _client(secured, "orchestrator", "acl-orch") as orch:
                await op.subscribe("livepatch/v1/+/events", qos=1)
                await op.subscribe(f"{ORCH}/rollout/#", qos=1)
                await forger.subscribe("livepatch/v1/+/request/#", qos=1)
                forged = {"kind": "event", "rollout": "r", "event": "completed"}
                await forger.publish(f"{ORCH}/events", json.dumps(forged).encode(), qos=1)
                await forger.publish(f"{ORCH}/rollout/forged", json.dumps({"state": "COMPLETED"}).encode(), qos=1,
                                     retain=True)
                await forger.publish(f"{ORCH}/service", b'{"state": "online"}', qos=1, retain=True)
                # an operator's rollout request is not delivered to the daemon account; a host request is
                await op.publish(f"{ORCH}/request/rollout/list", b'{"request_id": "x"}', qos=1)
                await op.publish(f"livepatch/v1/{host}/request/nonexistent", b'{"request_id": "acl-marker"}',
                                 qos=1)
                # the same account still publishes a host's events; the orchestrator account its own events
                await forger.publish(f"livepatch/v1/{host}/events", b'{"type": "acl.marker"}', qos=1)
                await orch.publish(f"{ORCH}/events", b'{"kind": "event", "rollout": "r", "event": "real"}', qos=1)
                await asyncio.wait_for(asyncio.gather(_collect(op, seen, f"{ORCH}/events"),
                                                      _collect(forger, heard, f"livepatch/v1/{host}/request/"
                                                                              "nonexistent")), 10)
                await asyncio.sleep(0.5)  # anything forged that was let through would be here by now
            topics = [t for t, _ in seen]
            assert f"livepatch/v1/{host}/events" in topics
            assert f"{ORCH}/rollout/forged" not in topics
            orch_events = [json.loads(p) for t, p in seen if t == f"{ORCH}/events"]
            assert orch_events == [{"kind": "event", "rollout": "r", "event": "real"}], orch_events
            assert [t for t, _ in heard if t.startswith(ORCH)] == []
            # nothing retained under the orchestrator's documents either
            async with _client(secured, "observer", "acl-obs") as obs:
                await obs.subscribe(f"{ORCH}/rollout/#", qos=0)
                await obs.subscribe(f"{ORCH}/service", qos=0)
                retained: list[tuple[str, bytes]] = []
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(_collect(obs, retained, "never"), 1.0)
                assert retained == []
            # the host still serves requests over the daemon account
            async with LivepatchClient(secured.url.replace("mqtt://", f"mqtt://operator:{USERS['operator']}@"),
                                       host, client_id="operator") as c:  # 1883 binds ids to user names
                assert (await c.info()).host == host
        run(main())
    finally:
        lpd.stop()
