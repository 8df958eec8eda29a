"""patch.effect end to end (real mosquitto, a real daemon and emulator, real compiled example patches): the
guest-side counts match the calls made through ``call``, the original's runs after a transition completed are
seen, the retained state carries the summary; and ``lpctl patch check|effect``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, run
from test_lpctl_patch import lpctl
from test_service_patch import Session, Sleeper, kernel_of, quiet_policy, signed, trusting_settings

from clients.sdk import LivepatchClient


@pytest.fixture(scope="module")
def effectd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """A daemon trusting the test key, with no fake signals (a sleeper holds a transition up until woken)."""
    d = DaemonThread(trusting_settings(tmp_path_factory.mktemp("effectd"), mosquitto.url)).start()
    quiet_policy(d)
    yield d
    d.stop()


async def section(c: LivepatchClient, want: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """The retained state's patch_effect section, once it says ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        state = await c.state()
        got = state.components.get("patch_effect") if state is not None else None
        if got == want or time.monotonic() > deadline:
            assert got == want
            return got
        await asyncio.sleep(0.05)


def test_counts_match_the_calls_made(effectd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(effectd.url, effectd.host) as s:
            c = s.c
            err = await s.error("patch.effect", {"name": "livepatch_demo_target"})
            assert err["code"] == "livepatch_not_found"
            await c.patch_load(signed("livepatch_demo_target").to_bytes())
            err = await s.error("patch.effect", {"name": "livepatch_demo_target"})
            assert (err["code"], "not enabled" in err["message"]) == ("livepatch_bad_state", True)
            await section(c, {"patches": {}})
            assert (await c.patch_enable("livepatch_demo_target", wait=True)).completed
            e = await c.patch_effect("livepatch_demo_target")
            (f,) = e.funcs
            assert (e.completed, e.calls, e.old_ran, e.verified) == (True, 0, False, False), "applied, not verified"
            assert (f.old_name, f.new_name, f.calls, f.old_calls, f.active) == (
                "klp_demo_target", "livepatch_klp_demo_target", 0, 0, True)
            assert e.completed_s_ago is not None
            assert e.completed_s_ago >= 0
            for x in range(7):
                assert (await c.call("klp_demo_target", x, cpu=x % 2)).value == 5 * x + 2
            e = await c.patch_effect("livepatch_demo_target")
            assert (e.calls, e.funcs[0].calls, e.funcs[0].old_calls, e.old_ran, e.verified) == (7, 7, 0, False, True)
            await section(c, {"patches": {"livepatch_demo_target": {"calls": 7, "old_calls": 0, "verified": True}}})

            # stacked: a second patch on another function counts on its own; the first keeps its count
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            await c.patch_enable("livepatch_cmdline", wait=True)
            for _ in range(3):
                await c.call_read("proc_cmdline_read")
            e2 = await c.patch_effect("livepatch_cmdline")
            assert (e2.calls, e2.verified) == (3, True)
            assert (await c.patch_effect("livepatch_demo_target")).calls == 7

            await c.patch_disable("livepatch_demo_target", wait=True)
            err = await s.error("patch.effect", {"name": "livepatch_demo_target"})
            assert err["code"] == "livepatch_bad_state"
            assert (await c.call("klp_demo_target", 3)).value == 10, "the original again"
            await c.patch_enable("livepatch_demo_target", wait=True)
            e = await c.patch_effect("livepatch_demo_target")
            assert (e.calls, e.verified) == (0, False), "counts start again at each enable"
            await s.cleanup()
            await section(c, {"patches": {}})
    run(main())


def test_the_original_running_after_completion_is_seen(effectd: DaemonThread) -> None:
    """livepatch_sleeper enabled; an atomic replace that drops sleeper_middle is held up by a task asleep in the
    replacement: meanwhile, a switched task's call of sleeper_middle runs the original (the replace's NOP), and
    livepatch_sleeper's effect says the original ran since its transition completed."""
    kernel = kernel_of(effectd)

    async def enable() -> None:
        async with Session(effectd.url, effectd.host) as s:
            await s.c.patch_load(signed("livepatch_sleeper").to_bytes())
            assert (await s.c.patch_enable("livepatch_sleeper", wait=True)).completed
    run(enable())
    sleeper = Sleeper(kernel)  # asleep in livepatch_sleeper_middle
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 5)  # sleeper_outer(flag) with *flag != 0 returns at once

    async def main() -> None:
        async with Session(effectd.url, effectd.host) as s:
            c = s.c
            assert (await c.call("sleeper_outer", flag)).value == 5 + 1 + 20 + 100
            e = await c.patch_effect("livepatch_sleeper")
            assert (e.calls, e.funcs[0].old_calls, e.verified) == (2, 0, True), "the sleeper's call, and ours"
            await c.patch_load(signed("livepatch_atomic_replace").to_bytes())
            change = await c.patch_enable("livepatch_atomic_replace", wait=True, timeout_s=0.5)
            assert not change.completed
            assert (await c.call("sleeper_outer", flag)).value == 5 + 1 + 10 + 100, "the original ran"
            e = await c.patch_effect("livepatch_sleeper")
            assert (e.calls, e.funcs[0].old_calls, e.old_ran, e.verified) == (2, 1, True, False)
            await section(c, {"patches": {"livepatch_sleeper": {"calls": 2, "old_calls": 1, "verified": False},
                                          "livepatch_atomic_replace": {"calls": 0, "old_calls": None,
                                                                       "verified": False}}})
            r = await c.patch_effect("livepatch_atomic_replace")
            assert (r.completed, r.funcs[0].old_calls, r.verified) == (False, None, False)
            await c.patch_disable("livepatch_atomic_replace", wait=True)
    run(main())
    assert sleeper.wake(5) == 5 + 1 + 20 + 100
    kernel.host_buffer.free(flag, 8)

    async def cleanup() -> None:
        async with Session(effectd.url, effectd.host) as s:
            await s.cleanup()
    run(cleanup())


def test_lpctl_check_and_effect(effectd: DaemonThread) -> None:
    kernel = kernel_of(effectd)

    async def load() -> None:
        async with LivepatchClient(effectd.url, effectd.host) as c:
            await c.patch_load(signed("livepatch_sleeper").to_bytes())
    run(load())
    code, out, err = lpctl(effectd, "patch", "check", "livepatch_sleeper")
    assert (code, "no task would block" in out) == (0, True), err
    sleeper = Sleeper(kernel)
    code, out, err = lpctl(effectd, "patch", "check", "livepatch_sleeper")
    assert code == 1
    assert "sleeping on function sleeper_middle" in out
    assert "sleeper_outer+" in out, "its stack"
    assert "would stall" in err
    code, out, _ = lpctl(effectd, "--json", "patch", "check", "livepatch_sleeper")
    doc = json.loads(out)
    assert (code, doc["ok"], doc["data"]["will_stall"]) == (1, True, True)
    assert [b["reason"] for b in doc["data"]["blockers"]] == ["interruptible"]
    assert sleeper.wake(1) == 1 + 1 + 10 + 100
    code, out, err = lpctl(effectd, "patch", "check", "nonexistent")
    assert (code, "livepatch_not_found" in err) == (1, True)

    code, out, err = lpctl(effectd, "patch", "effect", "livepatch_sleeper")
    assert (code, "livepatch_bad_state" in err) == (1, True)
    code, _, err = lpctl(effectd, "patch", "enable", "livepatch_sleeper", "--wait")
    assert code == 0, err
    code, out, err = lpctl(effectd, "patch", "effect", "livepatch_sleeper")
    assert (code, "not verified" in err) == (1, True)
    flag = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(flag, 2)
    code, out, err = lpctl(effectd, "call", "sleeper_outer", str(flag))
    assert code == 0, err
    kernel.host_buffer.free(flag, 8)
    code, out, err = lpctl(effectd, "patch", "effect", "livepatch_sleeper")
    assert (code, "verified" in out) == (0, True), err
    code, out, _ = lpctl(effectd, "--json", "patch", "effect", "livepatch_sleeper")
    assert (code, json.loads(out)["data"]["calls"]) == (0, 1)

    async def cleanup() -> None:
        async with Session(effectd.url, effectd.host) as s:
            await s.cleanup()
    run(cleanup())


def test_after_a_restart_the_restored_patch_counts_from_zero(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The restore at boot re-enables the patch: its completion is seen (a baseline, a completion time), the fresh
    kernel counts from zero, and the state follows calls made without any patch.effect (the refresh job)."""
    settings = trusting_settings(tmp_path, mosquitto.url)
    first = DaemonThread(settings).start()

    async def before() -> None:
        async with LivepatchClient(first.url, first.host) as c:
            await c.patch_load(signed("livepatch_demo_target").to_bytes())
            await c.patch_enable("livepatch_demo_target", wait=True)
            await c.call("klp_demo_target", 1)
            assert (await c.patch_effect("livepatch_demo_target")).calls == 1
    run(before())
    first.stop()
    second = DaemonThread(settings)
    assert second.daemon.settings.host_id == first.host
    second.start()
    try:
        async def after() -> None:
            async with LivepatchClient(second.url, second.host) as c:
                e = await c.patch_effect("livepatch_demo_target")
                assert (e.completed, e.calls, e.funcs[0].old_calls, e.verified) == (True, 0, 0, False)
                assert e.completed_s_ago is not None
                for x in range(4):
                    await c.call("klp_demo_target", x)
                # no patch.effect: the refresh job (every 5 s) republishes the section
                await section(c, {"patches": {"livepatch_demo_target": {"calls": 4, "old_calls": 0,
                                                                        "verified": True}}}, timeout=8)
        run(after())
    finally:
        second.stop()
