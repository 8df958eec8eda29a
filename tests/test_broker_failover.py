"""Failover between the nodes of a NATS cluster (MQTT + JetStream, three private nodes on loopback).

kill -9 the node the daemon is connected to: no last will is published (it died with that node), so the host
must show ``stale`` — its heartbeats stop — while the daemon is away; the daemon must reconnect to another node
within 10 s and resume its persistent session there, so that a QoS 1 request published through another node
during the outage is answered, once; afterwards the host is ``online`` again and its subscriptions all work.
(Reconnecting is the CONNACK of another node; being online again also needs the cluster to have new leaders for
the JetStream streams that the dead node led, which NATS takes 5-20 s to elect: until then it refuses QoS 1
operations, and the daemon retries them.)

The daemon waits 1 s between rounds of reconnects here (``reconnect_min_s``), so that the outage outlasts the
stale threshold (3 heartbeats of 0.2 s) however fast the cluster recovers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from broker_fixtures import NatsCluster
from mqtt_fixtures import DaemonThread, daemon_settings, run

from clients.sdk import LivepatchClient
from schemas.ftrace import OpsData

BEAT_S = 0.2


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
                                     reconnect_min_s=1.0, reconnect_max_s=1.0)).start(timeout=90)
    try:
        bridge = d.daemon.bridge
        assert bridge is not None
        assert bridge.link is not None
        assert bridge.link.node.port == n1.mqtt_port
        rid = f"outage-{uuid.uuid4().hex[:8]}"
        timeline: dict[str, float] = {}

        async def main() -> OpsData:
            async with LivepatchClient(n3.url, d.host, timeout=20) as watcher, LivepatchClient(
                    f"{n2.url},{n3.url}", d.host, timeout=60) as asker:
                assert await watcher.liveness() == "online"
                killed_at = time.monotonic()
                n1.kill()  # kill -9
                # During the outage: a QoS 1 request through another node. NATS may drop the asker's connection
                # too while it has no stream leader; the SDK then reconnects and sends it again with its id.
                answer = asyncio.ensure_future(asker.ops_register("outage", filter="work_step_a", request_id=rid))
                await watch_until(watcher, "stale", timeout=10)
                timeline["stale_s"] = time.monotonic() - killed_at
                assert not answer.done()
                while not (bridge.link is not None and bridge.link.node.port != n1.mqtt_port):
                    assert time.monotonic() - killed_at < 10, "the daemon did not reconnect within 10 s"
                    await asyncio.sleep(0.02)
                timeline["reconnected_s"] = time.monotonic() - killed_at
                ops = await answer
                timeline["answered_s"] = time.monotonic() - killed_at
                await watch_until(watcher, "online", timeout=30)
                timeline["online_s"] = time.monotonic() - killed_at
                # No subscription is silently missing: a new request, through the watcher's node, is answered.
                info = await watcher.info()
                assert info.broker is not None
                assert info.broker.node in (f"127.0.0.1:{n2.mqtt_port}", f"127.0.0.1:{n3.mqtt_port}")
                listed = await watcher.ops_list()
                assert [o.name for o in listed.ops if o.name == "outage"] == ["outage"]
                return ops
        ops = run(main())
        assert ops.ops.name == "outage"
        # Executed once: a second execution would have been refused (the ops exists) and counted as such.
        registry = d.daemon.metrics.registry
        assert registry.get_sample_value("lpd_requests_total", {"verb": "ftrace.ops.register",
                                                                "result": "ftrace_ops_state"}) is None
        print(f"failover timeline (s after kill -9): {timeline}")  # shown with -rP; the report quotes it
    finally:
        d.stop()


async def watch_until(c: LivepatchClient, want: str, timeout: float) -> float:
    """Seconds until the host's status reads ``want`` (polling, as a fresh ``lpctl status`` would)."""
    started = time.monotonic()
    while True:
        if await c.liveness(wait=0.25) == want:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"the host never showed {want}"
        await asyncio.sleep(0.02)
