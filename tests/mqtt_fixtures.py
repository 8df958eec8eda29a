"""Fixtures for the service tests: a private Mosquitto on a free loopback port, daemons in threads or processes.

Mosquitto runs with its own configuration (set_tcp_nodelay true, persistence false) on a port chosen free at
start; nothing assumes 1883. A daemon runs in a thread with its own event loop (``DaemonThread``) or as a
``livepatchd serve`` process (``DaemonProcess``), each with its own host id and state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from clients.sdk import LivepatchClient
from daemon.app import Daemon, Extension
from daemon.settings import Settings
from schemas import StatusDoc

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``predicate`` on the running loop until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def next_status(c: LivepatchClient, want: str, boot_seq: int, timeout: float = 60.0) -> StatusDoc:
    """The first status of the host in state ``want`` with boot sequence ``boot_seq`` (retained one included)."""
    async with asyncio.timeout(timeout):
        async for status in c.statuses():
            if status.state == want and status.boot_seq == boot_seq:
                return status
    raise AssertionError("status stream ended")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_host(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if path is None:
        raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
    return path


class Mosquitto:
    """A private mosquitto: ``start()``, ``stop()``, ``start()`` again on the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        base = self.extra_conf or "allow_anonymous true\n"
        # as root, mosquitto would switch to the 'mosquitto' user, who cannot read the test's private files
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nset_tcp_nodelay true\npersistence false\n"
                             f"log_dest file {self.log}\nlog_type error\nlog_type warning\n{user}{base}")

    def start(self, timeout: float = 10.0) -> None:
        self.write_conf()
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                err = self.proc.stderr.read().decode()
                self.proc.stderr.close()
                raise RuntimeError(f"mosquitto exited at start: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None


def logs_to_stderr() -> None:
    """Daemon logs go to stderr (fd 2, captured by pytest): stdout belongs to the CLI under test."""
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"), structlog.dev.ConsoleRenderer(colors=False)],
        logger_factory=structlog.PrintLoggerFactory(sys.__stderr__), cache_logger_on_first_use=False)


class DaemonThread:
    """A daemon on its own event loop in a thread (the test's loop stays free for clients)."""

    def __init__(self, settings: Settings, extensions: Sequence[Extension] = ()) -> None:
        logs_to_stderr()
        self.settings = settings
        self.host = settings.host_id
        self.daemon = Daemon(settings, extensions=extensions)
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"daemon-{self.host}", daemon=True)

    def _main(self) -> None:
        self.daemon.on_ready = lambda _d: self._ready.set()
        try:
            asyncio.run(self.daemon.run())
        except BaseException as exc:  # noqa: BLE001  (reported by start() and stop())
            self.error = exc
            self._ready.set()

    def start(self, timeout: float = 30.0) -> DaemonThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"daemon {self.host} did not come online") from self.error
        return self

    @property
    def url(self) -> str:
        assert self.daemon.broker_url is not None
        return self.daemon.broker_url

    def stop(self) -> None:
        self.daemon.stop()
        self._thread.join(30)
        if self.error is not None:
            raise RuntimeError(f"daemon {self.host} failed") from self.error
        assert not self._thread.is_alive(), "daemon did not stop"
        self.check_events()

    def check_events(self) -> None:
        """Every event this daemon published followed its model (schemas.events), and every state section its
        own (schemas.documents.COMPONENTS): checked as each was emitted."""
        service = self.daemon.service
        assert service is None or service.events.invalid == [], service.events.invalid
        assert service is None or service.state.invalid == [], service.state.invalid


def daemon_settings(tmp: Path, broker_url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"host_id": unique_host(), "state_dir": tmp, "broker_url": broker_url,
                              "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "nr_cpus": 2}
    values.update(overrides)
    return Settings(**values)


class DaemonProcess:
    """``livepatchd serve`` as a child process (for SIGTERM and kill -9)."""

    def __init__(self, tmp: Path, broker_url: str, host: str | None = None, *, serve_args: Sequence[str] = (),
                 cwd: Path = REPO, **env: str) -> None:
        self.tmp = tmp
        self.serve_args = list(serve_args)
        self.cwd = cwd
        self.host = host or unique_host("p")
        self.broker_url = broker_url
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"{self.host}.log"

    @property
    def journal(self) -> Path:
        return self.tmp / self.host / "journal.sqlite3"

    def start(self) -> DaemonProcess:
        env = {**os.environ, "LIVEPATCHD_RECONNECT_MAX_S": "0.5", "PYTHONPATH": str(REPO), **self.env}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve", "--broker", self.broker_url, "--host", self.host,
                 "--state-dir", str(self.tmp), "--cpus", "2", *self.serve_args], cwd=self.cwd, env=env,
                stdout=log, stderr=log)
        return self

    def wait_online(self, timeout: float = 30.0) -> None:
        """Until the log says the daemon announced itself online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            for line in self.log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "daemon_online":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come online: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(30)


def running_mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    """A private anonymous mosquitto for a fixture's lifetime (``yield from`` it)."""
    broker = Mosquitto(workdir)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One private anonymous mosquitto for the session."""
    yield from running_mosquitto(tmp_path_factory.mktemp("mosquitto"))


@pytest.fixture(scope="session")
def lpd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """One daemon (real kernel, 2 vCPUs, metrics on a free port) on the session's mosquitto; tests must leave
    it serving."""
    d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("lpd"), mosquitto.url, metrics_port=0)).start()
    yield d
    d.stop()
