"""The wire contract of livepatchd's MQTT API (pydantic models and topic names).

Imported by the daemon's service and mqtt layers and by the clients; it imports only pydantic and the stdlib.
Its modules, each exported here:

=================  ==============================================================================================
``kernel``         the kernel's own verbs (info, symbol.lookup, call, tasks)
``ftrace``         ftrace's verbs (ops, filters, tracers, profiler, hijacks), its events and its state section
``livepatch``      the live-patch verbs (load, enable, disable, transitions, call.read), events and state section
``patch_insight``  patch.check (stall prediction) and patch.effect (proof of effect), its state section
``catalog``        ``VERBS``: every verb, by name
``documents``      what the daemon publishes on its own: status, state, events
``events``         ``EVENTS``: every event type and the model of its data (the daemon's own events)
``envelope``       requests and replies; ``spec``: a verb's ``VerbSpec``
``fleet``          the fleet spec (``livepatchd fleet --spec``) and the hosts drawn from it
``topics``         every topic name; ``brokers``, ``discovery``, ``rollout``: broker nodes, discovery, rollouts
=================  ==============================================================================================
"""

from schemas import (
    brokers,
    catalog,
    discovery,
    documents,
    envelope,
    events,
    fleet,
    ftrace,
    kernel,
    kprobes,
    livepatch,
    patch_insight,
    retprobes,
    rollout,
    rollout_api,
    spec,
    topics,
)
from schemas._base import SCHEMA_VERSION, Address, HostId, Inbound, Outbound, RequestId
from schemas.catalog import VERBS
from schemas.documents import STALE_AFTER_BEATS, EventDoc, EventType, KernelState, Liveness, StateDoc, StatusDoc
from schemas.envelope import ErrorBody, Reply, Request
from schemas.kernel import (
    MAX_CALL_ARGS,
    CallData,
    CallPolicy,
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
from schemas.spec import VerbSpec
from schemas.topics import ALL_EVENTS, ALL_STATE, ALL_STATUS, ROOT, Topics, host_of, is_request_topic

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
    "CallPolicy",
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
    "brokers",
    "catalog",
    "discovery",
    "documents",
    "envelope",
    "events",
    "fleet",
    "ftrace",
    "host_of",
    "is_request_topic",
    "kernel",
    "kprobes",
    "livepatch",
    "patch_insight",
    "retprobes",
    "rollout",
    "rollout_api",
    "spec",
    "topics",
]
