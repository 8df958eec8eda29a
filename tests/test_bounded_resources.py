"""Bounded resources under long runs (issue 10 §4): the journal's WAL under sustained load, the desired state's
tombstones and applied request ids, the machine's pause records, the journal's size metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from mqtt_fixtures import DaemonThread, run, wait_for

from clients.sdk import LivepatchClient
from daemon.emu.machine import PAUSES_KEPT
from daemon.kernel.kernel import Kernel
from daemon.service import Journal
from daemon.service.store.checkpoint import Checkpointer
from daemon.service.store.desired import DesiredState


def test_the_wal_stays_bounded_while_requests_never_pause(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    payload = json.dumps({"blob": "x" * 4000})
    requests = 4000
    wal_max = 0

    async def main() -> None:
        nonlocal wal_max
        # idle never comes: only the backlog triggers run, as under sustained load; 4 KiB rows: the WAL's size
        # triggers a checkpoint long before 4,000 commits (~90 MiB of such rows) pile up
        checkpointer = Checkpointer(journal, idle_s=3600)
        task = asyncio.get_running_loop().create_task(checkpointer.run())
        for i in range(requests):
            rid = f"r{i}"
            journal.accept(rid, "info", payload, fp="f", reply_topic="t", correlation=None, boot_seq=1)
            journal.answer(rid, '{"ok":true}')
            journal.delivered(rid)
            if i % 50 == 0:
                wal_max = max(wal_max, journal.wal_bytes())
            await asyncio.sleep(0.001)  # ~1,000 requests/s, more than the daemon serves
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert checkpointer.checkpoints >= 2

    asyncio.run(main())
    written = requests * len(payload)  # ~100 MiB of WAL frames went through
    assert written > 15 << 20
    assert wal_max < 40 << 20, f"WAL reached {wal_max / 2**20:.1f} MiB"
    journal.close()


def test_tombstones_and_applied_ids_are_bounded(tmp_path: Path) -> None:
    store = DesiredState(tmp_path / "desired.sqlite3", applied_keep=5)
    store.put("ftrace.ops", "live", {"registered": True}, request_id="put-live")
    for i in range(30):
        with store.batch():
            store.put("ftrace.ops", f"gone-{i}", {"last": f"req-{i}"}, request_id=f"req-{i}")
            store.forget_tombstones("ftrace.ops", 10)
    keys = [item.key for item in store.items("ftrace.ops")]
    assert keys == ["live", *(f"gone-{i}" for i in range(20, 30))]  # the live item and the 10 newest tombstones
    assert [store.applied(f"req-{i}") for i in (24, 25, 29)] == [False, True, True]
    assert not store.applied("put-live")
    store.close()


def test_the_machine_keeps_only_the_latest_pauses(kernel: Kernel) -> None:
    machine = kernel.machine
    total = machine.pauses_total
    for _ in range(PAUSES_KEPT + 10):
        machine.stop_machine(lambda: None)
    assert len(machine.pauses) == PAUSES_KEPT
    assert machine.pauses_total == total + PAUSES_KEPT + 10
    assert machine.pause_summary()["count"] == PAUSES_KEPT


def test_the_journal_size_metrics_follow_the_journal(lpd: DaemonThread) -> None:
    metrics = lpd.daemon.metrics.registry

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            await c.info()
        started = time.monotonic()
        await wait_for(lambda: (metrics.get_sample_value("lpd_journal_rows") or 0) > 0
                       and time.monotonic() > started, timeout=10)

    run(main())
    assert (metrics.get_sample_value("lpd_journal_bytes", {"file": "db"}) or 0) > 0
    assert metrics.get_sample_value("lpd_journal_bytes", {"file": "wal"}) is not None
    assert metrics.get_sample_value("lpd_journal_pruned_total") is not None
