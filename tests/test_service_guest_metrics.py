"""Guest instruction counts on /metrics, when the daemon is told to count them."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings


def guest_instructions(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("lpd_guest_instructions "):
                return float(line.split()[1])
    return None


def test_guest_instructions_are_counted_only_on_request(mosquitto: Mosquitto, tmp_path: Path) -> None:
    counting = DaemonThread(daemon_settings(tmp_path / "a", mosquitto.url, metrics_port=0,
                                            count_guest_instructions=True)).start()
    plain = DaemonThread(daemon_settings(tmp_path / "b", mosquitto.url, metrics_port=0)).start()
    try:
        assert counting.daemon.metrics_port is not None
        assert plain.daemon.metrics_port is not None
        kernel = counting.daemon.kernel
        assert kernel is not None
        before = guest_instructions(counting.daemon.metrics_port)
        assert before is not None
        assert before > 0, "booting alone runs guest code"
        kernel.call("getpid_loop", 10_000)
        after = guest_instructions(counting.daemon.metrics_port)
        assert after is not None
        assert after - before >= 10_000 * 5, "each getpid_loop iteration is several instructions"
        assert guest_instructions(plain.daemon.metrics_port) is None, "not counted: not exported"
    finally:
        counting.stop()
        plain.stop()
