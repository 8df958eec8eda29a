"""How the live-patch verbs describe loaded patches in replies and in the state: their
summaries, a change's outcome, the transition in progress (with the tasks blocking it) and everything
``patch.info`` shows (objects, functions, sysfs files)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import cast

from daemon.kernel.kernel import Kernel
from daemon.livepatch import sysfs
from daemon.livepatch.core import Livepatch
from daemon.livepatch.klp import KlpPatch
from daemon.livepatch.transition import STATE_NAMES
from daemon.service.livepatch.desired import PatchRecorder
from patchformat import signing
from patchformat.bundle import PatchBundle
from schemas.livepatch import (
    BlockedTask,
    FuncInfo,
    ObjectInfo,
    PatchChangeData,
    PatchInfoData,
    PatchLoadData,
    PatchSummary,
    StateInfo,
    SysfsFile,
    TransitionProgress,
    TransitionTarget,
)


class PatchViews:
    """Views of one Livepatch's patches; ``key_ids`` (patch -> its signer's key id) is kept by the event subscriber."""

    def __init__(self, kernel: Kernel, livepatch: Livepatch, recorder: PatchRecorder,
                 key_ids: Mapping[str, str | None]) -> None:
        self.kernel = kernel
        self.lp = livepatch
        self.recorder = recorder
        self.key_ids = key_ids

    def blocked_tasks(self, blocked: dict[int, str]) -> list[BlockedTask]:
        """The tasks holding a transition up (pid -> why), described."""
        tasks = {t.pid: t for t in self.kernel.tasks()}
        out = []
        for pid, why in sorted(blocked.items()):
            t = tasks.get(pid)
            out.append(BlockedTask(pid=pid, comm=t.comm if t else "?", cpu=t.cpu if t else -1, why=why))
        return out

    def progress(self) -> TransitionProgress | None:
        """The transition in progress (call with ``lp.lock`` held)."""
        tr = self.lp.transition
        if tr is None:
            return None
        target = STATE_NAMES.get(tr.target, str(tr.target))
        states = self.lp.task_states()
        return TransitionProgress(
            patch=tr.patch.name, target=cast(TransitionTarget, target),
            elapsed_s=round(time.monotonic() - tr.started, 6), attempts=tr.attempts, signals_sent=tr.signals_sent,
            tasks_total=len(states), tasks_switched=sum(1 for s in states if s.patch_state == target),
            stalled=self.lp.is_stalled(tr), blocked=self.blocked_tasks(tr.blocked))

    def summaries(self) -> list[PatchSummary]:
        tr = self.lp.transition
        return [PatchSummary(name=p.name, enabled=p.enabled, transition=tr is not None and tr.patch is p,
                             replace=p.replace, stack_order=i + 1, forced=p.forced, replaced=p.replaced,
                             funcs=[f.sysfs_name for f in p.funcs() if not f.nop],
                             states=[StateInfo(id=i, version=v) for i, v in sorted(p.states.items())])
                for i, p in enumerate(self.lp.patches)]

    def load_data(self, p: KlpPatch, key_id: str | None, bundle: PatchBundle) -> PatchLoadData:
        return PatchLoadData(name=p.name, key_id=key_id, object_sha256=signing.object_digest(bundle.object),
                             build_id=p.manifest.build_id, replace=p.replace,
                             stack_order=self.lp.patches.index(p) + 1,
                             funcs=[f.sysfs_name for f in p.funcs() if not f.nop],
                             states=[StateInfo(id=i, version=v) for i, v in sorted(p.states.items())],
                             module_base=p.module.text[0])

    def change_data(self, name: str, *, waited_s: float | None = None, reversed_: bool = False) -> PatchChangeData:
        with self.lp.lock:
            p = self.lp.patch(name)
            tr = self.lp.transition
            mine = tr is not None and tr.patch is p
            return PatchChangeData(name=p.name, enabled=p.enabled, forced=p.forced, replaced=p.replaced,
                                   completed=not mine, reversed=reversed_, waited_s=waited_s,
                                   transition=self.progress() if mine else None)

    def info_data(self, name: str) -> PatchInfoData:
        with self.lp.lock:
            p = self.lp.patch(name)
            view = sysfs.patch_view(self.lp, name)
            mine = self.lp.transition is not None and self.lp.transition.patch is p
            objects = [ObjectInfo(name=o.name, patched=o.patched, callbacks=sorted(o.callbacks),
                                  funcs=[FuncInfo(old_name=f.old_name, old_sympos=f.old_sympos, old_addr=f.old_addr,
                                                  new_name=f.new_name, new_addr=f.new_addr, sysfs_name=f.sysfs_name,
                                                  patched=f.patched, transition=f.transition, nop=f.nop)
                                         for f in o.funcs])
                       for o in p.objects]
            files = [SysfsFile(path=path, mode=mode, content=content) for path, mode, content in sysfs.files(self.lp)
                     if path.split("/", 1)[0] == name]
            return PatchInfoData(
                name=p.name, enabled=bool(view["enabled"]), transition=bool(view["transition"]),
                replace=bool(view["replace"]), stack_order=view["stack_order"], forced=p.forced, replaced=p.replaced,
                module=p.module.name, module_base=p.module.text[0], build_id=p.manifest.build_id,
                key_id=self.key_ids.get(name),
                states=[StateInfo(id=i, version=v) for i, v in sorted(p.states.items())], objects=objects,
                progress=self.progress() if mine else None,
                desired_enabled=self.recorder.desired_enabled(name), sysfs=files)
