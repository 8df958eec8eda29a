"""The crash-loop guard: a kernel panic soon after a live patch was enabled keeps that patch disabled at the next
boot (vendors' live-patch agents do the same), instead of the desired state re-applying a crashing patch at
every boot.

A panic leaves ``<host dir>/panic.json`` (written by the daemon as its kernel dies). At the next boot, a patch
whose last transition to *patched* completed at most ``grace_s`` before that panic is *held back*: loaded, not
enabled, its desired state turned to disabled (with the reason), and the state document says why.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PANIC_FILE = "panic.json"


@dataclass(frozen=True)
class PanicRecord:
    time: float
    boot_seq: int
    message: str


def record_panic(host_dir: Path, boot_seq: int, message: str) -> PanicRecord:
    """Write the panic record (atomically: a half-written record never holds a patch back by mistake)."""
    record = PanicRecord(time.time(), boot_seq, message)
    tmp = host_dir / f".{PANIC_FILE}.tmp"
    with tmp.open("w") as f:
        json.dump(asdict(record), f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(host_dir / PANIC_FILE)
    return record


def previous_panic(host_dir: Path, boot_seq: int) -> PanicRecord | None:
    """The panic that ended the boot before ``boot_seq``, if that boot ended in one."""
    try:
        doc = json.loads((host_dir / PANIC_FILE).read_text())
        record = PanicRecord(float(doc["time"]), int(doc["boot_seq"]), str(doc["message"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.boot_seq == boot_seq - 1 else None


@dataclass(frozen=True)
class CrashLoopGuard:
    panic: PanicRecord | None
    grace_s: float

    def hold_back(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Why this desired patch (its desired-state document) must not be enabled at this boot, or None."""
        enabled_at = doc.get("enabled_at")
        if self.panic is None or self.grace_s <= 0 or not isinstance(enabled_at, (int, float)):
            return None
        after = self.panic.time - enabled_at
        if not 0 <= after <= self.grace_s:
            return None
        return {"reason": "crash_loop", "message": f"the kernel panicked {after:.1f} s after this patch was enabled "
                f"(within the {self.grace_s:g} s grace period): not enabled again at boot; enable it again to retry",
                "panic": self.panic.message, "panic_at": self.panic.time, "panic_boot_seq": self.panic.boot_seq,
                "enabled_at": enabled_at}
