"""The rollout store (SQLite and PostgreSQL) and the planner's refusals."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from clients.rollout.plan import HostInfo, PlanError, make_plan
from clients.rollout.store import Store
from schemas.rollout import ExecState, RolloutSpec

BUILD = "ab" * 20


def _pg_url() -> str | None:
    name = f"lp_rollout_{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["su", "postgres", "-c", f"createdb {name}"], capture_output=True, check=False)
    return None if r.returncode else f"postgresql://postgres@/{name}?host=/var/run/postgresql"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store(str(tmp_path / "r.sqlite3"))
    url = _pg_url()
    if url is None:
        pytest.fail("PostgreSQL is not running: .ci/run starts it")
    return Store(url)


def _bundle(tmp_path: Path, signed: bool = True, build: str = BUILD) -> str:
    p = tmp_path / f"fix-{build[:4]}-{signed}.lpb"
    sig = {"key_id": "k" * 64, "value": "x"} if signed else None
    p.write_text(json.dumps({"format": "livepatchd-bundle/1", "manifest": {"name": "fix", "build_id": build},
                             "object": "", "signature": sig}))
    return str(p)


def _fleet(n: int) -> dict[str, HostInfo]:
    return {f"h{i:02d}": HostInfo(f"h{i:02d}", BUILD if i % 5 else "cd" * 20, labels={"tier": "web"})
            for i in range(n)}


def test_claim_is_exclusive_and_versions_grow(store: Store, tmp_path: Path) -> None:
    spec = RolloutSpec(name="r1", patch="fix", bundles={BUILD: _bundle(tmp_path)}, targets={"globs": ["h*"]},
                       waves={"count": 2})
    plan = make_plan(spec, _fleet(10))
    assert [len(w) for w in plan.waves] == [5, 5]
    assert plan.coverage["removed_by_build"] == {"cd" * 20: 2}
    store.create("r1", spec.model_dump_json(), plan.summary(), len(plan.waves), plan.rows, 100.0)
    queued = [e.host for e in store.executions("r1") if e.state is ExecState.QUEUED]
    store.release("r1", queued, 100.0)
    a = store.claim("r1", "wa", 100.0, 30.0, 100)
    b = store.claim("r1", "wb", 100.0, 30.0, 100)
    assert len(a) == 8  # nothing driven twice while the lease holds
    assert b == []
    e = a[0]
    e.state = ExecState.IN_PROGRESS
    assert store.save(e, "wa", 101.0)
    assert not store.save(e, "wb", 101.0)  # not its lease (and a stale version)
    assert e.version == 2
    later = store.claim("r1", "wb", 200.0, 30.0, 100)  # wa's lease expired: wb carries on
    assert {x.host for x in later} == set(queued)
    store.close()


def test_plan_refusals(tmp_path: Path) -> None:
    fleet = _fleet(4)
    good = _bundle(tmp_path)
    cases = [
        ({"targets": {"hosts": ["nope"]}}, "unknown_host"),
        ({"targets": {"labels": {"tier": "db"}}}, "unknown_label"),
        ({"targets": {"build_ids": ["ee" * 20]}}, "unknown_build"),
        ({"targets": {"globs": ["h*"]}, "waves": {"count": 9}}, "wave_spec_invalid"),
        ({"targets": {"globs": ["h*"]}, "bundles": {BUILD: _bundle(tmp_path, signed=False)}}, "bundle_unsigned"),
    ]
    for extra, code in cases:
        fields = {"name": "r", "patch": "fix", "bundles": {BUILD: good}, **extra}
        with pytest.raises(PlanError) as exc:
            make_plan(RolloutSpec.model_validate(fields), fleet)
        assert exc.value.code == code, extra
    fleet["h01"] = HostInfo("h01", BUILD, patches={"fix": True})
    with pytest.raises(PlanError) as exc:
        make_plan(RolloutSpec(name="r", patch="fix", bundles={BUILD: good}, targets={"globs": ["h*"]}), fleet)
    assert exc.value.code == "patch_state_incompatible"
    with pytest.raises(ValueError, match="sum to 100"):
        RolloutSpec.model_validate({"name": "r", "patch": "fix", "bundles": {BUILD: good},
                                    "targets": {"globs": ["*"]}, "waves": {"canary": 1, "percentages": [50, 40]}})
