"""The fleet spec: which simulated hosts a ``livepatchd fleet`` runs, and what each one carries.

A spec names the hosts (a count and an id prefix), the kernel builds and the share of hosts on each, label
distributions, workloads, and a fault plan drawn with ``seed``: the same spec always gives the same fleet.
Every host draws its build, labels and workload on its own from ``(seed, host id)``, so a host keeps them when
the fleet grows or shrinks; a fault given by ``count`` goes to exactly that many of the spec's hosts, one given
by ``share`` to each host with that probability. What a host ends up with is a :class:`HostPlan`.

``python -m schemas.export`` publishes the JSON Schema as ``schemas/json/FleetSpec.json``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, RootModel, field_validator, model_validator

from schemas._base import HostId, Inbound, Outbound

LabelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
LabelValue = Annotated[str, Field(max_length=128)]
Share = Annotated[float, Field(ge=0, le=1)]
Workload = Literal["idle", "steady", "mix"]
"""``idle``: nothing runs; ``steady``: calls over the corpus on every vCPU; ``mix``: the corpus plus the kernel-like
functions the example patches touch (``cmdline_proc_show``, getpid, call chains)."""
StallMode = Literal["interruptible", "uninterruptible"]

_SUM_TOLERANCE = 1e-6


def _sums_to_one(shares: list[float], what: str) -> None:
    total = math.fsum(shares)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{what}: the shares sum to {total:g}, they must sum to 1")


class BuildShare(Inbound):
    """A kernel build (by its version string) and the share of hosts that run it."""

    release: str = Field(min_length=1, max_length=64, description="a shipped build: 6.1-lp1, 6.1-lp2 or 6.6-lp1")
    share: Share


class _FaultBase(Inbound):
    count: int | None = Field(default=None, ge=0, description="exactly this many of the spec's hosts")
    share: Share | None = Field(default=None, description="each host with this probability")
    hosts: list[HostId] = Field(default_factory=list, description="these hosts too")

    @model_validator(mode="after")
    def _one_way(self) -> _FaultBase:
        if self.count is not None and self.share is not None:
            raise ValueError("give count or share, not both")
        if self.count is None and self.share is None and not self.hosts:
            raise ValueError("say which hosts: count, share or hosts")
        return self


class StallFault(_FaultBase):
    """A task sleeps inside ``function`` (a function a patch will touch) from boot on: interruptible, the
    transition's fake signal clears it; uninterruptible, the transition stalls until the stall policy acts."""

    kind: Literal["stall"]
    mode: StallMode = "interruptible"
    function: Literal["sleeper_middle"] = Field(default="sleeper_middle", description="where the task sleeps "
                                                "(the guest's sleeper chain; livepatch_sleeper patches it)")


class CrashFault(_FaultBase):
    """The host dies abruptly (connection cut, last will, memory lost) and boots again from its state dir."""

    kind: Literal["crash"]
    when: Literal["transition", "after_transition", "uptime"] = Field(
        default="after_transition", description="during a patch transition, right after one completes, or after "
        "at_s seconds of uptime")
    at_s: float = Field(default=5.0, ge=0, description="for when=uptime: seconds after going online")
    reboot_after_s: float = Field(default=2.0, ge=0, le=3600)
    times: int = Field(default=1, ge=1, le=100, description="crashes at most this many times")


class SlowFault(_FaultBase):
    """Every reply is delayed."""

    kind: Literal["slow"]
    delay_s: float = Field(default=0.5, gt=0, le=60)


class FlakyFault(_FaultBase):
    """The broker connection drops (last will) ``times`` times, each for ``down_s``, every ``every_s``."""

    kind: Literal["flaky"]
    down_s: float = Field(default=2.0, gt=0, le=3600)
    times: int = Field(default=1, ge=1, le=1000)
    every_s: float = Field(default=10.0, gt=0, le=86400, description="from going online to the first drop, and "
                           "between drops")


class RejectFault(_FaultBase):
    """The host trusts no signing key: every patch is refused (``untrusted_key``)."""

    kind: Literal["reject"]


class PanicFault(_FaultBase):
    """On this host the replacement of ``function`` panics when it runs: the kernel dies, the host reboots,
    and the crash-loop guard keeps the patch disabled."""

    kind: Literal["panic"]
    function: str = Field(default="cmdline_proc_show", min_length=1, max_length=128,
                          description="the patched function whose replacement panics here")


Fault = Annotated[StallFault | CrashFault | SlowFault | FlakyFault | RejectFault | PanicFault,
                  Field(discriminator="kind")]
FaultKind = Literal["stall", "crash", "slow", "flaky", "reject", "panic"]


class HostOverride(Inbound):
    """What one named host gets instead of its draw."""

    release: str | None = Field(default=None, min_length=1, max_length=64)
    labels: dict[LabelName, LabelValue] = Field(default_factory=dict)
    workload: Workload | None = None


def _idle_only() -> dict[Workload, float]:
    return {"idle": 1.0}


class FleetSpec(Inbound):
    """A fleet of simulated hosts (YAML or JSON). See the module's docstring for how hosts draw."""

    seed: int = Field(default=0, ge=0, description="the same seed gives the same fleet")
    hosts: int = Field(default=20, ge=0, le=100_000, description="how many hosts (ids <prefix>-0000, -0001, ...)")
    prefix: str = Field(default="sim", min_length=1, max_length=48, pattern=r"^[A-Za-z0-9_-]+$")
    nr_cpus: int = Field(default=1, ge=1, le=8, description="vCPUs of each host's kernel")
    builds: list[BuildShare] = Field(default_factory=lambda: [BuildShare(release="6.1-lp1", share=1.0)],
                                     min_length=1)
    labels: dict[LabelName, dict[LabelValue, Share]] = Field(
        default_factory=dict, description="per label, its values and the share of hosts with each")
    workloads: dict[Workload, Share] = Field(default_factory=_idle_only)
    faults: list[Fault] = Field(default_factory=list)
    overrides: dict[HostId, HostOverride] = Field(default_factory=dict)
    crash_loop_grace_s: float = Field(default=60.0, ge=0, description="a kernel panic this soon after a patch was "
                                      "enabled keeps that patch disabled at the next boot (0: never)")

    @field_validator("builds")
    @classmethod
    def _builds(cls, value: list[BuildShare]) -> list[BuildShare]:
        names = [b.release for b in value]
        if len(set(names)) != len(names):
            raise ValueError("a build is listed twice")
        _sums_to_one([b.share for b in value], "builds")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, dist in value.items():
            if not dist:
                raise ValueError(f"label {name!r} has no values")
            _sums_to_one(list(dist.values()), f"label {name!r}")
        return value

    @field_validator("workloads")
    @classmethod
    def _workloads(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("name at least one workload")
        _sums_to_one(list(value.values()), "workloads")
        return value

    def host_ids(self, count: int | None = None, first: int = 0) -> list[str]:
        """``count`` ids from number ``first`` (a fleet split over several runners: each runs its own range; the
        ids are the ones one runner of the whole fleet would give those hosts)."""
        n = self.hosts if count is None else count
        width = max(4, len(str(max(first + n - 1, self.hosts - 1, 0))))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(first, first + n)]


class FaultState(Outbound):
    """A fault a host carries, as its state shows it (an item of ``components.fleet.faults``): the fault's kind
    and parameters as the spec gave them (which hosts it went to — count, share, hosts — left out); a parameter
    another kind has is absent."""

    kind: FaultKind
    mode: StallMode | None = Field(default=None, description="stall")
    function: str | None = Field(default=None, description="stall, panic")
    when: Literal["transition", "after_transition", "uptime"] | None = Field(default=None, description="crash")
    at_s: float | None = Field(default=None, description="crash")
    reboot_after_s: float | None = Field(default=None, description="crash")
    times: int | None = Field(default=None, description="crash, flaky")
    delay_s: float | None = Field(default=None, description="slow")
    down_s: float | None = Field(default=None, description="flaky")
    every_s: float | None = Field(default=None, description="flaky")


class FleetSection(Outbound):
    """``components.fleet`` of a simulated host's state: what the fleet spec gave it (a dashboard shows the
    faults). Its labels are in ``components.labels`` like any host's."""

    release: str = Field(description="the kernel build the host boots (6.1-lp1, 6.1-lp2, 6.6-lp1)")
    workload: Workload
    seed: int = Field(description="the spec's seed the host's draws came from")
    faults: list[FaultState] = Field(default_factory=list)


class LabelsSection(RootModel[dict[LabelName, LabelValue]]):
    """``components.labels``: the host's labels (``--label k=v`` / ``LIVEPATCHD_LABELS``; a fleet host's drawn
    ones), name -> value; what a rollout's ``targets.labels`` and waves match."""

    model_config = ConfigDict(frozen=True)


class HostPlan(Outbound):
    """One host of a fleet, as drawn from the spec: what the runner builds it from."""

    host: HostId
    release: str
    nr_cpus: int = 1
    labels: dict[str, str] = Field(default_factory=dict)
    workload: Workload = "idle"
    faults: list[Fault] = Field(default_factory=list)
    crash_loop_grace_s: float = 60.0
    seed: int = 0
