"""Write the JSON Schema of every model and the AsyncAPI document: ``python -m schemas.export [--check]``.

The outputs are checked in (``schemas/json/*.json``, ``schemas/asyncapi.json``); ``--check`` exits 1 when
they differ from what the models say (CI and a test run it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas._base import SCHEMA_VERSION
from schemas.catalog import VERBS
from schemas.discovery import DISCOVER, DISCOVER_REPLY_PREFIX, DiscoverRequest
from schemas.documents import COMPONENTS, EventDoc, StateDoc, StatusDoc
from schemas.envelope import ErrorBody, Reply
from schemas.events import EVENTS
from schemas.fleet import FleetSpec
from schemas.ftrace import TraceBatchDoc
from schemas.rollout import RolloutDoc, RolloutSpec
from schemas.rollout_api import VERBS as ORCHESTRATOR_VERBS
from schemas.rollout_api import DryRunData
from schemas.topics import ORCHESTRATOR_BASE, ROOT, verb_path

HERE = Path(__file__).resolve().parent
JSON_DIR = HERE / "json"
ASYNCAPI = HERE / "asyncapi.json"
REF = "#/components/schemas/{model}"

DOCUMENTS: tuple[type[BaseModel], ...] = (Reply, ErrorBody, StatusDoc, StateDoc, EventDoc, TraceBatchDoc,
                                          DiscoverRequest)
SPECS: tuple[type[BaseModel], ...] = (FleetSpec, RolloutSpec)
"""Files an operator writes (not MQTT messages): a JSON Schema each, none in the AsyncAPI document."""


Mode = Literal["validation", "serialization"]


def _mode(model: type[BaseModel]) -> Mode:
    """Requests are described as the daemon validates them; everything else as the daemon writes it."""
    inbound = ({spec.request for spec in VERBS.values()} | {v.request for v in ORCHESTRATOR_VERBS.values()}
               | set(SPECS))
    return "validation" if model in inbound else "serialization"


def _models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    for spec in VERBS.values():
        seen += [spec.request, spec.data]
    for v in ORCHESTRATOR_VERBS.values():
        seen += [m for m in (v.request, v.data) if m not in seen]
    return [*seen, RolloutDoc, DryRunData, *DOCUMENTS, *EVENTS.values(), *COMPONENTS.values()]


def _typed_components(state: dict[str, Any], ref: str) -> None:
    """StateDoc's ``components``: each section this version defines, by reference to its model (``ref``: where
    the models' schemas are; the document keeps the sections plain objects, see ``StateDoc``)."""
    components = state["properties"]["components"]
    components["properties"] = {name: {"$ref": ref.format(model=model.__name__)} for name, model in COMPONENTS.items()}


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def json_schemas() -> dict[str, str]:
    """File name -> content: one standalone JSON Schema (draft 2020-12) per model."""
    out = {}
    for model in [*_models(), *SPECS]:
        schema = model.model_json_schema(mode=_mode(model))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        if model is StateDoc:
            _typed_components(schema, "#/$defs/{model}")
            for section in COMPONENTS.values():
                section_schema = section.model_json_schema(mode="serialization")
                schema["$defs"].update(section_schema.pop("$defs", {}))
                schema["$defs"][section.__name__] = section_schema
        out[f"{model.__name__}.json"] = _dump(schema)
    return out


def asyncapi() -> str:
    """An AsyncAPI 2.6 document, from a client's point of view (clients publish requests, subscribe the rest)."""
    _, defs = models_json_schema([(m, _mode(m)) for m in _models()], ref_template=REF)
    schemas = defs.get("$defs", {})
    _typed_components(schemas["StateDoc"], REF)
    host = {"host": {"description": "the daemon's host id (one topic level)"}}
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in VERBS.values():
        name = spec.request.__name__
        messages[name] = {"name": name, "title": f"{spec.verb} request", "summary": spec.summary,
                          "contentType": "application/json", "payload": {"$ref": REF.format(model=name)},
                          "correlationId": {"location": "$message.payload#/request_id"}}
        channels[f"{ROOT}/{{host}}/request/{verb_path(spec.verb)}"] = {
            "description": f"{spec.summary} Reply data: {spec.data.__name__}.",
            "parameters": host,
            "publish": {"operationId": f"request_{spec.verb.replace('.', '_')}", "summary": spec.summary,
                        "bindings": {"mqtt": {"qos": 1, "retain": False}},
                        "message": {"$ref": f"#/components/messages/{name}"}},
        }
    for model, topic, retained, text in (
        (Reply, "reply", False, "Replies for MQTT 3.1.1 clients that gave no reply_to (v5 clients get theirs on "
                                "their response topic, with their correlation data), and refusals of requests "
                                "whose reply destination is refused: invalid_reply_topic (not a topic a reply can "
                                "be published to) or forbidden_reply_topic (a topic of livepatch/v1/ that is not a "
                                "reply topic)."),
        (StatusDoc, "status", True, "Birth, heartbeats (every heartbeat_s; a host is stale after 3 periods without "
                                    "one) and death (also the last will, whose time is null), retained."),
        (StateDoc, "state", True, "Every host-visible fact, versioned, retained."),
        (EventDoc, "events", False, "Events (transitions, errors, reconnects), with a per-boot sequence number; "
                                    "each type's data follows its own model (one message per type)."),
        (TraceBatchDoc, "trace", False, "Function-tracer records drained from the guest's per-CPU rings while a "
                                        "trace runs (trace.start), in batches, as trace lines and structured entries."),
    ):
        name = model.__name__
        messages[name] = {"name": name, "contentType": "application/json", "payload": {"$ref": REF.format(model=name)}}
        channels[f"{ROOT}/{{host}}/{topic}"] = {
            "description": text, "parameters": host,
            "subscribe": {"operationId": f"receive_{topic}", "bindings": {"mqtt": {"qos": 1, "retain": retained}},
                          "message": {"$ref": f"#/components/messages/{name}"}},
        }
    _orchestrator_channels(channels, messages)
    events = []
    for type_, data_model in EVENTS.items():
        name = f"event.{type_}"
        messages[name] = {
            "name": name, "title": f"{type_} event", "summary": (data_model.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/json",
            "payload": {"allOf": [{"$ref": REF.format(model="EventDoc")},
                                  {"type": "object", "required": ["type", "data"],
                                   "properties": {"type": {"const": type_},
                                                  "data": {"$ref": REF.format(model=data_model.__name__)}}}]}}
        events.append({"$ref": f"#/components/messages/{name}"})
    channels[f"{ROOT}/{{host}}/events"]["subscribe"]["message"] = {"oneOf": events}
    messages["DiscoverRequest"] = {"name": "DiscoverRequest", "contentType": "application/json",
                                   "payload": {"$ref": REF.format(model="DiscoverRequest")}}
    channels[DISCOVER] = {
        "description": "Discovery without retained wildcards: every online host answers with its current status on "
                       "the request's reply_to (which must be " + DISCOVER_REPLY_PREFIX + "<client id>). Used when "
                       "the retained statuses do not reach a wildcard subscription (RabbitMQ).",
        "publish": {"operationId": "discover", "bindings": {"mqtt": {"qos": 0, "retain": False}},
                    "message": {"$ref": "#/components/messages/DiscoverRequest"}},
    }
    channels[DISCOVER_REPLY_PREFIX + "{client_id}"] = {
        "description": "The answers to a client's discovery request: one StatusDoc per online host.",
        "parameters": {"client_id": {"description": "the asking client's MQTT client id (one topic level)"}},
        "subscribe": {"operationId": "receive_discovered", "bindings": {"mqtt": {"qos": 0, "retain": False}},
                      "message": {"$ref": "#/components/messages/StatusDoc"}},
    }
    doc = {
        "asyncapi": "2.6.0",
        "info": {"title": "livepatchd MQTT API", "version": f"{SCHEMA_VERSION}.0.0",
                 "description": "Control plane of an emulated arm64 kernel. Requests are QoS 1; every reply is "
                                "{request_id, ok, data | error: {code, message, details}}; a repeated request_id "
                                "gets the journaled reply without re-execution."},
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"messages": messages, "schemas": schemas},
    }
    return _dump(doc)


def _orchestrator_channels(channels: dict[str, Any], messages: dict[str, Any]) -> None:
    """The orchestrator's API: the host API's layout under the pseudo host ``_orchestrator``."""
    for v in ORCHESTRATOR_VERBS.values():
        name = v.request.__name__
        messages.setdefault(name, {"name": name, "contentType": "application/json",
                                   "payload": {"$ref": REF.format(model=name)},
                                   "correlationId": {"location": "$message.payload#/request_id"}})
        role = "operator" if v.mutating else "operator or observer"
        channels[f"{ORCHESTRATOR_BASE}/request/{verb_path(v.verb)}"] = {
            "description": f"{v.summary} Reply data: {v.data.__name__}. Role: {role}.",
            "publish": {"operationId": f"orchestrator_{v.verb.replace('.', '_')}", "summary": v.summary,
                        "bindings": {"mqtt": {"qos": 1, "retain": False}},
                        "message": {"$ref": f"#/components/messages/{name}"}},
        }
    messages["RolloutDoc"] = {"name": "RolloutDoc", "contentType": "application/json",
                              "payload": {"$ref": REF.format(model="RolloutDoc")}}
    channels[f"{ORCHESTRATOR_BASE}/rollout/{{name}}"] = {
        "description": "A rollout as the orchestrator holds it, republished on every change, retained.",
        "parameters": {"name": {"description": "the rollout's name (one topic level)"}},
        "subscribe": {"operationId": "receive_rollout", "bindings": {"mqtt": {"qos": 1, "retain": True}},
                      "message": {"$ref": "#/components/messages/RolloutDoc"}},
    }
    channels[f"{ORCHESTRATOR_BASE}/events"] = {
        "description": "Every execution change ({kind: execution, ...Execution}) and rollout event ({kind: event, "
                       "rollout, event, at, ...}), and each RolloutDoc change ({kind: rollout, ...}).",
        "subscribe": {"operationId": "receive_orchestrator_events",
                      "bindings": {"mqtt": {"qos": 1, "retain": False}},
                      "message": {"name": "OrchestratorEvent", "contentType": "application/json",
                                  "payload": {"type": "object", "required": ["kind", "worker"]}}},
    }
    channels[f"{ORCHESTRATOR_BASE}/reply/{{client_id}}"] = {
        "description": "Replies to a client's orchestrator requests (MQTT 3.1.1: its reply_to; MQTT 5: the "
                       "response topic).",
        "parameters": {"client_id": {"description": "the client's MQTT client id"}},
        "subscribe": {"operationId": "receive_orchestrator_reply",
                      "bindings": {"mqtt": {"qos": 1, "retain": False}},
                      "message": {"$ref": "#/components/messages/Reply"}},
    }


def expected() -> dict[Path, str]:
    files = {JSON_DIR / name: text for name, text in json_schemas().items()}
    files[ASYNCAPI] = asyncapi()
    return files


def stale() -> list[Path]:
    """Checked-in files that differ from the models (or are missing, or are left over)."""
    want = expected()
    bad = [p for p, text in want.items() if not p.exists() or p.read_text() != text]
    if JSON_DIR.is_dir():
        bad += [p for p in sorted(JSON_DIR.glob("*.json")) if p not in want]
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the checked-in files are current")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"stale: {p.relative_to(HERE.parent)} (run python -m schemas.export)", file=sys.stderr)
        return 1 if bad else 0
    JSON_DIR.mkdir(exist_ok=True)
    for p in JSON_DIR.glob("*.json"):
        p.unlink()
    for p, text in expected().items():
        p.write_text(text)
    print(f"wrote {len(expected())} files under {HERE.relative_to(HERE.parent)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
