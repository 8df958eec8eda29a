"""A 50-host fleet over a real Mosquitto with every fault kind from ONE seeded fault plan: the draw is the same for
the same seed (builds, labels, faults) and gives every kind; each host's retained state shows what it carries, and
the hosts that carry one kind alone behave as that fault says (stalls predicted by ``patch.check`` and then
seen, crashes back with their desired state, the crash-loop guard holding a panicking patch back, slow replies,
dropped connections, refused patches), while the hosts with no fault never reboot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import _offline, overrides, running
from test_service_patch import signed, signer

from clients.sdk import LivepatchClient, ReplyError
from daemon.fleet.plan import draw
from daemon.fleet.runner import FleetRunner
from schemas.fleet import Fault, FleetSpec, HostPlan

SEED = 7
KINDS = ["stall-interruptible", "stall-uninterruptible", "crash-after_transition", "crash-uptime", "slow", "flaky",
         "reject", "panic"]


def spec_doc(seed: int = SEED) -> dict[str, Any]:
    return {"hosts": 50, "prefix": "seeded", "seed": seed, "crash_loop_grace_s": 60,
            "builds": [{"release": "6.1-lp1", "share": 0.6}, {"release": "6.1-lp2", "share": 0.2},
                       {"release": "6.6-lp1", "share": 0.2}],
            "labels": {"zone": {"eu": 0.5, "us": 0.3, "ap": 0.2}, "tier": {"web": 0.7, "db": 0.3}},
            "faults": [
                {"kind": "stall", "mode": "interruptible", "count": 3},
                {"kind": "stall", "mode": "uninterruptible", "count": 3},
                {"kind": "crash", "when": "after_transition", "count": 3, "reboot_after_s": 0.3},
                {"kind": "crash", "when": "uptime", "share": 0.08, "at_s": 1.0, "reboot_after_s": 0.3},
                {"kind": "slow", "share": 0.1, "delay_s": 0.3},
                {"kind": "flaky", "share": 0.08, "down_s": 1.0, "every_s": 0.5, "times": 1},
                {"kind": "reject", "count": 3},
                {"kind": "panic", "count": 3}]}


def kind(f: Fault) -> str:
    return f"{f.kind}-{f.mode}" if f.kind == "stall" else f"{f.kind}-{f.when}" if f.kind == "crash" else f.kind


def lone_hosts(plans: list[HostPlan]) -> dict[str, str]:
    """Per fault kind, the first 6.1-lp1 host that carries that kind alone (the example patches' build)."""
    out: dict[str, str] = {}
    for p in plans:
        if len(p.faults) == 1 and p.release == "6.1-lp1":
            out.setdefault(kind(p.faults[0]), p.host)
    return out


def test_the_seeded_plan_is_the_same_for_the_same_seed_and_gives_every_kind() -> None:
    plans = draw(FleetSpec.model_validate(spec_doc()))
    assert plans == draw(FleetSpec.model_validate(spec_doc())), "the same seed: the same fleet"
    other = draw(FleetSpec.model_validate(spec_doc(SEED + 1)))
    assert [(p.release, p.labels, p.faults) for p in other] != [(p.release, p.labels, p.faults) for p in plans]
    carried = [kind(f) for p in plans for f in p.faults]
    for k in ("stall-interruptible", "stall-uninterruptible", "crash-after_transition", "reject", "panic"):
        assert carried.count(k) == 3, f"{k}: count 3"
    assert all(carried.count(k) >= 1 for k in ("crash-uptime", "slow", "flaky")), "share-drawn kinds all drawn"
    assert sorted(lone_hosts(plans)) == sorted(KINDS), "every kind on a host of its own"
    assert {p.release for p in plans} == {"6.1-lp1", "6.1-lp2", "6.6-lp1"}
    assert {p.labels["zone"] for p in plans} == {"eu", "us", "ap"}


def test_fifty_hosts_each_behave_per_their_fault(mosquitto: Mosquitto, tmp_path: Path) -> None:
    spec = FleetSpec.model_validate(spec_doc())
    plans = {p.host: p for p in draw(spec)}
    lone = lone_hosts(list(plans.values()))
    runner = FleetRunner(spec, overrides(tmp_path, mosquitto.url, trusted_keys=[str(signer().public_path)],
                                         transition_stall_s=0.3), workers=2)
    cmdline, sleeper = signed("livepatch_cmdline").to_bytes(), signed("livepatch_sleeper").to_bytes()
    url = mosquitto.url

    def client(kind_: str) -> LivepatchClient:
        return LivepatchClient(url, lone[kind_], protocol="3.1.1")

    async def scenario() -> None:
        async with running(runner, url) as feed:
            await wait_for(lambda: len(runner.online) == 50, 240)
            await wait_for(lambda: all(feed.hosts.get(h) is not None and feed.hosts[h].state for h in plans), 30)
            for h, plan in plans.items():  # every host's retained state says what the plan gave it
                state = feed.hosts[h].state
                assert state is not None
                assert [f["kind"] for f in state["components"]["fleet"]["faults"]] == [f.kind for f in plan.faults]
                assert state["kernel"]["release"] == plan.release, h
                assert state["components"]["labels"] == plan.labels, h

            async with client("slow") as c:
                t0 = time.monotonic()
                await c.info()
                assert time.monotonic() - t0 >= 0.3

            await wait_for(lambda: _offline(feed, lone["flaky"]) == "connection_lost"
                           or (feed.hosts[lone["flaky"]].status or {}).get("reason") == "reconnected", 20)
            await wait_for(lambda: (feed.hosts[lone["flaky"]].status or {}).get("reason") == "reconnected", 20)

            async with client("reject") as c:
                with pytest.raises(ReplyError, match="trusts no signing key"):
                    await c.patch_load(cmdline)

            for mode in ("interruptible", "uninterruptible"):  # predicted by patch.check, then seen
                async with client(f"stall-{mode}") as c:
                    await c.patch_load(sleeper)
                    check = await c.patch_check("livepatch_sleeper")
                    (b,) = check.blockers
                    assert (b.reason, b.function, check.will_stall) == (mode, "sleeper_middle",
                                                                        mode == "uninterruptible")
                    change = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=8 if mode ==
                                                  "interruptible" else 2)
                    assert change.completed is (mode == "interruptible")
                    if mode == "uninterruptible":
                        tr = await c.patch_transition("livepatch_sleeper")
                        assert [t.blocked for t in tr.tasks if t.blocked] == ["sleeping on function sleeper_middle"]
                        await c.patch_disable("livepatch_sleeper", wait=True)

            crashing = lone["crash-after_transition"]
            async with client("crash-after_transition") as c:
                await c.patch_load(cmdline)
                await c.patch_enable("livepatch_cmdline")
                await wait_for(lambda: runner.online.get(crashing) == 2, 60)
                info = await c.patch_info("livepatch_cmdline")
                assert (info.enabled, info.desired_enabled) == (True, True), "back with its desired state"

            panicking = lone["panic"]
            async with client("panic") as c:
                await c.patch_load(cmdline)
                assert (await c.patch_enable("livepatch_cmdline", wait=True, timeout_s=10)).completed
                with pytest.raises(ReplyError, match="guest_panic"):  # the replacement panics when it runs
                    await c.call_read("proc_cmdline_read")
                await wait_for(lambda: runner.online.get(panicking) == 2, 60)
                info = await c.patch_info("livepatch_cmdline")
                assert (info.enabled, info.desired_enabled) == (False, False), "held back by the crash-loop guard"

            uptime = [h for h, p in plans.items() if any(kind(f) == "crash-uptime" for f in p.faults)]
            await wait_for(lambda: all(runner.crashes.get(h) == 1 and h in runner.online for h in uptime), 60)
            quiet = [h for h, p in plans.items() if not p.faults]
            assert quiet
            assert {h: (runner.online.get(h), runner.crashes.get(h, 0)) for h in quiet} == dict.fromkeys(
                quiet, (1, 0)), "no host without a fault rebooted"

    run(scenario())
