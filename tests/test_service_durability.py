"""Durability: kill -9 mid-request, requests queued while the daemon is down, a broker that goes away."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonProcess, DaemonThread, Mosquitto, daemon_settings, next_status, run, wait_for

from clients.sdk import BrokerUnreachable, LivepatchClient

SLOW = 250_000_000  # getpid_loop iterations: a few seconds of guest time


def journal_row(path: Path, rid: str) -> tuple[int, str | None, float | None] | None:
    """(attempts, reply, delivered_at) of a request, read the way another process would."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT attempts, reply, delivered_at FROM requests WHERE request_id = ?", (rid,)).fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return None
    finally:
        db.close()
    return (int(row[0]), row[1], row[2]) if row else None


def test_kill_9_after_accept_then_restart_answers_the_request(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, mosquitto.url).start()
    try:
        proc.wait_online()
        rid = f"k9-{uuid.uuid4().hex}"

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, proc.host, timeout=120) as c, \
                    LivepatchClient(mosquitto.url, proc.host) as watcher:
                statuses = watcher.statuses()
                assert (await anext(statuses)).state == "online"
                pending = asyncio.ensure_future(c.request_raw("call", {"function": "getpid_loop", "args": [SLOW]},
                                                              request_id=rid))
                await wait_for(lambda: journal_row(proc.journal, rid) is not None)
                proc.kill()  # accepted (journaled and acknowledged), not answered
                row = journal_row(proc.journal, rid)
                assert row is not None
                assert row[1] is None
                died = await anext(statuses)  # the last will
                assert (died.state, died.reason, died.boot_seq) == ("offline", "connection_lost", 1)
                proc.start()  # replays the request before announcing online
                back = await next_status(watcher, "online", 2)
                assert back.reason == "started"
                raw = await pending
                assert raw.reply.ok
                assert raw.reply.data is not None
                assert raw.reply.data["value"] == SLOW
                await statuses.aclose()
                # answered once: a retry gets the journaled reply, the request is not run a third time
                again = await c.request_raw("call", {"function": "getpid_loop", "args": [SLOW]}, request_id=rid)
                assert again.payload == raw.payload
                info = await c.info()
                assert info.boot_seq == 2
                assert info.requests.replayed == 1
            # two attempts; the delivery mark reaches the disk with the next batch (every 0.25 s)
            await wait_for(lambda: (r := journal_row(proc.journal, rid)) is not None and r[2] is not None)
            row = journal_row(proc.journal, rid)
            assert row is not None
            assert row[0] == 2
        run(main())
    finally:
        proc.kill()


def test_requests_sent_while_the_daemon_is_down_are_served_after_restart(mosquitto: Mosquitto,
                                                                         tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, mosquitto.url).start()
    try:
        proc.wait_online()

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, proc.host, timeout=60) as c:
                statuses = c.statuses()
                assert (await anext(statuses)).state == "online"
                assert proc.terminate() == 0  # SIGTERM: graceful
                gone = await anext(statuses)
                assert (gone.state, gone.reason, gone.boot_seq) == ("offline", "shutdown", 1)
                await statuses.aclose()
                # the broker keeps these for the daemon's persistent session
                queued = [asyncio.ensure_future(c.request_raw("call", {"function": "work_chain", "args": [i]}))
                          for i in range(3)]
                await asyncio.sleep(0.3)
                assert not any(q.done() for q in queued)
                proc.start()
                replies = await asyncio.gather(*queued)
                assert all(r.reply.ok for r in replies)
                ids = {r.reply.request_id for r in replies}
                assert len(ids) == 3
                # JSON logs, with the host and each request's id bound
                done = [json.loads(line) for line in proc.log.read_text().splitlines() if '"request_done"' in line]
                logged = {e["request_id"] for e in done if e["host"] == proc.host and e["verb"] == "call"}
                assert ids <= logged
        run(main())
    finally:
        proc.kill()


def test_broker_restart_reconnects_and_loses_no_request(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    lpd = None
    try:
        lpd = DaemonThread(daemon_settings(tmp_path / "state", broker.url)).start()
        service = lpd.daemon.service
        assert service is not None
        rid = f"br-{uuid.uuid4().hex}"
        slow = SLOW // 2

        async def main() -> None:
            async with (LivepatchClient(broker.url, lpd.host, timeout=60) as c,
                        LivepatchClient(broker.url, lpd.host, timeout=60, reconnect=False) as fragile):
                pending = asyncio.ensure_future(c.request_raw("call", {"function": "getpid_loop", "args": [slow]},
                                                              request_id=rid))
                await wait_for(lambda: service.journal.get(rid) is not None)
                broker.stop()
                with pytest.raises(BrokerUnreachable):  # a client without reconnect fails at once
                    await fragile.info()
                # the call finishes while the broker is away: its reply waits in the journal
                await wait_for(lambda: (e := service.journal.get(rid)) is not None and e.reply is not None)
                entry = service.journal.get(rid)
                assert entry is not None
                assert entry.delivered_at is None
                assert not pending.done()  # the SDK waits for the broker instead of failing the request
                broker.start()  # same port; persistence off: sessions and retained messages are gone
                again = await pending  # reconnected, sent again with its id, answered from the journal
                assert again.reply.ok
                assert again.reply.data is not None
                assert again.reply.data["value"] == slow
                assert c.reconnects == 1
                entry = service.journal.get(rid)
                assert entry is not None
                assert entry.attempts == 1  # ran once
                status = await next_status(c, "online", 1)
                assert status.reason == "reconnected"  # the daemon republished its retained status
                state = await c.state()
                assert state is not None
                assert state.boot_seq == 1
                await wait_for(lambda: (e := service.journal.get(rid)) is not None and e.delivered_at is not None)
                assert (await c.info()).host == lpd.host  # the daemon resubscribed: new requests are served
            assert service.metrics.reconnects._value.get() >= 1
        run(main())
    finally:
        if lpd is not None:
            lpd.stop()
        broker.stop()
