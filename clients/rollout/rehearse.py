"""Rehearsals and dry runs: the rollout run against a seeded twin of its targets on a simulated clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

from clients.rollout import report
from clients.rollout.clock import SimClock
from clients.rollout.engine import Engine
from clients.rollout.plan import HostInfo, select
from clients.rollout.sim import SimDriver, assign_faults
from clients.rollout.store import Store
from schemas.fleet import Fault
from schemas.rollout import RolloutSpec

START = 1_700_000_000.0
"""The simulated clock's start: fixed, so that a replay gives the same bytes."""


async def rehearse(spec: RolloutSpec, fleet: dict[str, HostInfo], faults: list[Fault], seed: int) -> dict[str, Any]:
    """The report of ``spec`` run to its end against twins of ``fleet`` carrying ``faults`` (drawn by ``seed``).
    Approval gates and pauses are passed by themselves (the timeline shows where a real rollout would wait)."""
    clock = SimClock(START)
    twins = {h: fleet[h] for h in select(spec, fleet, strict=False)}  # the targets only: faults land on them
    carried = assign_faults(sorted(twins), faults, seed)
    driver = SimDriver(clock, twins, carried, spec.patch)
    store = Store(":memory:")
    try:
        engine = Engine(store, driver, clock, worker="rehearsal")
        await engine.create(spec)
        engine.start(spec.name)
        await engine.run(spec.name, auto=True)
        doc = report.build(store, spec.name)
    finally:
        store.close()
    doc["rehearsal"] = {
        "seed": seed,
        "faults": [f.model_dump(mode="json") for f in faults],
        "faulted": dict(sorted(Counter(f.kind for fs in carried.values() for f in fs).items())),
        "hosts_with_faults": {h: [f.kind for f in fs] for h, fs in sorted(carried.items()) if fs},
        "host_calls": driver.calls,
    }
    return doc
