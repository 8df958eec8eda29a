"""The README's first command: `livepatchd demo` tells the whole story on embedded defaults."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any


def _snapshot(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}api/snapshot", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def test_demo_patches_observes_and_unpatches_live() -> None:
    errors: list[str] = []
    lines: list[str] = []
    seen: dict[str, Any] = {}
    with subprocess.Popen([sys.executable, "-m", "daemon.cli", "demo"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else ""))
        reader.start()
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dashboard: http://"):  # the page follows the demo's broker while the story runs
                url = line.split()[1]
                deadline = time.monotonic() + 60
                while "demo" not in seen.get("hosts", {}) and time.monotonic() < deadline:
                    seen = _snapshot(url)
                    time.sleep(0.2)
        proc.wait(300)
        reader.join(30)
    out = "".join(lines)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, errors[0] if errors else "")
    assert done.returncode == 0, out + done.stderr
    assert seen["broker"]["connected"] is True, seen
    assert seen["hosts"]["demo"]["status"]["state"] == "online"
    reads = [out.split(f"$ lpctl read proc_cmdline_read    # {note}", 1)[1].split("\n")[1].strip()
             for note in ("/proc/cmdline, rendered by cmdline_proc_show", "the same function, live patched",
                          "back to the original")]
    assert reads == ["console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1",
                     "livepatch_cmdline: this has been live patched",
                     "console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1"]
    assert "cmdline_proc_show (1)   I   O M \tops: 0x" in out
    assert "(klp_ftrace_handler+0x0/" in out
    assert "exit code" not in out
    assert out.rstrip().endswith("result: OK — patched, observed and unpatched live, nothing rebooted")
    assert "WARNING" not in done.stderr
