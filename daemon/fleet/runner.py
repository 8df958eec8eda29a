"""``livepatchd fleet``: a broker (embedded unless one is given), worker processes, and the hosts spread over them.

The runner draws the hosts from the spec, gives each to the worker holding the fewest, and follows what the
workers report. ``<state-dir>/.fleet/`` is its control surface (no port: nothing fixed, nothing to secure):

- ``status.json`` (written by the runner, atomically, on every change): pid, broker URL, target size, every
  host's worker and whether it is online, every worker's pid and resident memory;
- ``control.json`` (written by ``livepatchd fleet scale N``, watched by the runner): ``{"hosts": N}``, the size to
  grow or shrink to. Growing adds the next host ids; shrinking stops the highest ones (offline published; their
  state dirs stay, so growing again brings them back with their desired state).

A worker that dies is started again with its hosts, which boot from their state dirs. With ``workers=0`` the
hosts run on the runner's own loop (one process: tests, small fleets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from daemon.fleet.plan import draw
from daemon.fleet.worker import HostSet, use_executor
from daemon.mqtt import EmbeddedBroker
from daemon.settings import Settings
from schemas.fleet import FleetSpec, HostPlan

log = structlog.get_logger(__name__)

CONTROL_POLL_S = 0.5
STATUS_EVERY_S = 0.5
WORKER_STOP_S = 30.0


def fleet_dir(state_dir: Path) -> Path:
    """The runner's own files; ``.`` cannot start a host id, so no host's state dir is ever this one."""
    return state_dir / ".fleet"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically: a reader sees the old document or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def request_size(state_dir: Path, hosts: int) -> None:
    """``livepatchd fleet scale``: ask the runner of ``state_dir`` to grow or shrink to ``hosts``."""
    write_json(fleet_dir(state_dir) / "control.json", {"hosts": hosts, "time": time.time()})


class _Worker:
    """A worker process and the hosts it holds."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.hosts: set[str] = set()

    def send(self, msg: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None


class FleetRunner:
    """N hosts of a spec over ``workers`` processes (0: on this loop), resizable while running."""

    def __init__(self, spec: FleetSpec, overrides: dict[str, Any], *, workers: int | None = None,
                 hosts: int | None = None, first: int = 0,
                 on_change: Callable[[FleetRunner], None] | None = None) -> None:
        self.spec = spec
        self.first = first
        """The number of this runner's first host id: a fleet split over several runners (machines) on one broker
        gives each its own range, so no host id runs twice; each grows and shrinks within its range."""
        self.overrides = dict(overrides)
        self.base = Settings(**self.overrides)
        self.target = max(0, spec.hosts - first) if hosts is None else hosts
        # one per core by default, but no idle process for a fleet smaller than the machine
        self.nr_workers = min(os.cpu_count() or 1, max(1, self.target)) if workers is None else workers
        self.on_change = on_change
        self.dir = fleet_dir(self.base.state_dir)
        self.broker_url: str | None = self.base.broker_url
        self.plans: dict[str, HostPlan] = {}
        self.where: dict[str, int] = {}
        self.online: dict[str, int] = {}
        """Online hosts and their boot sequence numbers."""
        self.crashes: dict[str, int] = {}
        self._workers: list[_Worker] = []
        self._local: HostSet | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._stopping = False
        self._control_mtime: int | None = None

    # -- control ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def resize(self, hosts: int) -> None:
        """Grow (the next host ids boot) or shrink (the highest ids stop) to ``hosts``."""
        self.target = max(0, hosts)
        self._reconcile()

    def crash(self, host: str, reboot_after_s: float = 2.0) -> None:
        self._send(host, {"op": "crash", "host": host, "reboot_after_s": reboot_after_s})

    @property
    def all_online(self) -> bool:
        return len(self.online) == self.target and set(self.online) == set(self.plans)

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._control_mtime = self._mtime()
        async with contextlib.AsyncExitStack() as stack:
            if self.broker_url is None:  # nothing configured: one embedded broker for the whole fleet
                broker = await stack.enter_async_context(EmbeddedBroker())
                self.broker_url = broker.url
                self.overrides.update(broker_url=broker.url, mqtt_protocol="3.1.1")
                self.base = Settings(**self.overrides)
                log.info("embedded_broker_started", url=broker.url)
            if self.nr_workers == 0:
                use_executor(loop)
                self._local = HostSet(self.base, on_event=self._event)
            async with asyncio.TaskGroup() as tg:
                if self._local is not None:
                    tg.create_task(self._local.run(), name="fleet.hosts")
                for i in range(self.nr_workers):
                    self._workers.append(await self._spawn(i, tg))
                self._reconcile()
                control = tg.create_task(self._watch_control(), name="fleet.control")
                status = tg.create_task(self._status_writer(), name="fleet.status")
                await self._stop.wait()
                self._stopping = True
                log.info("fleet_stopping", hosts=len(self.plans))
                await self._stop_workers()
                status.cancel()
                control.cancel()
            self._write_status(stopped=True)

    async def _spawn(self, index: int, tg: asyncio.TaskGroup) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.fleet.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 22)
        worker = _Worker(index, proc)
        worker.send({"op": "configure", "settings": self.overrides})
        tg.create_task(self._follow(worker, tg), name=f"fleet.worker[{index}]")
        log.info("fleet_worker_started", worker=index, pid=proc.pid)
        return worker

    async def _follow(self, worker: _Worker, tg: asyncio.TaskGroup) -> None:
        assert worker.proc.stdout is not None
        while line := await worker.proc.stdout.readline():
            msg = json.loads(line)
            host = msg.pop("host")
            self._event(host, msg.pop("event"), msg)
        code = await worker.proc.wait()
        if self._stopping:
            return
        log.error("fleet_worker_died", worker=worker.index, pid=worker.proc.pid, exit_code=code,
                  hosts=len(worker.hosts))
        for host in worker.hosts:
            self.online.pop(host, None)
        replacement = await self._spawn(worker.index, tg)
        self._workers[worker.index] = replacement
        for host in sorted(worker.hosts):  # they boot again from their state dirs
            replacement.hosts.add(host)
            replacement.send({"op": "add", "plan": self.plans[host].model_dump(mode="json")})
        self._changed.set()

    async def _stop_workers(self) -> None:
        if self._local is not None:
            self._local.stop()
        for w in self._workers:
            w.send({"op": "stop"})
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), WORKER_STOP_S)
            except TimeoutError:
                log.error("fleet_worker_stop_timeout", worker=w.index, pid=w.proc.pid)
                w.proc.kill()
                await w.proc.wait()

    # -- hosts -----------------------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Start or stop hosts until the fleet has ``target`` of them."""
        if self._stopping or (self._local is None and not self._workers):
            return
        wanted = draw(self.spec, self.target, self.first)
        wanted_ids = {p.host for p in wanted}
        for host in sorted(set(self.plans) - wanted_ids, reverse=True):
            self._send(host, {"op": "remove", "host": host})
            del self.plans[host]
        for plan in wanted:
            if plan.host not in self.plans:
                self.plans[plan.host] = plan
                self._place(plan)
        self._changed.set()

    def _place(self, plan: HostPlan) -> None:
        if self._local is not None:
            self.where[plan.host] = -1
            self._local.add(plan)
            return
        worker = min(self._workers, key=lambda w: (len(w.hosts), w.index))
        worker.hosts.add(plan.host)
        self.where[plan.host] = worker.index
        worker.send({"op": "add", "plan": plan.model_dump(mode="json")})

    def _send(self, host: str, msg: dict[str, Any]) -> None:
        index = self.where.get(host)
        if index is None:
            return
        if index < 0:
            assert self._local is not None
            if msg["op"] == "remove":
                self._local.remove(host)
            elif msg["op"] == "crash" and (h := self._local.hosts.get(host)) is not None:
                h.crash(msg["reboot_after_s"])
            return
        self._workers[index].send(msg)

    def _event(self, host: str, event: str, data: dict[str, Any]) -> None:
        if event == "online":
            self.online[host] = int(data.get("boot_seq") or 0)
        elif event in ("crashed", "stopped", "failed"):
            self.online.pop(host, None)
            if event == "crashed":
                self.crashes[host] = self.crashes.get(host, 0) + 1
            if event != "crashed" and host not in self.plans:  # removed by a shrink: it is gone for good
                index = self.where.pop(host, None)
                if index is not None and index >= 0:
                    self._workers[index].hosts.discard(host)
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self)

    # -- files -----------------------------------------------------------------------------------------------

    def _mtime(self) -> int | None:
        try:
            return (self.dir / "control.json").stat().st_mtime_ns
        except OSError:
            return None

    async def _watch_control(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            mtime = self._mtime()
            if mtime == self._control_mtime:
                continue
            self._control_mtime = mtime
            try:
                doc = json.loads((self.dir / "control.json").read_text())
                hosts = int(doc["hosts"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("fleet_control_unreadable", error=str(exc))
                continue
            log.info("fleet_resize", hosts=hosts, was=self.target)
            self.resize(hosts)

    async def _status_writer(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            self._write_status()
            await asyncio.sleep(STATUS_EVERY_S)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "broker_url": self.broker_url, "state_dir": str(self.base.state_dir),
            "target": self.target, "first": self.first, "online": len(self.online), "time": time.time(),
            "hosts": {h: {"worker": self.where.get(h), "online": h in self.online, "boot_seq": self.online.get(h),
                          "release": p.release, "crashes": self.crashes.get(h, 0)}
                      for h, p in sorted(self.plans.items())},
            "workers": [{"index": w.index, "pid": w.proc.pid, "hosts": len(w.hosts), "rss_mb": w.rss_mb()}
                        for w in self._workers],
        }

    def _write_status(self, *, stopped: bool = False) -> None:
        doc = self.status()
        if stopped:
            doc.update(pid=None, online=0, stopped=True)
        write_json(self.dir / "status.json", doc)


async def _dashboard(runner: FleetRunner, listen: str, broker: str | None) -> None:
    """The dashboard once the fleet's broker is known (an embedded one starts with the fleet), until cancelled."""
    from clients.dashboard.background import BackgroundDashboard, DashboardError  # noqa: PLC0415

    while broker is None and runner.broker_url is None:
        await asyncio.sleep(0.05)
    try:
        page = await asyncio.to_thread(BackgroundDashboard(broker or runner.broker_url or "", listen).start)
    except DashboardError as exc:
        print(f"livepatchd fleet: dashboard not started: {exc}", file=sys.stderr, flush=True)
        return
    print(f"dashboard: {page.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(page.stop)


def run_fleet(spec: FleetSpec, overrides: dict[str, Any], *, workers: int | None, hosts: int | None,
              first: int = 0, dashboard: str | None = None, dashboard_broker: str | None = None) -> int:
    """``livepatchd fleet``: run until SIGTERM/SIGINT; ``dashboard`` (address:port) serves the fleet page beside."""
    from daemon.app import configure_logging  # noqa: PLC0415

    base = Settings(**overrides)
    configure_logging(base.log_level)

    async def main() -> None:
        runner = FleetRunner(spec, overrides, workers=workers, hosts=hosts, first=first)
        loop = asyncio.get_running_loop()
        page = asyncio.create_task(_dashboard(runner, dashboard, dashboard_broker)) if dashboard else None

        def stop() -> None:
            if page is not None:
                page.cancel()  # the page goes first: its broker may be the fleet's embedded one
            runner.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await runner.run()
        finally:
            if page is not None:
                page.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await page

    asyncio.run(main())
    return 0
