"""README's live-patch walk-through, run as written: every command of its block, in order, exits 0.

The block is read from README.md itself, so the walk-through cannot drift from what works. Only what a test
must change is changed: `lpctl` / `livepatchd` run as `python -m clients.cli` / `-m daemon.cli` from this
checkout, the broker is the session's private mosquitto, the host id is unique and the daemon's state goes
into the test's directory.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from mqtt_fixtures import REPO, DaemonProcess, Mosquitto, unique_host

README_BROKER, README_HOST = "mqtt://127.0.0.1:1883", "web-01"


def walkthrough_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Live patches over MQTT"):]
    block = section[section.index("```sh\n") + 6:]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def command(line: str) -> list[str]:
    """The line's words up to its comment."""
    words = shlex.split(line, comments=True)
    return words[:-1] if words and words[-1] == "&" else words


def test_the_readme_patch_walkthrough_works_as_written(mosquitto: Mosquitto, tmp_path: Path) -> None:
    host = unique_host("readme")
    env = {**os.environ}
    daemon: DaemonProcess | None = None
    outputs: dict[str, str] = {}
    try:
        for line in walkthrough_block():
            words = [w.replace(README_BROKER, mosquitto.url).replace(README_HOST, host) for w in command(line)]
            if not words:
                continue  # a comment line
            if words[0] == "export":
                key, value = words[1].split("=", 1)
                env[key] = value
                continue
            tool, args = words[0], words[1:]
            assert tool in ("lpctl", "livepatchd"), line
            if tool == "livepatchd" and args[0] == "serve":
                # the README's own options (its trusted key above all), plus where this test keeps state
                extra = [a for a in args[1:] if a not in ("--broker", mosquitto.url, "--host", host)]
                daemon = DaemonProcess(tmp_path, mosquitto.url, host, serve_args=extra, cwd=tmp_path).start()
                daemon.wait_online(timeout=60)
                continue
            module = "clients.cli" if tool == "lpctl" else "daemon.cli"
            proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=120, check=False,
                                  env={**env, "PYTHONPATH": str(REPO)})
            assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
            outputs[line] = proc.stdout
    finally:
        if daemon is not None:
            daemon.kill()
    assert daemon is not None, "the block starts a daemon"
    loaded = [out for line, out in outputs.items() if " patch load " in line]
    assert loaded
    assert "livepatch_cmdline" in loaded[0]
    read = [out for line, out in outputs.items() if " read proc_cmdline_read" in line]
    assert read
    assert "livepatch" in read[0]
