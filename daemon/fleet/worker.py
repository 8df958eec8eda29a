"""Many hosts on one event loop (``HostSet``), and the worker process that holds one: ``python -m
daemon.fleet.worker``, driven by the runner over its stdin/stdout.

The protocol is JSON lines. In (runner -> worker)::

    {"op": "configure", "settings": {...}}   first line: Settings overrides every host starts from
    {"op": "add", "plan": {...}}             a HostPlan: boot that host
    {"op": "remove", "host": "sim-0003"}     stop it gracefully (offline published; its state dir stays)
    {"op": "crash", "host": "sim-0003", "reboot_after_s": 2}
    {"op": "stop"}                           stop every host, then exit

Out (worker -> runner): ``{"host": ..., "event": "online"|"crashed"|"stopped", ...}``. End of input is
``stop``: a worker never outlives its runner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import structlog

from daemon.app import configure_logging
from daemon.fleet.host import Host, HostEvent
from daemon.settings import Settings
from schemas.fleet import HostPlan

log = structlog.get_logger(__name__)

EXECUTOR_THREADS = 64
"""The loop's worker threads: every host's blocking work (boot, kernel calls, transitions waited for at boot)
shares them, and a host waiting on its guest must not hold up the others' boots."""


class HostSet:
    """Hosts of one process, each in its own task of one TaskGroup (nothing shared between them but the loop)."""

    def __init__(self, base: Settings, *, on_event: HostEvent | None = None) -> None:
        self.base = base
        self.on_event = on_event
        self.hosts: dict[str, Host] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._pending: list[HostPlan] = []
        self._again: dict[str, HostPlan] = {}
        """Hosts added back while they were still stopping: each boots again once its stop is complete."""
        self._stop = asyncio.Event()

    def add(self, plan: HostPlan) -> Host:
        """Boot a host; one still stopping here boots again once it has stopped (one daemon per identity)."""
        running = self.hosts.get(plan.host)
        if running is not None:
            if running.stopping:
                self._again[plan.host] = plan
            return running
        host = self.hosts[plan.host] = Host(plan, self.base, on_event=self.on_event)
        if self._tg is not None:
            self._tg.create_task(self._run(host), name=f"fleet.host[{plan.host}]")
        else:
            self._pending.append(plan)
        return host

    def remove(self, host_id: str) -> bool:
        self._again.pop(host_id, None)
        host = self.hosts.get(host_id)
        if host is None:
            return False
        host.stop()
        return True

    def stop(self) -> None:
        self._stop.set()

    async def _run(self, host: Host) -> None:
        try:
            await host.run()
        except Exception:  # one host failing to boot (a damaged state dir) must not take the others down
            log.exception("fleet_host_failed", host=host.host_id)
            if self.on_event is not None:
                self.on_event(host.host_id, "failed", {})
        finally:
            if self.hosts.get(host.host_id) is host:
                del self.hosts[host.host_id]
            again = self._again.pop(host.host_id, None)
            if again is not None and not self._stop.is_set():
                self.add(again)

    async def run(self) -> None:
        """Run the hosts added before and while this runs, until ``stop()``; then stop them all."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for plan in self._pending:
                tg.create_task(self._run(self.hosts[plan.host]), name=f"fleet.host[{plan.host}]")
            self._pending.clear()
            await self._stop.wait()
            for host in list(self.hosts.values()):
                host.stop()
        self._tg = None


def use_executor(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="fleet"))


async def _serve(lines: asyncio.StreamReader, send: Callable[[dict[str, Any]], None]) -> None:
    first = json.loads(await lines.readline() or b"{}")
    if first.get("op") != "configure":
        raise SystemExit("fleet worker: the first line must be a configure")
    base = Settings(**first.get("settings", {}))
    configure_logging(base.log_level)
    use_executor(asyncio.get_running_loop())
    hosts = HostSet(base, on_event=lambda host, event, data: send({"host": host, "event": event, **data}))

    async def commands() -> None:
        while line := await lines.readline():
            msg = json.loads(line)
            if msg.get("op") == "stop":
                break
            try:
                _command(hosts, msg)
            except (ValueError, KeyError, TypeError) as exc:  # a bad command is the runner's bug: say, go on
                log.error("fleet_command_refused", command=msg.get("op"), error=str(exc))
        hosts.stop()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(commands(), name="fleet.commands")
        await hosts.run()


def _command(hosts: HostSet, msg: dict[str, Any]) -> None:
    op = msg.get("op")
    if op == "add":
        hosts.add(HostPlan.model_validate(msg["plan"]))
    elif op == "remove":
        hosts.remove(msg["host"])
    elif op == "crash":
        host = hosts.hosts.get(msg["host"])
        if host is not None:
            host.crash(float(msg.get("reboot_after_s", 2.0)))
    else:
        raise ValueError(f"unknown op {op!r}")


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg, separators=(",", ":")) + "\n")
        out.flush()

    await _serve(reader, send)


def main() -> None:
    # A terminal's ^C reaches the whole process group: the runner turns it into an orderly stop for its workers,
    # so a worker waits for that (or for the end of its input) instead of dying with its hosts mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_main())


if __name__ == "__main__":
    main()
