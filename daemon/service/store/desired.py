"""The desired-state store: what the host should look like after a restart (kpatch's load-at-boot, as data).

The request journal (``journal.py``) makes *requests* durable; this store makes their *effect* durable. A
subsystem records each accepted change as a document under ``(kind, key)`` — e.g. ``("livepatch",
"livepatch_cmdline") -> {"enabled": true}`` with the signed bundle as its blob — and at boot, before the daemon
announces itself online, re-applies ``items(kind)`` in the order they were first put.

API (every method is thread-safe; handlers run in worker threads)::

    store.put(kind, key, doc, blob=None, request_id=None) -> Item   # insert or replace (keeps its order)
    store.update(kind, key, changes, request_id=None) -> Item       # merge into doc, keep blob and order
    store.delete(kind, key, request_id=None) -> bool
    store.get(kind, key) -> Item | None
    store.items(kind) -> list[Item]                                  # in order of first put
    store.applied(request_id) -> bool                                # did a change carry this request id?
    with store.batch(): ...                                          # several changes, one commit

``request_id`` is recorded in the same transaction as the change it caused: a request replayed after a crash
(``RequestContext.replayed``) can ask ``applied(request_id)`` and, when its change already reached this store
and was re-applied at boot, answer from the current state instead of applying it twice.

Storage: its own SQLite file next to the journal (``desired.sqlite3``), WAL mode, so it never contends with
the request path's journal commits. Every change is the effect of a mutating request,
so commits use ``synchronous=FULL`` (fsynced: they survive a power loss like the request's journal row).
Changes are rare (a patch load, an enable): SQLite's
automatic checkpoints are enough, and ``close()`` checkpoints the whole WAL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS desired (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    doc        TEXT NOT NULL,
    blob       BLOB,
    version    INTEGER NOT NULL DEFAULT 1,
    updated_at REAL NOT NULL,
    UNIQUE (kind, key)
);
CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    at         REAL NOT NULL
);
"""

APPLIED_KEEP = 10000
"""Request ids remembered (oldest forgotten first); the journal keeps about as many answered requests."""


@dataclass(frozen=True)
class Item:
    """One desired object. ``seq`` orders items by their first ``put``; ``version`` counts its changes."""

    kind: str
    key: str
    doc: dict[str, Any]
    blob: bytes | None
    seq: int
    version: int
    updated_at: float


class DesiredState:
    """One host's desired state (see the module docstring)."""

    def __init__(self, path: Path, *, durable: bool = False, applied_keep: int = APPLIED_KEEP,
                 fsync: bool = True) -> None:
        self.path = path
        self.applied_keep = applied_keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # `durable` kept for callers: always durable now, unless a benchmark measures what that costs (fsync=False)
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def mark_boot(self, boot_seq: int) -> None:
        """Record this start's boot sequence (the journal's): ``integrity.check`` compares the two."""
        with self.batch():
            self._db.execute("INSERT INTO marks(key, value) VALUES ('boot_seq', ?) ON CONFLICT(key) DO UPDATE "
                             "SET value = excluded.value", (boot_seq,))

    # -- transactions ----------------------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[DesiredState]:
        """Group changes into one transaction (nested batches join the outer one)."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _note(self, request_id: str | None, kind: str, key: str) -> None:
        if request_id is None:
            return
        self._db.execute("INSERT OR IGNORE INTO applied(request_id, kind, key, at) VALUES (?, ?, ?, ?)",
                         (request_id, kind, key, time.time()))
        self._db.execute("DELETE FROM applied WHERE seq <= (SELECT max(seq) FROM applied) - ?", (self.applied_keep,))

    # -- changes ---------------------------------------------------------------------------------------------

    def put(self, kind: str, key: str, doc: dict[str, Any], *, blob: bytes | None = None,
            request_id: str | None = None) -> Item:
        """Insert ``(kind, key)`` or replace its document and blob (an existing item keeps its place)."""
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        with self.batch():
            self._db.execute(
                "INSERT INTO desired(kind, key, doc, blob, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(kind, key) DO UPDATE SET doc = excluded.doc, blob = excluded.blob, "
                "version = version + 1, updated_at = excluded.updated_at",
                (kind, key, text, blob, time.time()))
            self._note(request_id, kind, key)
            item = self.get(kind, key)
        assert item is not None
        return item

    def update(self, kind: str, key: str, changes: dict[str, Any], *, request_id: str | None = None) -> Item:
        """Merge ``changes`` into the item's document (blob and order kept); KeyError if there is no such item."""
        with self.batch():
            item = self.get(kind, key)
            if item is None:
                raise KeyError(f"no desired {kind} {key!r}")
            text = json.dumps({**item.doc, **changes}, sort_keys=True, separators=(",", ":"))
            self._db.execute("UPDATE desired SET doc = ?, version = version + 1, updated_at = ? "
                             "WHERE kind = ? AND key = ?", (text, time.time(), kind, key))
            self._note(request_id, kind, key)
            new = self.get(kind, key)
        assert new is not None
        return new

    def delete(self, kind: str, key: str, *, request_id: str | None = None) -> bool:
        """Forget ``(kind, key)``; False if it was not there (the request id is recorded either way)."""
        with self.batch():
            cur = self._db.execute("DELETE FROM desired WHERE kind = ? AND key = ?", (kind, key))
            self._note(request_id, kind, key)
        return cur.rowcount > 0

    def forget_tombstones(self, kind: str, keep: int) -> int:
        """Delete all but the ``keep`` most recent items of ``kind`` whose document holds ``last`` (what a removal
        leaves for a replayed request: only the last few requests can ever be replayed)."""
        with self.batch():
            cur = self._db.execute(
                "DELETE FROM desired WHERE seq IN (SELECT seq FROM desired WHERE kind = ? AND "
                "json_extract(doc, '$.last') IS NOT NULL ORDER BY updated_at DESC, seq DESC LIMIT -1 OFFSET ?)",
                (kind, keep))
        return cur.rowcount

    # -- reads -----------------------------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Item | None:
        with self._lock:
            row = self._db.execute("SELECT kind, key, doc, blob, seq, version, updated_at FROM desired "
                                   "WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return _item(row) if row else None

    def items(self, kind: str) -> list[Item]:
        """Every item of ``kind``, in the order of their first ``put``."""
        with self._lock:
            rows = self._db.execute("SELECT kind, key, doc, blob, seq, version, updated_at FROM desired "
                                    "WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
        return [_item(r) for r in rows]

    def applied(self, request_id: str) -> bool:
        """True if a change made under ``request_id`` is recorded here (among the last ``applied_keep``)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM applied WHERE request_id = ?", (request_id,)).fetchone()
        return row is not None


def _item(row: tuple[Any, ...]) -> Item:
    kind, key, doc, blob, seq, version, updated_at = row
    return Item(kind, key, json.loads(doc), bytes(blob) if blob is not None else None, int(seq), int(version),
                float(updated_at))


__all__ = ["APPLIED_KEEP", "DesiredState", "Item"]
