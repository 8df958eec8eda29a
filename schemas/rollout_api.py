"""The orchestrator's control API: ``livepatch/v1/_orchestrator/request/rollout/<verb>`` requests and their data.

Every request carries ``request_id`` (and ``reply_to`` on MQTT 3.1.1) as host requests do; a repeated id is
answered from the orchestrator's store. ``mutating`` verbs need the operator role; the others (status, list,
report) an observer may send too (``deploy/livepatchd.acl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from schemas._base import Outbound
from schemas.envelope import Request
from schemas.fleet import Fault
from schemas.rollout import ExecState, Execution, RolloutDoc, RolloutSpec

RolloutName = str


class CreateRequest(Request):
    """Plan a rollout and store it (CREATED; ``rollout.start`` starts it). ``dry_run``: plan it, store nothing,
    send nothing that changes a host, and answer the plan with its projected duration."""

    spec: RolloutSpec
    dry_run: bool = False


class NameRequest(Request):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")


class ApproveRequest(NameRequest):
    wave: int | None = Field(default=None, ge=0, le=999, description="default: the wave waiting for approval")


class StatusRequest(NameRequest):
    states: list[ExecState] = Field(default_factory=list, description="only executions in these states")


class ListRequest(Request):
    """Every rollout, oldest first."""


class RehearseRequest(Request):
    """Run ``spec`` against a simulated twin of its targets (their builds, labels and patch stacks as their
    retained state says) with ``faults`` drawn by ``seed``, on a simulated clock: the same inputs give a
    byte-identical report."""

    spec: RolloutSpec
    faults: list[Fault] = Field(default_factory=list)
    seed: int = Field(default=0, ge=0)


class RolloutData(Outbound):
    rollout: RolloutDoc
    plan: dict[str, Any] | None = None


class StatusData(Outbound):
    rollout: RolloutDoc
    executions: list[Execution]


class ListData(Outbound):
    rollouts: list[RolloutDoc]


class DryRunData(Outbound):
    dry_run: bool = True
    plan: dict[str, Any] = Field(description="waves (hosts per wave), coverage, bundles")
    waves: list[list[str]]
    removed: dict[str, str] = Field(description="host -> why it would be REMOVED")
    offline: list[str] = Field(description="targets whose status is offline now")
    in_transition: list[str] = Field(description="targets with a transition in progress now")
    would_stall: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="host -> the tasks whose stacks would stall its transition now "
        "(patch.check by function, read-only; interruptible sleeps a fake signal clears are not listed)")
    unchecked: dict[str, str] = Field(default_factory=dict, description="host -> why its stalls were not predicted")
    supersedes: dict[str, list[str]] = Field(
        default_factory=dict, description="host -> the enabled patches an atomic-replace bundle would take over "
        "there (disabled as replaced by the transition's end, then unloaded by the rollout); their functions are "
        "in the stall prediction")
    projected_s: float = Field(description="time to 100% on the simulated clock, no faults")


class ReportData(Outbound):
    report: dict[str, Any] = Field(description="the report document (clients.rollout.report)")
    markdown: str


@dataclass(frozen=True)
class OrchestratorVerb:
    verb: str
    request: type[Request]
    data: type[Outbound]
    mutating: bool
    summary: str


VERBS: dict[str, OrchestratorVerb] = {v.verb: v for v in (
    OrchestratorVerb("rollout.create", CreateRequest, RolloutData, True,
                     "Plan and store a rollout (CREATED); with dry_run, answer DryRunData and store nothing."),
    OrchestratorVerb("rollout.start", NameRequest, RolloutData, True, "Start a CREATED rollout."),
    OrchestratorVerb("rollout.pause", NameRequest, RolloutData, True, "Stop releasing hosts (those in flight finish)."),
    OrchestratorVerb("rollout.resume", NameRequest, RolloutData, True,
                     "Go on after a pause or a wave below its success threshold."),
    OrchestratorVerb("rollout.approve", ApproveRequest, RolloutData, True, "Open an approval gate."),
    OrchestratorVerb("rollout.cancel", NameRequest, RolloutData, True, "Cancel the hosts not started yet."),
    OrchestratorVerb("rollout.rollback", NameRequest, RolloutData, True,
                     "Disable and unload the patch on every host reached, latest wave first."),
    OrchestratorVerb("rollout.status", StatusRequest, StatusData, False, "The rollout and its executions."),
    OrchestratorVerb("rollout.list", ListRequest, ListData, False, "Every rollout."),
    OrchestratorVerb("rollout.report", NameRequest, ReportData, False, "The report document and its Markdown."),
    OrchestratorVerb("rollout.rehearse", RehearseRequest, ReportData, False,
                     "Run a spec against a seeded simulated twin of its targets (simulated clock, deterministic)."),
)}
