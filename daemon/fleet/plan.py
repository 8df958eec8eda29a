"""From a fleet spec to its hosts: every draw seeded, so the same spec gives the same fleet.

A host's build, labels and workload come from a generator seeded with ``(seed, host id, what)`` (string seeds
are hashed with SHA-512 by :class:`random.Random`, so no process's hash seed changes them). A fault given by
``count`` goes to the ``count`` spec hosts that rank first in that fault's own seeded order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from daemon.errors import LivepatchdError
from daemon.fleet.builds import BUILDS
from schemas.fleet import Fault, FleetSpec, HostPlan

K = TypeVar("K", bound=str)


class FleetSpecError(LivepatchdError):
    code = "bad_fleet_spec"


def _rng(seed: int, *what: object) -> random.Random:
    return random.Random("/".join(str(w) for w in (seed, *what)))


def _draw(rng: random.Random, dist: Mapping[K, float]) -> K:
    """One value of ``dist`` (value -> share), by the generator; the order of the mapping is the spec's."""
    x = rng.random()
    acc = 0.0
    last: K | None = None
    for value, share in dist.items():
        if share <= 0:
            continue
        acc += share
        last = value
        if x < acc:
            return value
    assert last is not None  # shares sum to 1 (the model checked)
    return last


def load_spec(path: Path) -> FleetSpec:
    """Read a spec file (YAML or JSON); ``bad_fleet_spec`` naming the field when it is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetSpecError(f"cannot read the fleet spec {path}: {exc.strerror}", path=str(path)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetSpecError(f"fleet spec {path} is not YAML or JSON: {exc}", path=str(path)) from None
    return parse_spec(doc if doc is not None else {}, source=str(path))


def parse_spec(doc: Any, *, source: str = "fleet spec") -> FleetSpec:
    if not isinstance(doc, dict):
        raise FleetSpecError(f"{source}: the spec must be a mapping (YAML) or an object (JSON)", source=source)
    try:
        spec = FleetSpec.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise FleetSpecError(f"{source}: {where}: {first['msg']}", field=where,
                             errors=[{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in errors]) from None
    check(spec, source=source)
    return spec


def check(spec: FleetSpec, *, source: str = "fleet spec", builds: Mapping[str, Path] = BUILDS) -> None:
    """What the model cannot know: the shipped builds, and which hosts the fleet has."""
    for i, b in enumerate(spec.builds):
        if b.release not in builds:
            raise FleetSpecError(f"{source}: builds.{i}.release: unknown build {b.release!r}; shipped builds: "
                                 f"{', '.join(sorted(builds))}", field=f"builds.{i}.release", known=sorted(builds))
    for host, o in spec.overrides.items():
        if o.release is not None and o.release not in builds:
            raise FleetSpecError(f"{source}: overrides.{host}.release: unknown build {o.release!r}; shipped builds: "
                                 f"{', '.join(sorted(builds))}", field=f"overrides.{host}.release")
    for j, f in enumerate(spec.faults):
        if f.count is not None and f.count > spec.hosts:
            raise FleetSpecError(f"{source}: faults.{j}.count: {f.count} is more than the fleet's {spec.hosts} hosts",
                                 field=f"faults.{j}.count")


def _fault_hosts(spec: FleetSpec, index: int, fault: Fault, hosts: Sequence[str]) -> set[str]:
    chosen = set(fault.hosts)
    if fault.count:
        ranked = sorted(spec.host_ids(), key=lambda h: _rng(spec.seed, "fault", index, h).random())
        chosen.update(ranked[: fault.count])
    if fault.share is not None:
        chosen.update(h for h in hosts if _rng(spec.seed, "fault", index, h).random() < fault.share)
    return chosen


def draw(spec: FleetSpec, count: int | None = None, first: int = 0) -> list[HostPlan]:
    """The hosts ``<prefix>-0000`` .. of the spec (``count`` of them: the spec's own count by default), numbered
    from ``first``: a host draws the same whichever runner of a split fleet runs it."""
    hosts = spec.host_ids(count, first)
    faults: dict[str, list[Fault]] = {h: [] for h in hosts}
    for j, fault in enumerate(spec.faults):
        for h in _fault_hosts(spec, j, fault, hosts):
            if h in faults:
                faults[h].append(fault)
    plans = []
    for h in hosts:
        builds = {b.release: b.share for b in spec.builds}
        release = _draw(_rng(spec.seed, h, "build"), builds)
        labels = {name: _draw(_rng(spec.seed, h, "label", name), dist) for name, dist in spec.labels.items()}
        workload = _draw(_rng(spec.seed, h, "workload"), spec.workloads)
        o = spec.overrides.get(h)
        if o is not None:
            release = o.release or release
            labels.update(o.labels)
            workload = o.workload or workload
        plans.append(HostPlan(host=h, release=release, nr_cpus=spec.nr_cpus, labels=labels, workload=workload,
                              faults=faults[h], crash_loop_grace_s=spec.crash_loop_grace_s, seed=spec.seed))
    return plans
