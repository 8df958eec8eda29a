"""The README's first command: `livepatchd demo` tells the whole story on embedded defaults."""

from __future__ import annotations

import subprocess
import sys


def test_demo_patches_observes_and_unpatches_live() -> None:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "demo"], capture_output=True, text=True, timeout=300,
                          check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
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
