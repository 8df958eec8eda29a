"""The rollout engine on the simulated clock against seeded twin hosts: every control of the rollout spec."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest
from rollout_fixtures import BUILD_A, BUILD_B, Rig, bundle, fleet

from clients.rollout.clock import SimClock
from clients.rollout.driver import Outcome
from clients.rollout.engine import ControlError
from clients.rollout.plan import PlanError
from clients.rollout.sim import SimDriver
from schemas.fleet import RejectFault, SlowFault, StallFault


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_four_waves_all_succeed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(40))
    state = run(rig.run(rig.spec(waves={"count": 4})))
    assert state == "COMPLETED"
    assert Counter(rig.states().values()) == {"SUCCEEDED": 40}
    assert all(h.patches == {"fix": True} for h in rig.driver.hosts.values())
    doc = rig.engine.doc("r1")
    assert [w.hosts for w in doc.waves] == [10, 10, 10, 10]
    assert all(w.state == "done" for w in doc.waves)
    # waves run one after another: every wave-1 host starts after every wave-0 host succeeded
    started, done = rig.first_seen("IN_PROGRESS"), rig.first_seen("SUCCEEDED")
    execs = {e.host: e.wave for e in rig.store.executions("r1")}
    for w in range(1, 4):
        assert min(started[h] for h, x in execs.items() if x == w) >= max(
            done[h] for h, x in execs.items() if x == w - 1)


def test_constant_rate_starts_per_minute(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(30))
    run(rig.run(rig.spec(rate={"per_minute": 10})))
    starts = sorted(rig.first_seen("IN_PROGRESS").values())
    t0 = starts[0]
    per_minute = Counter(int((t - t0) // 60) for t in starts)
    assert per_minute == {0: 10, 1: 10, 2: 10}
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(starts)}
    assert gaps == {6.0}


def test_exponential_rate_doubles(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(35))
    run(rig.run(rig.spec(rate={"base_per_minute": 6, "factor": 2, "increase_every": 5,
                               "increase_on": "notified"})))
    starts = sorted(rig.first_seen("IN_PROGRESS").values())
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    # 6/min -> 10 s apart for the first 5, then 12/min (5 s), 24/min (2.5 s), 48/min (1.25 s) ...
    assert gaps[:4] == [10.0] * 4
    assert gaps[5:9] == [5.0] * 4
    assert gaps[10:14] == [2.5] * 4
    events = [ev for ev in rig.store.rollout("r1").plan["events"] if ev["event"] == "rate_increased"]
    assert [ev["level"] for ev in events][:3] == [1, 2, 3]


def test_max_in_progress_caps_concurrency(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(12), [StallFault(kind="stall", share=1.0)])  # interruptible: ~1 s each
    run(rig.run(rig.spec(rate={"max_in_progress": 3})))
    starts, done = rig.first_seen("IN_PROGRESS"), rig.first_seen("SUCCEEDED")
    for t in sorted(starts.values()):
        live = sum(starts[h] <= t < done[h] for h in starts)
        assert live <= 3
    assert set(rig.states().values()) == {"SUCCEEDED"}


def test_success_threshold_pauses_then_resume(tmp_path: Path) -> None:
    hosts = fleet(20)
    rig = Rig(tmp_path, hosts, [RejectFault(kind="reject", hosts=["sim-0000", "sim-0001"])])
    spec = rig.spec(waves={"count": 2, "success_threshold": 90})
    state = run(rig.run(spec))
    assert state == "PAUSED"
    doc = rig.engine.doc("r1")
    assert doc.current_wave == 0
    assert "80.0% succeeded" in (doc.reason or "")
    assert Counter(rig.states().values()) == {"QUEUED": 10, "SUCCEEDED": 8, "REJECTED": 2}
    rig.engine.resume("r1")
    assert run(rig.engine.run("r1")) .state == "COMPLETED"  # type: ignore[attr-defined]
    assert Counter(rig.states().values()) == {"SUCCEEDED": 18, "REJECTED": 2}


def test_on_success_pause_and_approval_gate(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(9))
    spec = rig.spec(waves={"count": 3, "on_success": "pause", "approval": [0, 2]})
    run(rig.engine.create(spec))
    rig.engine.start("r1")
    assert rig.engine.doc("r1").state == "WAITING_APPROVAL"
    assert run(rig.engine.run("r1")).state == "WAITING_APPROVAL"  # type: ignore[attr-defined]
    assert set(rig.states().values()) == {"QUEUED"}  # nothing was sent to any host
    assert rig.driver.calls == 0
    rig.engine.approve("r1")
    assert run(rig.engine.run("r1")).state == "PAUSED"  # type: ignore[attr-defined]
    rig.engine.resume("r1")  # wave 1 (no gate), then on_success=pause again
    assert run(rig.engine.run("r1")).state == "PAUSED"  # type: ignore[attr-defined]
    assert rig.engine.doc("r1").waves[1].state == "done"
    rig.engine.resume("r1")
    assert rig.engine.doc("r1").state == "WAITING_APPROVAL"
    rig.engine.approve("r1", 2)
    assert run(rig.engine.run("r1")).state == "COMPLETED"  # type: ignore[attr-defined]
    assert set(rig.states().values()) == {"SUCCEEDED"}


@pytest.mark.parametrize(("fault", "failure", "expect"), [
    (RejectFault(kind="reject", count=3), "REJECTED", "REJECTED"),
    (SlowFault(kind="slow", count=3, delay_s=5.0), "TIMED_OUT", "TIMED_OUT"),
    (StallFault(kind="stall", count=3, mode="uninterruptible"), "STALLED", "REVERTED"),
    (StallFault(kind="stall", count=3, mode="uninterruptible"), "REVERTED", "REVERTED"),
    (RejectFault(kind="reject", count=3), "ALL", "REJECTED"),
])
def test_abort_criteria_trip(tmp_path: Path, fault: object, failure: str, expect: str) -> None:
    rig = Rig(tmp_path, fleet(20), [fault], seed=7)  # type: ignore[list-item]
    spec = rig.spec(waves={"count": 1}, rate={"max_in_progress": 1},
                    timeouts={"load_s": 1.0, "enable_s": 1.0},
                    stall={"wait_s": 5, "then_wait_s": 5},
                    abort={"criteria": [{"failure_type": failure, "threshold_pct": 10, "min_executed": 5}]})
    assert run(rig.run(spec)) == "CANCELED"
    states = rig.states()
    assert "abort" in (rig.engine.doc("r1").reason or "")
    assert Counter(states.values())[expect] >= 1
    # One host at a time: the criterion trips as soon as failures / executed >= 10% with at least 5 executed.
    done = [s for s in states.values() if s not in ("CANCELED", "QUEUED")]
    bad = sum(s == expect for s in done)
    assert len(done) >= 5
    assert bad / len(done) >= 0.1
    assert (bad - 1) / (len(done) - 1) < 0.1 or len(done) - 1 < 5  # one execution earlier it had not tripped


def test_abort_with_rollback_leaves_nothing_patched(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(30), [RejectFault(kind="reject", hosts=["sim-0020", "sim-0021", "sim-0022"])])
    spec = rig.spec(waves={"count": 3}, abort={"action": "rollback", "criteria": [
        {"failure_type": "REJECTED", "threshold_pct": 10, "min_executed": 3, "scope": "wave"}]})
    assert run(rig.run(spec)) == "ROLLED_BACK"
    assert not any(on for h in rig.driver.hosts.values() for on in h.patches.values())
    assert not any(h.patches for h in rig.driver.hosts.values())  # unloaded too
    reverted = rig.first_seen("REVERTED")
    waves = {e.host: e.wave for e in rig.store.executions("r1")}
    # latest wave first
    assert max(reverted[h] for h in reverted if waves[h] == 1) <= min(reverted[h] for h in reverted
                                                                         if waves[h] == 0)


def test_operator_rollback_after_completion(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(8))
    assert run(rig.run(rig.spec(waves={"count": 2}))) == "COMPLETED"
    rig.engine.rollback("r1")
    assert run(rig.engine.run("r1")).state == "ROLLED_BACK"  # type: ignore[attr-defined]
    assert set(rig.states().values()) == {"REVERTED"}
    assert not any(h.patches for h in rig.driver.hosts.values())
    with pytest.raises(ControlError) as exc:
        rig.engine.resume("r1")
    assert exc.value.code == "rollout_bad_state"


def test_removed_without_bundle_and_coverage(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(10, builds=(BUILD_A, BUILD_B)))
    run(rig.run(rig.spec()))
    states = rig.states()
    assert Counter(states.values()) == {"SUCCEEDED": 5, "REMOVED": 5}
    plan = rig.store.rollout("r1").plan
    assert plan["coverage"] == {"targets": 10, "covered": 5, "removed_by_build": {BUILD_B: 5}}
    removed = [e for e in rig.store.executions("r1") if e.state.value == "REMOVED"]
    assert all(e.details["code"] == "no_bundle" for e in removed)
    (tmp_path / "both").mkdir()
    both = Rig(tmp_path / "both", fleet(10, builds=(BUILD_A, BUILD_B)))
    spec = both.spec(bundles={BUILD_A: bundle(tmp_path), BUILD_B: bundle(tmp_path, BUILD_B)})
    run(both.run(spec))
    assert Counter(both.states().values()) == {"SUCCEEDED": 10}


def test_retries_with_backoff(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(1), [SlowFault(kind="slow", count=1, delay_s=5.0)])
    spec = rig.spec(waves={"count": 1, "success_threshold": 0}, timeouts={"load_s": 1.0},
                    retries=[{"failure_type": "TIMED_OUT", "retries": 3,
                                                         "backoff_s": 10, "jitter": 0.5}])
    assert run(rig.run(spec)) == "COMPLETED"
    e = rig.store.executions("r1")[0]
    assert e.state.value == "TIMED_OUT"
    assert e.attempts == 3
    assert [f["state"] for f in e.details["failures"]] == ["TIMED_OUT"] * 3
    with rig.store.tx() as t:
        rows = [(r[0], float(r[1])) for r in t.run("SELECT state, at FROM steps WHERE rollout = 'r1' ORDER BY at")]
    # each failed try is one step: QUEUED again (3 retries), then TIMED_OUT for good
    assert [st for st, _ in rows] == ["QUEUED", "QUEUED", "QUEUED", "TIMED_OUT"]
    ats = [at for _, at in rows]
    # the n-th retry comes after 10 s x 2^(n-1), stretched by the seeded jitter (up to +50%)
    for n, delay in enumerate((b - a for a, b in itertools.pairwise(ats)), start=1):
        assert 10 * 2 ** (n - 1) <= delay <= 10 * 2 ** (n - 1) * 1.5 + 1


def test_phase_timeout_of_a_stalled_transition(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(3), [StallFault(kind="stall", hosts=["sim-0001"], mode="uninterruptible")])
    spec = rig.spec(waves={"count": 1, "success_threshold": 0}, stall={"wait_s": 1000, "then_wait_s": 1000},
                    timeouts={"transition_s": 30})
    assert run(rig.run(spec)) == "COMPLETED"
    e = {x.host: x for x in rig.store.executions("r1")}["sim-0001"]
    assert e.state.value == "TIMED_OUT"
    assert e.details["timeout"] == "transition"
    assert rig.driver.hosts["sim-0001"].patches == {}  # reverted and unloaded on the way out


def test_maintenance_window(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(12))
    t0 = rig.clock.now()
    every, length = 600.0, 60.0
    start = (t0 % every) + 120.0  # the window opens 2 minutes from now
    spec = rig.spec(rate={"per_minute": 6}, schedule={"windows": [{"every_s": every, "start_s": start % every,
                                                                    "length_s": length}]})
    assert run(rig.run(spec)) == "COMPLETED"
    starts = sorted(rig.first_seen("IN_PROGRESS").values())
    for t in starts:
        assert (t - start) % every < length
    assert starts[0] - t0 >= 120.0
    assert len({int((t - start) // every) for t in starts}) >= 2  # paused at the window's end, resumed later


def test_dynamic_targets_join(tmp_path: Path) -> None:
    hosts = fleet(6)
    rig = Rig(tmp_path, hosts)
    spec = rig.spec(targets={"labels": {"zone": "eu"}, "dynamic": True}, rate={"per_minute": 1})
    run(rig.engine.create(spec))
    rig.engine.start("r1")

    async def grow() -> None:
        for _ in range(3):
            await rig.engine.tick("r1")
            await rig.clock.sleep(30)
        from clients.rollout.plan import HostInfo  # noqa: PLC0415
        from clients.rollout.sim import TwinHost  # noqa: PLC0415

        for name, zone in (("sim-0100", "eu"), ("sim-0101", "us")):
            rig.driver.hosts[name] = TwinHost(HostInfo(name, BUILD_A, labels={"zone": zone}), [])
        await rig.engine.run("r1")

    run(grow())
    states = rig.states()
    assert states.get("sim-0100") == "SUCCEEDED"
    assert "sim-0101" not in states
    assert len(states) == 4


def test_same_inputs_same_run(tmp_path: Path) -> None:
    def once(d: Path) -> list[tuple[str, int, str, str]]:
        d.mkdir()
        rig = Rig(d, fleet(25), [StallFault(kind="stall", share=0.2, mode="uninterruptible"),
                                 SlowFault(kind="slow", share=0.1, delay_s=3.0)], seed=42)
        spec = rig.spec(waves={"canary": 2, "percentages": [50, 50]}, timeouts={"load_s": 2},
                        stall={"wait_s": 5, "then_wait_s": 5},
                        retries=[{"failure_type": "TIMED_OUT", "retries": 2, "backoff_s": 3}])
        run(rig.run(spec, auto=True))
        return [(h, v, o, s) for h, v, o, s in rig.store.steps("r1")]

    assert once(tmp_path / "a") == once(tmp_path / "b")


class FailingEnable(SimDriver):
    """A seam we own: the listed hosts fail patch.enable (a pre_patch callback error) — a FAILED, not REJECTED."""

    def __init__(self, *args: object, failing: set[str]) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.failing = failing

    async def enable(self, host: str, patch: str, request_id: str, timeout_s: float) -> Outcome:
        if host in self.failing:
            return Outcome(ok=False, code="livepatch_callback_failed", message="pre_patch callback returned -22")
        return await super().enable(host, patch, request_id, timeout_s)


def test_abort_on_failed(tmp_path: Path) -> None:
    hosts = fleet(20)
    clock = SimClock()
    driver = FailingEnable(clock, hosts, {}, "fix", failing={"sim-0003", "sim-0004"})
    rig = Rig(tmp_path, hosts, driver=driver, clock=clock)
    spec = rig.spec(rate={"max_in_progress": 1}, abort={"criteria": [
        {"failure_type": "FAILED", "threshold_pct": 30, "min_executed": 5}]})
    assert run(rig.run(spec)) == "CANCELED"
    states = rig.states()
    assert states["sim-0003"] == "FAILED"
    assert states["sim-0004"] == "FAILED"
    done = [s for s in states.values() if s not in ("CANCELED", "QUEUED")]
    assert len(done) == 5  # at 4 executed min_executed is not met; the 5th (sim-0004) makes 2/5 = 40% >= 30%
    assert Counter(states.values())["CANCELED"] == 15


def test_start_and_end_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(30))
    t0 = rig.clock.now()
    spec = rig.spec(rate={"per_minute": 10}, schedule={"start_at": t0 + 300, "end_at": t0 + 300 + 90})
    assert run(rig.run(spec)) == "CANCELED"
    starts = sorted(rig.first_seen("IN_PROGRESS").values())
    assert starts[0] == t0 + 300
    assert all(t < t0 + 390 for t in starts)
    assert len(starts) == 15  # 10/min for 90 s: at 0, 6, ..., 84 s
    assert "end time" in (rig.engine.doc("r1").reason or "")
    assert Counter(rig.states().values()) == {"SUCCEEDED": 15, "CANCELED": 15}


@pytest.mark.parametrize(("predict", "expect"), [("skip", "REMOVED"), ("proceed", "REVERTED")])
def test_stall_prediction_before_enable(tmp_path: Path, predict: str, expect: str) -> None:
    rig = Rig(tmp_path, fleet(6), [StallFault(kind="stall", hosts=["sim-0002"], mode="uninterruptible")])
    spec = rig.spec(waves={"count": 1, "success_threshold": 0},
                    stall={"predict": predict, "wait_s": 2, "then_wait_s": 2})
    assert run(rig.run(spec)) == "COMPLETED"
    e = {x.host: x for x in rig.store.executions("r1")}["sim-0002"]
    assert e.state.value == expect
    assert rig.driver.hosts["sim-0002"].patches == {}  # unloaded either way
    if predict == "skip":
        assert e.details["prediction"]["would_stall"] is True
        assert e.details["code"] == "would_stall"
        assert "TRANSITIONING" not in [s for h, _v, _o, s in rig.store.steps("r1") if h == "sim-0002"]


def test_verify_marks_proof_of_effect(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(4))
    assert run(rig.run(rig.spec(verify=True))) == "COMPLETED"
    assert set(rig.states().values()) == {"VERIFIED"}


def test_bad_controls_change_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fleet(4))
    run(rig.engine.create(rig.spec(waves={"count": 2})))
    before = rig.engine.doc("r1")
    for action in ("pause", "resume", "approve"):
        with pytest.raises(ControlError):
            getattr(rig.engine, action)("r1") if action != "approve" else rig.engine.approve("r1", 7)
    with pytest.raises(ControlError) as exc:
        rig.engine.start("nope")
    assert exc.value.code == "rollout_not_found"
    assert rig.engine.doc("r1") == before
    with pytest.raises(PlanError) as exc2:
        run(rig.engine.create(rig.spec(waves={"count": 2})))
    assert exc2.value.code == "rollout_exists"
