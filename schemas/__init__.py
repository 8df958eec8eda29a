"""The wire contract of livepatchd's MQTT API (pydantic models and topic names).

Imported by the daemon's service and mqtt layers and by the clients; it imports only pydantic and the stdlib.
"""

from schemas._base import SCHEMA_VERSION, Address, HostId, Inbound, Outbound, RequestId
from schemas.documents import STALE_AFTER_BEATS, EventDoc, EventType, KernelState, Liveness, StateDoc, StatusDoc
from schemas.envelope import ErrorBody, Reply, Request
from schemas.spec import VerbSpec
from schemas.topics import ALL_EVENTS, ALL_STATE, ALL_STATUS, ROOT, Topics, host_of, is_request_topic
from schemas.verbs import (
    MAX_CALL_ARGS,
    VERBS,
    CallData,
    CallRequest,
    InfoData,
    InfoRequest,
    RequestCounts,
    SymbolData,
    SymbolLookupRequest,
    TaskEntry,
    TasksData,
    TasksRequest,
)

__all__ = [
    "ALL_EVENTS",
    "ALL_STATE",
    "ALL_STATUS",
    "MAX_CALL_ARGS",
    "ROOT",
    "SCHEMA_VERSION",
    "STALE_AFTER_BEATS",
    "VERBS",
    "Address",
    "CallData",
    "CallRequest",
    "ErrorBody",
    "EventDoc",
    "EventType",
    "HostId",
    "Inbound",
    "InfoData",
    "InfoRequest",
    "KernelState",
    "Liveness",
    "Outbound",
    "Reply",
    "Request",
    "RequestCounts",
    "RequestId",
    "StateDoc",
    "StatusDoc",
    "SymbolData",
    "SymbolLookupRequest",
    "TaskEntry",
    "TasksData",
    "TasksRequest",
    "Topics",
    "VerbSpec",
    "host_of",
    "is_request_topic",
]
