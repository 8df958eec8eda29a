"""From a spec and the fleet's retained state to a plan: targets, bundles per build, waves, coverage.

Everything here is pure (no I/O but reading bundle files): ``create`` refuses a bad spec before anything is
stored or sent, with a stable code.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.rollout import ExecState, RolloutSpec, WaveGroup


class PlanError(Exception):
    """A refused spec: ``code`` is stable, ``message`` says what to change."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


@dataclass(frozen=True)
class HostInfo:
    """What the orchestrator knows of a host, from its retained ``state`` and ``status``."""

    host: str
    build_id: str
    online: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    patches: dict[str, bool] = field(default_factory=dict)  # name -> enabled
    transition: bool = False
    funcs: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # patch -> (old_name, sympos)
    states: dict[str, dict[int, int]] = field(default_factory=dict)  # patch -> klp_state id -> version

    @classmethod
    def from_state(cls, doc: dict[str, Any], online: bool = True) -> HostInfo:
        comps = doc.get("components") or {}
        lp = comps.get("livepatch") or {}
        labels = comps.get("labels") or (comps.get("fleet") or {}).get("labels") or {}
        patches = lp.get("patches") or []
        return cls(host=str(doc["host"]), build_id=str((doc.get("kernel") or {}).get("build_id", "")),
                   online=online, labels={str(k): str(v) for k, v in labels.items()},
                   patches={str(p["name"]): bool(p.get("enabled")) for p in patches},
                   transition=lp.get("transition") is not None,
                   funcs={str(p["name"]): tuple(_sysfs_func(f) for f in p.get("funcs") or [] if isinstance(f, str))
                          for p in patches},
                   states={str(p["name"]): {int(st["id"]): int(st["version"]) for st in p.get("states") or []}
                           for p in patches})

    def replaced_by(self, bundle: Bundle) -> tuple[list[str], list[tuple[str, int]]]:
        """What an atomic replace by ``bundle`` would take over here: the enabled patches, and the functions they
        cover that the bundle does not (its NOP funcs, ``klp_add_nops``: their transition checks them too)."""
        if not bundle.replace:
            return [], []
        mine = {(n, max(p, 1)) for n, p in bundle.functions}
        olds = sorted(n for n, on in self.patches.items() if on and n != bundle.name)
        nops: list[tuple[str, int]] = []
        for name in olds:
            for fn, pos in self.funcs.get(name, ()):
                if (fn, max(pos, 1)) not in mine:
                    mine.add((fn, max(pos, 1)))
                    nops.append((fn, pos))
        return olds, nops

    def incompatible(self, bundle: Bundle) -> str | None:
        """Why enabling ``bundle`` here would be refused (klp_is_patch_compatible: every system state an enabled
        patch installed must be in a cumulative patch at that version or later; a patch without the replace
        flag may leave a state out), or None."""
        for name, on in sorted(self.patches.items()):
            if not on or name == bundle.name:
                continue
            for sid, version in sorted(self.states.get(name, {}).items()):
                mine = bundle.states.get(sid)
                if (not bundle.replace) if mine is None else mine >= version:
                    continue
                offered = "does not carry it" if mine is None else f"has version {mine}"
                return (f"patch {name!r} installed system state {sid} at version {version}; {bundle.name!r} "
                        f"{offered}")
        return None


def _sysfs_func(name: str) -> tuple[str, int]:
    """``cmdline_proc_show,1`` (a func's sysfs name, as the state lists it) -> ``("cmdline_proc_show", 1)``."""
    fn, _, pos = name.rpartition(",")
    if not fn or not pos.isdigit():
        return name, 0
    return fn, int(pos)


@dataclass(frozen=True)
class Bundle:
    build_id: str
    path: str
    raw: bytes
    name: str
    replace: bool
    signed: bool
    key_id: str | None
    functions: tuple[tuple[str, int], ...] = ()  # (old_name, old_sympos) the patch replaces, from its manifest
    states: dict[int, int] = field(default_factory=dict)  # klp_state id -> version, from its manifest

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()


def read_bundle(build_id: str, path: str, patch: str) -> Bundle:
    """Read and check one bundle: a livepatchd bundle, for ``patch`` and this build, signed."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PlanError("bundle_unreadable", f"cannot read bundle {path}: {exc.strerror}", {"path": path}) from None
    try:
        doc = json.loads(raw)
        manifest = doc["manifest"]
        if doc.get("format") != "livepatchd-bundle/1":
            raise ValueError(doc.get("format"))
    except (ValueError, KeyError, TypeError):
        raise PlanError("bundle_invalid", f"{path} is not a livepatchd bundle (format livepatchd-bundle/1)",
                        {"path": path}) from None
    sig = doc.get("signature")
    if not sig:
        raise PlanError("bundle_unsigned", f"{path} is not signed: sign it with 'lpctl patch sign {path} --key …' "
                        "(hosts refuse unsigned bundles)", {"path": path, "build_id": build_id})
    if manifest.get("build_id") != build_id:
        raise PlanError("bundle_build_mismatch", f"{path} is built for {manifest.get('build_id')}, but the spec "
                        f"maps it to build {build_id}", {"path": path})
    if manifest.get("name") != patch:
        raise PlanError("bundle_patch_mismatch", f"{path} holds patch {manifest.get('name')!r}, not {patch!r}",
                        {"path": path})
    funcs = tuple((str(f.get("old_name")), int(f.get("old_sympos") or 0))
                  for o in manifest.get("objects") or [] if isinstance(o, dict)
                  for f in o.get("funcs") or [] if isinstance(f, dict) and f.get("old_name"))
    try:
        states = {int(st["id"]): int(st["version"]) for st in manifest.get("states") or []}
    except (KeyError, TypeError, ValueError):
        raise PlanError("bundle_invalid", f"{path}: its manifest's states are not a list of {{id, version}}",
                        {"path": path}) from None
    return Bundle(build_id, path, raw, patch, bool(manifest.get("replace")), True, sig.get("key_id"), funcs, states)


def _labels_match(want: dict[str, str], have: dict[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def select(spec: RolloutSpec, fleet: dict[str, HostInfo], *, strict: bool = True) -> list[str]:
    """The target hosts in a stable order; ``strict`` refuses names that match nothing."""
    t = spec.targets
    if strict:
        unknown = sorted(set(t.hosts) - fleet.keys())
        if unknown:
            raise PlanError("unknown_host", f"no such host(s): {', '.join(unknown)} (not in the hosts' retained "
                            "state on this broker)", {"hosts": unknown})
        for g in t.globs:
            if not any(fnmatch.fnmatchcase(h, g) for h in fleet):
                raise PlanError("no_match", f"glob {g!r} matches no host", {"glob": g})
        if t.labels and not any(_labels_match(t.labels, i.labels) for i in fleet.values()):
            raise PlanError("unknown_label", f"no host has the labels {t.labels}", {"labels": t.labels})
        builds = {i.build_id for i in fleet.values()}
        missing = sorted(set(t.build_ids) - builds)
        if missing:
            raise PlanError("unknown_build", f"no host runs build(s) {', '.join(missing)}", {"build_ids": missing})
    chosen = []
    for h in sorted(fleet):
        i = fleet[h]
        by_name = h in t.hosts or any(fnmatch.fnmatchcase(h, g) for g in t.globs)
        by_build = i.build_id in t.build_ids
        by_label = bool(t.labels) and _labels_match(t.labels, i.labels)
        # Name/glob/build/label terms are a union; labels alone select, with other terms they narrow.
        if t.labels and (t.hosts or t.globs or t.build_ids):
            ok = (by_name or by_build) and by_label
        else:
            ok = by_name or by_build or by_label
        if ok:
            chosen.append(h)
    return chosen


def split_waves(spec: RolloutSpec, hosts: list[str], fleet: dict[str, HostInfo]) -> list[list[str]]:
    """Hosts per wave. Refuses a split that does not add up (more groups than hosts, an empty group…)."""
    w = spec.waves
    n = len(hosts)
    if w.groups:
        left = list(hosts)
        out: list[list[str]] = []
        for i, g in enumerate(w.groups):
            take = [h for h in left if _in_group(g, fleet[h])]
            if not take:
                raise PlanError("wave_spec_invalid", f"wave group {i} ({g.model_dump(exclude_defaults=True)}) "
                                "selects no target host", {"group": i})
            out.append(take)
            left = [h for h in left if h not in take]
        if left:
            raise PlanError("wave_spec_invalid", f"{len(left)} target host(s) are in no wave group (e.g. "
                            f"{left[0]}): add a catch-all group {{\"glob\": \"*\"}}", {"unassigned": left[:20]})
        return out
    if w.canary is not None or w.percentages:
        k = w.canary or 0
        if k > n:
            raise PlanError("wave_spec_invalid", f"a canary of {k} host(s) but only {n} target(s)", {"targets": n})
        out = [hosts[:k]] if k else []
        rest = hosts[k:]
        cum, start = 0.0, 0
        for p in w.percentages or [100.0]:
            cum += p
            end = len(rest) if math.isclose(cum, 100.0) else round(len(rest) * cum / 100.0)
            out.append(rest[start:end])
            start = end
        if any(not g for g in out):
            raise PlanError("wave_spec_invalid", f"{n} target(s) leave a wave empty with canary {k} and "
                            f"percentages {w.percentages}", {"sizes": [len(g) for g in out]})
        return out
    count = w.count or 1
    if count > n:
        raise PlanError("wave_spec_invalid", f"{count} waves but only {n} target host(s)", {"targets": n})
    base, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(hosts[start:start + size])
        start += size
    return out


def _in_group(g: WaveGroup, info: HostInfo) -> bool:
    return (g.glob is None or fnmatch.fnmatchcase(info.host, g.glob)) and _labels_match(g.labels, info.labels)


@dataclass
class Plan:
    waves: list[list[str]]
    rows: list[tuple[str, int, str | None, ExecState, dict[str, Any]]]
    coverage: dict[str, Any]
    bundles: dict[str, Bundle]

    def summary(self) -> dict[str, Any]:
        return {"waves": [len(w) for w in self.waves], "coverage": self.coverage,
                "bundles": {b: {"path": x.path, "replace": x.replace, "key_id": x.key_id}
                            for b, x in sorted(self.bundles.items())}}


def make_plan(spec: RolloutSpec, fleet: dict[str, HostInfo]) -> Plan:
    bundles = {b: read_bundle(b, p, spec.patch) for b, p in sorted(spec.bundles.items())}
    if spec.waves.approval and max(spec.waves.approval) >= 1000:
        raise PlanError("wave_spec_invalid", "approval wave index out of range")
    targets = select(spec, fleet)
    if not targets:
        raise PlanError("no_targets", "the targets select no host", {})
    waves = split_waves(spec, targets, fleet)
    if spec.waves.approval and max(spec.waves.approval) >= len(waves):
        raise PlanError("wave_spec_invalid", f"approval gate on wave {max(spec.waves.approval)} but the plan has "
                        f"{len(waves)} wave(s)", {"waves": len(waves)})
    rows: list[tuple[str, int, str | None, ExecState, dict[str, Any]]] = []
    removed: dict[str, list[str]] = {}
    for wi, hosts in enumerate(waves):
        for h in hosts:
            info = fleet[h]
            if info.build_id not in bundles:
                reason = f"no bundle for build {info.build_id}"
                rows.append((h, wi, info.build_id, ExecState.REMOVED, {"reason": reason, "code": "no_bundle"}))
                removed.setdefault(info.build_id, []).append(h)
                continue
            if info.patches.get(spec.patch):
                raise PlanError("patch_state_incompatible", f"host {h} already has patch {spec.patch!r} enabled: "
                                "disable and unload it first, or roll out a new name", {"host": h})
            why = info.incompatible(bundles[info.build_id])
            if why is not None:
                raise PlanError("patch_state_incompatible", f"host {h}: {why} (the host would refuse the enable: "
                                "build the patch with that state, or leave the host out)", {"host": h})
            rows.append((h, wi, info.build_id, ExecState.QUEUED, {}))
    covered = len(rows) - sum(len(v) for v in removed.values())
    if covered == 0:
        raise PlanError("no_coverage", "no target host runs a build that the spec has a bundle for",
                        {"removed": removed})
    coverage = {"targets": len(rows), "covered": covered,
                "removed_by_build": {b: len(v) for b, v in sorted(removed.items())}}
    return Plan(waves, rows, coverage, bundles)
