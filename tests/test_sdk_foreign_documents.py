"""Issue 10 §3: a foreign document on ``status``, ``state`` or ``events`` (anyone allowed to publish there can put
one) is skipped and logged by the SDK's streams; it never ends them (they ended with a ValidationError)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import aiomqtt
import pytest
from mqtt_fixtures import DaemonThread, run

from clients.sdk import LivepatchClient
from schemas import EventDoc, Topics

FOREIGN = [b'{"hello": "world"}', b"not json", b"[1, 2]", b'{"state": "online"}']


def test_streams_skip_foreign_documents(lpd: DaemonThread, caplog: pytest.LogCaptureFixture) -> None:
    fake = f"foreign-{uuid.uuid4().hex[:8]}"
    topics = Topics(fake)

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as real:
            status, state = await real.status(), await real.state()
        assert status is not None
        assert state is not None
        event = EventDoc(host=fake, boot_seq=1, seq=1, time=0.0, type="test.marker", data={"n": 1})
        port = int(lpd.url.rsplit(":", 1)[1])
        async with aiomqtt.Client("127.0.0.1", port) as pub, LivepatchClient(lpd.url, fake) as c:
            # a foreign retained document first: the stream must skip it and still give the real one
            await pub.publish(topics.status, FOREIGN[0], qos=1, retain=True)
            await pub.publish(topics.state, FOREIGN[0], qos=1, retain=True)
            statuses, states, events = c.statuses(), c.states(), c.events()
            next_status = asyncio.ensure_future(anext(statuses))
            next_state = asyncio.ensure_future(anext(states))
            next_event = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.3)  # subscribed, the foreign retained documents received
            for payload in FOREIGN:
                await pub.publish(topics.events, payload, qos=1)
                await pub.publish(topics.status, payload, qos=1)
                await pub.publish(topics.state, payload, qos=1)
            await pub.publish(topics.status, status.model_copy(update={"host": fake}).model_dump_json(), qos=1)
            await pub.publish(topics.state, state.model_copy(update={"host": fake}).model_dump_json(), qos=1)
            await pub.publish(topics.events, event.model_dump_json(), qos=1)
            async with asyncio.timeout(10):
                assert (await next_status).host == fake
                assert (await next_state).host == fake
                assert (await next_event).data == {"n": 1}
            for stream in (statuses, states, events):
                await stream.aclose()
            for t in (topics.status, topics.state):
                await pub.publish(t, b"", qos=1, retain=True)

    with caplog.at_level(logging.WARNING, logger="clients.sdk.client"):
        run(main())
    skipped = [r for r in caplog.records if r.name == "clients.sdk.client" and "skipped a document" in r.getMessage()]
    assert len(skipped) >= 3 * len(FOREIGN)
