"""The request journal: SQLite in WAL mode, one row per accepted request, its reply, and its delivery.

A request is *accepted* once its row is committed (the MQTT adapter acknowledges the PUBLISH only then, so
a request the broker saw acknowledged is on disk). A row without a reply after a restart is re-executed; a
reply without a delivery mark is published again after a (re)connect. Rows are pruned oldest first once more
than ``keep`` answered and delivered ones exist.

The commits use ``synchronous=NORMAL``: durable across a crash of the daemon (kill -9), not across a power
loss of the host; ``durable=True`` switches to ``FULL`` (an fsync per commit). What a request costs on the
event loop is one INSERT (which also commits the delivery marks recorded since the previous one) and one
UPDATE. WAL checkpoints (which fsync) never run on the request path: automatic checkpointing is off and
``daemon.service.checkpoint`` runs them beside it. New journals use 1 KiB pages and no secondary index but
the request id's: a request then writes ~9 KiB of WAL instead of ~30 KiB (the unanswered and undelivered
rows are found by a scan, at startup and after a reconnect only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id   TEXT NOT NULL UNIQUE,
    verb         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    reply_topic  TEXT NOT NULL,
    correlation  BLOB,
    accepted_at  REAL NOT NULL,
    boot_seq     INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 1,
    answered_at  REAL,
    reply        TEXT,
    delivered_at REAL
);
DROP INDEX IF EXISTS requests_unanswered;
DROP INDEX IF EXISTS requests_undelivered;
"""

PAGE_SIZE = 1024  # a request touches a few pages: small ones keep the WAL (and checkpoints) small
WAL_SIZE_LIMIT = 64 << 20

_COLUMNS = ("seq, request_id, verb, payload, fingerprint, reply_topic, correlation, accepted_at, boot_seq, attempts, "
            "answered_at, reply, delivered_at")


_INSERT = ("INSERT INTO requests(request_id, verb, payload, fingerprint, reply_topic, correlation, accepted_at, "
           "boot_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _mark_delivered(db: sqlite3.Connection, marks: dict[str, float]) -> None:
    db.executemany("UPDATE requests SET delivered_at = ? WHERE request_id = ? AND delivered_at IS NULL",
                   [(t, rid) for rid, t in marks.items()])


def fingerprint(verb: str, params: dict[str, Any]) -> str:
    """What makes two requests with one id "the same": the verb and every parameter except where to reply."""
    body = {k: v for k, v in params.items() if k not in ("request_id", "reply_to")}
    return hashlib.sha256(json.dumps([verb, body], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    seq: int
    request_id: str
    verb: str
    payload: str
    fingerprint: str
    reply_topic: str
    correlation: bytes | None
    accepted_at: float
    boot_seq: int
    attempts: int
    answered_at: float | None
    reply: str | None
    delivered_at: float | None

    @property
    def answered(self) -> bool:
        return self.reply is not None


class Journal:
    """One daemon's journal. Not thread-safe: the service calls it from the event loop only (each call is a
    few tens of microseconds; no kernel work ever holds it)."""

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect on a new database
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._db.executescript(_SCHEMA)
        self._checkpointer: sqlite3.Connection | None = None
        # Lifetime counts, kept in memory (a request costs one INSERT and one UPDATE, nothing more):
        # accepted = the AUTOINCREMENT high-water mark; answered = answered rows + those pruned since.
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'requests'").fetchone()
        self._accepted = int(row[0]) if row else 0
        row = self._db.execute("SELECT count(*) FROM requests WHERE answered_at IS NOT NULL").fetchone()
        self._answered = int(row[0]) + self.meta("pruned")
        self._delivered: dict[str, float] = {}
        self.commits = 0
        """Commits since the last checkpoint began (what the checkpointer decides on)."""
        self.last_commit = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: never blocks the writer). Thread-safe with the request
        path, which it never runs on: it has its own connection. Not reentrant: one caller at a time.
        The caller resets ``commits`` on the loop before handing this to its thread."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, one commit."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._committed()

    def _committed(self) -> None:
        self.commits += 1
        self.last_commit = time.monotonic()

    # -- meta counters ---------------------------------------------------------------------------------------

    def _bump(self, key: str) -> int:
        with self._tx() as db:
            self._count(db, key)
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    @staticmethod
    def _count(db: sqlite3.Connection, key: str) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
                   (key,))

    def meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def next_boot_seq(self) -> int:
        """Called once per daemon start: 1 on a fresh state directory, then 2, 3, …"""
        return self._bump("boot_seq")

    def next_state_version(self) -> int:
        return self._bump("state_version")

    # -- requests --------------------------------------------------------------------------------------------

    def _one(self, where: str, *args: Any) -> Entry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM requests WHERE {where}", args).fetchone()
        return Entry(*row) if row else None

    def get(self, request_id: str) -> Entry | None:
        entry = self._one("request_id = ?", request_id)
        if entry is not None and entry.delivered_at is None and request_id in self._delivered:
            return dataclasses.replace(entry, delivered_at=self._delivered[request_id])
        return entry

    def accept(self, request_id: str, verb: str, payload: str, *, fp: str, reply_topic: str,
               correlation: bytes | None, boot_seq: int) -> None:
        """Commit a new request (raises sqlite3.IntegrityError if the id is journaled already), with the
        delivery marks recorded since the last commit: one transaction instead of a batch later."""
        row = (request_id, verb, payload, fp, reply_topic, correlation, time.time(), boot_seq)
        if self._delivered:
            marks, self._delivered = self._delivered, {}
            try:
                with self._tx() as db:
                    db.execute(_INSERT, row)
                    _mark_delivered(db, marks)
            except BaseException:
                self._delivered = marks | self._delivered
                raise
        else:
            self._db.execute(_INSERT, row)
            self._committed()
        self._accepted += 1

    def retry(self, request_id: str) -> None:
        """An unanswered request is being executed again (after a restart)."""
        self._db.execute("UPDATE requests SET attempts = attempts + 1 WHERE request_id = ?", (request_id,))
        self._committed()

    def reroute(self, request_id: str, reply_topic: str, correlation: bytes | None) -> None:
        """A duplicate came with a new place to reply to: later deliveries go there."""
        self._db.execute("UPDATE requests SET reply_topic = ?, correlation = ? WHERE request_id = ?",
                         (reply_topic, correlation, request_id))
        self._committed()

    def answer(self, request_id: str, reply: str) -> None:
        self._db.execute("UPDATE requests SET reply = ?, answered_at = ? WHERE request_id = ?",
                         (reply, time.time(), request_id))
        self._committed()
        self._answered += 1

    def delivered(self, request_id: str) -> None:
        """The reply was published (and acknowledged). Recorded in memory, committed with the next request or
        by ``flush()``: after a crash, a reply delivered in the last moments is published once more (clients
        drop replies to requests they no longer wait for)."""
        self._delivered.setdefault(request_id, time.time())

    def flush(self) -> None:
        """Commit the delivery marks recorded since the last flush, in one transaction."""
        if self._delivered:
            marks, self._delivered = self._delivered, {}
            with self._tx() as db:
                _mark_delivered(db, marks)

    def unanswered(self) -> list[Entry]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM requests WHERE answered_at IS NULL ORDER BY seq")
        return [Entry(*r) for r in rows]

    def undelivered(self) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM requests WHERE answered_at IS NOT NULL AND delivered_at IS NULL ORDER BY seq")
        return [e for e in (Entry(*r) for r in rows) if e.request_id not in self._delivered]

    def counts(self) -> dict[str, int]:
        """Lifetime counts (they survive pruning)."""
        return {"accepted": self._accepted, "answered": self._answered}

    def prune(self, keep: int) -> int:
        """Forget the oldest answered and delivered requests beyond ``keep``; returns how many went."""
        self.flush()
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE delivered_at IS NOT NULL "
                "ORDER BY seq DESC LIMIT -1 OFFSET ?)", (keep,))
            pruned = cur.rowcount
            db.execute("INSERT INTO meta(key, value) VALUES ('pruned', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (pruned,))
        return pruned
