"""Every event type has a model of its data, and every section of the state its model, listed in the exported JSON
Schema and AsyncAPI document; the daemon checks each event and section it publishes against its model (the test
fixtures fail on one that does not follow it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import get_args

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from pydantic import ValidationError

from clients.sdk import LivepatchClient
from daemon.fleet.host import fleet_section
from daemon.fleet.plan import draw
from daemon.service.pipeline.outbox import EventLog, StateBoard
from daemon.service.store.journal import Journal
from schemas import EventDoc, EventType, KernelState
from schemas import export as schema_export
from schemas.documents import COMPONENTS
from schemas.events import EVENTS, UnknownEvent, check_event
from schemas.fleet import FleetSection, FleetSpec, LabelsSection
from schemas.ftrace import FtraceEventType, FtraceSection
from schemas.kernel import KernelEventType
from schemas.kprobes import KprobeEventType
from schemas.livepatch import LivepatchSection, PatchEventType, TransitionStalledEvent
from schemas.retprobes import RetprobeEventType


def test_every_event_type_has_a_model_and_every_model_a_type() -> None:
    documented = {*get_args(EventType), *get_args(KernelEventType), *get_args(FtraceEventType),
                  *get_args(PatchEventType), *get_args(KprobeEventType), *get_args(RetprobeEventType)}
    assert set(EVENTS) == documented
    assert len(set(EVENTS.values())) == len(EVENTS), "one model per type"


def test_the_exported_contract_lists_each_event_model() -> None:
    asyncapi = json.loads(schema_export.ASYNCAPI.read_text())
    one_of = asyncapi["channels"]["livepatch/v1/{host}/events"]["subscribe"]["message"]["oneOf"]
    assert len(one_of) == len(EVENTS)
    for type_, model in EVENTS.items():
        assert (schema_export.JSON_DIR / f"{model.__name__}.json").is_file()
        message = asyncapi["components"]["messages"][f"event.{type_}"]
        typed = message["payload"]["allOf"][1]["properties"]
        assert typed["type"] == {"const": type_}
        assert typed["data"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert model.__name__ in asyncapi["components"]["schemas"]


def test_check_event_refuses_what_a_model_does_not_say() -> None:
    good = {"patch": "p", "target": "patched", "waited_s": 1.5,
            "blocked": [{"pid": 7, "comm": "worker1", "cpu": 1, "why": "sleeping on function f"}]}
    parsed = check_event("patch.transition.stalled", good)
    assert isinstance(parsed, TransitionStalledEvent)
    assert parsed.blocked[0].pid == 7
    with pytest.raises(UnknownEvent):
        check_event("patch.transition.wobbled", {})
    assert check_event("myext.thing", {"any": 1}) is None, "an extension's own type is its author's to document"
    with pytest.raises(ValueError, match="not in TransitionStalledEvent"):
        check_event("patch.transition.stalled", {**good, "extra": 1})
    with pytest.raises(ValidationError):
        check_event("patch.transition.stalled", {**good, "target": "sideways"})
    with pytest.raises(ValidationError):
        check_event("patch.transition.stalled", {"patch": "p"})


def test_an_event_doc_gives_its_data_as_the_model_of_its_type() -> None:
    doc = EventDoc(host="h", boot_seq=1, seq=1, time=0.0, type="patch.unloaded", data={"patch": "p"})
    typed = doc.typed_data()
    assert typed is not None
    assert typed.model_dump() == {"patch": "p"}
    assert EventDoc(host="h", boot_seq=1, seq=2, time=0.0, type="from.the.future", data={}).typed_data() is None


def test_the_daemon_records_an_event_that_does_not_follow_its_model() -> None:
    log = EventLog("h", 1, asyncio.Event())
    log.emit("patch.unloaded", patch="p")
    assert log.invalid == []
    log.emit("patch.unloaded", patch="p", surprise=True)
    log.emit("patch.wobbled")
    assert len(log.invalid) == 2
    assert log.invalid[0].startswith("patch.unloaded: ")
    assert log.peek() is not None, "published all the same"


def test_the_state_sections_are_listed_by_their_models() -> None:
    state = json.loads((schema_export.JSON_DIR / "StateDoc.json").read_text())
    assert state["properties"]["components"]["properties"] == {
        name: {"$ref": f"#/$defs/{model.__name__}"} for name, model in COMPONENTS.items()}
    assert {"LivepatchSection", "FtraceSection", "PatchSummary", "OpsSummary"} <= set(state["$defs"])
    asyncapi = json.loads(schema_export.ASYNCAPI.read_text())
    components = asyncapi["components"]["schemas"]["StateDoc"]["properties"]["components"]["properties"]
    assert components == {"ftrace": {"$ref": "#/components/schemas/FtraceSection"},
                          "livepatch": {"$ref": "#/components/schemas/LivepatchSection"},
                          "patch_effect": {"$ref": "#/components/schemas/PatchEffectSection"},
                          "kprobes": {"$ref": "#/components/schemas/KprobesSection"},
                          "kretprobes": {"$ref": "#/components/schemas/KretprobesSection"},
                          "fprobes": {"$ref": "#/components/schemas/FprobesSection"},
                          "labels": {"$ref": "#/components/schemas/LabelsSection"},
                          "fleet": {"$ref": "#/components/schemas/FleetSection"}}


def test_a_running_daemon_publishes_sections_that_follow_their_models(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            state = await c.state()
            assert state is not None
            livepatch, ftrace = state.section("livepatch"), state.section("ftrace")
            assert isinstance(livepatch, LivepatchSection)
            assert isinstance(ftrace, FtraceSection)
            assert ftrace.records > 10000
            assert state.components["ftrace"]["records"] == ftrace.records, "the document keeps plain objects"
    run(main())
    lpd.check_events()  # and every event and section it published so far followed its model


def test_the_daemon_records_a_section_that_does_not_follow_its_model(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    board = StateBoard(journal, "h", 1, KernelState(build_id="b", nr_cpus=1, booted_at=0.0), asyncio.Event())
    board.set_component("livepatch", {"patches": [], "transition": None, "trusted_keys": 0})
    assert board.invalid == []
    board.set_component("livepatch", {"patches": [], "transition": None, "trusted_keys": "many"})
    board.set_component("ftrace", {"ops": []})
    assert [line.split(":")[0] for line in board.invalid] == ["livepatch", "ftrace"]
    assert board.document().components["ftrace"] == {"ops": []}, "published all the same"
    journal.close()


def _board(tmp_path: Path) -> tuple[StateBoard, Journal]:
    journal = Journal(tmp_path / "journal.sqlite3")
    return StateBoard(journal, "h", 1, KernelState(build_id="b", nr_cpus=1, booted_at=0.0), asyncio.Event()), journal


def test_the_fleet_section_of_every_fault_kind_follows_its_model(tmp_path: Path) -> None:
    spec = FleetSpec.model_validate({"hosts": 6, "prefix": "f", "labels": {"zone": {"a": 0.5, "b": 0.5}},
                                     "faults": [
        {"kind": "slow", "hosts": ["f-0000"], "delay_s": 0.4},
        {"kind": "flaky", "hosts": ["f-0001"], "down_s": 1.0, "times": 2, "every_s": 0.3},
        {"kind": "reject", "hosts": ["f-0002"]},
        {"kind": "crash", "hosts": ["f-0003"], "when": "uptime", "at_s": 0.5, "reboot_after_s": 0.3},
        {"kind": "panic", "hosts": ["f-0004"], "function": "cmdline_proc_show"},
        {"kind": "stall", "count": 1, "mode": "uninterruptible"},
    ]})
    board, journal = _board(tmp_path)
    kinds = set()
    for plan in draw(spec):
        section = fleet_section(plan)
        board.set_component("fleet", section)
        board.set_component("labels", dict(plan.labels))
        typed = FleetSection.model_validate(section)
        assert typed.model_dump(mode="json", exclude_none=True) == section, "the model says every field it carries"
        kinds |= {f.kind for f in typed.faults}
        assert LabelsSection.model_validate(plan.labels).root == plan.labels
    assert kinds == {"slow", "flaky", "reject", "crash", "panic", "stall"}
    assert board.invalid == []
    journal.close()


def test_a_labels_or_fleet_section_that_does_not_follow_its_model_is_recorded(tmp_path: Path) -> None:
    board, journal = _board(tmp_path)
    board.set_component("labels", {"zone": "a", "team": "kernel"})
    assert board.invalid == []
    board.set_component("labels", {"bad name!": "a"})
    board.set_component("labels", {"zone": 3})
    board.set_component("fleet", {"release": "6.1-lp1", "workload": "idle", "seed": 0, "faults": [],
                                  "surprise": 1})
    board.set_component("fleet", {"release": "6.1-lp1", "workload": "busy", "seed": 0, "faults": []})
    board.set_component("fleet", {"release": "6.1-lp1", "workload": "idle", "seed": 0,
                                  "faults": [{"kind": "meteor"}]})
    assert [line.split(":")[0] for line in board.invalid] == ["labels", "labels", "fleet", "fleet", "fleet"]
    journal.close()


def test_every_section_a_labelled_daemon_publishes_has_its_model(tmp_path: Path, mosquitto: Mosquitto) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path, mosquitto.url, labels={"zone": "eu-1", "tier": "canary"})).start()
    try:
        async def main() -> None:
            async with LivepatchClient(lpd.url, lpd.host) as c:
                state = await c.state()
                assert state is not None
                assert set(state.components) <= set(COMPONENTS), "a section without a model"
                assert {"labels", "livepatch", "ftrace"} <= set(state.components)
                for name in state.components:
                    assert state.section(name) is not None
                labels = state.section("labels")
                assert isinstance(labels, LabelsSection)
                assert labels.root == {"zone": "eu-1", "tier": "canary"}
        run(main())
    finally:
        lpd.stop()  # and every event and section it published followed its model
