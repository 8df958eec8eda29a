"""Shared pieces of the rollout tests: bundles on disk, twin fleets, an engine on the simulated clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clients.rollout.clock import SimClock
from clients.rollout.engine import Engine
from clients.rollout.plan import HostInfo
from clients.rollout.sim import SimDriver, assign_faults
from clients.rollout.store import Store
from schemas.fleet import Fault
from schemas.rollout import RolloutSpec

BUILD_A = "a1" * 20
BUILD_B = "b2" * 20


def bundle(tmp: Path, build: str = BUILD_A, name: str = "fix", signed: bool = True, *, replace: bool = False,
           funcs: tuple[str, ...] = (), states: dict[int, int] | None = None) -> str:
    """A bundle file as the planner reads it (the twins do not check signatures; real hosts do): ``replace``
    sets the atomic-replace flag, ``funcs`` the old functions its manifest lists, ``states`` its system states."""
    p = tmp / f"{name}-{build[:4]}-{int(signed)}.lpb"
    sig = {"key_id": "k" * 64, "value": "x"} if signed else None
    manifest: dict[str, Any] = {"name": name, "build_id": build, "replace": replace,
                                "objects": [{"name": "vmlinux", "funcs": [{"old_name": f} for f in funcs]}],
                                "states": [{"id": i, "version": v} for i, v in sorted((states or {}).items())]}
    p.write_text(json.dumps({"format": "livepatchd-bundle/1", "manifest": manifest, "object": "",
                             "signature": sig}))
    return str(p)


def fleet(n: int, *, builds: tuple[str, ...] = (BUILD_A,), zones: tuple[str, ...] = ("eu", "us"),
          prefix: str = "sim") -> dict[str, HostInfo]:
    return {f"{prefix}-{i:04d}": HostInfo(f"{prefix}-{i:04d}", builds[i % len(builds)],
                                          labels={"zone": zones[i % len(zones)]}) for i in range(n)}


class Rig:
    """An engine, its store and its twin fleet, on one simulated clock."""

    def __init__(self, tmp: Path, hosts: dict[str, HostInfo], faults: list[Fault] | None = None, *,
                 seed: int = 0, patch: str = "fix", store: Store | None = None, worker: str = "w0",
                 driver: SimDriver | None = None, clock: SimClock | None = None) -> None:
        self.tmp = tmp
        self.clock = clock or SimClock()
        self.store = store or Store(str(tmp / "rollouts.sqlite3"))
        self.driver = driver or SimDriver(self.clock, hosts, assign_faults(sorted(hosts), faults or [], seed), patch)
        self.engine = Engine(self.store, self.driver, self.clock, worker=worker)
        self.changes: list[tuple[str, dict[str, Any]]] = []
        self.engine.listeners.append(lambda kind, doc: self.changes.append((kind, doc)))

    def spec(self, **fields: Any) -> RolloutSpec:
        doc: dict[str, Any] = {"name": "r1", "patch": "fix", "bundles": {BUILD_A: bundle(self.tmp)},
                               "targets": {"globs": ["*"]}}
        doc.update(fields)
        return RolloutSpec.model_validate(doc)

    async def run(self, spec: RolloutSpec, *, auto: bool = False) -> str:
        await self.engine.create(spec)
        self.engine.start(spec.name)
        return (await self.engine.run(spec.name, auto=auto)).state

    def states(self, name: str = "r1") -> dict[str, str]:
        return {e.host: e.state.value for e in self.store.executions(name)}

    def first_seen(self, state: str, name: str = "r1") -> dict[str, float]:
        """When each execution first entered ``state`` (from the store's audit trail of steps)."""
        out: dict[str, float] = {}
        with self.store.tx() as t:
            for host, at in t.run("SELECT host, MIN(at) FROM steps WHERE rollout = ? AND state = ? GROUP BY host",
                                  (name, state)):
                out[host] = float(at)
        return out
