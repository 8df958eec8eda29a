"""The dashboard beside another program (``livepatchd demo``, ``livepatchd fleet``): uvicorn on a loop of its own
in a daemon thread, so that it never takes the caller's loop or signal handlers (uvicorn installs its own only on
the main thread)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from clients.dashboard.app import create_app
from clients.dashboard.controls import OperatorControls
from clients.dashboard.feed import FleetFeed


class DashboardError(Exception):
    """The dashboard could not start (bad listen address, port taken)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``address:port`` (port 0: any free one); raises DashboardError with what is wrong."""
    address, _, port = listen.rpartition(":")
    if not address or not port.isdigit() or int(port) > 65535:
        raise DashboardError(f"{listen!r} is not address:port (e.g. 127.0.0.1:8088; port 0 for any free one)")
    return address, int(port)


class BackgroundDashboard:
    def __init__(self, broker_url: str, listen: str = "127.0.0.1:0", controls: OperatorControls | None = None) -> None:
        self.address, self.port = parse_listen(listen)
        self.broker_url, self.controls = broker_url, controls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"

    def start(self, timeout_s: float = 20.0) -> BackgroundDashboard:
        if self.port == 0:  # a free port now, so the URL can be printed before the first request
            with socket.socket() as s:
                s.bind((self.address, 0))
                self.port = s.getsockname()[1]
        app = create_app(FleetFeed(self.broker_url), controls=self.controls)
        self._server = uvicorn.Server(uvicorn.Config(app, host=self.address, port=self.port, log_level="error",
                                                     lifespan="on", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise DashboardError(f"could not serve on {self.address}:{self.port} (in use?)")
            if time.monotonic() > deadline:
                raise DashboardError(f"not serving on {self.address}:{self.port} after {timeout_s:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
