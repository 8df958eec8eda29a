"""An atomic-replace rollout superseding an older patch, end to end: real fleet hosts (full daemons with their
emulated kernels) over a real Mosquitto, and the orchestrator service.

v1 (``livepatch_sleeper``: sleeper_middle) goes out first; then a task on one host goes to sleep, uninterruptibly,
inside v1's sleeper_middle. v2 (``livepatch_atomic_replace``: cmdline_proc_show, with the replace flag) would
drop v1's function through a NOP func, whose transition waits for that task: the dry run says so (asking about
v2's functions alone would not), and the rollout skips that host. Everywhere else v2 ends enabled and v1
unloaded; the rollback of v2 leaves those hosts unpatched (a cumulative patch disabled returns to the original
code) and does not touch the skipped host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import running
from test_orchestrator import SLEEPER, bundle_file, fleet_runner, orchestrator, spec_doc

from clients.rollout.service import Orchestrator
from clients.sdk import LivepatchClient, ReplyError, RolloutClient
from daemon.fleet.runner import FleetRunner
from daemon.guest import abi

V2 = "livepatch_atomic_replace"
UNINTERRUPTIBLE = 1  # the sleeper's flag bit for a D-state sleep (daemon.fleet.faults)


def enabled_everywhere(orch: Orchestrator, hosts: list[str], patch: str) -> bool:
    """The orchestrator's view of the hosts' retained state: ``patch`` enabled, with its functions and states."""
    for h in hosts:
        lp = (orch.driver._states.get(h) or {}).get("components", {}).get("livepatch") or {}
        if not any(p["name"] == patch and p["enabled"] and (p["funcs"] or p["states"])
                   for p in lp.get("patches") or []):
            return False
    return True


def put_to_sleep(runner: FleetRunner, host: str) -> None:
    """A worker task of ``host`` asleep (D state) inside sleeper_middle: v1's, since v1 is enabled."""
    assert runner._local is not None
    daemon = runner._local.hosts[host].daemon
    assert daemon is not None
    assert daemon.kernel is not None
    k = daemon.kernel
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    k.submit("sleeper_outer", flag | UNINTERRUPTIBLE, cpu=k.config.nr_cpus - 1)

    def asleep() -> bool:
        return any(t.get("wait_addr") == flag and t.get("state") == abi.TASK_WAITING
                   for t in map(k.task, range(k.boot_params.get("nr_tasks"))))
    deadline = 200
    while not asleep():
        deadline -= 1
        assert deadline > 0, "the sleeper never went to sleep"
        time.sleep(0.05)


async def patches_of(url: str, host: str) -> dict[str, dict[str, Any]]:
    async with LivepatchClient(url, host, protocol="3.1.1") as c:
        return {p.name: p.model_dump() for p in (await c.patch_list()).patches}


async def until_final(r: RolloutClient, name: str, after: str | None = None) -> str:
    """The rollout's first final state (``after``: skipping that one, the retained document a rollback of a
    COMPLETED rollout may still be before its next version)."""
    async for doc in r.watch(name):
        if doc.state in ("COMPLETED", "CANCELED", "ROLLED_BACK") and doc.state != after:
            return doc.state
    return "?"


def test_replace_rollout_supersedes_v1(mosquitto: Mosquitto, tmp_path: Path) -> None:
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 4)
    prefix = hosts[0].rsplit("-", 1)[0]
    v1 = bundle_file(tmp_path, SLEEPER)
    v2 = bundle_file(tmp_path, V2)
    sleepy = hosts[1]

    async def scenario() -> None:
        async with running(runner, mosquitto.url), orchestrator(mosquitto.url, str(tmp_path / "o.sqlite3")) as orch:
            await wait_for(lambda: len(runner.online) == 4 and all(h in orch.driver._states for h in hosts), 60)
            async with RolloutClient(mosquitto.url, protocol="3.1.1", timeout=30) as r:
                await r.create(spec_doc("v1", prefix, v1, SLEEPER, verify=False))
                await r.start("v1")
                assert await asyncio.wait_for(until_final(r, "v1"), 90) == "COMPLETED"
                await wait_for(lambda: enabled_everywhere(orch, hosts, SLEEPER), 30)
                await asyncio.to_thread(put_to_sleep, runner, sleepy)

                async with LivepatchClient(mosquitto.url, sleepy, protocol="3.1.1") as c:
                    alone = await c.request("patch.check", {"functions": [{"name": "cmdline_proc_show"}]})
                assert alone["will_stall"] is False, "v2's own functions are clear: only its NOP func is not"

                spec = spec_doc("v2", prefix, v2, V2, verify=False, stall={"predict": "skip"})
                dry = await r.dry_run(spec)
                assert list(dry.would_stall) == [sleepy], "the NOP func over v1's sleeper_middle is predicted"
                assert dry.would_stall[sleepy][0]["reason"] == "uninterruptible"
                assert dry.supersedes == {h: [SLEEPER] for h in hosts}
                assert dry.plan["bundles"][next(iter(dry.plan["bundles"]))]["replace"] is True
                spec_path = tmp_path / "v2.json"
                spec_path.write_text(json.dumps(spec))
                env = {**os.environ, "LPCTL_BROKER": mosquitto.url, "LPCTL_PROTOCOL": "3.1.1"}
                shown = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "clients.cli", "--timeout",
                                                "30", "rollout", "create", str(spec_path), "--dry-run"],
                                                env=env, capture_output=True, text=True, check=False)
                assert shown.returncode == 0, shown.stderr
                assert f"supersedes {SLEEPER} on 4 host(s)" in shown.stdout
                assert f"would stall {sleepy}" in shown.stdout.replace("\n", " ")

                await r.create(spec)
                await r.start("v2")
                assert await asyncio.wait_for(until_final(r, "v2"), 90) == "COMPLETED"
                status = {e.host: e for e in (await r.rollout_status("v2")).executions}
                assert status[sleepy].state.value == "REMOVED"
                assert status[sleepy].details["code"] == "would_stall"
                for h in hosts:
                    have = await patches_of(mosquitto.url, h)
                    if h == sleepy:
                        assert list(have) == [SLEEPER], "skipped: v1 stays"
                        assert have[SLEEPER]["enabled"]
                        continue
                    assert status[h].state.value == "SUCCEEDED"
                    assert status[h].details["superseded"] == [SLEEPER]
                    assert list(have) == [V2], f"{h}: v1 replaced and unloaded, v2 alone"
                    assert have[V2]["enabled"]
                    assert have[V2]["replace"]

                await r.rollback("v2")
                assert await asyncio.wait_for(until_final(r, "v2", after="COMPLETED"), 90) == "ROLLED_BACK"
                for h in hosts:
                    have = await patches_of(mosquitto.url, h)
                    assert list(have) == ([SLEEPER] if h == sleepy else []), h

    run(scenario())


def test_cumulative_patch_must_carry_the_installed_states(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """v1 (``livepatch_state``) installs system state 1 at version 1. A cumulative patch without it
    (``livepatch_atomic_replace``) is refused at create — the hosts would refuse its enable — with nothing sent;
    ``livepatch_state2`` (state 1 at version 2) takes v1 over."""
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 2)
    prefix = hosts[0].rsplit("-", 1)[0]

    async def scenario() -> None:
        async with running(runner, mosquitto.url), orchestrator(mosquitto.url, str(tmp_path / "o.sqlite3")) as orch:
            await wait_for(lambda: len(runner.online) == 2 and all(h in orch.driver._states for h in hosts), 60)
            async with RolloutClient(mosquitto.url, protocol="3.1.1", timeout=30) as r:
                await r.create(spec_doc("s1", prefix, bundle_file(tmp_path, "livepatch_state"), "livepatch_state",
                                        verify=False))
                await r.start("s1")
                assert await asyncio.wait_for(until_final(r, "s1"), 60) == "COMPLETED"
                await wait_for(lambda: enabled_everywhere(orch, hosts, "livepatch_state"), 30)

                sent = orch.driver.requests
                with pytest.raises(ReplyError) as exc:
                    await r.create(spec_doc("bad", prefix, bundle_file(tmp_path, V2), V2))
                assert exc.value.code == "patch_state_incompatible"
                assert "system state 1 at version 1" in exc.value.message
                assert orch.driver.requests == sent, "refused at create: nothing sent to any host"
                assert [d.name for d in await r.rollouts()] == ["s1"]

                s2 = spec_doc("s2", prefix, bundle_file(tmp_path, "livepatch_state2"), "livepatch_state2",
                              verify=False)
                assert (await r.dry_run(s2)).supersedes == {h: ["livepatch_state"] for h in hosts}
                await r.create(s2)
                await r.start("s2")
                assert await asyncio.wait_for(until_final(r, "s2"), 60) == "COMPLETED"
                for h in hosts:
                    assert list(await patches_of(mosquitto.url, h)) == ["livepatch_state2"]

    run(scenario())
