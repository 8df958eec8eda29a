"""The journal's storage and its checkpointer: delivery marks ride on the next commit, checkpoints happen in a
low-priority thread when the journal is quiet (or has piled up too much), and nothing is lost on the way."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from daemon.service import Journal
from daemon.service.pipeline.metrics import Metrics
from daemon.service.store.checkpoint import Checkpointer
from daemon.service.store.journal import _SCHEMA


def answered(journal: Journal, rid: str) -> None:
    journal.accept(rid, "info", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
    journal.answer(rid, '{"ok":true}')


def delivered_on_disk(path: Path) -> dict[str, bool]:
    with sqlite3.connect(path) as db:  # another connection: sees only what is committed
        return {rid: at is not None for rid, at in db.execute("SELECT request_id, delivered_at FROM requests")}


def test_delivery_marks_are_committed_with_the_next_request(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    answered(journal, "a")
    journal.delivered("a")
    assert delivered_on_disk(journal.path) == {"a": False}  # in memory only, for now
    entry = journal.get("a")
    assert entry is not None
    assert entry.delivered_at is not None  # ...but the journal answers with it
    commits = journal.commits
    answered(journal, "b")
    assert journal.commits == commits + 2  # the mark cost no commit of its own
    assert delivered_on_disk(journal.path) == {"a": True, "b": False}
    assert [e.request_id for e in journal.undelivered()] == ["b"]


def test_a_refused_accept_keeps_the_pending_marks(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    answered(journal, "a")
    journal.delivered("a")
    with pytest.raises(sqlite3.IntegrityError):
        journal.accept("a", "info", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
    assert delivered_on_disk(journal.path) == {"a": False}  # rolled back with the duplicate...
    journal.flush()
    assert delivered_on_disk(journal.path) == {"a": True}  # ...and not forgotten


def test_new_journals_use_small_pages_and_old_ones_lose_the_partial_indexes(tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as db:  # the layout of journals written by earlier versions: 4 KiB pages, indexes
        db.executescript(_SCHEMA.split("DROP INDEX")[0]
                         + "CREATE INDEX requests_unanswered ON requests (seq) WHERE answered_at IS NULL;")
    Journal(old).close()
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'requests_unanswered'").fetchall() == []
    journal = Journal(tmp_path / "new.sqlite3")
    assert journal._db.execute("PRAGMA page_size").fetchone()[0] == 1024


def test_checkpoint_policy(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    cp = Checkpointer(journal, idle_s=0.05, max_commits=10)
    journal.commits = 0
    assert not cp.due(time.monotonic() + 10)  # nothing to copy
    answered(journal, "a")
    assert not cp.due(journal.last_commit + 0.01)  # requests are still coming
    assert cp.due(journal.last_commit + 0.06)  # quiet for idle_s
    for i in range(5):
        answered(journal, f"b{i}")
    assert cp.due(journal.last_commit)  # 12 commits: due even without a pause


def test_checkpointer_runs_when_quiet_in_a_nice_thread(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    answered(journal, "a")
    journal.delivered("a")

    metrics = Metrics()

    async def scenario() -> tuple[int, int]:
        cp = Checkpointer(journal, idle_s=0.02, metrics=metrics)
        task = asyncio.create_task(cp.run())
        tid = await asyncio.get_running_loop().run_in_executor(cp._pool, threading.get_native_id)
        deadline = time.monotonic() + 5
        while cp.checkpoints == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cp.checkpoints, nice

    checkpoints, nice = asyncio.run(scenario())
    assert checkpoints >= 1
    assert nice == 19
    assert metrics.registry.get_sample_value("lpd_journal_checkpoint_seconds_count", {"trigger": "idle"}) == checkpoints
    assert journal.commits == 0
    assert delivered_on_disk(journal.path) == {"a": True}  # the quiet moment also committed the marks


def test_prune_keeps_the_dedup_window_in_time_and_in_count(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    for i in range(20):
        answered(journal, f"r{i}")
        if i != 15:  # r15's reply was never published: it is kept whatever its age
            journal.delivered(f"r{i}")
    journal.flush()
    # r0..r9 were answered two hours ago
    journal._db.execute("UPDATE requests SET accepted_at = accepted_at - 7200, answered_at = answered_at - 7200 "
                        "WHERE seq <= 10")

    def left() -> list[int]:
        return [i for i in range(20) if journal.get(f"r{i}") is not None]

    assert journal.prune(keep=100, keep_s=3600, batch=4) == 4  # in batches
    assert left() == list(range(4, 20))
    assert journal.prune(keep=100, keep_s=3600) == 6  # the time window
    assert left() == list(range(10, 20))
    assert journal.prune(keep=100, keep_s=3600) == 0
    journal.close()
    journal = Journal(tmp_path / "j.sqlite3")  # what is not delivered is found again at the next start
    assert journal.prune(keep=5, keep_s=3600) == 4  # the count: the newest 5 delivered ones, and r15
    assert left() == [14, 15, 16, 17, 18, 19]
    assert journal.counts() == {"accepted": 20, "answered": 20}
    journal.close()
