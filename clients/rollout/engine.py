"""The rollout engine: the rollout-level decisions (schedule, waves, rate, abort, rollback) around the per-host
state machine of ``clients.rollout.steps``.

Every decision is written to the store before the engine acts on it, and ``tick`` starts from what the store
holds — so a restarted engine, or a second worker on the same PostgreSQL database, carries on where the last
one stopped. Time comes from a ``Clock``: the real one in the orchestrator service, a simulated one in a
rehearsal (the same inputs then give the same run, byte for byte).

Rollout states::

    CREATED --start--> SCHEDULED (start_at ahead, window closed) --> WAITING_APPROVAL (gate) --> RUNNING
    RUNNING --wave done, below its threshold / on_success=pause / operator--> PAUSED --resume--> RUNNING
    RUNNING --last wave done--> COMPLETED;  any --cancel / abort--> CANCELED
    any --rollback / abort with action rollback--> ROLLING_BACK --every reached host reverted--> ROLLED_BACK
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from clients.rollout.clock import Clock
from clients.rollout.driver import HostDriver
from clients.rollout.plan import PlanError, make_plan, read_bundle, select
from clients.rollout.rate import RateState, bump, may_start, next_start, next_window, reanchor, window_open
from clients.rollout.steps import UNDO_PHASES, StepContext, advance
from clients.rollout.store import ExecRow, RolloutRow, Store
from schemas.rollout import ACTIVE, SUCCESS, ExecState, Execution, RolloutDoc, RolloutSpec, WaveDoc

FINAL = frozenset({"COMPLETED", "CANCELED", "ROLLED_BACK"})
FAILURES = frozenset({ExecState.FAILED, ExecState.TIMED_OUT, ExecState.REJECTED, ExecState.REVERTED})
NOT_EXECUTED = frozenset({ExecState.REMOVED, ExecState.CANCELED})

Listener = Callable[[str, dict[str, Any]], None]
"""Told of every change: ``("rollout", RolloutDoc dump)``, ``("execution", Execution dump)``, ``("event", …)``."""


class ControlError(PlanError):
    """A control that the rollout's state does not allow (``rollout_bad_state``) or an unknown rollout."""


def _exec_event(e: ExecRow) -> dict[str, Any]:
    """``_exec_doc(e).model_dump(mode="json")``, built directly (it runs for every change of every host)."""
    return {"rollout": e.rollout, "host": e.host, "wave": e.wave, "build_id": e.build_id, "state": e.state.value,
            "version": e.version, "attempts": e.attempts, "details": e.details, "updated_at": e.updated_at}


def _exec_doc(e: ExecRow) -> Execution:
    return Execution(rollout=e.rollout, host=e.host, wave=e.wave, build_id=e.build_id, state=e.state,
                     version=e.version, attempts=e.attempts, details=e.details, updated_at=e.updated_at)


class Engine:
    def __init__(self, store: Store, driver: HostDriver, clock: Clock, *, worker: str = "w0",
                 lease_s: float = 30.0, batch: int = 256, poll_s: float = 1.0) -> None:
        self.store, self.driver, self.clock = store, driver, clock
        self.worker, self.lease_s, self.batch, self.poll_s = worker, lease_s, batch, poll_s
        self.listeners: list[Listener] = []
        self._bundles: dict[str, dict[str, str]] = {}
        self._replace: dict[str, frozenset[str]] = {}
        self._specs: dict[str, tuple[str, RolloutSpec]] = {}

    # -- documents ---------------------------------------------------------------------------------------------

    def _tell(self, kind: str, doc: dict[str, Any]) -> None:
        for fn in self.listeners:
            fn(kind, doc)

    def _row(self, name: str) -> RolloutRow:
        r = self.store.rollout(name)
        if r is None:
            raise ControlError("rollout_not_found", f"no rollout named {name!r} ('lpctl rollout list' shows them)")
        return r

    def doc(self, name: str) -> RolloutDoc:
        r = self._row(name)
        by_wave = self.store.counts(name)  # (wave, state) -> n: a GROUP BY, not every row (this runs per change)
        total: Counter[str] = Counter()
        waves = []
        for w in r.waves:
            mine = {s: n for (wi, s), n in by_wave.items() if wi == w["index"]}
            total.update(mine)
            waves.append(WaveDoc(index=w["index"], hosts=sum(mine.values()), state=w["state"],
                                 counts=dict(sorted(mine.items()))))
        return RolloutDoc.model_validate({
            "name": r.name, "state": r.state, "version": r.version, "current_wave": r.current_wave, "waves": waves,
            "counts": dict(sorted(total.items())), "reason": r.reason,
            "created_at": r.created_at, "updated_at": r.updated_at})

    def executions(self, name: str) -> list[Execution]:
        return [_exec_doc(e) for e in self.store.executions(name)]

    def _set(self, name: str, **fields: Any) -> None:
        self.store.update_rollout(name, self.clock.now(), **fields)
        self._tell("rollout", self.doc(name).model_dump(mode="json"))

    def _event(self, r: RolloutRow, event: str, **detail: Any) -> None:
        """A rollout-level event, kept in the plan document (the report's timeline) and told to listeners."""
        ev = {"at": self.clock.now(), "event": event, **detail}
        r.plan.setdefault("events", []).append(ev)
        self.store.update_rollout(r.name, self.clock.now(), plan=r.plan)
        self._tell("event", {"rollout": r.name, **ev})

    # -- create and controls -----------------------------------------------------------------------------------

    async def create(self, spec: RolloutSpec) -> RolloutDoc:
        """Plan ``spec`` against the hosts' retained state and store it (CREATED); refusals raise PlanError."""
        if self.store.rollout(spec.name) is not None:
            raise PlanError("rollout_exists", f"a rollout named {spec.name!r} exists: pick another name")
        fleet = await self.driver.fleet()
        plan = make_plan(spec, fleet)
        summary = plan.summary()
        summary["events"] = []
        self.store.create(spec.name, spec.model_dump_json(), summary, len(plan.waves), plan.rows, self.clock.now())
        self._bundles[spec.name] = {b: x.b64 for b, x in plan.bundles.items()}
        self._replace[spec.name] = frozenset(b for b, x in plan.bundles.items() if x.replace)
        doc = self.doc(spec.name)
        self._tell("rollout", doc.model_dump(mode="json"))
        return doc

    def _spec(self, r: RolloutRow) -> RolloutSpec:
        """The rollout's spec (stored once, never changed: parsed once per engine, not at every tick)."""
        got = self._specs.get(r.name)
        if got is None or got[0] != r.spec:
            got = self._specs[r.name] = (r.spec, RolloutSpec.model_validate_json(r.spec))
        return got[1]

    def _bundle_map(self, r: RolloutRow, spec: RolloutSpec) -> tuple[dict[str, str], frozenset[str]]:
        """build id -> base64 bundle, and the build ids whose bundle is an atomic replace."""
        if r.name not in self._bundles:  # a restarted engine: read the bundles again (make_plan checked them)
            read = {b: read_bundle(b, p, spec.patch) for b, p in spec.bundles.items()}
            self._bundles[r.name] = {b: x.b64 for b, x in read.items()}
            self._replace[r.name] = frozenset(b for b, x in read.items() if x.replace)
        return self._bundles[r.name], self._replace[r.name]

    def _need(self, r: RolloutRow, action: str, allowed: set[str]) -> None:
        if r.state not in allowed:
            raise ControlError("rollout_bad_state", f"cannot {action} rollout {r.name!r} in state {r.state} "
                               f"(allowed in: {', '.join(sorted(allowed))})", {"state": r.state})

    def start(self, name: str) -> RolloutDoc:
        r = self._row(name)
        self._need(r, "start", {"CREATED"})
        now = self.clock.now()
        self.store.update_rollout(name, now, started_at=now, state="SCHEDULED")
        self._event(r, "started")
        self._activate(self._row(name), self._spec(r))
        return self.doc(name)

    def pause(self, name: str) -> RolloutDoc:
        r = self._row(name)
        self._need(r, "pause", {"RUNNING", "WAITING_APPROVAL", "SCHEDULED"})
        self._event(r, "paused", by="operator")
        self._set(name, state="PAUSED", reason="paused by the operator")
        return self.doc(name)

    def resume(self, name: str) -> RolloutDoc:
        r = self._row(name)
        self._need(r, "resume", {"PAUSED"})
        self._event(r, "resumed")
        w = r.waves[r.current_wave]
        if w["state"] == "done":
            self._next_wave(self._row(name), self._spec(r), resumed=True)
        else:
            self._set(name, state="SCHEDULED", reason=None)
            self._activate(self._row(name), self._spec(r))
        return self.doc(name)

    def approve(self, name: str, wave: int | None = None) -> RolloutDoc:
        r = self._row(name)
        self._need(r, "approve", {"CREATED", "SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED"})
        idx = r.current_wave if wave is None else wave
        if not 0 <= idx < len(r.waves):
            raise ControlError("wave_not_found", f"rollout {name!r} has waves 0..{len(r.waves) - 1}, not {idx}")
        self.store.update_wave(name, idx, approved=1)
        self._event(r, "approved", wave=idx)
        if r.state == "WAITING_APPROVAL" and idx == r.current_wave:
            self._start_wave(self._row(name), idx)
        return self.doc(name)

    def cancel(self, name: str, reason: str = "canceled by the operator") -> RolloutDoc:
        r = self._row(name)
        self._need(r, "cancel", {"CREATED", "SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED"})
        self._cancel_queued(name)
        self._event(r, "canceled", reason=reason)
        self._set(name, state="CANCELED", reason=reason)
        return self.doc(name)

    def rollback(self, name: str, reason: str = "rolled back by the operator") -> RolloutDoc:
        """Disable and unload the patch on every host the rollout reached, latest wave first."""
        r = self._row(name)
        self._need(r, "roll back", {"SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED", "COMPLETED", "CANCELED"})
        self._cancel_queued(name)
        now = self.clock.now()
        reached = [e for e in self.store.executions(name)
                   if e.details.get("loaded") or (e.released and e.phase != "done")]
        top = max((e.wave for e in reached), default=-1)
        for e in reached:
            self.store.force_state(name, e.host, e.state, e.details, now, phase="rb_disable",
                                   released=e.wave == top)
        self._event(r, "rollback", reason=reason, hosts=len(reached))
        self._set(name, state="ROLLING_BACK", reason=reason)
        return self.doc(name)

    def _cancel_queued(self, name: str) -> None:
        now = self.clock.now()
        for e in self.store.executions(name):
            if e.state is ExecState.QUEUED and e.phase != "done":
                self.store.force_state(name, e.host, ExecState.CANCELED, {**e.details, "reason": "canceled"}, now)

    # -- waves -------------------------------------------------------------------------------------------------

    def _activate(self, r: RolloutRow, spec: RolloutSpec) -> None:
        """SCHEDULED -> (wait) | WAITING_APPROVAL | RUNNING, at the current wave."""
        now = self.clock.now()
        if spec.schedule.start_at is not None and now < spec.schedule.start_at:
            return
        if not window_open(spec.schedule, now):
            if r.reason != "outside the maintenance window":
                self._set(r.name, reason="outside the maintenance window")
            return
        w = r.waves[r.current_wave]
        if w["state"] in ("running", "paused"):
            self.store.update_wave(r.name, r.current_wave, state="running")
            self._run(r)
        else:
            self._open_wave(r, spec, r.current_wave)

    def _open_wave(self, r: RolloutRow, spec: RolloutSpec, idx: int) -> None:
        if idx in spec.waves.approval and not r.waves[idx]["approved"]:
            self.store.update_wave(r.name, idx, state="waiting_approval")
            self._event(r, "waiting_approval", wave=idx)
            self._set(r.name, state="WAITING_APPROVAL", current_wave=idx, reason=f"wave {idx} waits for approval")
            return
        self._start_wave(r, idx)

    def _start_wave(self, r: RolloutRow, idx: int) -> None:
        now = self.clock.now()
        self.store.update_wave(r.name, idx, state="running", started_at=now)
        self._event(r, "wave_started", wave=idx)
        self._run(self._row(r.name), current_wave=idx)

    def _run(self, r: RolloutRow, **fields: Any) -> None:
        """Into RUNNING, with the rate limiter anchored now."""
        now = self.clock.now()
        st = RateState.load(r.plan.get("rate"), now)
        reanchor(st, r.released, now)
        r.plan["rate"] = st.dump()
        self._set(r.name, state="RUNNING", reason=None, plan=r.plan, **fields)

    def _next_wave(self, r: RolloutRow, spec: RolloutSpec, *, resumed: bool = False) -> None:
        nxt = r.current_wave + 1
        if nxt >= len(r.waves):
            self._event(r, "completed")
            self._set(r.name, state="COMPLETED", reason=None)
        elif spec.waves.on_success == "pause" and not resumed:
            self.store.update_rollout(r.name, self.clock.now(), current_wave=r.current_wave)
            self._set(r.name, state="PAUSED", reason=f"wave {r.current_wave} done: resume to start wave {nxt}")
        else:
            self._open_wave(self._row(r.name), spec, nxt)

    def _wave_done(self, r: RolloutRow, spec: RolloutSpec, execs: list[ExecRow]) -> None:
        mine = [e for e in execs if e.wave == r.current_wave]
        if any(e.phase != "done" for e in mine):
            return
        self.store.update_wave(r.name, r.current_wave, state="done")
        counted = [e for e in mine if e.state not in NOT_EXECUTED]
        pct = 100.0 * sum(e.state in SUCCESS for e in counted) / len(counted) if counted else 100.0
        self._event(r, "wave_done", wave=r.current_wave, success_pct=round(pct, 3))
        if pct + 1e-9 < spec.waves.success_threshold:
            self._set(r.name, state="PAUSED", reason=f"wave {r.current_wave}: {pct:.1f}% succeeded, below the "
                      f"success threshold of {spec.waves.success_threshold:g}%: resume to go on, or roll back")
            return
        self._next_wave(self._row(r.name), spec)

    # -- abort criteria ----------------------------------------------------------------------------------------

    def _tripped(self, r: RolloutRow, spec: RolloutSpec, execs: list[ExecRow]) -> str | None:
        for c in spec.abort.criteria:
            scope = [e for e in execs if c.scope == "rollout" or e.wave == r.current_wave]
            executed = [e for e in scope if e.phase == "done" and e.state not in NOT_EXECUTED]
            if c.failure_type == "STALLED":
                stalled_now = [e for e in scope if e.state is ExecState.STALLED and e.phase != "done"]
                pool = executed + stalled_now
                bad = sum(bool(e.details.get("stalled")) for e in pool)
            else:
                pool = executed
                kinds = FAILURES if c.failure_type == "ALL" else {ExecState(c.failure_type)}
                bad = sum(e.state in kinds for e in pool)
            if len(pool) >= c.min_executed and 100.0 * bad / len(pool) + 1e-9 >= c.threshold_pct:
                return (f"abort: {c.failure_type} {bad}/{len(pool)} = {100.0 * bad / len(pool):.1f}% >= "
                        f"{c.threshold_pct:g}% ({c.scope}, min {c.min_executed} executed)")
        return None

    # -- the tick ----------------------------------------------------------------------------------------------

    def _release(self, r: RolloutRow, spec: RolloutSpec, execs: list[ExecRow]) -> None:
        now = self.clock.now()
        st = RateState.load(r.plan.get("rate"), r.started_at or now)
        was = r.plan.get("rate")
        succeeded = sum(e.state in SUCCESS for e in execs)
        if bump(spec.rate, st, r.released, succeeded, now):
            self._event(r, "rate_increased", per_minute=spec.rate.base_per_minute * spec.rate.factor ** st.level
                        if spec.rate.base_per_minute else None, level=st.level)
        r.plan["rate"] = st.dump()
        queued = [e for e in execs if e.wave == r.current_wave and not e.released and e.phase != "done"]
        in_progress = sum(e.released and e.phase != "done" for e in execs)
        room = may_start(spec.rate, st, r.released, in_progress, now)
        take = queued if room == float("inf") else queued[: int(room)]
        if take:
            self.store.release(r.name, [e.host for e in take], now)
        if r.plan["rate"] != was:
            self.store.update_rollout(r.name, now, plan=r.plan)

    async def _join(self, r: RolloutRow, spec: RolloutSpec, execs: list[ExecRow]) -> None:
        """Dynamic targets: hosts that match now and are not in the rollout join the current wave."""
        fleet = await self.driver.fleet()
        known = {e.host for e in execs}
        bundles = set(spec.bundles)
        for host in select(spec, fleet, strict=False):
            if host in known:
                continue
            info = fleet[host]
            details: dict[str, Any] = {"joined": True}
            if info.build_id in bundles:
                state = ExecState.QUEUED
            else:
                state = ExecState.REMOVED
                details.update(reason=f"no bundle for build {info.build_id}", code="no_bundle")
            if self.store.add_host(r.name, host, r.current_wave, info.build_id, state, details, self.clock.now()):
                self._event(r, "host_joined", host=host, state=state.value)

    def _control_step(self, r: RolloutRow, spec: RolloutSpec, execs: list[ExecRow]) -> None:
        now = self.clock.now()
        if r.state == "SCHEDULED":
            self._activate(r, spec)
            return
        if r.state == "ROLLING_BACK":
            pending = [e for e in execs if e.phase in UNDO_PHASES]
            if not pending:
                self._event(r, "rolled_back")
                self._set(r.name, state="ROLLED_BACK")
                return
            top = max(e.wave for e in pending)
            if not any(e.released for e in pending if e.wave == top):
                self.store.release(r.name, [e.host for e in pending if e.wave == top], now)
            return
        if r.state != "RUNNING":
            return
        if spec.schedule.end_at is not None and now >= spec.schedule.end_at:
            self.cancel(r.name, reason="the schedule's end time was reached")
            return
        if not window_open(spec.schedule, now):
            self._event(r, "window_closed")
            self._set(r.name, state="SCHEDULED", reason="outside the maintenance window")
            return
        why = self._tripped(r, spec, execs)
        if why is not None:
            self._event(r, "abort", reason=why, action=spec.abort.action)
            if spec.abort.action == "rollback":
                self.rollback(r.name, reason=why)
            else:
                self.cancel(r.name, reason=why)
            return
        self._release(r, spec, execs)
        self._wave_done(self._row(r.name), spec, execs)  # a release changes no phase: the rows read still hold

    async def _drive(self, r: RolloutRow, spec: RolloutSpec) -> int:
        now = self.clock.now()
        rows = self.store.claim(r.name, self.worker, now, self.lease_s, self.batch)
        if not rows:
            return 0
        bundles, replace = self._bundle_map(r, spec)
        ctx = StepContext(spec, bundles, now, self.poll_s, replace)
        before = [e.state for e in rows]
        await asyncio.gather(*(advance(e, ctx, self.driver) for e in rows))
        saved = self.store.save_many(rows, self.worker, self.clock.now(), keep_lease=False)  # one commit
        for e, state, ok in zip(rows, before, saved, strict=True):
            if ok and e.state is not state:
                self._tell("execution", _exec_event(e))
        return len(rows)

    async def tick(self, name: str) -> float | None:
        """Decide (the worker holding the rollout's lead lease), then drive every due host one step (any worker).
        Returns when to tick next (None: nothing scheduled)."""
        r = self._row(name)
        if r.state in ("CREATED", "ROLLED_BACK"):
            return None
        spec = self._spec(r)
        if r.state not in FINAL and self.store.lead(name, self.worker, self.clock.now(), self.lease_s):
            if spec.targets.dynamic and r.state == "RUNNING":
                await self._join(r, spec, self.store.executions(name))
            for _ in range(4):  # a wave done can open the next one, which can release hosts at once
                before = (r.state, r.current_wave, r.version)
                self._control_step(r, spec, self.store.executions(name))
                r = self._row(name)
                if (r.state, r.current_wave, r.version) == before:
                    break
        await self._drive(r, spec)
        return self._next_wake(self._row(name), spec)

    def _next_wake(self, r: RolloutRow, spec: RolloutSpec) -> float | None:
        first, queued = self.store.due(r.name, r.current_wave)
        cands = [] if first is None else [first]
        if r.state == "ROLLING_BACK":
            cands.append(self.clock.now())  # the next tick releases the next wave down, or ends the rollback
        if r.state == "RUNNING":
            if queued:
                st = RateState.load(r.plan.get("rate"), r.started_at or self.clock.now())
                t = next_start(spec.rate, st, r.released)
                if t is not None and t > self.clock.now():  # not yet by rate (at once: the cap holds it back)
                    cands.append(t)
            if not cands:
                cands.append(self.clock.now())  # free to start more, or the wave is done: tick again at once
        if r.state == "SCHEDULED":
            if spec.schedule.start_at is not None and self.clock.now() < spec.schedule.start_at:
                cands.append(spec.schedule.start_at)
            else:
                t = next_window(spec.schedule, self.clock.now())
                cands.append(self.clock.now() if t is None else t)
        return min(cands) if cands else None

    def busy(self, name: str) -> bool:
        """Some host of the rollout is still being driven."""
        return self.store.busy(name)

    async def run(self, name: str, *, auto: bool = False, max_ticks: int = 1_000_000) -> RolloutDoc:
        """Tick until the rollout is final with no host in flight, or it waits for an operator (``auto``: a
        rehearsal approves and resumes by itself, and says so in the timeline)."""
        for _ in range(max_ticks):
            wake = await self.tick(name)
            r = self._row(name)
            if r.state in FINAL and not self.busy(name):
                break
            if wake is None:
                if auto and r.state == "WAITING_APPROVAL":
                    self.approve(name)
                    continue
                if auto and r.state == "PAUSED":
                    self.resume(name)
                    continue
                if r.state == "CREATED" or not self.busy(name):
                    break
                wake = self.clock.now() + self.poll_s
            await self.clock.sleep(max(0.0, wake - self.clock.now()))
        return self.doc(name)


__all__ = ["ACTIVE", "ControlError", "Engine"]
