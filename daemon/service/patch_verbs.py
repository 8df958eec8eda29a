"""The live-patch verbs: load signed bundles, enable, disable, unload, list, info, force, transitions.

:func:`register` serves ``patch.*`` (and ``call.read``) for one :class:`Livepatch` and returns the
:class:`PatchVerbs` that owns three more duties:

* **desired state** — each accepted change is recorded in the :class:`DesiredState` store (kind
  ``"livepatch"``: the bundle as blob, ``{"enabled": bool}``, in load order) in the same transaction as its
  request id; :meth:`PatchVerbs.restore` re-loads and re-enables those patches at boot (waiting for each
  transition) before the journal replay and before the daemon announces itself online, like kpatch's
  ``load --all`` at boot. A request replayed after a crash whose change already reached the store is answered
  from the restored state, never applied twice;
* **events** — Livepatch's own (loaded, unloaded, transition started, stalled, reversed, completed: it is
  subscribed to once), with each request's enable or disable announced with its transition, and ``forced``,
  all on the ``events`` topic (types in ``schemas.livepatch.PatchEventType``);
* **state** — the retained state's ``components.livepatch`` section: patches, the transition, the keys.

Signature checks are Livepatch's (``trusted_keys``): a bundle is refused before anything is loaded. With no
trusted key configured, every load is refused with a hint saying how to configure one.

:class:`PatchVerbs` holds the changes (load, enable, disable, force, unload); its other parts are mixed in from
``patch_events`` (events, state), ``patch_views`` (replies describing patches and the transition) and
``patch_desired`` (desired state, restore at boot); the trusted keys are ``patch_trust``'s.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import TypeVar, cast

import structlog

from daemon.errors import BundleFormatError, GuestCallTimeout, PatchStateError
from daemon.kernel.kernel import Kernel
from daemon.livepatch import signing
from daemon.livepatch.bundle import PatchBundle
from daemon.livepatch.core import Livepatch
from daemon.livepatch.klp import KlpPatch
from daemon.livepatch.transition import STATE_NAMES
from daemon.service.crash_guard import CrashLoopGuard
from daemon.service.kernel_calls import KernelCalls
from daemon.service.patch_desired import KIND, PatchDesired, RestoreReport
from daemon.service.patch_events import Change, PatchEvents
from daemon.service.patch_trust import NO_KEYS_HINT, NoTrustedKeys, dev_signing_key, trusted_keys
from daemon.service.patch_views import PatchViews
from daemon.service.pipeline.core import RequestContext, Service
from daemon.service.store.desired import DesiredState
from schemas.livepatch import (
    CallReadData,
    CallReadRequest,
    PatchChangeData,
    PatchDisableRequest,
    PatchEnableRequest,
    PatchForceRequest,
    PatchInfoData,
    PatchInfoRequest,
    PatchListData,
    PatchListRequest,
    PatchLoadData,
    PatchLoadRequest,
    PatchTransitionData,
    PatchTransitionRequest,
    PatchUnloadData,
    PatchUnloadRequest,
    StateInfo,
    TaskPatchState,
    TaskTransition,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")


# -- the verbs -------------------------------------------------------------------------------------------------


class PatchVerbs(PatchEvents, PatchViews, PatchDesired):
    """The live-patch use-cases of one daemon (see the module docstring)."""

    def __init__(self, service: Service, kernel: Kernel, livepatch: Livepatch, desired: DesiredState | None, *,
                 restore_timeout_s: float = 30.0, guard: CrashLoopGuard | None = None) -> None:
        self.service = service
        self.guard = guard
        self.kernel = kernel
        self.lp = livepatch
        self.desired = desired
        self.restore_timeout_s = restore_timeout_s
        self.restored: RestoreReport | None = None
        self._change: Change | None = None  # the request whose enable/disable Livepatch is making (lp.lock held)
        self._started: dict[str, float] = {}  # patch -> when its current transition started (or reversed)
        self._key_ids: dict[str, str | None] = {}  # patch -> its signer's key id
        self._forcing: set[str] = set()  # patches being forced (their completion counts as forced)
        self.also_publish = []
        livepatch.subscribe(self._on_livepatch_event)

    # -- changes ---------------------------------------------------------------------------------------------

    def _wait_cap(self, timeout_s: float) -> float:
        """A wait inside a handler must end before the service's request timeout cuts it off."""
        return max(0.0, min(timeout_s, self.service.request_timeout_s * 0.8))

    def load(self, bundle: PatchBundle, raw: bytes, request_id: str | None) -> PatchLoadData:
        if self.lp.trusted_keys is not None and not self.lp.trusted_keys and bundle.signature is not None:
            raise NoTrustedKeys(f"patch {bundle.name} is refused: this daemon trusts no signing key",
                                patch=bundle.name, hint=NO_KEYS_HINT)
        key_id = bundle.signature.key_id if bundle.signature is not None else None
        with self.lp.lock:
            patch = self.lp.load(bundle)  # admission first: nothing is loaded unless every check passes
            if self.desired is not None:
                try:
                    self.desired.put(KIND, patch.name, {"enabled": False, "key_id": key_id,
                                                        "object_sha256": signing.object_digest(bundle.object)},
                                     blob=raw, request_id=request_id)
                except BaseException:
                    self.lp.unload(patch.name)
                    raise
            data = self._load_reply(patch, key_id, bundle)
        self.publish()
        return data

    def _load_reply(self, p: KlpPatch, key_id: str | None, bundle: PatchBundle) -> PatchLoadData:
        return PatchLoadData(name=p.name, key_id=key_id, object_sha256=signing.object_digest(bundle.object),
                             build_id=p.manifest.build_id, replace=p.replace,
                             stack_order=self.lp.patches.index(p) + 1,
                             funcs=[f.sysfs_name for f in p.funcs() if not f.nop],
                             states=[StateInfo(id=i, version=v) for i, v in sorted(p.states.items())],
                             module_base=p.module.text[0])

    def enable(self, name: str, request_id: str | None, *, wait: bool = False,
               timeout_s: float = 10.0) -> PatchChangeData:
        with self.lp.lock:
            self._change = Change("enable", name, request_id)  # its events are sent as its transition starts
            try:
                self.lp.enable(name, wait=False)
            finally:
                self._change = None
            self._record(name, {"enabled": True, "held_back": None}, request_id)  # an operator's retry clears it
        return self._after_change(name, wait, timeout_s)

    def disable(self, name: str, request_id: str | None, *, wait: bool = False,
                timeout_s: float = 10.0) -> PatchChangeData:
        with self.lp.lock:
            tr = self.lp.transition
            reversing = tr is not None and tr.patch.name == name
            self._change = Change("disable", name, request_id)
            try:
                self.lp.disable(name, wait=False)
            finally:
                self._change = None
            self._record(name, {"enabled": False}, request_id)
        return self._after_change(name, wait, timeout_s, reversed_=reversing)

    def _after_change(self, name: str, wait: bool, timeout_s: float, *, reversed_: bool = False) -> PatchChangeData:
        self.publish()
        waited = None
        if wait:
            t0 = time.monotonic()
            self.lp.wait(self._wait_cap(timeout_s))
            waited = round(time.monotonic() - t0, 6)
        return self.change_data(name, waited_s=waited, reversed_=reversed_)

    def force(self, name: str, request_id: str | None) -> PatchChangeData:
        with self.lp.lock:
            tr = self.lp.transition
            if tr is None or tr.patch.name != name:
                self.lp.patch(name)  # PatchNotFound first
                raise PatchStateError(f"patch {name!r} is not in transition: nothing to force", patch=name)
            target = STATE_NAMES.get(tr.target, str(tr.target))
            log.warning("transition_forced", patch=name, target=target,
                        note="tasks switched without a stack check; the module can never be unloaded")
            self.emit("patch.forced", patch=name, target=target, request_id=request_id)
            self._forcing.add(name)
            try:
                self.lp.force(name)  # the completion it causes is counted as forced
            finally:
                self._forcing.discard(name)
            self._record(name, {"forced": True}, request_id)
        self.publish()
        return self.change_data(name)

    def unload(self, name: str, request_id: str | None) -> PatchUnloadData:
        with self.lp.lock:
            self.lp.unload(name)
            if self.desired is not None:
                self.desired.delete(KIND, name, request_id=request_id)
        self.publish()
        return PatchUnloadData(name=name, unloaded=True)


def decode_bundle(text: str) -> tuple[PatchBundle, bytes]:
    """The request's base64 bundle: (parsed bundle, the file's bytes)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError("bundle is not valid base64 (send base64 of the bundle file)",
                                field="bundle") from None
    return PatchBundle.from_bytes(raw, "the request's bundle"), raw


def register(service: Service, kernel: Kernel, livepatch: Livepatch, *, desired: DesiredState | None = None,
             restore_timeout_s: float = 30.0, call_timeout_s: float = 10.0,
             calls: KernelCalls | None = None, guard: CrashLoopGuard | None = None) -> PatchVerbs:
    """Serve the live-patch verbs of ``livepatch`` on ``service``; ``desired`` makes patches survive restarts
    (then call ``restore()`` on the result before the journal replay); ``calls`` (the kernel verbs') runs the
    readers of ``call.read``."""
    reads = calls or KernelCalls(kernel, timeout_s=call_timeout_s)
    verbs = PatchVerbs(service, kernel, livepatch, desired, restore_timeout_s=restore_timeout_s, guard=guard)
    lp = livepatch

    def replayed_or(ctx: RequestContext, redo: Callable[[], T], answer: Callable[[], T]) -> T:
        if verbs._already(ctx):
            log.info("request_already_applied", note="its change was restored at boot; answering from the state")
            return answer()
        return redo()

    @service.handler("patch.load")
    def patch_load(req: PatchLoadRequest, ctx: RequestContext) -> PatchLoadData:
        bundle, raw = decode_bundle(req.bundle)
        key_id = bundle.signature.key_id if bundle.signature is not None else None

        def answer() -> PatchLoadData:
            with lp.lock:
                return verbs._load_reply(lp.patch(bundle.name), key_id, bundle)
        return replayed_or(ctx, lambda: verbs.load(bundle, raw, ctx.request_id), answer)

    @service.handler("patch.enable")
    def patch_enable(req: PatchEnableRequest, ctx: RequestContext) -> PatchChangeData:
        return replayed_or(ctx, lambda: verbs.enable(req.name, ctx.request_id, wait=req.wait,
                                                     timeout_s=req.timeout_s),
                           lambda: verbs.change_data(req.name))

    @service.handler("patch.disable")
    def patch_disable(req: PatchDisableRequest, ctx: RequestContext) -> PatchChangeData:
        return replayed_or(ctx, lambda: verbs.disable(req.name, ctx.request_id, wait=req.wait,
                                                      timeout_s=req.timeout_s),
                           lambda: verbs.change_data(req.name))

    @service.handler("patch.force")
    def patch_force(req: PatchForceRequest, ctx: RequestContext) -> PatchChangeData:
        return replayed_or(ctx, lambda: verbs.force(req.name, ctx.request_id),
                           lambda: verbs.change_data(req.name))

    @service.handler("patch.unload")
    def patch_unload(req: PatchUnloadRequest, ctx: RequestContext) -> PatchUnloadData:
        return replayed_or(ctx, lambda: verbs.unload(req.name, ctx.request_id),
                           lambda: PatchUnloadData(name=req.name, unloaded=True))

    @service.handler("patch.list")
    def patch_list(req: PatchListRequest, ctx: RequestContext) -> PatchListData:
        with lp.lock:
            return PatchListData(patches=verbs._summaries(), transition=verbs._progress(),
                                 trusted_keys=len(lp.trusted_keys or []))

    @service.handler("patch.info")
    def patch_info(req: PatchInfoRequest, ctx: RequestContext) -> PatchInfoData:
        return verbs.info_data(req.name)

    @service.handler("patch.transition")
    def patch_transition(req: PatchTransitionRequest, ctx: RequestContext) -> PatchTransitionData:
        with lp.lock:
            if req.name is not None:
                lp.patch(req.name)  # livepatch_not_found for a patch that is not loaded
            tr = lp.transition
            mine = tr is not None and (req.name is None or tr.patch.name == req.name)
            progress = verbs._progress() if mine else None
            tasks = [TaskTransition(pid=t.pid, comm=t.comm, cpu=t.cpu, kind=t.kind,
                                    patch_state=cast(TaskPatchState, t.patch_state),
                                    pending=t.pending, blocked=t.blocked) for t in lp.task_states()]
        return PatchTransitionData(in_progress=progress is not None, progress=progress, tasks=tasks)

    @service.handler("call.read")
    def call_read(req: CallReadRequest, ctx: RequestContext) -> CallReadData:
        sym = reads.symbol(req.function, req.sympos, req.cpu)
        buf = kernel.host_buffer.alloc(req.size)
        try:
            n = reads.run(sym, (buf, req.size), cpu=req.cpu, events=ctx.events, request_id=ctx.request_id,
                          verb=ctx.verb)
        except GuestCallTimeout as late:
            kernel.free_when_done(late.job, buf, req.size)  # the reader still writes into it
            raise
        except BaseException:
            kernel.host_buffer.free(buf, req.size)
            raise
        try:
            text = kernel.memory.read(buf, min(n, req.size)).decode("utf-8", "replace")
        finally:
            kernel.host_buffer.free(buf, req.size)
        return CallReadData(function=sym.name, cpu=req.cpu, length=n, text=text)

    verbs.publish()
    return verbs


__all__ = ["KIND", "NoTrustedKeys", "PatchVerbs", "RestoreReport", "decode_bundle", "dev_signing_key", "register",
           "trusted_keys"]
