"""The rollout contract: what an operator asks the orchestrator for, and the documents it keeps.

A rollout takes one patch (one signed bundle per kernel build id) to a set of hosts in waves. Its controls are
the union of AWS IoT Jobs (rate, exponential rate, abort criteria, timeouts, retries, scheduling) and hawkBit
(groups with success thresholds, pause, approval), plus what only live patching needs (stall policy, stall
prediction, revert, atomic replace).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from schemas._base import Inbound, Outbound


class ExecState(StrEnum):
    """One host's execution of a rollout (AWS IoT Jobs' states plus the live-patch ones)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"        # bundle being loaded
    TRANSITIONING = "TRANSITIONING"    # enabled, transition under way
    STALLED = "STALLED"                # transition blocked past the stall policy's wait
    SUCCEEDED = "SUCCEEDED"
    VERIFIED = "VERIFIED"              # proof of effect seen (patch.effect)
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"              # the host refused the bundle (signature, build id, state)
    REVERTED = "REVERTED"              # disabled and unloaded again (stall policy or rollback)
    CANCELED = "CANCELED"
    REMOVED = "REMOVED"                # never started: no bundle for its build, or it left the target set


TERMINAL = frozenset({ExecState.SUCCEEDED, ExecState.VERIFIED, ExecState.FAILED, ExecState.TIMED_OUT,
                      ExecState.REJECTED, ExecState.REVERTED, ExecState.CANCELED, ExecState.REMOVED})
ACTIVE = frozenset({ExecState.IN_PROGRESS, ExecState.TRANSITIONING, ExecState.STALLED})
SUCCESS = frozenset({ExecState.SUCCEEDED, ExecState.VERIFIED})
NOT_EXECUTED_STATES = frozenset({ExecState.REMOVED.value, ExecState.CANCELED.value})
"""Left out of a wave's success share and of the abort criteria's executed count."""

FailureType = Literal["FAILED", "TIMED_OUT", "REJECTED", "STALLED", "REVERTED", "ALL"]

RolloutState = Literal["CREATED", "SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED", "COMPLETED", "CANCELED",
                       "ROLLING_BACK", "ROLLED_BACK"]


class Targets(Inbound):
    """Which hosts: the union of ``hosts`` (ids), ``globs`` (fnmatch on ids), ``labels`` (every pair must match
    the host's ``components.labels``) and ``build_ids``; resolved from the hosts' retained state documents."""

    hosts: list[str] = Field(default_factory=list)
    globs: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    build_ids: list[str] = Field(default_factory=list)
    dynamic: bool = Field(default=False, description="hosts that appear later and match join the open waves")

    @model_validator(mode="after")
    def _some(self) -> Targets:
        if not (self.hosts or self.globs or self.labels or self.build_ids):
            raise ValueError("targets: name at least one of hosts, globs, labels, build_ids")
        return self


class WaveGroup(Inbound):
    """An explicit wave: the targets matching ``glob`` and/or ``labels`` (not already in an earlier wave)."""

    glob: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class Waves(Inbound):
    """How to split the targets: ``count`` equal groups; or a ``canary`` of k hosts then ``percentages`` of
    the rest (summing to 100); or explicit ``groups``. ``success_threshold`` is the % SUCCEEDED a wave needs;
    then ``on_success`` says whether the next wave starts by itself or the rollout pauses for ``resume``."""

    count: int | None = Field(default=None, ge=1, le=1000)
    canary: int | None = Field(default=None, ge=1)
    percentages: list[float] = Field(default_factory=list)
    groups: list[WaveGroup] = Field(default_factory=list)
    success_threshold: float = Field(default=100.0, ge=0, le=100)
    on_success: Literal["next", "pause"] = "next"
    approval: list[int] = Field(default_factory=list,
                                description="wave indexes (0-based) that wait for 'approve' before they start")

    @model_validator(mode="after")
    def _adds_up(self) -> Waves:
        kinds = sum((self.count is not None, self.canary is not None or bool(self.percentages), bool(self.groups)))
        if kinds > 1:
            raise ValueError("waves: use one of count, canary+percentages, groups")
        if self.percentages and (any(p <= 0 for p in self.percentages)
                                 or abs(sum(self.percentages) - 100.0) > 1e-6):
            raise ValueError(f"waves: percentages must be positive and sum to 100 (got {sum(self.percentages)})")
        if any(i < 0 for i in self.approval):
            raise ValueError("waves: approval indexes are >= 0")
        return self


class Rate(Inbound):
    """Hosts started per minute: constant ``per_minute``, or exponential (``base_per_minute`` × ``factor`` each
    time ``increase_every`` more hosts were notified / succeeded, as AWS's ``rateIncreaseCriteria``)."""

    per_minute: float | None = Field(default=None, gt=0, le=1_000_000)
    base_per_minute: float | None = Field(default=None, gt=0, le=1_000_000)
    factor: float = Field(default=2.0, ge=1.1, le=5.0)
    increase_every: int = Field(default=10, ge=1)
    increase_on: Literal["notified", "succeeded"] = "succeeded"
    max_in_progress: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> Rate:
        if self.per_minute is not None and self.base_per_minute is not None:
            raise ValueError("rate: per_minute (constant) or base_per_minute (exponential), not both")
        return self


class AbortCriterion(Inbound):
    failure_type: FailureType
    threshold_pct: float = Field(gt=0, le=100)
    min_executed: int = Field(default=1, ge=1)
    scope: Literal["wave", "rollout"] = "rollout"


class Abort(Inbound):
    criteria: list[AbortCriterion] = Field(default_factory=list)
    action: Literal["cancel", "rollback"] = "cancel"


class Timeouts(Inbound):
    """Seconds (on the orchestrator's clock). ``in_progress_s``: the whole host execution; the others: one
    phase each (the load reply, the enable reply, the transition's completion)."""

    in_progress_s: float = Field(default=600.0, gt=0, le=7 * 86400)
    load_s: float = Field(default=30.0, gt=0, le=3600)
    enable_s: float = Field(default=30.0, gt=0, le=3600)
    transition_s: float = Field(default=300.0, gt=0, le=86400)


class Retry(Inbound):
    failure_type: Literal["FAILED", "TIMED_OUT", "ALL"]
    retries: int = Field(ge=0, le=10)
    backoff_s: float = Field(default=5.0, ge=0, le=3600)
    jitter: float = Field(default=0.2, ge=0, le=1)


class StallPolicy(Inbound):
    """kpatch's default: 15 s blocked → fake signal → 60 s more → revert."""

    wait_s: float = Field(default=15.0, ge=0)
    signal: bool = True
    then_wait_s: float = Field(default=60.0, ge=0)
    action: Literal["revert", "force"] = "revert"
    predict: Literal["proceed", "wait", "skip"] = Field(
        default="proceed", description="before each enable, patch.check: proceed anyway, wait until clear, or "
                                       "skip (REMOVED) a host whose transition would stall")


class Window(Inbound):
    """A recurring maintenance window: ``start_s`` seconds after each ``every_s`` boundary, ``length_s`` long.
    Outside it no host starts; at its end a running rollout pauses (state SCHEDULED) and resumes at the next."""

    every_s: float = Field(default=86400.0, gt=0)
    start_s: float = Field(default=0.0, ge=0)
    length_s: float = Field(gt=0)


class Schedule(Inbound):
    start_at: float | None = Field(default=None, description="Unix time on the orchestrator's clock")
    end_at: float | None = None
    windows: list[Window] = Field(default_factory=list)


class RolloutSpec(Inbound):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    patch: str = Field(min_length=1, max_length=64, description="the patch name inside the bundles")
    bundles: dict[str, str] = Field(description="build id -> path of the signed bundle for that kernel build")
    targets: Targets
    waves: Waves = Field(default_factory=lambda: Waves(count=1))
    rate: Rate = Field(default_factory=Rate)
    abort: Abort = Field(default_factory=Abort)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: list[Retry] = Field(default_factory=list, max_length=2)
    stall: StallPolicy = Field(default_factory=StallPolicy)
    schedule: Schedule = Field(default_factory=Schedule)
    verify: bool = Field(default=False, description="after SUCCEEDED, ask patch.effect for proof (VERIFIED)")
    seed: int = Field(default=0, description="seeds the retry jitter (deterministic replay)")

    @model_validator(mode="after")
    def _bundles(self) -> RolloutSpec:
        if not self.bundles:
            raise ValueError("bundles: at least one build id -> bundle")
        return self


class Execution(Outbound):
    rollout: str
    host: str
    wave: int
    build_id: str | None
    state: ExecState
    version: int = Field(description="grows by one per change")
    attempts: int
    details: dict[str, Any] = Field(default_factory=dict)
    updated_at: float


class WaveDoc(Outbound):
    index: int
    hosts: int
    counts: dict[str, int]
    state: Literal["pending", "waiting_approval", "running", "done", "paused"]


class RolloutDoc(Outbound):
    """Retained on ``livepatch/v1/_orchestrator/rollout/<name>``: the rollout as the orchestrator holds it."""

    name: str
    state: RolloutState
    version: int
    current_wave: int
    waves: list[WaveDoc]
    counts: dict[str, int]
    reason: str | None = None
    created_at: float
    updated_at: float
