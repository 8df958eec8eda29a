"""Two questions about a live patch that the other verbs do not answer: will its transition stall, and did it take
effect.

=============  =========  ==================================================================================
verb           mutating   does
=============  =========  ==================================================================================
patch.check    no         for a loaded patch not yet enabled: scan every task's stack now (the transition's
                          own check, in one stop-machine pause, nothing written) and say which tasks would
                          block its patching transition, why, and whether a fake signal would clear them
patch.effect   no         for an enabled patch: how many calls each replacement function took (guest-side
                          per-CPU counters in ``klp_ftrace_handler``) and whether the original function ran
                          since the transition completed; ``verified`` when every replacement ran and the
                          original did not
=============  =========  ==================================================================================

The retained state carries the effect of every enabled patch too: ``components.patch_effect``
(:class:`PatchEffectSection`), refreshed with the livepatch section, at each ``patch.effect`` and every few
seconds while a patch is enabled.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas._base import Inbound, Outbound
from schemas.envelope import Request
from schemas.livepatch import PatchName
from schemas.spec import VerbSpec

BlockReason = Literal["interruptible", "uninterruptible", "running", "unreliable_stack"]
BlockOutcome = Literal["signal_clears", "stalls"]

# -- patch.check --------------------------------------------------------------------------------------------------


class FunctionRef(Inbound):
    name: str = Field(min_length=1, max_length=256)
    sympos: int = Field(default=0, ge=0, le=1_000_000)


class PatchCheckRequest(Request):
    """Predict the stalls of a patching transition (read-only): of a loaded, not yet enabled patch (``name``), or
    — before anything is loaded, e.g. a rollout's dry run — of a patch replacing ``functions`` (as its manifest
    lists them; an atomic replace's NOP funcs are then not included)."""

    name: PatchName | None = None
    functions: list[FunctionRef] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _one(self) -> PatchCheckRequest:
        if (self.name is None) == (not self.functions):
            raise ValueError("give either name (a loaded patch) or functions (what a patch would replace)")
        return self


class PredictedBlocker(Outbound):
    pid: int
    comm: str
    cpu: int
    kind: str = Field(description="idle, worker or loadgen")
    reason: BlockReason = Field(description="interruptible / uninterruptible: asleep inside a function the patch "
                                "changes; running: executing (or runnable) inside one; unreliable_stack: the "
                                "unwinder cannot trust its stack")
    outcome: BlockOutcome = Field(description="signal_clears: the stall policy's fake signal ends the sleep, the "
                                  "task then switches; stalls: the transition waits for it (until the task leaves "
                                  "the function, or the stall policy gives up)")
    why: str = Field(description="what patch.transition would say: the transition's own wording")
    function: str | None = Field(description="the function of the check it is in (null: unreliable stack)")
    stack: list[str] = Field(description="its stack, innermost first, return addresses described at their call")


class PatchCheckData(Outbound):
    name: str
    tasks_scanned: int
    functions: list[str] = Field(description="the functions no task may be in to switch (the patch's; for an "
                                 "atomic replace also those it would drop)")
    would_block: bool = Field(description="some task would not switch at the first attempt")
    will_stall: bool = Field(description="some blocker would not be cleared by a fake signal")
    blockers: list[PredictedBlocker]
    signals: bool = Field(description="the daemon's stall policy sends fake signals to pending tasks")
    busy_with: str | None = Field(description="another patch in transition: enabling now would be refused until it "
                                  "ends")


# -- patch.effect -------------------------------------------------------------------------------------------------


class PatchEffectRequest(Request):
    """How many calls an enabled patch's replacement functions took, and whether the originals still run."""

    name: PatchName


class FuncEffect(Outbound):
    old_name: str
    new_name: str
    sysfs_name: str
    calls: int = Field(description="calls klp_ftrace_handler sent to this replacement since the patch was enabled")
    active: bool = Field(description="on top of its function's func stack: new calls come here (false: a later "
                         "patch replaces the function too)")
    old_calls: int | None = Field(description="calls of the original function since the transition completed "
                                  "(entries that klp_ftrace_handler let through to the original); null while the "
                                  "transition is in progress")


class PatchEffectData(Outbound):
    name: str
    completed: bool = Field(description="the patching transition is over")
    completed_s_ago: float | None = Field(description="seconds since it completed (null: in progress)")
    calls: int = Field(description="sum of the replacements' calls")
    old_ran: bool = Field(description="some original function ran since the transition completed")
    verified: bool = Field(description="completed, every replacement ran at least once, no original ran since")
    funcs: list[FuncEffect]


# -- the state section (``StateDoc.components["patch_effect"]``) --------------------------------------------------


class PatchEffectSummary(Outbound):
    calls: int
    old_calls: int | None
    verified: bool


class PatchEffectSection(Outbound):
    """``components.patch_effect`` of the retained state: every enabled patch's effect, by patch name."""

    patches: dict[str, PatchEffectSummary]


SPECS: list[VerbSpec] = [
    VerbSpec("patch.check", PatchCheckRequest, PatchCheckData,
             "Predict which tasks would block a loaded patch's transition now (and why), with their stacks."),
    VerbSpec("patch.effect", PatchEffectRequest, PatchEffectData,
             "An enabled patch's effect: calls per replacement function, and whether the originals still ran."),
]
