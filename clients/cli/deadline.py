"""``Deadline``: the hard end of an lpctl command.

asyncio's timeout ends the command cleanly in nearly every case, but not when a thread cannot be interrupted:
paho's blocking TCP connect runs in an executor thread, and ``asyncio.run`` waits for that thread before it
returns. A ``Deadline`` is a daemon timer thread that, if the command is still running when it fires, prints the
same one-line error the command would have printed and ends the process with exit code 3.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

EXIT_UNREACHABLE = 3


class Deadline:
    def __init__(self, seconds: float, message: Callable[[], str]) -> None:
        self._message = message
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"error: {self._message()}\n")
        sys.stderr.flush()
        os._exit(EXIT_UNREACHABLE)
