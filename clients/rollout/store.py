"""Durable rollout state: SQLite by default, PostgreSQL by URL; versioned SQL migrations.

Every change of an execution bumps its ``version`` and is committed before the orchestrator acts on it, so a
kill -9 loses nothing: a restarted (or another) worker reads the same rows and carries on. Work is shared by
leases: a worker claims due executions (PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``; SQLite: one writer at
a time, ``BEGIN IMMEDIATE``), and a claimed execution is changed only by its owner until its lease expires.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.rollout import TERMINAL, ExecState

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE rollouts (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    current_wave INTEGER NOT NULL,
    reason TEXT,
    plan TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    released INTEGER NOT NULL DEFAULT 0,
    rate_anchor DOUBLE PRECISION
);
CREATE TABLE waves (
    rollout TEXT NOT NULL REFERENCES rollouts(name),
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    approved INTEGER NOT NULL DEFAULT 0,
    started_at DOUBLE PRECISION,
    PRIMARY KEY (rollout, idx)
);
CREATE TABLE executions (
    rollout TEXT NOT NULL REFERENCES rollouts(name),
    host TEXT NOT NULL,
    wave INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    build_id TEXT,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    version INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    details TEXT NOT NULL,
    released INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    phase_at DOUBLE PRECISION,
    owner TEXT,
    lease_until DOUBLE PRECISION,
    driven INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rollout, host)
);
CREATE INDEX executions_due ON executions (rollout, released, next_at);
"""),
    (2, """
CREATE TABLE steps (
    rollout TEXT NOT NULL,
    host TEXT NOT NULL,
    version INTEGER NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rollout, host, version)
);
"""),
    (3, """
ALTER TABLE rollouts ADD COLUMN leader TEXT;
ALTER TABLE rollouts ADD COLUMN leader_until DOUBLE PRECISION
"""),
    (4, """
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    verb TEXT NOT NULL,
    worker TEXT NOT NULL,
    reply TEXT,
    at DOUBLE PRECISION NOT NULL
)
"""),
]
"""Append-only: a released migration is never edited; a new one gets the next number. ``steps`` is the audit
trail of every execution change and who made it (a second driver of one version would violate its key);
``requests`` holds each control request's id and reply (a repeat is answered from it, never run twice)."""


@dataclass
class ExecRow:
    rollout: str
    host: str
    wave: int
    seq: int
    build_id: str | None
    state: ExecState
    phase: str
    version: int
    attempts: int
    raw_details: str  # the stored JSON: parsed on first use of ``details`` (most reads of a tick never need it)
    released: bool
    next_at: float
    started_at: float | None
    phase_at: float | None
    owner: str | None
    lease_until: float | None
    updated_at: float
    _details: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def details(self) -> dict[str, Any]:
        if self._details is None:
            self._details = json.loads(self.raw_details)
        return self._details

    @details.setter
    def details(self, value: dict[str, Any]) -> None:
        self._details = value

    def details_json(self) -> str:
        return self.raw_details if self._details is None else json.dumps(self._details, sort_keys=True)


@dataclass
class RolloutRow:
    name: str
    spec: str
    state: str
    version: int
    current_wave: int
    reason: str | None
    plan: dict[str, Any]
    created_at: float
    updated_at: float
    started_at: float | None
    released: int
    rate_anchor: float | None
    waves: list[dict[str, Any]] = field(default_factory=list)


_EXEC_COLS = ("rollout, host, wave, seq, build_id, state, phase, version, attempts, details, released, next_at, "
              "started_at, phase_at, owner, lease_until, updated_at")
_ROLLOUT_COLS = ("name, spec, state, version, current_wave, reason, plan, created_at, updated_at, started_at, "
                 "released, rate_anchor")


def _exec(row: Sequence[Any]) -> ExecRow:
    r = list(row)
    return ExecRow(r[0], r[1], int(r[2]), int(r[3]), r[4], ExecState(r[5]), r[6], int(r[7]), int(r[8]),
                   r[9], bool(r[10]), float(r[11]), r[12], r[13], r[14], r[15], float(r[16]))


class _Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Tx:
    """One transaction: ``?`` placeholders whatever the database."""

    def __init__(self, cur: _Cursor, pg: bool) -> None:
        self._cur, self.pg = cur, pg

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._cur.execute(sql.replace("?", "%s") if self.pg else sql, tuple(params))
        try:
            return list(self._cur.fetchall())
        except Exception:  # noqa: BLE001 - a statement without rows (both drivers raise their own type)
            return []


class Store:
    """Open with ``Store(url)``: a path or ``sqlite:///path`` (default), or ``postgresql://…``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.Lock()
        if self.pg:
            import psycopg  # only needed for PostgreSQL  # noqa: PLC0415

            self._pgconn = psycopg.connect(url, autocommit=False)
        else:
            path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
            self._sqlite = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self._sqlite.execute("PRAGMA journal_mode=WAL")
            self._sqlite.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def close(self) -> None:
        if self.pg:
            self._pgconn.close()
        else:
            self._sqlite.close()

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, one writer; PostgreSQL: READ COMMITTED + row locks)."""
        with self._lock:
            if self.pg:
                with self._pgconn.cursor() as cur:
                    try:
                        yield Tx(cur, True)
                        self._pgconn.commit()
                    except BaseException:
                        self._pgconn.rollback()
                        raise
            else:
                scur = self._sqlite.cursor()
                scur.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(scur, False)
                    scur.execute("COMMIT")
                except BaseException:
                    scur.execute("ROLLBACK")
                    raise

    def migrate(self) -> int:
        """Apply the migrations not yet applied, each in its own transaction; returns the schema version."""
        with self.tx() as t:
            if self.pg:  # two workers starting at once: one migrates, the other waits (even CREATE ... IF NOT EXISTS
                t.run("SELECT pg_advisory_xact_lock(7263110)")  # races on PostgreSQL's catalog)
            t.run("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
            done = {int(r[0]) for r in t.run("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                for stmt in (s.strip() for s in sql.split(";")):
                    if stmt:
                        t.run(stmt)
                t.run("INSERT INTO schema_migrations (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)", (version,))
            return max(v for v, _ in MIGRATIONS)

    # -- rollouts ----------------------------------------------------------------------------------------------

    def create(self, name: str, spec_json: str, plan: dict[str, Any], waves: int,  # noqa: PLR0917
               hosts: list[tuple[str, int, str | None, ExecState, dict[str, Any]]], now: float) -> None:
        with self.tx() as t:
            if t.run("SELECT name FROM rollouts WHERE name = ?", (name,)):
                raise KeyError(name)
            t.run(f"INSERT INTO rollouts ({_ROLLOUT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                  (name, spec_json, "CREATED", 1, 0, None, json.dumps(plan, sort_keys=True), now, now, None, 0,
                   None))
            for i in range(waves):
                t.run("INSERT INTO waves (rollout, idx, state, approved) VALUES (?,?,?,0)", (name, i, "pending"))
            for seq, (host, wave, build_id, state, details) in enumerate(hosts):
                self._insert_exec(t, name, host, wave, seq, build_id, state, details, now)

    def _insert_exec(self, t: Tx, name: str, host: str, wave: int, seq: int, build_id: str | None,  # noqa: PLR0917
                     state: ExecState, details: dict[str, Any], now: float) -> None:
        t.run(f"INSERT INTO executions ({_EXEC_COLS}, driven) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0)",
              (name, host, wave, seq, build_id, state.value, "done" if state in TERMINAL else "load", 1, 0,
               json.dumps(details, sort_keys=True), 0, now, None, None, None, None, now))

    def add_host(self, name: str, host: str, wave: int, build_id: str | None, state: ExecState,  # noqa: PLR0917
                 details: dict[str, Any], now: float) -> bool:
        """A dynamic target joining: False when the host is already in the rollout."""
        with self.tx() as t:
            if t.run("SELECT host FROM executions WHERE rollout = ? AND host = ?", (name, host)):
                return False
            seq = int(t.run("SELECT COALESCE(MAX(seq), -1) + 1 FROM executions WHERE rollout = ?", (name,))[0][0])
            self._insert_exec(t, name, host, wave, seq, build_id, state, details, now)
            return True

    def rollout(self, name: str) -> RolloutRow | None:
        with self.tx() as t:
            rows = t.run(f"SELECT {_ROLLOUT_COLS} FROM rollouts WHERE name = ?", (name,))
            if not rows:
                return None
            r = list(rows[0])
            row = RolloutRow(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], json.loads(r[6]), float(r[7]),
                             float(r[8]), r[9], int(r[10]), r[11])
            row.waves = [{"index": int(w[0]), "state": w[1], "approved": bool(w[2]), "started_at": w[3]}
                         for w in t.run("SELECT idx, state, approved, started_at FROM waves WHERE rollout = ? "
                                        "ORDER BY idx", (name,))]
            return row

    def names(self) -> list[str]:
        with self.tx() as t:
            return [r[0] for r in t.run("SELECT name FROM rollouts ORDER BY created_at, name")]

    def update_rollout(self, name: str, now: float, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v, sort_keys=True) if k == "plan" else v for k, v in fields.items()]
        with self.tx() as t:
            t.run(f"UPDATE rollouts SET {sets}, version = version + 1, updated_at = ? WHERE name = ?",
                  (*values, now, name))

    def lead(self, name: str, worker: str, now: float, lease_s: float) -> bool:
        """Take or keep the rollout's lead lease: its holder alone makes the rollout-level decisions."""
        with self.tx() as t:
            t.run("UPDATE rollouts SET leader = ?, leader_until = ? WHERE name = ? AND (leader IS NULL OR "
                  "leader = ? OR leader_until < ?)", (worker, now + lease_s, name, worker, now))
            got = t.run("SELECT leader FROM rollouts WHERE name = ?", (name,))
            return bool(got) and got[0][0] == worker

    def update_wave(self, name: str, idx: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as t:
            t.run(f"UPDATE waves SET {sets} WHERE rollout = ? AND idx = ?", (*fields.values(), name, idx))

    # -- executions --------------------------------------------------------------------------------------------

    def executions(self, name: str) -> list[ExecRow]:
        with self.tx() as t:
            return [_exec(r) for r in t.run(f"SELECT {_EXEC_COLS} FROM executions WHERE rollout = ? ORDER BY seq",
                                            (name,))]

    def counts(self, name: str) -> dict[tuple[int, str], int]:
        """How many executions per (wave, state)."""
        with self.tx() as t:
            return {(int(w), str(st)): int(n) for w, st, n in
                    t.run("SELECT wave, state, COUNT(*) FROM executions WHERE rollout = ? GROUP BY wave, state",
                          (name,))}

    def busy(self, name: str) -> bool:
        """Some execution is released and not done."""
        with self.tx() as t:
            return bool(t.run("SELECT 1 FROM executions WHERE rollout = ? AND released = 1 AND phase <> 'done' "
                              "LIMIT 1", (name,)))

    def release(self, name: str, hosts: list[str], now: float) -> None:
        """The rate limiter let these QUEUED executions start (durable: a restart does not release them again)."""
        with self.tx() as t:
            for host in hosts:
                t.run("UPDATE executions SET released = 1, next_at = ? WHERE rollout = ? AND host = ? "
                      "AND released = 0", (now, name, host))
            t.run("UPDATE rollouts SET released = released + ? WHERE name = ?", (len(hosts), name))

    def claim(self, name: str, worker: str, now: float, lease_s: float, limit: int) -> list[ExecRow]:
        """Due executions (released, not ``done``) no other live worker holds, now leased to ``worker``."""
        lock = " FOR UPDATE SKIP LOCKED" if self.pg else ""
        with self.tx() as t:
            rows = t.run(f"SELECT {_EXEC_COLS} FROM executions WHERE rollout = ? AND released = 1 "
                         f"AND phase <> 'done' AND next_at <= ? AND (owner IS NULL OR owner = ? OR "
                         f"lease_until < ?) ORDER BY wave, seq LIMIT ?{lock}",
                         (name, now, worker, now, limit))
            got = [_exec(r) for r in rows]
            for e in got:
                t.run("UPDATE executions SET owner = ?, lease_until = ? WHERE rollout = ? AND host = ?",
                      (worker, now + lease_s, name, e.host))
                e.owner, e.lease_until = worker, now + lease_s
            return got

    def save(self, e: ExecRow, worker: str, now: float, *, keep_lease: bool = True) -> bool:
        """Write ``e`` back as version+1, only if ``worker`` still holds it at the version it read."""
        return self.save_many([e], worker, now, keep_lease=keep_lease)[0]

    def save_many(self, rows: Sequence[ExecRow], worker: str, now: float, *, keep_lease: bool = True) -> list[bool]:
        """``save`` of every row, in one transaction (one commit for a batch of host steps: each row is still
        written only if ``worker`` holds it at the version it read)."""
        out = []
        with self.tx() as t:
            for e in rows:
                held = t.run("SELECT version, owner FROM executions WHERE rollout = ? AND host = ?"
                             + (" FOR UPDATE" if self.pg else ""), (e.rollout, e.host))
                if not held or int(held[0][0]) != e.version or held[0][1] != worker:
                    out.append(False)
                    continue
                e.version += 1
                e.updated_at = now
                t.run("UPDATE executions SET state = ?, phase = ?, version = ?, attempts = ?, details = ?, "
                      "released = ?, next_at = ?, started_at = ?, phase_at = ?, owner = ?, lease_until = ?, "
                      "driven = driven + 1, updated_at = ? WHERE rollout = ? AND host = ?",
                      (e.state.value, e.phase, e.version, e.attempts, e.details_json(),
                       int(e.released), e.next_at, e.started_at, e.phase_at, worker if keep_lease else None,
                       e.lease_until if keep_lease else None, now, e.rollout, e.host))
                t.run("INSERT INTO steps (rollout, host, version, owner, state, at) VALUES (?,?,?,?,?,?)",
                      (e.rollout, e.host, e.version, worker, e.state.value, now))
                out.append(True)
        return out

    def due(self, name: str, wave: int) -> tuple[float | None, int]:
        """When the next released execution is due (None: none in flight), and how many of ``wave`` wait to be
        released: what the engine's next wake-up needs, without reading every row."""
        with self.tx() as t:
            nxt = t.run("SELECT MIN(next_at) FROM executions WHERE rollout = ? AND released = 1 AND phase <> 'done'",
                        (name,))
            queued = t.run("SELECT COUNT(*) FROM executions WHERE rollout = ? AND wave = ? AND released = 0 "
                           "AND phase <> 'done'", (name, wave))
        first = nxt[0][0] if nxt else None
        return (None if first is None else float(first)), int(queued[0][0]) if queued else 0

    def force_state(self, name: str, host: str, state: ExecState, details: dict[str, Any], now: float,  # noqa: PLR0917
                    phase: str = "done", released: bool | None = None) -> None:
        """A control decision (cancel, remove, rollback start) that overrides any lease."""
        with self.tx() as t:
            rel = "" if released is None else f", released = {int(released)}"
            t.run(f"UPDATE executions SET state = ?, phase = ?, details = ?, version = version + 1, owner = NULL, "
                  f"lease_until = NULL, next_at = ?, updated_at = ?{rel} WHERE rollout = ? AND host = ?",
                  (state.value, phase, json.dumps(details, sort_keys=True), now, now, name, host))
            v = t.run("SELECT version FROM executions WHERE rollout = ? AND host = ?", (name, host))
            t.run("INSERT INTO steps (rollout, host, version, owner, state, at) VALUES (?,?,?,?,?,?)",
                  (name, host, int(v[0][0]), "control", state.value, now))

    def steps(self, name: str) -> list[tuple[str, int, str, str]]:
        with self.tx() as t:
            return [(r[0], int(r[1]), r[2], r[3]) for r in
                    t.run("SELECT host, version, owner, state FROM steps WHERE rollout = ? ORDER BY at, host, "
                          "version", (name,))]
