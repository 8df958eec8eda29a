"""The daemon's log: one format per session (third-party records included), human-readable on a terminal and
JSON otherwise; on a terminal, a daemon on its embedded broker says how to point lpctl at it."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from mqtt_fixtures import REPO

from daemon.app import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes the process's logging: put the test session's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def test_json_off_a_terminal_with_third_party_records_in_the_same_format(restore_logging: None) -> None:
    out = io.StringIO()  # not a terminal
    configure_logging("info", out)
    structlog.get_logger("daemon.test").info("daemon_thing", answer=42)
    logging.getLogger("amqtt.broker").warning("Invalid connection from %s", "127.0.0.1:5")
    logging.getLogger("amqtt.broker").info("below the third-party threshold")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["event"], d["level"]) for d in lines] == [("daemon_thing", "info"),
                                                         ("Invalid connection from 127.0.0.1:5", "warning")]
    assert lines[0]["answer"] == 42
    assert lines[1]["logger"] == "amqtt.broker"
    assert "timestamp" in lines[1]


def test_console_format_on_request(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", out, fmt="console")
    structlog.get_logger("daemon.test").info("daemon_thing", answer=42)
    logging.getLogger("amqtt.broker").warning("Invalid connection")
    first, second = out.getvalue().splitlines()
    assert "daemon_thing" in first
    assert "answer=42" in first
    assert not first.startswith("{")
    assert "Invalid connection" in second
    assert "warning" in second
    assert "\x1b[" not in first, "no colours off a terminal"


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return buf


def test_serve_on_a_terminal_says_how_to_reach_its_embedded_broker(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LIVEPATCHD_BROKER_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--state-dir", str(tmp_path), "--host",
                             "tty-host", "--cpus", "1"], stdin=secondary, stdout=secondary, stderr=secondary,
                            cwd=REPO, env=env)
    os.close(secondary)
    try:
        out = _read_until(primary, b"daemon_online", 60).decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        os.close(primary)
    lines = out.splitlines()
    export = next((i for i, line in enumerate(lines) if line.startswith("export LPCTL_BROKER=mqtt://127.0.0.1:")),
                  None)
    assert export is not None, out
    assert export < 5, "among the first lines"
    assert lines[export].split()[2] == "LPCTL_HOST=tty-host"
    url = lines[export].split()[1].split("=", 1)[1]
    assert any("embedded_broker_started" in line and url in line for line in lines)
    assert not any(line.startswith("{") for line in lines), "human-readable on a terminal"
