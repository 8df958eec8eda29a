"""Every injected fault kind, each on its own host of one fleet (hosts on the test's loop, a real Mosquitto): what
the host's state says it carries, and what an operator sees it do."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import _offline, overrides, running
from test_service_patch import signed, signer

from clients.sdk import LivepatchClient, ReplyError
from daemon.fleet.runner import FleetRunner
from schemas.fleet import FleetSpec


def test_each_fault_does_what_the_spec_says(mosquitto: Mosquitto, tmp_path: Path) -> None:
    p = f"x{uuid.uuid4().hex[:6]}"
    h = [f"{p}-{i:04d}" for i in range(8)]
    spec = FleetSpec.model_validate({"hosts": 8, "prefix": p, "crash_loop_grace_s": 30, "faults": [
        {"kind": "slow", "hosts": [h[0]], "delay_s": 0.4},
        {"kind": "flaky", "hosts": [h[1]], "down_s": 1.0, "times": 1, "every_s": 0.3},
        {"kind": "reject", "hosts": [h[2]]},
        {"kind": "crash", "hosts": [h[3]], "when": "after_transition", "reboot_after_s": 0.3},
        {"kind": "panic", "hosts": [h[4]], "function": "cmdline_proc_show"},
        {"kind": "stall", "hosts": [h[5]], "mode": "interruptible"},
        {"kind": "stall", "hosts": [h[6]], "mode": "uninterruptible"},
        {"kind": "crash", "hosts": [h[7]], "when": "uptime", "at_s": 0.5, "reboot_after_s": 0.3, "times": 1},
    ]})
    runner = FleetRunner(spec, overrides(tmp_path, mosquitto.url, trusted_keys=[str(signer().public_path)],
                                         transition_stall_s=0.3), workers=0)
    cmdline, sleeper = signed("livepatch_cmdline").to_bytes(), signed("livepatch_sleeper").to_bytes()

    async def scenario() -> None:
        async with running(runner, mosquitto.url) as feed:
            await wait_for(lambda: len(runner.online) == 8, 60)
            await wait_for(lambda: all((feed.hosts.get(x) is not None and feed.hosts[x].state) for x in h))
            for x, kind in zip(h, ["slow", "flaky", "reject", "crash", "panic", "stall", "stall", "crash"],
                               strict=True):
                state = feed.hosts[x].state
                assert state is not None
                assert [f["kind"] for f in state["components"]["fleet"]["faults"]] == [kind], "visible in state"

            async with LivepatchClient(mosquitto.url, h[0], protocol="3.1.1") as c:  # slow
                t0 = time.monotonic()
                await c.info()
                assert time.monotonic() - t0 >= 0.4

            # flaky: the connection drops (last will), the host comes back in the same boot
            await wait_for(lambda: _offline(feed, h[1]) == "connection_lost", 10)
            await wait_for(lambda: (feed.hosts[h[1]].status or {}).get("reason") == "reconnected", 10)
            assert feed.hosts[h[1]].status["boot_seq"] == 1  # type: ignore[index]

            async with LivepatchClient(mosquitto.url, h[2], protocol="3.1.1") as c:  # reject
                with pytest.raises(ReplyError, match="trusts no signing key"):
                    await c.patch_load(cmdline)
                assert (await c.patch_list()).patches == []

            # crash right after the transition completes, then back with the patch re-applied (once: times=1)
            async with LivepatchClient(mosquitto.url, h[3], protocol="3.1.1") as c:
                await c.patch_load(cmdline)
                await c.patch_enable("livepatch_cmdline")
                await wait_for(lambda: runner.online.get(h[3]) == 2, 30)
                assert runner.crashes[h[3]] == 1
                info = await c.patch_info("livepatch_cmdline")
                assert (info.enabled, info.desired_enabled) == (True, True)

            # panic: the replacement panics when it runs on this host; the crash-loop guard holds the patch back
            async with LivepatchClient(mosquitto.url, h[4], protocol="3.1.1") as c:
                await c.patch_load(cmdline)
                assert (await c.patch_enable("livepatch_cmdline", wait=True, timeout_s=10)).completed
                assert runner.online.get(h[4]) == 1, "enabled: nothing has run the replacement yet"
                with pytest.raises(ReplyError, match=r"guest_panic: vCPU 0 hit BUG\(\)"):  # inside the replacement
                    await c.call_read("proc_cmdline_read")
                await wait_for(lambda: runner.online.get(h[4]) == 2, 30)
                info = await c.patch_info("livepatch_cmdline")
                assert (info.enabled, info.desired_enabled) == (False, False), "not re-enabled at boot"
                state = await c.state()
                assert state is not None
                (held,) = state.components["livepatch"]["restored"]["held_back"]
                assert held["patch"] == "livepatch_cmdline"
                assert held["reason"] == "crash_loop"
                assert "BUG()" in held["panic"]
                assert (tmp_path / h[4] / "panic.json").is_file()
                await asyncio.sleep(0.5)
                assert runner.online.get(h[4]) == 2, "no crash loop: it stays up"

            # interruptible stall: the fake signal clears it, the transition completes
            async with LivepatchClient(mosquitto.url, h[5], protocol="3.1.1") as c:
                assert any(t.state == "waiting" and t.kind == "worker" for t in (await c.tasks()).tasks)
                await c.patch_load(sleeper)
                done = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=8)
                assert done.completed

            # uninterruptible stall: no signal ends the sleep, the transition stays blocked by that task
            async with LivepatchClient(mosquitto.url, h[6], protocol="3.1.1") as c:
                await c.patch_load(sleeper)
                change = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=2.5)
                assert not change.completed
                tr = await c.patch_transition("livepatch_sleeper")
                assert [t.blocked for t in tr.tasks if t.blocked] == ["sleeping on function sleeper_middle"]
                state = await c.state()
                assert state is not None
                assert state.components["livepatch"]["transition"]["stalled"] is True
                await c.patch_disable("livepatch_sleeper", wait=True)

            # uptime crash: once, then it stays up
            await wait_for(lambda: runner.online.get(h[7]) == 2, 30)
            assert runner.crashes.get(h[7]) == 1
            assert {x: runner.online[x] for x in (h[0], h[1], h[2], h[5], h[6])} == dict.fromkeys(
                (h[0], h[1], h[2], h[5], h[6]), 1), "no other host rebooted"

            # every event and state section each host's current daemon published followed its model (the fleet
            # section and the labels included; the fault injections' events too)
            assert runner._local is not None
            for x in h:
                daemon = runner._local.hosts[x].daemon
                service = daemon.service if daemon is not None else None
                assert service is not None, x
                assert (service.events.invalid, service.state.invalid) == ([], []), x
                assert "fleet" in service.state.document().components, x

    run(scenario())
