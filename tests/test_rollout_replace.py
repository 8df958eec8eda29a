"""Atomic-replace rollouts on the seeded twins: a cumulative patch takes the older one over (which is then
unloaded), a reverted one leaves the older one in, a rollback leaves the host unpatched; and the dry run's stall
prediction covers the functions of the patch a replace would take over (its NOP funcs)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from rollout_fixtures import BUILD_A, Rig, bundle

from clients.rollout.api import dry_run
from clients.rollout.driver import Outcome
from clients.rollout.plan import HostInfo, PlanError
from clients.rollout.sim import SimDriver
from schemas.fleet import StallFault
from schemas.rollout import RolloutSpec
from schemas.rollout_api import CreateRequest

V1, V2 = "fix1", "fix2"


def twins(n: int, *, enabled: bool = True) -> dict[str, HostInfo]:
    """Hosts that run v1 (enabled, replacing f_a and f_b) as their retained state says."""
    return {f"t-{i:03d}": HostInfo(f"t-{i:03d}", BUILD_A, patches={V1: enabled},
                                   funcs={V1: (("f_a", 1), ("f_b", 1))}) for i in range(n)}


def v2_spec(rig: Rig, *, replace: bool = True, **more: Any) -> RolloutSpec:
    return rig.spec(patch=V2, bundles={BUILD_A: bundle(rig.tmp, name=V2, replace=replace, funcs=("f_a", "f_c"))},
                    **more)


def test_replace_supersedes_and_unloads_the_older_patch(tmp_path: Path) -> None:
    rig = Rig(tmp_path, twins(6), patch=V2)
    assert asyncio.run(rig.run(v2_spec(rig, waves={"count": 2}))) == "COMPLETED"
    assert set(rig.states().values()) == {"SUCCEEDED"}
    for h in rig.driver.hosts.values():
        assert h.patches == {V2: True}, "v2 in, v1 taken over and unloaded"
        assert h.replaced == set()
    execs = rig.store.executions("r1")
    assert all(e.details["superseded"] == [V1] for e in execs)
    assert "superseded_kept" not in execs[0].details

    rig.engine.rollback("r1")
    assert asyncio.run(rig.engine.run("r1")).state == "ROLLED_BACK"
    for h in rig.driver.hosts.values():
        assert h.patches == {}, "rolled back: v2 disabled and unloaded; v1 was superseded, nothing is patched"


def test_a_patch_without_the_replace_flag_stacks_on_the_older_one(tmp_path: Path) -> None:
    rig = Rig(tmp_path, twins(3), patch=V2)
    assert asyncio.run(rig.run(v2_spec(rig, replace=False))) == "COMPLETED"
    for h in rig.driver.hosts.values():
        assert h.patches == {V1: True, V2: True}
    assert all("superseded" not in e.details for e in rig.store.executions("r1"))


def test_a_reverted_replace_leaves_the_older_patch_enabled(tmp_path: Path) -> None:
    stall = StallFault(kind="stall", count=1, mode="uninterruptible")
    rig = Rig(tmp_path, twins(4), [stall], patch=V2)
    spec = v2_spec(rig, stall={"wait_s": 2, "then_wait_s": 2, "action": "revert"}, waves={"success_threshold": 50})
    assert asyncio.run(rig.run(spec)) == "COMPLETED"
    states = rig.states()
    stalled = [h for h, s in states.items() if s == "REVERTED"]
    assert len(stalled) == 1
    assert rig.driver.hosts[stalled[0]].patches == {V1: True}, "the reversal never took v1 over"
    for h in (h for h in states if h not in stalled):
        assert rig.driver.hosts[h].patches == {V2: True}


class Recording(SimDriver):
    """Twins that record what each read-only prediction was asked about."""

    asked: dict[str, list[tuple[str, int]]]

    async def predict(self, host: str, functions: list[tuple[str, int]]) -> Outcome:
        self.asked = getattr(self, "asked", {})
        self.asked[host] = list(functions)
        return Outcome(ok=True, data={"would_stall": host == "t-001" and ("f_b", 1) in functions,
                                      "tasks": [{"pid": 7, "comm": "sleeper", "reason": "uninterruptible"}]})


def test_dry_run_predicts_the_stalls_of_the_nop_funcs(tmp_path: Path) -> None:
    """v2 replaces f_a and f_c; v1 (enabled) covers f_a and f_b: the replace's transition also checks f_b (its
    NOP func), so a task asleep in v1's f_b would stall it. Hosts where v1 is loaded but disabled: only v2's."""
    hosts = {**twins(2), "t-002": HostInfo("t-002", BUILD_A, patches={V1: False},
                                              funcs={V1: (("f_a", 1), ("f_b", 1))})}
    rig = Rig(tmp_path, hosts, patch=V2)
    rec = Recording(rig.clock, hosts, {}, V2)
    rig.engine.driver = rec
    spec = v2_spec(rig)
    dry = asyncio.run(dry_run(rig.engine, CreateRequest(request_id="d1", spec=spec, dry_run=True)))
    assert rec.asked["t-000"] == [("f_a", 0), ("f_c", 0), ("f_b", 1)], "v2's own, then v1's not in v2"
    assert rec.asked["t-002"] == [("f_a", 0), ("f_c", 0)], "a disabled v1 gets no NOP func"
    assert list(dry["would_stall"]) == ["t-001"]
    assert dry["supersedes"] == {"t-000": [V1], "t-001": [V1]}
    assert rig.store.names() == [], "a dry run stores nothing"

    plain = v2_spec(rig, replace=False)
    dry = asyncio.run(dry_run(rig.engine, CreateRequest(request_id="d2", spec=plain, dry_run=True)))
    assert rec.asked["t-000"] == [("f_a", 0), ("f_c", 0)], "no replace: no NOP funcs"
    assert dry["would_stall"] == {}
    assert dry["supersedes"] == {}


def test_retained_state_funcs_are_read() -> None:
    doc = {"host": "h1", "kernel": {"build_id": BUILD_A}, "components": {"livepatch": {"patches": [
        {"name": V1, "enabled": True, "funcs": ["cmdline_proc_show,1", "dup_fn,2", "odd"]},
        {"name": "old", "enabled": False, "funcs": []}]}}}
    info = HostInfo.from_state(doc)
    assert info.funcs == {V1: (("cmdline_proc_show", 1), ("dup_fn", 2), ("odd", 0)), "old": ()}
    assert info.patches == {V1: True, "old": False}


def test_state_compatibility_is_checked_at_create(tmp_path: Path) -> None:
    """klp_is_patch_compatible over the hosts' retained state: v1 installed system state 1 at version 2."""
    hosts = {h: HostInfo(h, BUILD_A, patches={V1: True}, states={V1: {1: 2}}) for h in ("s-0", "s-1")}
    rig = Rig(tmp_path, hosts, patch=V2)
    for replace, states, ok in [(True, None, False), (True, {1: 1}, False), (True, {1: 2}, True),
                                (True, {1: 3}, True), (False, None, True), (False, {1: 1}, False)]:
        path = bundle(rig.tmp, name=V2, replace=replace, states=states)
        spec = rig.spec(name=f"s{int(replace)}{states and states[1]}", patch=V2, bundles={BUILD_A: path})
        if ok:
            asyncio.run(rig.engine.create(spec))
            continue
        with pytest.raises(PlanError) as exc:
            asyncio.run(rig.engine.create(spec))
        assert exc.value.code == "patch_state_incompatible", (replace, states)
        assert "system state 1 at version 2" in exc.value.message
        assert rig.store.rollout(spec.name) is None, "nothing stored"
    assert rig.driver.calls == 0, "nothing asked of any host"
