"""A daemon account trying to forge the orchestrator's events, on a shipped broker config (NATS, RabbitMQ): what a
reader of ``livepatch/v1/_orchestrator/events`` receives. The forgery goes first on its own connection (a broker
may close a connection over a denied publish: RabbitMQ does), then a second connection of the same account publishes
a marker on the host's events topic, which every config grants: once the marker has arrived, a forgery let through
would have arrived too (both are QoS 1 publishes of one account to one subscriber)."""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt

ORCH_EVENTS = "livepatch/v1/_orchestrator/events"
FORGED = b'{"kind": "event", "rollout": "r", "event": "completed"}'
MARKER = b'{"type": "acl.marker"}'


def _client(port: int, user: str, password: str, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=password, identifier=ident,
                          protocol=aiomqtt.ProtocolVersion.V311)


async def forged_events_seen(port: int, host: str, daemon: tuple[str, str], reader: tuple[str, str],
                             timeout: float = 15.0) -> list[tuple[str, bytes]]:
    """The messages ``reader`` receives on the orchestrator's and ``host``'s events topics while the ``daemon``
    account publishes a forged orchestrator event, then the host marker (returns once the marker is in)."""
    seen: list[tuple[str, bytes]] = []
    host_events = f"livepatch/v1/{host}/events"
    async with _client(port, *reader, "forgery-reader") as sub:
        await sub.subscribe(ORCH_EVENTS, qos=1)
        await sub.subscribe(host_events, qos=1)
        # a denied publish may cost the forger its connection (an error here or on leaving): that is a refusal too
        with contextlib.suppress(aiomqtt.MqttError):
            async with _client(port, *daemon, "forgery-forger") as forger:
                await forger.publish(ORCH_EVENTS, FORGED, qos=1, timeout=5)
        async with _client(port, *daemon, "forgery-marker") as marker:
            await marker.publish(host_events, MARKER, qos=1, timeout=5)

        async def collect() -> None:
            async for m in sub.messages:
                seen.append((str(m.topic), m.payload if isinstance(m.payload, bytes) else b""))
                if (str(m.topic), m.payload) == (host_events, MARKER):
                    return
        await asyncio.wait_for(collect(), timeout)
    return seen
