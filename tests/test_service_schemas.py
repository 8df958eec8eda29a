"""The wire contract: checked-in JSON Schema/AsyncAPI files are current, strict input, topic names."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import schemas
from schemas import (
    VERBS,
    CallRequest,
    InfoRequest,
    Reply,
    SymbolData,
    SymbolLookupRequest,
    Topics,
    host_of,
    is_request_topic,
)
from schemas import export as schema_export


def test_checked_in_schema_files_are_current() -> None:
    assert schema_export.stale() == [], "run: python -m schemas.export"
    assert schema_export.main(["--check"]) == 0


def test_asyncapi_document_covers_every_verb_and_document() -> None:
    doc = json.loads(schema_export.ASYNCAPI.read_text())
    assert doc["asyncapi"] == "2.6.0"
    channels = doc["channels"]
    for verb, spec in VERBS.items():
        channel = channels[f"livepatch/v1/{{host}}/request/{verb.replace('.', '/')}"]
        assert channel["publish"]["bindings"]["mqtt"]["qos"] == 1
        assert spec.request.__name__ in doc["components"]["schemas"]
        assert spec.data.__name__ in doc["components"]["schemas"]
    for topic, retained in (("status", True), ("state", True), ("events", False), ("reply", False)):
        assert channels[f"livepatch/v1/{{host}}/{topic}"]["subscribe"]["bindings"]["mqtt"]["retain"] is retained
    assert json.loads((schema_export.JSON_DIR / "CallRequest.json").read_text())["additionalProperties"] is False


def test_public_names_are_exported_and_sorted() -> None:
    # every module is exported too (issue 11 §4), but the export script (a command, imported by its test)
    public = {name for name in vars(schemas) if not name.startswith("_") and name not in {"annotations", "export"}}
    assert set(schemas.__all__) == public
    # constants, then classes, then functions (isort style), each alphabetically
    assert schemas.__all__ == sorted(schemas.__all__, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2,
                                                                     n))


def test_requests_are_strict() -> None:
    assert InfoRequest.model_validate({"request_id": "a"}).reply_to is None
    for bad in ({"request_id": "a", "extra": 1}, {"request_id": 1}, {"request_id": ""}, {"request_id": "a b"},
                {"request_id": "a", "reply_to": "x/#"}, {"request_id": "a", "reply_to": "$SYS/x"}, {}):
        with pytest.raises(ValidationError):
            InfoRequest.model_validate(bad)
    with pytest.raises(ValidationError):
        CallRequest.model_validate({"request_id": "a", "function": "f", "args": [True]})  # no bool -> int
    with pytest.raises(ValidationError):
        CallRequest.model_validate({"request_id": "a", "function": "f", "args": [1.0]})
    with pytest.raises(ValidationError):
        CallRequest.model_validate({"request_id": "a", "function": "f", "args": [-(1 << 63) - 1]})
    ok = CallRequest.model_validate({"request_id": "a", "function": "f", "args": [-1, (1 << 64) - 1]})
    assert ok.args == [-1, (1 << 64) - 1]


def test_addresses_accept_int_or_hex_and_serialize_as_hex() -> None:
    assert SymbolLookupRequest.model_validate({"request_id": "a", "address": "0xFF"}).address == 255
    assert SymbolLookupRequest.model_validate({"request_id": "a", "address": 255}).address == 255
    for bad in ("255", "0x", "0x1" + "0" * 16, -1, 1 << 64):
        with pytest.raises(ValidationError):
            SymbolLookupRequest.model_validate({"request_id": "a", "address": bad})
    with pytest.raises(ValidationError, match="exactly one"):
        SymbolLookupRequest.model_validate({"request_id": "a"})
    data = SymbolData(name="f", sympos=1, address=0xFFFF800080001000, size=8, is_func=True, offset=0,
                      description="f+0x0/0x8")
    assert json.loads(data.model_dump_json())["address"] == "0xffff800080001000"
    assert SymbolData.model_validate_json(data.model_dump_json()) == data


def test_reply_wire_form() -> None:
    assert json.loads(Reply.success("r", {"a": None}).to_json()) == {"request_id": "r", "ok": True, "data": {"a": None}}
    failure = json.loads(Reply.failure(None, "bad_request", "no").to_json())
    assert failure == {"request_id": None, "ok": False, "error": {"code": "bad_request", "message": "no",
                                                                   "details": {}}}
    # clients read tolerantly: a field added by a later daemon is ignored
    assert Reply.model_validate({"request_id": "r", "ok": True, "data": {}, "new_field": 1}).ok


def test_topics() -> None:
    t = Topics("web-01")
    assert t.request("symbol.lookup") == "livepatch/v1/web-01/request/symbol/lookup"
    assert t.request_filter == "livepatch/v1/web-01/request/#"
    assert (t.reply(), t.reply("lpsdk-1")) == ("livepatch/v1/web-01/reply", "livepatch/v1/web-01/reply/lpsdk-1")
    assert (t.status, t.state, t.events, t.trace) == tuple(f"livepatch/v1/web-01/{x}" for x in
                                                          ("status", "state", "events", "trace"))
    assert t.verb_of("livepatch/v1/web-01/request/call") == "call"
    assert t.verb_of("livepatch/v1/web-02/request/call") is None
    assert t.verb_of("livepatch/v1/web-01/request/a/b") == "a.b"
    assert t.verb_of("livepatch/v1/web-01/request/symbol/lookup") == "symbol.lookup"
    assert t.verb_of("livepatch/v1/web-01/request/symbol.lookup") == "request/symbol.lookup"  # names no verb
    assert host_of("livepatch/v1/web-01/status") == "web-01"
    assert is_request_topic("livepatch/v1/other/request/call")
    assert not is_request_topic("livepatch/v1/web-01/reply/request")
    assert host_of("other/v1/web-01/status") is None
    for bad in ("", "a/b", "+", "#", "$x"):
        with pytest.raises(ValueError, match="topic level"):
            Topics(bad)
    with pytest.raises(ValueError, match="dot-separated names"):
        t.request("a/b")
