"""A request's walk goes straight down (mqtt -> service -> livepatch/ftrace/kprobes -> arch -> kernel -> emu): while
the main verbs run, no code of ``daemon/service`` is entered from a layer below it, except through the one
interface the design has for that — Livepatch's subscribers (``Livepatch.subscribe``), which report what a
transition did as it happens."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, run
from test_service_patch import signed, trusting_settings

import daemon
from clients.sdk import LivepatchClient

DAEMON = str(Path(daemon.__file__).resolve().parent) + "/"
SERVICE = DAEMON + "service/"
ABOVE = ("service/", "mqtt/", "app.py", "cli.py", "fleet/", "errors.py", "settings.py", "logs.py")
"""daemon/ paths at or above the service: a call from there into the service is a call going down."""

ALLOWED = {
    # Livepatch.subscribe: Livepatch tells its subscribers what a change or a transition did, synchronously
    ("daemon/service/livepatch/events.py", "PatchEvents.on_livepatch_event"),
    ("daemon/service/livepatch/insight.py", "PatchEffects.on_event"),
}
"""(module, function) of the service that a lower layer may call during a request."""


class Walk:
    """Records each entry into service code whose nearest caller inside ``daemon/`` is below the service."""

    def __init__(self) -> None:
        self.active = False
        self.hops: set[tuple[str, str, str, str]] = set()
        self.entered: set[str] = set()
        """Service functions entered while active, from anywhere: the threads running the request were seen."""
        self._lock = threading.Lock()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.active:
            return
        code = frame.f_code
        if not code.co_filename.startswith(SERVICE):
            return
        self.entered.add(code.co_qualname)
        caller = frame.f_back
        while caller is not None:
            path = caller.f_code.co_filename
            if path.startswith(DAEMON):
                rel = path[len(DAEMON):]
                if not rel.startswith(ABOVE):
                    with self._lock:
                        self.hops.add(("daemon/" + rel, caller.f_code.co_qualname,
                                       "daemon/" + code.co_filename[len(DAEMON):], code.co_qualname))
                return
            caller = caller.f_back


@pytest.fixture(scope="module")
def traced(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonThread, Walk]]:
    walk = Walk()
    threading.setprofile(walk.profile)  # every thread started from now on (loop, workers, vCPUs, drivers)
    try:
        d = DaemonThread(trusting_settings(tmp_path_factory.mktemp("walk"), mosquitto.url)).start()
        yield d, walk
        d.stop()
    finally:
        threading.setprofile(None)


def _hops_of(traced: tuple[DaemonThread, Walk], requests: Any, handler: str) -> set[tuple[str, str, str, str]]:
    """The hops seen while ``requests`` ran; ``handler`` (a service function they run) was seen entered."""
    d, walk = traced

    async def main() -> None:
        async with LivepatchClient(d.url, d.host, timeout=60) as c:
            await c.info()
            walk.hops.clear()
            walk.active = True
            try:
                await requests(c)
            finally:
                walk.active = False
    run(main())
    assert handler in walk.entered, "the thread that ran the request was not traced"
    return set(walk.hops)


def _unexpected(hops: set[tuple[str, str, str, str]]) -> list[str]:
    return sorted(f"{a}:{b} -> {c}:{e}" for a, b, c, e in hops if (c, e) not in ALLOWED)


def test_patch_enable_walks_down_but_for_livepatch_subscribers(traced: tuple[DaemonThread, Walk]) -> None:
    async def requests(c: LivepatchClient) -> None:
        await c.patch_load(signed("livepatch_cmdline").to_bytes())
        change = await c.patch_enable("livepatch_cmdline")
        if not change.completed:
            await c.wait_transition("livepatch_cmdline", 30)
        await c.patch_disable("livepatch_cmdline", wait=True)
        await c.patch_unload("livepatch_cmdline")
    hops = _hops_of(traced, requests, "PatchChanges.enable")
    assert _unexpected(hops) == []
    assert {(c, e) for _a, _b, c, e in hops} <= ALLOWED
    assert hops, "the subscribers were called: the check saw the livepatch layer's calls"


def test_ftrace_ops_register_walks_straight_down(traced: tuple[DaemonThread, Walk]) -> None:
    async def requests(c: LivepatchClient) -> None:
        await c.ops_register("walk", callback="count", filter="cmdline_proc_show")
        await c.call_read("proc_cmdline_read")
        await c.ops_unregister("walk")
    assert _unexpected(_hops_of(traced, requests, "OpsVerbs.ops_register")) == []


def test_call_walks_straight_down(traced: tuple[DaemonThread, Walk]) -> None:
    async def requests(c: LivepatchClient) -> None:
        await c.call("work_chain", 3)
        await c.call_read("proc_cmdline_read")
    assert _unexpected(_hops_of(traced, requests, "KernelCalls.run")) == []


def test_the_walk_check_sees_a_hop(traced: tuple[DaemonThread, Walk]) -> None:
    """The check itself: a service function called from a lower layer's frame is reported."""
    walk = Walk()
    walk.active = True
    from daemon.kernel import kernel as lower  # noqa: PLC0415 - a frame of the kernel layer for the check
    sys.setprofile(walk.profile)
    try:
        exec(compile("from daemon.service.pipeline.payload import reply_topic_ok\nreply_topic_ok('t')",
                     lower.__file__, "exec"), {})
    finally:
        sys.setprofile(None)
    assert any(a == "daemon/kernel/kernel.py" and c.startswith("daemon/service/") for a, _b, c, _e in walk.hops)
