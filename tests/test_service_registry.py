"""The registry others plug verbs into: registration rules, threads vs the loop, serialization, error codes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from pydantic import Field

from clients.sdk import LivepatchClient, ReplyError
from daemon.errors import FtraceBusy
from daemon.kernel.kernel import Kernel
from daemon.service import Journal, RequestContext, Service
from schemas import VERBS, KernelState, Outbound, Request, VerbSpec


class SleepRequest(Request):
    seconds: float = Field(ge=0, le=1)
    fail: str | None = None


class SleepData(Outbound):
    thread: str
    concurrent: int


def make_service(tmp_path: Path) -> Service:
    journal = Journal(tmp_path / "j.sqlite3")
    return Service(host="reg", boot_seq=journal.next_boot_seq(), journal=journal,
                   kernel=KernelState(build_id="x", nr_cpus=1, booted_at=time.time()), request_timeout_s=0.5)


@pytest.fixture
def verbs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VERBS, "test.change", VerbSpec("test.change", SleepRequest, SleepData, "a change",
                                                       mutating=True))
    monkeypatch.setitem(VERBS, "test.read", VerbSpec("test.read", SleepRequest, SleepData, "a read"))


def sleeper(active: list[int]) -> object:
    def handler(req: SleepRequest, ctx: RequestContext) -> SleepData:
        active[0] += 1
        try:
            if req.fail == "busy":
                raise FtraceBusy("function already has an IPMODIFY owner", function="f")
            if req.fail == "bug":
                raise KeyError("oops")
            time.sleep(req.seconds)
            ctx.state.set_component("test", {"last": ctx.request_id})  # from the worker thread
            return SleepData(thread=threading.current_thread().name, concurrent=active[0])
        finally:
            active[0] -= 1
    return handler


def test_registration_rules(tmp_path: Path, verbs: None) -> None:
    service = make_service(tmp_path)
    with pytest.raises(ValueError, match=r"not in schemas\.VERBS"):
        service.register("test.unknown", lambda req, ctx: None)
    service.register("test.read", sleeper([0]))
    with pytest.raises(ValueError, match="already has a handler"):
        service.register("test.read", sleeper([0]))
    assert service.verbs == ["test.read"]


def test_mutating_verbs_run_one_at_a_time_in_worker_threads(tmp_path: Path, verbs: None) -> None:
    service = make_service(tmp_path)
    changes, reads = [0], [0]
    service.register("test.change", sleeper(changes))
    service.register("test.read", sleeper(reads))

    async def main() -> None:
        service.attach(asyncio.get_running_loop())

        async def send(verb: str, i: int, **params: object) -> dict[str, object]:
            out = await service.handle(verb, json.dumps({"request_id": f"{verb}-{i}", **params}).encode())
            return json.loads(out.payload)  # type: ignore[no-any-return]

        changed = await asyncio.gather(*(send("test.change", i, seconds=0.05) for i in range(4)))
        read = await asyncio.gather(*(send("test.read", i, seconds=0.1) for i in range(3)))
        assert [r["data"]["concurrent"] for r in changed] == [1, 1, 1, 1]  # type: ignore[index]
        assert max(r["data"]["concurrent"] for r in read) > 1  # type: ignore[index]
        assert all(r["data"]["thread"] != threading.current_thread().name for r in changed)  # type: ignore[index]
        await asyncio.sleep(0)  # the state change was handed to this loop
        assert service.state.document().components["test"]["last"].startswith("test.")

        busy = await send("test.change", 10, seconds=0, fail="busy")
        assert busy["error"] == {"code": "ftrace_busy", "message": "function already has an IPMODIFY owner",
                                 "details": {"function": "f"}}
        bug = await send("test.change", 11, seconds=0, fail="bug")
        assert bug["error"]["code"] == "internal"  # type: ignore[index]
        assert "oops" not in json.dumps(bug)  # no internals on the wire
        slow = await send("test.read", 12, seconds=0.9)
        assert slow["error"]["code"] == "timeout"  # type: ignore[index]
        await asyncio.sleep(0)
        failed = []
        while (event := service.events.peek()) is not None:
            failed.append((event.type, event.data["request_id"], event.data["code"]))
            service.events.pop()
        assert failed == [("request.failed", "test.change-10", "ftrace_busy"),
                          ("request.failed", "test.change-11", "internal")]
    asyncio.run(main())
    service.journal.close()


def test_an_extension_verb_end_to_end(mosquitto: Mosquitto, tmp_path: Path, verbs: None) -> None:
    """How ftrace/livepatch verbs plug in: an extension registers handlers; the daemon serves them over MQTT."""
    def extension(service: Service, kernel: Kernel) -> None:
        def read(req: SleepRequest, ctx: RequestContext) -> SleepData:
            assert kernel.config.nr_cpus == 2
            return SleepData(thread=threading.current_thread().name, concurrent=0)

        service.serve({"test.read": read})

    lpd = DaemonThread(daemon_settings(tmp_path, mosquitto.url), extensions=[extension]).start()
    try:
        async def main() -> None:
            async with LivepatchClient(mosquitto.url, lpd.host) as c:
                data = await c.request("test.read", {"seconds": 0})
                assert data["concurrent"] == 0
                with pytest.raises(ReplyError) as exc:
                    await c.request("test.change", {"seconds": 0})  # in the schema, but nobody serves it
                assert exc.value.code == "unknown_verb"
        run(main())
    finally:
        lpd.stop()
