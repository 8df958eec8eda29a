"""A state directory on a real, small file system (tmpfs) that fills up: mutating requests are refused with
``storage_full`` and nothing is journaled, reads are still served, the daemon never crashes and recovers by
itself once space returns (issue 10 §2)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

from clients.sdk import LivepatchClient, ReplyError
from daemon.service.store.journal import Journal, JournalFull

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Write until the file system says ENOSPC."""
    filler = fs / "filler"
    chunk = b"\xa5" * 65536
    with filler.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        with contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 512)
    return filler


def test_full_disk_refuses_changes_serves_reads_and_recovers(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "6m") as fs:
        lpd = DaemonThread(daemon_settings(fs / "state", mosquitto.url)).start()
        try:
            service = lpd.daemon.service
            assert service is not None

            async def main() -> None:
                async with LivepatchClient(mosquitto.url, lpd.host, timeout=60) as c:
                    await c.ops_register("before_full", filter="cmdline_proc_show")
                    filler = fill(fs)
                    refused = 0
                    for i in range(5):
                        with pytest.raises(ReplyError) as info:
                            await c.ops_register(f"while_full_{i}", filter="cmdline_proc_show")
                        assert info.value.code == "storage_full"
                        refused += 1
                        assert (await c.info()).host == lpd.host  # reads are still served
                    listed = {o.name for o in (await c.ops_list()).ops}
                    assert listed == {"before_full"}  # nothing refused was applied
                    filler.unlink()
                    # space is back: the next change is accepted, without a restart
                    data = await c.ops_register("after_full", filter="cmdline_proc_show")
                    assert data.ops.name == "after_full"
                    listed = {o.name for o in (await c.ops_list()).ops}
                    assert listed == {"before_full", "after_full"}
                    assert refused == 5
                    assert service.metrics.storage_full._value.get() >= 5
            run(main())
        finally:
            lpd.stop()


def test_full_disk_while_answering_keeps_the_reply(tmp_path: Path) -> None:
    """An accepted request whose reply cannot be written is answered anyway, and the reply reaches the journal
    once space returns (a duplicate is answered from memory meanwhile)."""
    with small_fs(tmp_path / "fs", "2m") as fs:
        j = Journal(fs / "journal.sqlite3")
        j.accept("r1", "ftrace.ops.register", '{"x": 1}', fp="f", reply_topic="t", correlation=None, boot_seq=1,
                 sync=True)
        filler = fill(fs)
        j.answer("r1", '{"ok": true, "big": "' + "y" * 200_000 + '"}')
        entry = j.get("r1")
        assert entry is not None
        assert entry.reply is not None
        assert j.pending == 1
        assert j.unanswered() == []  # not re-executed while held in memory
        with pytest.raises(JournalFull):
            j.accept("r2", "ftrace.ops.register", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
        j.next_state_version()  # counters never fail
        filler.unlink()
        j.flush()
        assert j.pending == 0
        j.close()
        again = Journal(fs / "journal.sqlite3")
        entry = again.get("r1")
        assert entry is not None
        assert entry.reply is not None
        assert entry.reply.startswith('{"ok": true')
        assert again.get("r2") is None
        assert again.meta("state_version") == 1
        again.close()


def test_full_or_read_only_state_dir_at_start_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "1m") as fs:
        fill(fs)
        proc = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--state-dir", str(fs / "state"),
                               "--broker", "mqtt://127.0.0.1:1"], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 3, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "state directory" in proc.stderr
        assert str(fs / "state") in proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--state-dir", str(ro),
                               "--broker", "mqtt://127.0.0.1:1"], capture_output=True, text=True,
                              timeout=120, check=False)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "read-only" in proc.stderr or "cannot write" in proc.stderr
