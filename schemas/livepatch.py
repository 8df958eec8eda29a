"""Request and reply models of the live-patch verbs: load (signed), enable, disable, unload, list, info, force,
transition progress — and ``call.read``, which shows what a patched function now renders.

=================  =========  ==================================================================================
verb               mutating   does
=================  =========  ==================================================================================
patch.load         yes        admit a signed bundle (signature, object, target kernel) and load it, disabled
patch.enable       yes        start the patching transition; reply at its start (``wait``: at its end)
patch.disable      yes        start the unpatching transition (or reverse the patch's own transition)
patch.unload       yes        remove a disabled (or replaced) patch's module
patch.force        yes        finish the patch's transition without stack checks (dangerous: pins the module)
patch.list         no         every loaded patch, and the transition in progress
patch.info         no         one patch as /sys/kernel/livepatch shows it, functions and states included
patch.transition   no         the transition's progress, task by task, with why each blocked task blocks
call.read          yes        call a reader ``fn(buf, size)`` (like proc_cmdline_read) and return its text
=================  =========  ==================================================================================

A patch's *desired* state (loaded, enabled) is journaled with each accepted change and re-applied at boot
before the daemon announces itself online. Events (``events`` topic, ``type`` one of :data:`PatchEventType`)
report each step; the retained state's ``components.livepatch`` section summarizes every patch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas._base import Address, Outbound
from schemas.envelope import Request
from schemas.spec import VerbSpec

PatchName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", min_length=1, max_length=55,
                                 description="the patch (module) name, as in /sys/kernel/livepatch")]
MAX_BUNDLE_B64 = ((64 << 20) + 2) // 3 * 4
"""The longest base64 text of a bundle (bundles are at most 64 MiB; the payload limit applies first)."""
MAX_WAIT_S = 3600.0
MAX_READ_BYTES = 65536

PatchEventType = Literal[
    "patch.loaded",                 # data: patch, key_id, replace, funcs
    "patch.unloaded",               # data: patch
    "patch.enabled",                # data: patch, request_id (the patching transition starts)
    "patch.disabled",               # data: patch, request_id, reversed (the unpatching transition starts)
    "patch.forced",                 # data: patch, target, request_id (consistency not guaranteed)
    "patch.transition.started",     # data: patch, target
    "patch.transition.stalled",     # data: patch, target, waited_s, blocked: [{pid, comm, cpu, why}]
    "patch.transition.reversed",    # data: patch, target (the new one)
    "patch.transition.completed",   # data: patch, target, duration_s
    "patch.restored",               # data: patches, enabled, failed, duration_s (at boot, before online)
    "patch.restore_failed",         # data: patch, code, message (a desired patch that could not be re-applied)
    "patch.held_back",              # data: patch, reason, message, panic, ... (the crash-loop guard, at boot)
]
"""Events of the live-patch verbs (on ``events``, with the daemon's own ``EventType``)."""

TransitionTarget = Literal["patched", "unpatched"]
TaskPatchState = Literal["idle", "unpatched", "patched"]

# -- shared parts ------------------------------------------------------------------------------------------------


class BlockedTask(Outbound):
    pid: int
    comm: str
    cpu: int
    why: str = Field(description="why the task did not switch at the last attempt, e.g. 'sleeping on function f'")


class TransitionProgress(Outbound):
    """The transition in progress (Linux: one at a time)."""

    patch: str
    target: TransitionTarget
    elapsed_s: float = Field(description="since the transition started (or was last reversed)")
    attempts: int = Field(description="klp_try_complete_transition attempts so far")
    signals_sent: int = Field(description="rounds of fake signals sent to the tasks still pending")
    tasks_total: int
    tasks_switched: int = Field(description="tasks already in the target state")
    stalled: bool = Field(description="still blocked after the daemon's stall threshold")
    blocked: list[BlockedTask]


class FuncInfo(Outbound):
    """One replaced function (klp_func)."""

    old_name: str
    old_sympos: int
    old_addr: Address
    new_name: str
    new_addr: Address
    sysfs_name: str = Field(description="'<function>,<sympos>', its /sys/kernel/livepatch directory name")
    patched: bool
    transition: bool
    nop: bool = Field(description="an atomic-replace NOP func: calls go back to the original")


class ObjectInfo(Outbound):
    name: str
    patched: bool
    funcs: list[FuncInfo]
    callbacks: list[str] = Field(description="the callbacks the object has: pre_patch, post_patch, ...")


class StateInfo(Outbound):
    id: int
    version: int


class PatchSummary(Outbound):
    name: str
    enabled: bool
    transition: bool
    replace: bool
    stack_order: int = Field(description="1-based position among loaded patches")
    forced: bool
    replaced: bool
    funcs: list[str] = Field(description="sysfs names of the functions it replaces")
    states: list[StateInfo] = Field(default_factory=list, description="its system states (klp_state id and "
                                    "version): what a later cumulative patch must carry to be compatible")


# -- patch.load ---------------------------------------------------------------------------------------------------


class PatchLoadRequest(Request):
    """Load a signed patch bundle. Refused, with nothing loaded, unless a trusted key signed exactly this
    object and manifest, the object is a well-formed AArch64 relocatable object defining every function the
    manifest names, and the manifest targets this kernel build with traceable functions."""

    bundle: str = Field(min_length=4, max_length=MAX_BUNDLE_B64,
                        description="base64 of the bundle file (livepatchd-bundle/1 JSON, as `lpctl patch build` "
                                    "and `lpctl patch sign` write it)")


class PatchLoadData(Outbound):
    name: str
    key_id: str | None = Field(description="sha256 of the signer's raw public key (hex)")
    object_sha256: str
    build_id: str
    replace: bool
    stack_order: int
    funcs: list[str]
    states: list[StateInfo]
    module_base: Address = Field(description="where the patch's module was mapped")


# -- patch.enable / patch.disable / patch.force -----------------------------------------------------------------


class PatchEnableRequest(Request):
    """Enable a loaded patch: the reply comes once its transition has started (``completed`` says whether it
    already finished). With ``wait``, the reply comes when it finishes, or after ``timeout_s`` (capped below
    the daemon's request timeout) with ``completed: false`` — the transition then goes on; other changes wait
    for the reply meanwhile."""

    name: PatchName
    wait: bool = False
    timeout_s: float = Field(default=10.0, gt=0, le=MAX_WAIT_S)


class PatchDisableRequest(Request):
    """Disable an enabled patch (unpatching transition); during the patch's own patching transition, reverse
    it. ``wait`` / ``timeout_s`` as for ``patch.enable``."""

    name: PatchName
    wait: bool = False
    timeout_s: float = Field(default=10.0, gt=0, le=MAX_WAIT_S)


class PatchForceRequest(Request):
    """klp_force_transition: switch every remaining task without checking its stack. Consistency is no longer
    guaranteed; after a forced unpatching transition the patch's module can never be unloaded (``forced``), nor,
    after a forced atomic replace, the modules of the patches it replaced."""

    name: PatchName


class PatchChangeData(Outbound):
    """A patch right after a change (``patch.enable``, ``patch.disable``, ``patch.force``)."""

    name: str
    enabled: bool
    forced: bool
    replaced: bool
    completed: bool = Field(description="no transition of this patch is in progress")
    reversed: bool = Field(default=False, description="patch.disable reversed the patch's own transition")
    waited_s: float | None = Field(default=None, description="how long the daemon waited (wait: true)")
    transition: TransitionProgress | None = Field(description="progress while the transition goes on")


# -- patch.unload -----------------------------------------------------------------------------------------------


class PatchUnloadRequest(Request):
    """Unload a disabled (or replaced) patch that is not in transition and was never forced."""

    name: PatchName


class PatchUnloadData(Outbound):
    name: str
    unloaded: bool


# -- patch.list / patch.info ------------------------------------------------------------------------------------


class PatchListRequest(Request):
    """Every loaded patch, in stack order, and the transition in progress."""


class PatchListData(Outbound):
    patches: list[PatchSummary]
    transition: TransitionProgress | None
    trusted_keys: int = Field(description="how many signing keys this daemon trusts (0: every load is refused)")


class PatchInfoRequest(Request):
    """One patch as /sys/kernel/livepatch/<patch> shows it, with its functions, states and signer."""

    name: PatchName


class SysfsFile(Outbound):
    path: str = Field(description="relative to /sys/kernel/livepatch")
    mode: str
    content: str


class PatchInfoData(Outbound):
    name: str
    enabled: bool
    transition: bool
    replace: bool
    stack_order: int
    forced: bool
    replaced: bool
    module: str
    module_base: Address
    build_id: str
    key_id: str | None
    states: list[StateInfo]
    objects: list[ObjectInfo]
    progress: TransitionProgress | None
    desired_enabled: bool | None = Field(description="what the daemon re-applies at boot (None: not journaled)")
    sysfs: list[SysfsFile]


# -- patch.transition -------------------------------------------------------------------------------------------


class PatchTransitionRequest(Request):
    """The transition in progress, task by task (``name``: only if it is that patch's; the patch must exist)."""

    name: PatchName | None = None


class TaskTransition(Outbound):
    pid: int
    comm: str
    cpu: int
    kind: str
    patch_state: TaskPatchState = Field(description="/proc/<pid>/patch_state: idle, unpatched or patched")
    pending: bool = Field(description="TIF_PATCH_PENDING: the task has not switched yet")
    blocked: str | None = Field(description="why it did not switch at the last attempt")


class PatchTransitionData(Outbound):
    in_progress: bool
    progress: TransitionProgress | None
    tasks: list[TaskTransition]


# -- call.read --------------------------------------------------------------------------------------------------


class CallReadRequest(Request):
    """Call a reader ``function(buf, size)`` on a vCPU — one that writes text into ``buf`` and returns the number
    of bytes written, like ``proc_cmdline_read`` (/proc/cmdline) — and return that text."""

    function: str = Field(min_length=1, max_length=256)
    sympos: int = Field(default=0, ge=0, le=1_000_000)
    size: int = Field(default=4096, ge=1, le=MAX_READ_BYTES, description="the buffer's size in bytes")
    cpu: int = Field(default=0, ge=0, le=63)


class CallReadData(Outbound):
    function: str
    cpu: int
    length: int = Field(description="the function's return value: bytes written (at most size)")
    text: str = Field(description="what it wrote, decoded as UTF-8 (invalid bytes replaced)")


SPECS: list[VerbSpec] = [
    VerbSpec("patch.load", PatchLoadRequest, PatchLoadData,
             "Load a signed live-patch bundle (base64); refused with nothing loaded unless trusted and valid.",
             mutating=True),
    VerbSpec("patch.enable", PatchEnableRequest, PatchChangeData,
             "Enable a loaded patch; replies once its transition started (wait: once it completed).", mutating=True),
    VerbSpec("patch.disable", PatchDisableRequest, PatchChangeData,
             "Disable a patch (unpatching transition), or reverse its transition in progress.", mutating=True),
    VerbSpec("patch.unload", PatchUnloadRequest, PatchUnloadData,
             "Unload a disabled or replaced patch's module.", mutating=True),
    VerbSpec("patch.force", PatchForceRequest, PatchChangeData,
             "Force the patch's transition to complete without stack checks (dangerous; may pin modules).",
             mutating=True),
    VerbSpec("patch.list", PatchListRequest, PatchListData,
             "Every loaded patch in stack order, and the transition in progress."),
    VerbSpec("patch.info", PatchInfoRequest, PatchInfoData,
             "One patch as /sys/kernel/livepatch shows it: flags, objects, functions, states, signer."),
    VerbSpec("patch.transition", PatchTransitionRequest, PatchTransitionData,
             "The transition in progress: target, attempts, signals, and every task's patch state and blocker."),
    VerbSpec("call.read", CallReadRequest, CallReadData,
             "Call a reader fn(buf, size) such as proc_cmdline_read on a vCPU and return the text it wrote.",
             mutating=True),
]
"""This module's verbs; schemas.catalog.VERBS includes them."""


# -- events (on ``events``: ``EventDoc.data`` of each type) ------------------------------------------------------


class PatchLoadedEvent(Outbound):
    """``patch.loaded``."""

    patch: str
    key_id: str | None = Field(description="the signer's key id; None: signatures are not checked")
    replace: bool
    funcs: list[str] = Field(description="sysfs names of the functions it replaces")


class PatchUnloadedEvent(Outbound):
    """``patch.unloaded``."""

    patch: str


class PatchEnabledEvent(Outbound):
    """``patch.enabled``: a request enabled it; its patching transition starts."""

    patch: str
    request_id: str | None


class PatchDisabledEvent(Outbound):
    """``patch.disabled``: a request disabled it; its unpatching transition starts, or (``reversed``) its own
    patching transition turns around."""

    patch: str
    request_id: str | None
    reversed: bool


class PatchForcedEvent(Outbound):
    """``patch.forced``: its transition was forced (consistency not guaranteed; the module stays loaded)."""

    patch: str
    target: TransitionTarget
    request_id: str | None


class TransitionStartedEvent(Outbound):
    """``patch.transition.started``."""

    patch: str
    target: TransitionTarget


class TransitionStalledEvent(Outbound):
    """``patch.transition.stalled``: still blocked ``transition_stall_s`` after it started."""

    patch: str
    target: TransitionTarget
    waited_s: float
    blocked: list[BlockedTask]


class TransitionReversedEvent(Outbound):
    """``patch.transition.reversed``."""

    patch: str
    target: TransitionTarget = Field(description="the new target")
    by: Literal["request", "policy"]


class TransitionCompletedEvent(Outbound):
    """``patch.transition.completed``."""

    patch: str
    target: TransitionTarget
    duration_s: float | None = Field(description="since the transition started (None: not known)")


class RestoreFailure(Outbound):
    patch: str
    code: str
    message: str


class HeldBack(Outbound):
    """A desired-enabled patch the crash-loop guard did not enable at boot: the kernel panicked soon after it was
    enabled (its desired state is now disabled; enabling it again retries it)."""

    patch: str
    reason: Literal["crash_loop"]
    message: str
    panic: str = Field(description="the panic's message")
    panic_at: float
    panic_boot_seq: int
    enabled_at: float = Field(description="when its transition to patched had completed")


class PatchRestoredEvent(Outbound):
    """``patch.restored``: the desired patches re-applied at boot, before the daemon went online."""

    patches: list[str] = Field(description="loaded again")
    enabled: list[str] = Field(description="enabled again (transition completed)")
    failed: list[RestoreFailure]
    held_back: list[str] = Field(default_factory=list, description="kept disabled by the crash-loop guard")
    duration_s: float


class PatchHeldBackEvent(HeldBack):
    """``patch.held_back``: the crash-loop guard kept a patch disabled at boot."""


class PatchRestoreFailedEvent(Outbound):
    """``patch.restore_failed``: a desired patch that could not be re-applied at boot."""

    patch: str
    code: str
    message: str


EVENTS: dict[str, type[Outbound]] = {
    "patch.loaded": PatchLoadedEvent,
    "patch.unloaded": PatchUnloadedEvent,
    "patch.enabled": PatchEnabledEvent,
    "patch.disabled": PatchDisabledEvent,
    "patch.forced": PatchForcedEvent,
    "patch.transition.started": TransitionStartedEvent,
    "patch.transition.stalled": TransitionStalledEvent,
    "patch.transition.reversed": TransitionReversedEvent,
    "patch.transition.completed": TransitionCompletedEvent,
    "patch.restored": PatchRestoredEvent,
    "patch.restore_failed": PatchRestoreFailedEvent,
    "patch.held_back": PatchHeldBackEvent,
}
"""This module's events, by type: the model of each one's ``data`` (``schemas.events.EVENTS`` includes them)."""


# -- the state section (``StateDoc.components["livepatch"]``) ---------------------------------------------------


class TransitionSummary(Outbound):
    patch: str
    target: TransitionTarget
    stalled: bool = Field(description="still blocked transition_stall_s after it started")
    blocked: list[int] = Field(description="pids of the tasks holding it up (patch.transition tells why)")


class RestoredSummary(Outbound):
    """What the restore at this boot re-applied."""

    loaded: list[str]
    enabled: list[str]
    failed: list[RestoreFailure]
    held_back: list[HeldBack] = Field(default_factory=list, description="kept disabled by the crash-loop guard")


class LivepatchSection(Outbound):
    """``components.livepatch`` of the retained state: the loaded patches, the transition, the trusted keys."""

    patches: list[PatchSummary]
    transition: TransitionSummary | None
    trusted_keys: int = Field(description="how many keys the daemon trusts to sign patches")
    restored: RestoredSummary | None = Field(default=None, description="absent when nothing was restored")
