"""The request journal: SQLite in WAL mode, one row per accepted request, its reply, and its delivery.

A request is *accepted* once its row is committed (the MQTT adapter acknowledges the PUBLISH only then, so
a request the broker saw acknowledged is on disk). A row without a reply after a restart is re-executed; a
reply without a delivery mark is published again after a (re)connect. Rows are pruned oldest first once more
than ``keep`` answered and delivered ones exist.

Durability: a *mutating* request's row is fsynced before its PUBACK: it survives a power loss of the host.
Either ``accept(sync=True)`` commits it with ``synchronous=FULL`` (the WAL is fsynced before ``accept``
returns), or the service commits it like any other and waits for ``fsync_wal`` in a thread of its own
(``daemon.service.store.durability``: the event loop goes on serving meanwhile). Every other commit (read-only
requests, replies, delivery marks) uses ``NORMAL``: durable across a crash of the daemon (kill -9), not across a
power loss (a lost reply re-executes its request at the next start; a lost read-only request was never promised);
``durable=True`` makes every commit ``FULL``.

A full disk never crashes the journal's user: ``accept`` raises :class:`JournalFull` (nothing was journaled);
a reply that cannot be written is kept in memory (``get`` sees it) and written by the next ``flush``; counters
(boot sequence, state version) advance in memory and are written when space returns. What a request costs on the
event loop is one INSERT (which also commits the delivery marks recorded since the previous one) and one
UPDATE. WAL checkpoints (which fsync) never run on the request path: automatic checkpointing is off and
``daemon.service.store.checkpoint`` runs them beside it. New journals use 1 KiB pages and no secondary index but
the request id's: a request then writes ~9 KiB of WAL instead of ~30 KiB (the unanswered and undelivered
rows are found by a scan, at startup and after a reconnect only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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
WAL_SIZE_LIMIT = 16 << 20  # what a reset WAL file is truncated to
SQLITE_FULL = 13


class JournalFull(Exception):
    """The journal's file system is full: nothing was written."""


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL

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
        self._answers: dict[str, tuple[str, float]] = {}  # replies not written yet (the disk was full)
        self._meta_unsaved: dict[str, int] = {}  # counters advanced in memory while the disk was full
        # Lifetime counts, kept in memory (a request costs one INSERT and one UPDATE, nothing more):
        # accepted = the AUTOINCREMENT high-water mark; answered = answered rows + those pruned since.
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'requests'").fetchone()
        self._accepted = int(row[0]) if row else 0
        row = self._db.execute("SELECT count(*) FROM requests WHERE answered_at IS NOT NULL").fetchone()
        self._answered = int(row[0]) + self.meta("pruned")
        self._delivered: dict[str, float] = {}
        # Rows whose delivery mark is not committed (unanswered or undelivered): how many of the newest rows
        # prune() must look past to keep ``keep`` delivered ones, without scanning the table for them.
        self._open = {rid for (rid,) in self._db.execute("SELECT request_id FROM requests WHERE delivered_at IS NULL")}
        self.sync_full = durable
        self.commits = 0
        """Commits since the last checkpoint began (what the checkpointer decides on)."""
        self.last_commit = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    def restart_wal(self) -> None:
        """On the request path's connection, between two requests: copy what the last background checkpoint left
        (a few frames) and make the next commit start the WAL from its beginning. Under sustained load a PASSIVE
        checkpoint never catches up with the writer, so without this the WAL grows without bound."""
        self._db.execute("PRAGMA wal_checkpoint(RESTART)")

    def fsync_wal(self) -> None:
        """fsync the WAL file: every commit written before this call is then durable (thread-safe: it touches no
        connection; ``daemon.service.store.durability`` runs it beside the request path). No WAL file: nothing to do
        (a checkpoint fsynced the database before the WAL went)."""
        try:
            fd = os.open(self.path.with_name(self.path.name + "-wal"), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def wal_bytes(self) -> int:
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except OSError:
            return 0

    def db_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def rows(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM requests").fetchone()[0])

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
        value = self._meta_unsaved.get(key, self.meta(key)) + 1
        try:
            self._set_meta(key, value)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            self._meta_unsaved[key] = value  # written by the next flush once there is space
        return value

    def _set_meta(self, key: str, value: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = max(value, excluded.value)", (key, value))
        self._meta_unsaved.pop(key, None)

    @staticmethod
    def _count(db: sqlite3.Connection, key: str) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
                   (key,))

    def meta(self, key: str) -> int:
        if key in self._meta_unsaved:
            return self._meta_unsaved[key]
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
        if entry is not None and entry.reply is None and request_id in self._answers:
            reply, at = self._answers[request_id]
            entry = dataclasses.replace(entry, reply=reply, answered_at=at)
        if entry is not None and entry.delivered_at is None and request_id in self._delivered:
            return dataclasses.replace(entry, delivered_at=self._delivered[request_id])
        return entry

    def accept(self, request_id: str, verb: str, payload: str, *, fp: str, reply_topic: str,
               correlation: bytes | None, boot_seq: int, sync: bool = False) -> None:
        """Commit a new request (raises sqlite3.IntegrityError if the id is journaled already, JournalFull if
        the disk is full), with the delivery marks recorded since the last commit: one transaction instead of a
        batch later. ``sync``: fsync the WAL before returning (a mutating request, acknowledged next)."""
        row = (request_id, verb, payload, fp, reply_topic, correlation, time.time(), boot_seq)
        if self._answers or self._meta_unsaved:
            self._save_pending()
        full = sync and not self.sync_full
        if full:
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._accept(row)
        except sqlite3.OperationalError as exc:
            if is_full(exc):
                raise JournalFull(str(exc)) from None
            raise
        finally:
            if full:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def _accept(self, row: tuple[Any, ...]) -> None:
        if self._delivered:
            marks, self._delivered = self._delivered, {}
            try:
                with self._tx() as db:
                    db.execute(_INSERT, row)
                    _mark_delivered(db, marks)
            except BaseException:
                self._delivered = marks | self._delivered
                raise
            self._open.difference_update(marks)
        else:
            self._db.execute(_INSERT, row)
            self._committed()
        self._accepted += 1
        self._open.add(row[0])

    def _best_effort(self, sql: str, args: tuple[Any, ...]) -> bool:
        try:
            self._db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            return False
        self._committed()
        return True

    def retry(self, request_id: str) -> None:
        """An unanswered request is being executed again (after a restart). Not counted on a full disk."""
        self._best_effort("UPDATE requests SET attempts = attempts + 1 WHERE request_id = ?", (request_id,))

    def reroute(self, request_id: str, reply_topic: str, correlation: bytes | None) -> None:
        """A duplicate came with a new place to reply to: later deliveries go there (best effort on a full
        disk: this reply is published to the new place anyway)."""
        self._best_effort("UPDATE requests SET reply_topic = ?, correlation = ? WHERE request_id = ?",
                          (reply_topic, correlation, request_id))

    def answer(self, request_id: str, reply: str) -> None:
        """Record the reply; on a full disk it is kept in memory (and published) until ``flush`` can write it."""
        at = time.time()
        if not self._best_effort("UPDATE requests SET reply = ?, answered_at = ? WHERE request_id = ?",
                                 (reply, at, request_id)):
            self._answers[request_id] = (reply, at)
        self._answered += 1

    def _save_pending(self) -> None:
        """Write the replies and counters a full disk held back; stops at the first write that still fails."""
        try:
            for key, value in list(self._meta_unsaved.items()):
                self._set_meta(key, value)
            if self._answers:
                answers = dict(self._answers)
                with self._tx() as db:
                    db.executemany("UPDATE requests SET reply = ?, answered_at = ? WHERE request_id = ?",
                                   [(r, t, rid) for rid, (r, t) in answers.items()])
                for rid in answers:
                    self._answers.pop(rid, None)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise

    @property
    def pending(self) -> int:
        """Replies and counters waiting for disk space."""
        return len(self._answers) + len(self._meta_unsaved)

    def delivered(self, request_id: str) -> None:
        """The reply was published (and acknowledged). Recorded in memory, committed with the next request or
        by ``flush()``: after a crash, a reply delivered in the last moments is published once more (clients
        drop replies to requests they no longer wait for)."""
        self._delivered.setdefault(request_id, time.time())

    def flush(self) -> None:
        """Commit what a full disk held back, then the delivery marks recorded since the last flush, in one
        transaction (kept for later if the disk is still full)."""
        if self._answers or self._meta_unsaved:
            self._save_pending()
        if self._delivered and not self._answers:
            marks, self._delivered = self._delivered, {}
            try:
                with self._tx() as db:
                    _mark_delivered(db, marks)
            except sqlite3.OperationalError as exc:
                self._delivered = marks | self._delivered
                if not is_full(exc):
                    raise
            else:
                self._open.difference_update(marks)

    def unanswered(self) -> list[Entry]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM requests WHERE answered_at IS NULL ORDER BY seq")
        return [e for e in (Entry(*r) for r in rows) if e.request_id not in self._answers]

    def undelivered(self) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM requests WHERE answered_at IS NOT NULL AND delivered_at IS NULL ORDER BY seq")
        return [e for e in (Entry(*r) for r in rows) if e.request_id not in self._delivered]

    def counts(self) -> dict[str, int]:
        """Lifetime counts (they survive pruning)."""
        return {"accepted": self._accepted, "answered": self._answered}

    def prune(self, keep: int, keep_s: float | None = None, *, batch: int = 2000) -> int:
        """Forget the answered and delivered requests beyond the dedup window: all but the newest ``keep``, and
        those answered more than ``keep_s`` seconds ago. At most ``batch`` rows per call (one short
        transaction on the request path's connection: the janitor calls it often). Returns how many went.

        Cheap whatever the journal's size: it reads no row it does not delete (bar the few undelivered ones
        below the cut). Rows are numbered in acceptance order, so the newest ``keep`` delivered rows all lie
        above ``newest seq - keep - (rows not delivered)``, and the time window's edge is found by a binary
        search on the acceptance time. A table scan here (a window function over every row) cost ~20-60 ms of
        the event loop every 2 s at 10,000 rows: the tail latency of every request then."""
        self.flush()
        count_cut = self._accepted - keep - len(self._open)
        cutoff = time.time() - keep_s if keep_s is not None else 0.0
        time_cut = self._accepted_before(cutoff) if keep_s is not None else 0
        upto = max(count_cut, time_cut)
        if upto <= 0:
            return 0
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE seq <= ? AND delivered_at "
                "IS NOT NULL AND (seq <= ? OR answered_at < ?) ORDER BY seq LIMIT ?)",
                (upto, count_cut, cutoff, batch))
            pruned = cur.rowcount
            db.execute("INSERT INTO meta(key, value) VALUES ('pruned', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (pruned,))
        return pruned

    def _accepted_before(self, t: float) -> int:
        """The highest seq accepted before ``t`` (0: none), by a binary search on seq (a row read per probe;
        acceptance times grow with seq, a clock stepped back only makes the edge approximate)."""
        lo, hi = 0, self._accepted
        while lo < hi:
            mid = (lo + hi + 1) // 2
            row = self._db.execute("SELECT seq, accepted_at FROM requests WHERE seq >= ? ORDER BY seq LIMIT 1",
                                   (mid,)).fetchone()
            if row is None or row[1] >= t:
                hi = mid - 1
            else:
                lo = int(row[0])
        return lo
