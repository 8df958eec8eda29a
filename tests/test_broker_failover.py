"""Failover between the nodes of a NATS cluster (MQTT + JetStream, three private nodes on loopback).

kill -9 the node the daemon is connected to: no last will is published (it died with that node), so the host
must show ``stale`` — its heartbeats stop — while the daemon is away; the daemon must reconnect to another node
within 10 s and resume its persistent session there, so that a QoS 1 request published through another node
during the outage is answered, once; afterwards the host is ``online`` again and its subscriptions all work.

The daemon waits 2 s before each reconnect here (``reconnect_min_s``), so that the outage outlasts the stale
threshold (3 heartbeats of 0.3 s) however fast the cluster recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator

import aiomqtt
import pytest
from broker_fixtures import NatsCluster
from mqtt_fixtures import DaemonThread, daemon_settings, run

from clients.sdk import LivepatchClient
from schemas import Topics

BEAT_S = 0.3


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path_factory.mktemp("nats-failover"))
    try:
        yield c.start()
    finally:
        c.stop()


def test_kill_the_daemons_node(cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    n1, n2, n3 = cluster.nodes
    d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("failover-state"), cluster.url, heartbeat_s=BEAT_S,
                                     reconnect_min_s=2.0, reconnect_max_s=2.0)).start(timeout=90)
    try:
        bridge = d.daemon.bridge
        assert bridge is not None
        assert bridge.link is not None
        assert bridge.link.node.port == n1.mqtt_port
        topics = Topics(d.host)
        rid = f"outage-{uuid.uuid4().hex[:8]}"
        reply_to = topics.reply("failover-asker")

        async def main() -> None:
            async with LivepatchClient(n3.url, d.host, timeout=20) as watcher, aiomqtt.Client(
                    "127.0.0.1", n2.mqtt_port, identifier="failover-asker",
                    protocol=aiomqtt.ProtocolVersion.V311) as asker:
                await asker.subscribe(reply_to, qos=1)
                assert await watcher.liveness() == "online"
                killed_at = time.monotonic()
                n1.kill()  # kill -9
                # During the outage: a QoS 1 request through another node, once.
                publish = asyncio.ensure_future(asker.publish(
                    topics.request("info"), json.dumps({"request_id": rid, "reply_to": reply_to}), qos=1,
                    timeout=30))  # its PUBACK waits until the cluster has stored it (JetStream leader election)
                stale_seen = await watch_until(watcher, "stale", timeout=10)
                assert stale_seen < 10
                assert bridge.link is None or bridge.link.node.port == n1.mqtt_port or not bridge.online.is_set()
                # The daemon comes back on another node, within 10 s of the kill.
                while not (bridge.online.is_set() and bridge.link is not None
                           and bridge.link.node.port != n1.mqtt_port):
                    assert time.monotonic() - killed_at < 10, "the daemon did not reconnect within 10 s"
                    await asyncio.sleep(0.05)
                await publish
                replies = await collect(asker, rid, seconds=3.0)
                assert len(replies) == 1, replies
                assert replies[0]["ok"] is True
                assert replies[0]["data"]["broker"]["node"] != f"127.0.0.1:{n1.mqtt_port}"
                await watch_until(watcher, "online", timeout=10)
                # No subscription is silently missing: a new request, through the watcher's node, is answered.
                info = await watcher.info()
                assert info.broker is not None
                assert info.broker.node in (f"127.0.0.1:{n2.mqtt_port}", f"127.0.0.1:{n3.mqtt_port}")
                assert await watcher.liveness() == "online"
        run(main())
    finally:
        d.stop()


async def watch_until(c: LivepatchClient, want: str, timeout: float) -> float:
    """Seconds until the host's retained status reads ``want`` (polling, as a fresh ``lpctl status`` would)."""
    started = time.monotonic()
    while True:
        if await c.liveness(wait=0.5) == want:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"the host never showed {want}"
        await asyncio.sleep(0.1)


async def collect(client: aiomqtt.Client, rid: str, seconds: float) -> list[dict[str, object]]:
    """Every reply to ``rid`` that arrives within ``seconds`` (after the first one: a duplicate would follow)."""
    got: list[dict[str, object]] = []
    deadline = asyncio.get_running_loop().time() + 15
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline) as scope:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b"{}"
                reply = json.loads(payload)
                if reply.get("request_id") == rid:
                    got.append(reply)
                    scope.reschedule(asyncio.get_running_loop().time() + seconds)
    return got
