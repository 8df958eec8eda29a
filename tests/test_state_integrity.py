"""Damaged state directories are noticed at start (the daemon refuses with a message naming the file and what to
do, exit 3) and ``livepatchd state check|repair`` keeps what can be kept (issue 10 §2)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from daemon.service.store import integrity
from daemon.service.store.desired import DesiredState
from daemon.service.store.journal import Journal

HOST = "vm"


def make_state(root: Path, requests: int = 20, boots: int = 2) -> tuple[Path, Path]:
    """A state directory as a daemon leaves it: ``boots`` starts, ``requests`` answered requests, one ops."""
    host = root / HOST
    journal, desired = host / "journal.sqlite3", host / "desired.sqlite3"
    for b in range(boots):
        j = Journal(journal)
        d = DesiredState(desired)
        boot = j.next_boot_seq()
        d.mark_boot(boot)
        d.put("ftrace.ops", f"ops{b}", {"registered": True}, request_id=f"put-{b}")
        for i in range(requests):
            rid = f"b{b}-r{i}"
            j.accept(rid, "ftrace.ops.register", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=boot,
                     sync=True)
            j.answer(rid, '{"ok":true}')
        j.close()
        d.close()
    return journal, desired


def state_cli(root: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "state", action, "--state-dir", str(root),
                           "--host", HOST], capture_output=True, text=True, timeout=60, check=False)


def serve(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--state-dir", str(root), "--host", HOST,
                           "--broker", "mqtt://127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_healthy_state_dir_passes(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path)
    assert integrity.check(journal, desired) == []
    out = state_cli(tmp_path, "check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok:")


def test_zeroed_desired_state_refuses_start_and_repair_keeps_the_journal(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path)
    size = desired.stat().st_size
    desired.write_bytes(b"\0" * size)
    problems = integrity.check(journal, desired)
    assert [p.path for p in problems] == [desired]
    proc = serve(tmp_path)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert str(desired) in proc.stderr
    assert "livepatchd state repair" in proc.stderr
    assert state_cli(tmp_path, "check").returncode == 1
    fixed = state_cli(tmp_path, "repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert integrity.check(journal, desired) == []
    assert list(desired.parent.glob("desired.sqlite3.damaged-*"))  # moved aside, not deleted
    j = Journal(journal)
    assert j.get("b1-r3") is not None  # the journal was kept whole
    assert j.next_boot_seq() == 3  # and the boot sequence continues
    j.close()


def test_vanished_desired_state_is_noticed(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path)
    desired.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        desired.with_name(desired.name + suffix).unlink(missing_ok=True)
    problems = integrity.check(journal, desired)
    assert len(problems) == 1
    assert problems[0].path == desired
    assert "gone" in problems[0].what


def test_emptied_journal_is_noticed_and_repair_continues_the_boot_sequence(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path, boots=3)
    journal.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        journal.with_name(journal.name + suffix).unlink(missing_ok=True)
    problems = integrity.check(journal, desired)
    assert [p.path for p in problems] == [journal]
    assert "starts over" in problems[0].what
    proc = serve(tmp_path)
    assert proc.returncode == 3
    assert str(journal) in proc.stderr
    assert state_cli(tmp_path, "repair").returncode == 0
    assert integrity.check(journal, desired) == []
    j = Journal(journal)
    assert j.next_boot_seq() == 4  # not 1: old request ids are not mistaken for new ones by boot
    j.close()
    d = DesiredState(desired)
    assert [i.key for i in d.items("ftrace.ops")] == ["ops0", "ops1", "ops2"]
    d.close()


def test_truncated_journal_is_refused(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path, requests=400)
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) // 2])
    problems = integrity.check(journal, desired)
    assert [p.path for p in problems] == [journal]
    fixed = state_cli(tmp_path, "repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert integrity.check(journal, desired) == []


def test_garbage_in_the_wal_after_a_crash_is_detected_and_the_prefix_kept(tmp_path: Path) -> None:
    journal, _desired = make_state(tmp_path, boots=1, requests=0)
    j = Journal(journal)
    for i in range(30):
        j.accept(f"w{i}", "ftrace.ops.register", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1,
                 sync=True)
    # kill -9: copy the files as the crash leaves them (no checkpoint, no close)
    crashed = tmp_path / "crashed" / HOST
    crashed.mkdir(parents=True)
    for f in journal.parent.iterdir():
        shutil.copy2(f, crashed / f.name)
    j.close()
    wal = crashed / "journal.sqlite3-wal"
    data = bytearray(wal.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 512] = b"\x5a" * 512
    wal.write_bytes(bytes(data))
    cj, cd = crashed / "journal.sqlite3", crashed / "desired.sqlite3"
    problems = integrity.check(cj, cd)
    assert [p.path for p in problems] == [wal]
    assert "damaged" in problems[0].what
    proc = serve(tmp_path / "crashed")
    assert proc.returncode == 3
    assert str(wal) in proc.stderr
    assert state_cli(tmp_path / "crashed", "repair").returncode == 0
    assert integrity.check(cj, cd) == []
    kept = Journal(cj)
    assert kept.get("w0") is not None  # the commits before the damage
    kept.close()
    assert list(crashed.glob("journal.sqlite3-wal.damaged-*"))


def test_a_wal_reused_after_a_reset_is_not_mistaken_for_damage(tmp_path: Path) -> None:
    journal, desired = make_state(tmp_path, boots=1, requests=0)
    j = Journal(journal)
    for round_ in range(3):
        for i in range(50):
            j.accept(f"x{round_}-{i}", "info", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
        j.checkpoint()
        j.restart_wal()
    j.accept("last", "info", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
    assert integrity.check(journal, desired) == []  # older frames left in the file carry older salts
    j.close()
