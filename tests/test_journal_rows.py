"""The journal can never hold what the daemon cannot act on (issue 10 §1): whatever a row holds — written by an
older version before reply destinations were checked, damaged, edited — the daemon starts, replays what it can,
answers or drops the rest with an event and a log line, and keeps one connection to a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cutting_proxy import CuttingProxy
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

from clients.sdk import LivepatchClient
from daemon.service.store.journal import fingerprint
from daemon.settings import Settings
from schemas import Topics

_INSERT = ("INSERT INTO requests(request_id, verb, payload, fingerprint, reply_topic, correlation, accepted_at, "
           "boot_seq, answered_at, reply) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)")


def first_run(settings: Settings) -> None:
    """A real state directory (journal and desired state agree), left by a daemon that served a request."""
    d = DaemonThread(settings).start()
    try:
        async def info() -> None:
            async with LivepatchClient(d.url, d.host) as c:
                await c.info()
        run(info())
    finally:
        d.stop()


def info_payload(rid: str) -> str:
    return json.dumps({"request_id": rid})


def answered(rid: str, topic: object, *, reply: object = None, correlation: object = None) -> tuple[Any, ...]:
    text = reply if reply is not None else json.dumps({"request_id": rid, "ok": True, "data": {}})
    return (rid, "info", info_payload(rid), fingerprint("info", {"request_id": rid, "reply_to": None}), topic,
            correlation, time.time(), time.time(), text)


def unanswered(rid: str, topic: str, *, verb: str = "info", payload: str | None = None) -> tuple[Any, ...]:
    return (rid, verb, payload if payload is not None else info_payload(rid), "fp", topic, None, time.time(), None,
            None)


def poisoned_rows(host: str) -> tuple[list[tuple[Any, ...]], set[str]]:
    """Rows an older version could write, or damage could leave; and the ids whose replies must be dropped."""
    topics = Topics(host)
    rows = [
        answered("old-plus", "replies/+/x"),  # the repro: the daemon exited at every restart
        answered("old-ctl", "replies/\u0001x"),  # mosquitto dropped the daemon at every connect
        answered("old-nonchar", "replies/\uffffx"),
        answered("old-status", topics.status),
        answered("bad-reply", "replies/ok", reply="{not json"),
        answered("other-reply", "replies/ok", reply=json.dumps({"request_id": "someone-else", "ok": True})),
        answered("text-corr", "replies/ok", correlation="text, not bytes"),
        answered("blob-topic", b"\x00\xff"),
        unanswered("garbage", "replies/ok", payload="{{{"),
        unanswered("deep", "replies/ok", payload='{"request_id": "deep", "x": ' + "[" * 5000 + "]" * 5000 + "}"),
        unanswered("not-mine", "replies/ok", payload=info_payload("another-id")),
        unanswered("no-verb", "replies/ok", verb="no.such.verb"),
        unanswered("wrong-params", "replies/ok", payload=json.dumps({"request_id": "wrong-params", "x": 1})),
        unanswered("replay-to-hash", "replies/#"),  # executed again at start, then its reply cannot go anywhere
    ]
    dropped = {"old-plus", "old-ctl", "old-nonchar", "old-status", "bad-reply", "other-reply", "text-corr",
               "blob-topic", "replay-to-hash"}
    return rows, dropped


def test_boot_replay_and_redelivery_survive_any_row(mosquitto: Mosquitto, tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, mosquitto.url)
    topics = Topics(settings.host_id)
    first_run(settings)
    rows, dropped = poisoned_rows(settings.host_id)
    rows += [unanswered("good-replay", "replies/good"), answered("good-redelivery", "replies/good")]
    with sqlite3.connect(settings.journal_path) as db:
        db.executemany(_INSERT, rows)

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
            await watcher.subscribe(topics.events, qos=1)
            await watcher.subscribe("replies/good", qos=1)
            d = await asyncio.to_thread(lambda: DaemonThread(settings).start())
            try:
                events: dict[str, list[dict[str, Any]]] = {}
                good: list[str] = []
                async with asyncio.timeout(20):
                    async for msg in watcher.messages:
                        assert isinstance(msg.payload, bytes)
                        doc = json.loads(msg.payload)
                        if msg.topic.value == "replies/good":
                            good.append(doc["request_id"])
                        else:
                            events.setdefault(doc["type"], []).append(doc["data"])
                        if len(events.get("reply.dropped", [])) >= len(dropped) and len(good) >= 2:
                            break
                assert sorted(good) == ["good-redelivery", "good-replay"]
                assert {e["request_id"] for e in events["reply.dropped"]} == dropped
                assert all(e["why"] for e in events["reply.dropped"])
                unreadable = {e["request_id"]: e["why"] for e in events.get("request.unreadable", [])}
                assert set(unreadable) == {"garbage", "deep", "not-mine", "no-verb", "wrong-params"}
                assert "another request id" in unreadable["not-mine"]
                assert "no handler" in unreadable["no-verb"]
                bridge, service = d.daemon.bridge, d.daemon.service
                assert bridge is not None
                assert service is not None
                await asyncio.sleep(1.0)
                assert bridge.connections == 1  # never dropped by the broker
                entry = service.journal.get("garbage")
                assert entry is not None
                assert entry.reply is not None
                assert json.loads(entry.reply)["error"]["code"] == "journal_unreadable"
                async with LivepatchClient(d.url, d.host) as c:
                    assert (await c.info()).host == d.host
                    # a duplicate of a row whose reply cannot be read is told so, not crashed on
                    raw = await c.request_raw("info", {}, request_id="bad-reply")
                    assert raw.reply.error is not None
                    assert raw.reply.error.code == "journal_unreadable"
            finally:
                await asyncio.to_thread(d.stop)
    run(main())

    again = DaemonThread(settings).start()  # and the next start has nothing left to trip on
    try:
        assert again.daemon.service is not None
        assert again.daemon.service.journal.undelivered() == []
        assert again.daemon.service.journal.unanswered() == []
        time.sleep(0.5)
        assert again.daemon.bridge is not None
        assert again.daemon.bridge.connections == 1
    finally:
        again.stop()


def test_a_reply_that_costs_the_connection_is_dropped_after_its_redelivery(mosquitto: Mosquitto,
                                                                           tmp_path: Path) -> None:
    """A broker that drops the daemon whenever one reply is published (for a topic the daemon's checks let
    through): the stored reply is tried once, alone at the connect, then dropped with an event; the replies
    around it are delivered and the connection then stays up, also across a restart on the same state dir."""
    proxy = CuttingProxy(mosquitto.port, marker=b"replies/cut-here")
    try:
        direct = daemon_settings(tmp_path, mosquitto.url)
        first_run(direct)
        settings = direct.model_copy(update={"broker_url": proxy.url})
        topics = Topics(settings.host_id)
        with sqlite3.connect(settings.journal_path) as db:
            db.executemany(_INSERT, [answered("before", "replies/good"), answered("sticky", "replies/cut-here"),
                                     answered("after", "replies/good")])

        async def main() -> None:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
                await watcher.subscribe(topics.events, qos=1)
                await watcher.subscribe("replies/#", qos=1)
                d = await asyncio.to_thread(lambda: DaemonThread(settings).start())
                try:
                    good: list[str] = []
                    dropped: list[dict[str, Any]] = []
                    async with asyncio.timeout(60):
                        async for msg in watcher.messages:
                            assert isinstance(msg.payload, bytes)
                            doc = json.loads(msg.payload)
                            if msg.topic.value == "replies/good":
                                good.append(doc["request_id"])
                            elif doc.get("type") == "reply.dropped":
                                dropped.append(doc["data"])
                            if dropped and len(good) == 2:
                                break
                    assert good == ["before", "after"]
                    assert [e["request_id"] for e in dropped] == ["sticky"]
                    assert "connection was lost" in dropped[0]["why"]
                    assert proxy.cuts == 1
                    bridge = d.daemon.bridge
                    assert bridge is not None
                    connections = bridge.connections
                    await asyncio.sleep(1.5)
                    assert (bridge.connections, proxy.cuts) == (connections, 1)  # no more losses
                    async with LivepatchClient(d.url, d.host) as c:
                        assert (await c.info()).host == d.host
                finally:
                    await asyncio.to_thread(d.stop)
        run(main())
        again = DaemonThread(settings).start()  # dropped means never tried again
        try:
            time.sleep(1.0)
            assert again.daemon.bridge is not None
            assert (again.daemon.bridge.connections, proxy.cuts) == (1, 1)
        finally:
            again.stop()
    finally:
        proxy.close()


def test_a_stored_reply_the_mqtt_client_refuses_is_dropped_after_one_try(mosquitto: Mosquitto, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored reply whose publish fails for any other reason than the connection (paho refusing it before
    sending) is tried once, then dropped with an event and a log line; never tried again, not after a restart."""
    settings = daemon_settings(tmp_path, mosquitto.url)
    first_run(settings)
    topics = Topics(settings.host_id)
    with sqlite3.connect(settings.journal_path) as db:
        db.executemany(_INSERT, [answered("refused", "replies/refused"), answered("fine", "replies/good")])
    tries: list[str] = []
    publish = aiomqtt.Client.publish

    async def refusing(self: aiomqtt.Client, topic: str, *args: Any, **kwargs: Any) -> None:
        if topic == "replies/refused":
            tries.append(topic)
            raise ValueError("refused by this test")
        await publish(self, topic, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", refusing)

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
            await watcher.subscribe(topics.events, qos=1)
            await watcher.subscribe("replies/good", qos=1)
            d = await asyncio.to_thread(lambda: DaemonThread(settings).start())
            try:
                dropped: list[dict[str, Any]] = []
                good: list[str] = []
                async with asyncio.timeout(20):
                    async for msg in watcher.messages:
                        assert isinstance(msg.payload, bytes)
                        doc = json.loads(msg.payload)
                        if msg.topic.value == "replies/good":
                            good.append(doc["request_id"])
                        elif doc.get("type") == "reply.dropped":
                            dropped.append(doc["data"])
                        if dropped and good:
                            break
                assert good == ["fine"]
                assert [e["request_id"] for e in dropped] == ["refused"]
                assert "refused to publish" in dropped[0]["why"]
                assert tries == ["replies/refused"]
                service, bridge = d.daemon.service, d.daemon.bridge
                assert service is not None
                assert bridge is not None
                assert service.journal.undelivered() == []
                assert service.metrics.replies_dropped._value.get() == 1
                assert bridge.connections == 1
            finally:
                await asyncio.to_thread(d.stop)
    run(main())
    again = DaemonThread(settings).start()
    try:
        time.sleep(0.5)
        assert tries == ["replies/refused"]
    finally:
        again.stop()
