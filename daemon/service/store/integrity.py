"""Is this host's state directory what the last run left? Checked before the daemon opens it (and by
``livepatchd state check``); ``repair`` keeps what can be kept.

Checks, per SQLite file (the journal, the desired state):

* the database file opens and passes ``PRAGMA quick_check`` (a zeroed or truncated file fails here);
* its WAL is whole: SQLite reads a WAL up to its first bad frame and silently ignores the rest, so garbage
  written into the middle of a WAL (a torn write, a disk fault) would drop every later commit — acknowledged
  requests included — without a word. A frame after that point that still carries the WAL header's salts was
  written by the same WAL generation: it is lost data, and the file is reported damaged;
* the journal and the desired state agree: each start records its boot sequence number in both, so a journal
  that starts over (emptied, replaced: its boot sequence is behind the desired state's) or a desired state that
  vanished (empty while the journal says the host ran before) is noticed instead of silently starting a host
  with no patches, or executing old request ids again.
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path

WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_HEADER = 32
FRAME_HEADER = 24


class StateError(Exception):
    """The state directory cannot be used: the message says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class Problem:
    path: Path
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def _checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_problem(wal: Path) -> str | None:
    """Why the WAL at ``wal`` would lose commits, or None (absent, empty, reset or whole)."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < WAL_HEADER:
        return None if not data.strip(b"\0") else "the WAL file is shorter than its header"
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:WAL_HEADER])
    if magic not in WAL_MAGIC:
        return None if not data.strip(b"\0") else "the WAL header is not a WAL header (garbage)"
    big = magic & 1 == 1
    if _checksum(data[:24], 0, 0, big) != (c0, c1):
        return "the WAL header's checksum is wrong (garbage in the WAL)"
    frame = FRAME_HEADER + page_size
    s0, s1 = c0, c1
    off = WAL_HEADER
    valid = True
    lost_at: int | None = None
    while off + frame <= len(data):
        header = data[off:off + FRAME_HEADER]
        fsalt1, fsalt2, f0, f1 = struct.unpack(">4I", header[8:24])
        same_generation = (fsalt1, fsalt2) == (salt1, salt2)
        if valid:
            if not same_generation:
                valid = False  # an older generation's frames: left over after a WAL reset, not data
            else:
                s0, s1 = _checksum(header[:8], s0, s1, big)
                s0, s1 = _checksum(data[off + FRAME_HEADER:off + frame], s0, s1, big)
                if (s0, s1) != (f0, f1):
                    valid = False
                    lost_at = off
        elif same_generation and lost_at is not None:
            return (f"the WAL is damaged at byte {lost_at}: frames written after it would be silently dropped "
                    "(commits lost)")
        off += frame
    return None


def _open_ro(path: Path) -> sqlite3.Connection:
    # not immutable: the WAL (if any) is read as the daemon would read it
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def db_problem(path: Path) -> str | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        db = _open_ro(path)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return f"not a readable SQLite database ({exc})"
    if rows != [("ok",)]:
        return "the database is corrupt: " + "; ".join(str(r[0]) for r in rows[:3])
    return None


def _scalar(path: Path, sql: str) -> int | None:
    """One integer from a healthy file; None when the file, the table or the row is not there."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    db = _open_ro(path)
    try:
        row = db.execute(sql).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return int(row[0]) if row and row[0] is not None else None


def journal_boot(journal: Path) -> int:
    return _scalar(journal, "SELECT value FROM meta WHERE key = 'boot_seq'") or 0


def desired_boot(desired: Path) -> int | None:
    return _scalar(desired, "SELECT value FROM marks WHERE key = 'boot_seq'")


def desired_used(desired: Path) -> bool:
    """Has this desired-state file ever held anything (its tables exist)?"""
    return _scalar(desired, "SELECT count(*) FROM sqlite_master WHERE name = 'desired'") == 1


def check(journal: Path, desired: Path) -> list[Problem]:
    problems: list[Problem] = []
    for path in (journal, desired):
        wal = path.with_name(path.name + "-wal")
        if (why := wal_problem(wal)) is not None:
            problems.append(Problem(wal, why))
        elif (why := db_problem(path)) is not None:
            problems.append(Problem(path, why))
    if problems:
        return problems
    jboot, dboot = journal_boot(journal), desired_boot(desired)
    if jboot > 0 and not desired_used(desired):
        problems.append(Problem(desired, f"the desired state is gone (empty or missing) although the journal "
                                         f"records {jboot} earlier start(s): the host would start without its "
                                         "patches, ops and hijacks"))
    elif dboot is not None and jboot < dboot:
        problems.append(Problem(journal, f"the journal starts over (boot sequence {jboot}) while the desired "
                                         f"state was last used by start {dboot}: the journal was emptied or "
                                         "replaced; old request ids would be executed again"))
    return problems


ADVICE = ("Restore the file from a backup, or run `livepatchd state repair --state-dir DIR --host HOST` to keep "
          "what can be kept (the damaged files are moved aside, not deleted).")


def refuse(problems: list[Problem]) -> StateError:
    lines = "\n".join(f"  {p}" for p in problems)
    return StateError(f"the state directory is damaged:\n{lines}\n{ADVICE}")


def _aside(path: Path, stamp: str) -> Path | None:
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    shutil.move(path, target)
    return target


def _salvage(src: Path, dst: Path) -> int:
    """Copy every row that can still be read from ``src`` into ``dst`` (same schema); returns rows kept."""
    kept = 0
    try:
        old = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        tables = old.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                             ).fetchall()
    except sqlite3.DatabaseError:
        return 0
    new = sqlite3.connect(dst, isolation_level=None)
    try:
        for name, sql in tables:
            new.execute(sql)
            try:
                for row in old.execute(f'SELECT * FROM "{name}"'):
                    try:
                        new.execute(f'INSERT OR IGNORE INTO "{name}" VALUES ({",".join("?" * len(row))})', row)
                        kept += 1
                    except sqlite3.DatabaseError:
                        continue
            except sqlite3.DatabaseError:
                continue  # the rest of this table is unreadable
    finally:
        new.close()
        old.close()
    return kept


def repair(journal: Path, desired: Path) -> list[str]:
    """Make the state directory usable again, keeping what can be kept; returns what was done."""
    done: list[str] = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (journal, desired):
        wal = path.with_name(path.name + "-wal")
        if (why := wal_problem(wal)) is not None:
            # keep a copy, then let SQLite keep the WAL's readable part: the commits before the damage
            shutil.copy2(wal, wal.with_name(f"{wal.name}.damaged-{stamp}"))
            db = sqlite3.connect(path)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
            done.append(f"{wal}: {why}; kept the commits before the damage (a copy: {wal.name}.damaged-{stamp})")
        if (why := db_problem(path)) is not None:
            moved = _aside(path, stamp)
            for suffix in ("-wal", "-shm"):
                _aside(path.with_name(path.name + suffix), stamp)
            assert moved is not None
            kept = _salvage(moved, path)
            done.append(f"{path}: {why}; moved to {moved.name}, {kept} readable row(s) copied into a new file")
    jboot, dboot = journal_boot(journal), desired_boot(desired)
    boot = max(jboot, dboot or 0)
    if check(journal, desired):
        # what is left is consistent by decree: boot sequences continue from the highest one seen
        for path, table in ((journal, "meta"), (desired, "marks")):
            db = sqlite3.connect(path, isolation_level=None)
            db.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            if path == desired:
                db.execute("CREATE TABLE IF NOT EXISTS desired (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                           "kind TEXT NOT NULL, key TEXT NOT NULL, doc TEXT NOT NULL, blob BLOB, version INTEGER "
                           "NOT NULL DEFAULT 1, updated_at REAL NOT NULL, UNIQUE (kind, key))")
            db.execute(f"INSERT INTO {table}(key, value) VALUES ('boot_seq', ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = excluded.value", (boot,))
            db.close()
        done.append(f"journal and desired state told to agree at boot sequence {boot} (what the lost file held "
                    "is gone: re-apply patches, ops and hijacks that are missing)")
    return done


__all__ = ["ADVICE", "Problem", "StateError", "check", "refuse", "repair"]
