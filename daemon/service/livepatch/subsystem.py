"""The live-patch verbs: load signed bundles, enable, disable, unload, list, info, force, transitions, and the
insight verbs (``patch.check``, ``patch.effect``).

:class:`LivepatchSubsystem` serves ``patch.*`` for one :class:`Livepatch` (``verbs()`` is its table) and owns
three more duties:

* **desired state** — each accepted change is recorded in the :class:`DesiredState` store (kind
  ``"livepatch"``: the bundle as blob, ``{"enabled": bool}``, in load order) in the same transaction as its
  request id; :meth:`LivepatchSubsystem.restore` re-loads and re-enables those patches at boot (waiting for each
  transition) before the journal replay and before the daemon announces itself online, like kpatch's
  ``load --all`` at boot. A request replayed after a crash whose change already reached the store
  (``RequestContext.already_applied``) is answered from the restored state, never applied twice;
* **events** — Livepatch's own (loaded, unloaded, transition started, stalled, reversed, completed: it is
  subscribed to once), with each request's enable or disable announced with its transition, and ``forced``,
  all on the ``events`` topic (types in ``schemas.livepatch.PatchEventType``);
* **state** — the retained state's ``components.livepatch`` section (patches, the transition, the keys) and
  ``components.patch_effect``.

Signature checks are Livepatch's (``trusted_keys``): a bundle is refused before anything is loaded. With no
trusted key configured, every load is refused with a hint saying how to configure one.

Its parts, each handed what it uses: ``changes`` (the use-cases), ``events`` (the subscriber), ``section`` (the
state section), ``desired`` (the recorder), ``restore`` (the restore at boot, with ``crash_guard``), ``views``
(replies describing patches and the transition), ``insight`` (check and effect), ``trust`` (the trusted keys).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import cast

from daemon.errors import BundleFormatError
from daemon.kernel.kernel import Kernel
from daemon.livepatch.core import Livepatch
from daemon.service.livepatch.changes import PatchChanges
from daemon.service.livepatch.crash_guard import CrashLoopGuard
from daemon.service.livepatch.desired import PatchRecorder, RestoreReport
from daemon.service.livepatch.events import PatchEvents
from daemon.service.livepatch.insight import PatchEffects, check
from daemon.service.livepatch.restore import PatchRestore
from daemon.service.livepatch.section import LivepatchSection
from daemon.service.livepatch.views import PatchViews
from daemon.service.pipeline.context import RequestContext, VerbTable
from daemon.service.pipeline.core import Service
from daemon.service.store.desired import DesiredState
from patchformat.bundle import PatchBundle
from schemas.livepatch import (
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
    TaskPatchState,
    TaskTransition,
)
from schemas.patch_insight import PatchCheckData, PatchCheckRequest, PatchEffectData, PatchEffectRequest


def decode_bundle(text: str) -> tuple[PatchBundle, bytes]:
    """The request's base64 bundle: (parsed bundle, the file's bytes)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError("bundle is not valid base64 (send base64 of the bundle file)",
                                field="bundle") from None
    return PatchBundle.from_bytes(raw, "the request's bundle"), raw


class LivepatchSubsystem:
    """The live-patch use-cases of one daemon (see the module docstring). Built, it subscribes to ``livepatch``
    and publishes its sections; ``also_publish`` are other sections a patch change moves (ftrace's)."""

    def __init__(self, service: Service, kernel: Kernel, livepatch: Livepatch, desired: DesiredState | None = None,
                 *, restore_timeout_s: float = 30.0, guard: CrashLoopGuard | None = None,
                 also_publish: Iterable[Callable[[], None]] = (), effect_refresh_s: float = 5.0) -> None:
        self.lp = livepatch
        key_ids: dict[str, str | None] = {}  # patch -> its signer's key id (kept by the subscriber)
        self.recorder = PatchRecorder(livepatch, desired)
        self.views = PatchViews(kernel, livepatch, self.recorder, key_ids)
        self.section = LivepatchSection(service.state, service.metrics, livepatch, self.views,
                                        also_publish=also_publish)
        self.events = PatchEvents(service.events, service.metrics, self.views, self.recorder, key_ids=key_ids,
                                  publish=self.section.publish)
        self.changes = PatchChanges(livepatch, self.recorder, self.views, self.events, publish=self.section.publish,
                                    request_timeout_s=service.request_timeout_s)
        self.restorer = PatchRestore(livepatch, self.recorder, self.events, self.section, guard=guard,
                                     timeout_s=restore_timeout_s)
        self.effects = PatchEffects(service.state, kernel, livepatch, refresh_s=effect_refresh_s)
        livepatch.subscribe(self.events.on_livepatch_event)
        livepatch.subscribe(self.effects.on_event)  # after the events: a completion's baseline follows its event
        self.section.publish()
        self.effects.publish()

    @property
    def restored(self) -> RestoreReport | None:
        return self.section.restored

    def restore(self) -> RestoreReport:
        """The desired patches, loaded and enabled again (load-at-boot): in a worker thread, before the replay."""
        return self.restorer.restore()

    def publish(self) -> None:
        self.section.publish()

    def verbs(self) -> VerbTable:
        return {
            "patch.load": self.patch_load,
            "patch.enable": self.patch_enable,
            "patch.disable": self.patch_disable,
            "patch.force": self.patch_force,
            "patch.unload": self.patch_unload,
            "patch.list": self.patch_list,
            "patch.info": self.patch_info,
            "patch.transition": self.patch_transition,
            "patch.check": self.patch_check,
            "patch.effect": self.patch_effect,
        }

    # -- the verbs (a replay of a change already applied is answered from the state) --------------------------

    def patch_load(self, req: PatchLoadRequest, ctx: RequestContext) -> PatchLoadData:
        bundle, raw = decode_bundle(req.bundle)
        if ctx.already_applied:
            key_id = bundle.signature.key_id if bundle.signature is not None else None
            with self.lp.lock:
                return self.views.load_data(self.lp.patch(bundle.name), key_id, bundle)
        return self.changes.load(bundle, raw, ctx.request_id)

    def patch_enable(self, req: PatchEnableRequest, ctx: RequestContext) -> PatchChangeData:
        if ctx.already_applied:
            return self.views.change_data(req.name)
        return self.changes.enable(req.name, ctx.request_id, wait=req.wait, timeout_s=req.timeout_s)

    def patch_disable(self, req: PatchDisableRequest, ctx: RequestContext) -> PatchChangeData:
        if ctx.already_applied:
            return self.views.change_data(req.name)
        return self.changes.disable(req.name, ctx.request_id, wait=req.wait, timeout_s=req.timeout_s)

    def patch_force(self, req: PatchForceRequest, ctx: RequestContext) -> PatchChangeData:
        if ctx.already_applied:
            return self.views.change_data(req.name)
        return self.changes.force(req.name, ctx.request_id)

    def patch_unload(self, req: PatchUnloadRequest, ctx: RequestContext) -> PatchUnloadData:
        if ctx.already_applied:
            return PatchUnloadData(name=req.name, unloaded=True)
        return self.changes.unload(req.name, ctx.request_id)

    def patch_list(self, req: PatchListRequest, ctx: RequestContext) -> PatchListData:
        with self.lp.lock:
            return PatchListData(patches=self.views.summaries(), transition=self.views.progress(),
                                 trusted_keys=len(self.lp.trusted_keys or []))

    def patch_info(self, req: PatchInfoRequest, ctx: RequestContext) -> PatchInfoData:
        return self.views.info_data(req.name)

    def patch_transition(self, req: PatchTransitionRequest, ctx: RequestContext) -> PatchTransitionData:
        lp = self.lp
        with lp.lock:
            if req.name is not None:
                lp.patch(req.name)  # livepatch_not_found for a patch that is not loaded
            tr = lp.transition
            mine = tr is not None and (req.name is None or tr.patch.name == req.name)
            progress = self.views.progress() if mine else None
            tasks = [TaskTransition(pid=t.pid, comm=t.comm, cpu=t.cpu, kind=t.kind,
                                    patch_state=cast(TaskPatchState, t.patch_state),
                                    pending=t.pending, blocked=t.blocked) for t in lp.task_states()]
        return PatchTransitionData(in_progress=progress is not None, progress=progress, tasks=tasks)

    def patch_check(self, req: PatchCheckRequest, ctx: RequestContext) -> PatchCheckData:
        return check(self.lp, req)

    def patch_effect(self, req: PatchEffectRequest, ctx: RequestContext) -> PatchEffectData:
        data = self.effects.effect(req.name)
        self.effects.publish()
        return data
