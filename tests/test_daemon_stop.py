"""A daemon stops promptly whenever it is asked to: right after its thread started, while it boots, while it
connects, right after it came online.

``Daemon.stop()`` called before ``run()`` had taken its event loop used to be dropped (there was no loop to hand
it to), so a daemon started and stopped at once in a thread ran on until the test's join gave up (30 s).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings

ROUNDS = 20
STOP_WITHIN_S = 5.0


def test_a_daemon_started_and_stopped_at_once_stops_within_5_s_20_times(mosquitto: Mosquitto,
                                                                         tmp_path: Path) -> None:
    stops: list[float] = []
    online = 0
    for i in range(ROUNDS):
        d = DaemonThread(daemon_settings(tmp_path / str(i), mosquitto.url))
        came_online = d._ready  # set by DaemonThread's on_ready
        thread = threading.Thread(target=d._main, name=f"daemon-{d.host}", daemon=True)
        thread.start()
        # rounds 0, 4, 8, ...: at once (before run() has a loop); the others at growing delays, through boot and
        # connect, and once online (the last of each four waits for it)
        if i % 4 == 3:
            assert came_online.wait(30), f"round {i}: the daemon did not come online"
        else:
            time.sleep(0.08 * (i % 4))
        online += came_online.is_set()
        t0 = time.monotonic()
        d.daemon.stop()
        thread.join(30)
        stops.append(time.monotonic() - t0)
        assert not thread.is_alive(), f"round {i}: the daemon did not stop within 30 s"
        assert d.error is None, f"round {i}: {d.error!r}"
    slow = [(i, round(s, 2)) for i, s in enumerate(stops) if s >= STOP_WITHIN_S]
    assert not slow, f"stops slower than {STOP_WITHIN_S} s (round, seconds): {slow}; all: {stops}"
    assert online >= ROUNDS // 4, "the rounds that wait for online saw it"


def test_a_stop_before_the_thread_runs_is_kept(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Asked to stop before its thread even started, the daemon returns without booting its kernel."""
    d = DaemonThread(daemon_settings(tmp_path, mosquitto.url))
    d.daemon.stop()
    thread = threading.Thread(target=d._main, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert d.error is None
    assert time.monotonic() - t0 < STOP_WITHIN_S
    assert d.daemon.kernel is None, "no kernel booted for a daemon already told to stop"
