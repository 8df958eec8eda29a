"""The fleet spec: seeded draws (the same spec gives the same fleet), stable hosts when the fleet grows, and bad
specs refused with a message naming the field before anything starts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.fleet.plan import FleetSpecError, draw, load_spec, parse_spec
from schemas.fleet import FleetSpec

SPEC: dict[str, Any] = {
    "seed": 42, "hosts": 200, "prefix": "sim",
    "labels": {"zone": {"eu": 0.5, "us": 0.3, "ap": 0.2}, "tier": {"web": 0.7, "db": 0.3}},
    "workloads": {"idle": 0.5, "steady": 0.3, "mix": 0.2},
    "faults": [
        {"kind": "stall", "count": 5, "mode": "uninterruptible"},
        {"kind": "crash", "count": 3, "when": "after_transition", "reboot_after_s": 1},
        {"kind": "slow", "share": 0.1, "delay_s": 0.2},
        {"kind": "flaky", "count": 2, "down_s": 1, "times": 2},
        {"kind": "reject", "hosts": ["sim-0007"]},
        {"kind": "panic", "count": 1},
    ],
    "overrides": {"sim-0000": {"labels": {"role": "canary"}, "workload": "mix"}},
}


def test_the_same_seed_gives_the_same_fleet() -> None:
    a, b = draw(parse_spec(SPEC)), draw(parse_spec(json.loads(json.dumps(SPEC))))
    assert [p.model_dump() for p in a] == [p.model_dump() for p in b]
    other = draw(parse_spec({**SPEC, "seed": 43}))
    assert [p.labels for p in a] != [p.labels for p in other]
    faults = Counter(f.kind for p in a for f in p.faults)
    assert (faults["stall"], faults["crash"], faults["flaky"], faults["panic"]) == (5, 3, 2, 1), "counts are exact"
    assert [f.kind for f in a[7].faults].count("reject") == 1
    assert 5 <= faults["slow"] <= 40, "a share is a probability per host"
    zones = Counter(p.labels["zone"] for p in a)
    assert set(zones) == {"eu", "us", "ap"}
    assert zones["eu"] > zones["ap"]
    assert a[0].labels["role"] == "canary"
    assert a[0].workload == "mix"
    assert {p.workload for p in a} == {"idle", "steady", "mix"}
    assert [p.host for p in a[:2]] == ["sim-0000", "sim-0001"]


def test_a_host_keeps_its_draw_when_the_fleet_grows_or_shrinks() -> None:
    spec = parse_spec(SPEC)
    small, large = draw(spec, 50), draw(spec, 300)
    assert [p.model_dump() for p in small] == [p.model_dump() for p in large[:50]]
    assert not [f for p in large[200:] for f in p.faults if f.count], "count faults stay on the spec's own hosts"


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"builds": [{"release": "5.4-old", "share": 1.0}]}, "builds.0.release", "unknown build '5.4-old'"),
    ({"hosts": -1}, "hosts", "greater than or equal to 0"),
    ({"faults": [{"kind": "crash", "count": -2}]}, "faults.0.crash.count", "greater than or equal to 0"),
    ({"labels": {"zone": {"eu": 0.5, "us": 0.4}}}, "labels", "sum to 0.9, they must sum to 1"),
    ({"workloads": {"idle": 0.7, "steady": 0.7}}, "workloads", "sum to 1.4"),
    ({"faults": [{"kind": "meteor", "count": 1}]}, "faults.0", "'meteor'"),
    ({"faults": [{"kind": "slow"}]}, "faults.0.slow", "say which hosts"),
    ({"faults": [{"kind": "panic", "count": 500}]}, "faults.0.count", "more than the fleet's 200 hosts"),
    ({"overrides": {"sim-0001": {"release": "9.9"}}}, "overrides.sim-0001.release", "unknown build '9.9'"),
    ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
])
def test_bad_specs_are_refused_naming_the_field(change: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(FleetSpecError) as err:
        parse_spec({**SPEC, **change})
    assert err.value.code == "bad_fleet_spec"
    assert err.value.details["field"] == field
    assert f"{field}: " in err.value.message
    assert words in err.value.message


def test_spec_files_in_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("seed: 3\nhosts: 4\nlabels:\n  zone: {eu: 1.0}\n")
    (tmp_path / "f.json").write_text(json.dumps({"seed": 3, "hosts": 4, "labels": {"zone": {"eu": 1.0}}}))
    assert load_spec(tmp_path / "f.yaml") == load_spec(tmp_path / "f.json") == FleetSpec(
        seed=3, hosts=4, labels={"zone": {"eu": 1.0}})
    (tmp_path / "bad.yaml").write_text("hosts: [1\n")
    with pytest.raises(FleetSpecError, match="is not YAML or JSON"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(FleetSpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")
    with pytest.raises(FleetSpecError, match="cannot read the fleet spec"):
        load_spec(tmp_path / "missing.yaml")


def test_the_command_refuses_a_bad_spec_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("hosts: 10\nbuilds:\n  - {release: 6.1-lp1, share: 0.5}\n")
    state = tmp_path / "state"
    assert main(["fleet", "--spec", str(spec), "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "bad_fleet_spec" in err
    assert "builds: the shares sum to 0.5, they must sum to 1" in err
    assert not state.exists(), "nothing started"
    assert main(["fleet", "--hosts", "-3", "--state-dir", str(state)]) == 2
    assert "--hosts must be 0 or more" in capsys.readouterr().err
    assert main(["fleet", "scale", "-1", "--state-dir", str(state)]) == 2
    assert not state.exists()
