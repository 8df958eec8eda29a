"""The live-patch verbs: load signed bundles, enable, disable, unload, list, info, force, transitions.

:func:`register` serves ``patch.*`` (and ``call.read``) for one :class:`Livepatch` and returns the
:class:`PatchVerbs` that owns three more duties:

* **desired state** — each accepted change is recorded in the :class:`DesiredState` store (kind
  ``"livepatch"``: the bundle as blob, ``{"enabled": bool}``, in load order) in the same transaction as its
  request id; :meth:`PatchVerbs.restore` re-loads and re-enables those patches at boot (waiting for each
  transition) before the journal replay and before the daemon announces itself online, like kpatch's
  ``load --all`` at boot. A request replayed after a crash whose change already reached the store is answered
  from the restored state, never applied twice;
* **events** — Livepatch's ``on_event`` (loaded, unloaded, transition complete) plus what the handlers see
  (enabled, disabled, transition started / reversed, forced) and a watcher thread for stalls, all on the
  ``events`` topic (types in ``schemas.patch_verbs.PatchEventType``);
* **state** — the retained state's ``components.livepatch`` section: patches, the transition, the keys.

Signature checks are Livepatch's (``trusted_keys``): a bundle is refused before anything is loaded. With no
trusted key configured, every load is refused with a hint saying how to configure one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.errors import BundleFormatError, LivepatchdError, PatchStateError, UntrustedKey
from daemon.kernel.kernel import Kernel
from daemon.livepatch import signing, sysfs
from daemon.livepatch.bundle import PatchBundle
from daemon.livepatch.core import Livepatch
from daemon.livepatch.klp import KlpPatch
from daemon.livepatch.transition import STATE_NAMES, Transition
from daemon.service import kernel_verbs
from daemon.service.core import RequestContext, Service
from daemon.service.desired import DesiredState
from schemas.patch_verbs import (
    BlockedTask,
    CallReadData,
    CallReadRequest,
    FuncInfo,
    ObjectInfo,
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
    PatchSummary,
    PatchTransitionData,
    PatchTransitionRequest,
    PatchUnloadData,
    PatchUnloadRequest,
    StateInfo,
    SysfsFile,
    TaskPatchState,
    TaskTransition,
    TransitionProgress,
    TransitionTarget,
)

log = structlog.get_logger(__name__)

KIND = "livepatch"
"""The desired-state kind of live patches (key: the patch name)."""
DEV_KEY_NAME = "dev-signing"
NO_KEYS_HINT = ("configure trusted Ed25519 public keys: LIVEPATCHD_TRUSTED_KEYS_DIR (a directory of .pub/.pem files) "
                "or LIVEPATCHD_TRUSTED_KEYS (paths); for a demo only, `livepatchd serve --dev-signing-key`")
WATCH_PERIOD_S = 0.05
T = TypeVar("T")


class NoTrustedKeys(UntrustedKey):
    """This daemon trusts no signing key at all (same stable code as a key that is not trusted)."""


# -- trusted keys ------------------------------------------------------------------------------------------------


def dev_signing_key(directory: Path) -> tuple[Path, Path]:
    """The demo signing key pair in ``directory`` (generated on first use): (private PEM, public PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{DEV_KEY_NAME}.key", directory / f"{DEV_KEY_NAME}.pub"
    if not private.exists():
        key = signing.generate_key()
        signing.save_private_key(key, private)
        signing.save_public_key(key.public_key(), public)
    elif not public.exists():
        signing.save_public_key(signing.load_private_key(private).public_key(), public)
    return private, public


def trusted_keys(paths: Iterable[Path], *, dev_key_dir: Path | None = None) -> list[Ed25519PublicKey]:
    """Load the trusted public keys (``KeyFileError`` for a bad file); with ``dev_key_dir``, the demo key too."""
    files = list(paths)
    if dev_key_dir is not None:
        private, public = dev_signing_key(dev_key_dir)
        files.append(public)
        log.warning("dev_signing_key_trusted", private_key=str(private), public_key=str(public),
                    note="for demos only: anyone who can read this file can sign patches this daemon loads")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in files:
        key = signing.load_public_key(path)
        keys.setdefault(signing.key_id(key), key)
    return list(keys.values())


# -- the verbs -------------------------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    """What :meth:`PatchVerbs.restore` re-applied at boot."""

    loaded: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    duration_s: float = 0.0


class PatchVerbs:
    """The live-patch use-cases of one daemon (see the module docstring)."""

    def __init__(self, service: Service, kernel: Kernel, livepatch: Livepatch, desired: DesiredState | None, *,
                 stall_after_s: float = 1.0, restore_timeout_s: float = 30.0) -> None:
        self.service = service
        self.kernel = kernel
        self.lp = livepatch
        self.desired = desired
        self.stall_after_s = stall_after_s
        self.restore_timeout_s = restore_timeout_s
        self.restored: RestoreReport | None = None
        self._local = threading.local()  # per thread: Livepatch events held back while a handler runs
        self._started: dict[str, float] = {}  # patch -> when its current transition started (or reversed)
        self._key_ids: dict[str, str | None] = {}  # patch -> its signer's key id
        self._forcing: set[str] = set()  # patches being forced (their completion counts as forced)
        self._watcher: threading.Thread | None = None
        self._watch_lock = threading.Lock()
        livepatch.on_event = self._on_livepatch_event

    # -- events and state ------------------------------------------------------------------------------------

    def emit(self, type_: str, **data: Any) -> None:
        self.service.events.emit(type_, **data)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Hold back Livepatch's events raised by this thread (a completion inside ``enable()``) so that they
        follow the handler's own (enabled, transition started); released in order on exit."""
        outer = getattr(self._local, "held", None)
        held: list[tuple[str, dict[str, object]]] = []
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = outer
            for event, data in held:
                self._handle_livepatch_event(event, data)

    def _on_livepatch_event(self, event: str, data: dict[str, object]) -> None:
        held = getattr(self._local, "held", None)
        if held is not None:
            held.append((event, data))
        else:
            self._handle_livepatch_event(event, data)

    def _handle_livepatch_event(self, event: str, data: dict[str, object]) -> None:
        name = str(data.get("patch"))
        if event == "loaded":
            with self.lp.lock:
                patch = next((p for p in self.lp.patches if p.name == name), None)
                extra: dict[str, Any] = {} if patch is None else {
                    "key_id": self._key_ids.get(name), "replace": patch.replace,
                    "funcs": [f.sysfs_name for f in patch.funcs() if not f.nop]}
            self.emit("patch.loaded", patch=name, **extra)
        elif event == "unloaded":
            self._key_ids.pop(name, None)
            self.emit("patch.unloaded", patch=name)
        elif event == "transition_complete":
            target = str(data.get("target"))
            started = self._started.pop(name, None)
            self._completed_in_desired(name, target)
            metrics = self.service.metrics
            metrics.transitions.labels(target, "forced" if name in self._forcing else "completed").inc()
            if started is not None:
                metrics.transition_duration.labels(target).observe(time.monotonic() - started)
            self.emit("patch.transition.completed", patch=name, target=target,
                      duration_s=None if started is None else round(time.monotonic() - started, 6))
        self.publish()

    def _completed_in_desired(self, name: str, target: str) -> None:
        """The store follows what a transition ended in (a reversal by the stall policy included)."""
        if self.desired is None:
            return
        with self.lp.lock, self.desired.batch():
            items = {i.key: i for i in self.desired.items(KIND)}
            if name in items and items[name].doc.get("enabled") != (target == "patched"):
                self.desired.update(KIND, name, {"enabled": target == "patched"})
            patch = next((p for p in self.lp.patches if p.name == name), None)
            if target == "patched" and patch is not None and patch.replace:
                for other in self.lp.patches:
                    if other is not patch and other.replaced and other.name in items:
                        self.desired.update(KIND, other.name, {"enabled": False, "replaced": True})

    def publish(self) -> None:
        """Republish ``components.livepatch`` (a no-op when nothing changed)."""
        with self.lp.lock:
            tr = self.lp.transition
            gauge = self.service.metrics.livepatches
            gauge.labels("enabled").set(sum(p.enabled for p in self.lp.patches))
            gauge.labels("disabled").set(sum(not p.enabled for p in self.lp.patches))
            gauge.labels("transition").set(int(tr is not None))
            section: dict[str, Any] = {
                "patches": [s.model_dump(mode="json") for s in self._summaries()],
                "transition": None if tr is None else {
                    "patch": tr.patch.name, "target": STATE_NAMES.get(tr.target, str(tr.target)),
                    "stalled": self._stalled(tr), "blocked": sorted(tr.blocked)},
                "trusted_keys": len(self.lp.trusted_keys or []),
            }
        if self.restored is not None:
            section["restored"] = {"loaded": self.restored.loaded, "enabled": self.restored.enabled,
                                   "failed": self.restored.failed}
        self.service.state.set_component("livepatch", section)

    def _stalled(self, tr: Transition) -> bool:
        return bool(tr.blocked) and time.monotonic() - tr.started >= self.stall_after_s

    # -- the watcher: stalls and reversals of the transition in progress ------------------------------------

    def _watch(self) -> None:
        with self._watch_lock:
            if self.lp.transition is None or (self._watcher is not None and self._watcher.is_alive()):
                return
            self._watcher = threading.Thread(target=self._watch_loop, name="patch-watch", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        seen: tuple[int, int] | None = None  # (id of the transition, its target) last looked at
        stalled_for: tuple[int, int] | None = None
        blocked_seen: frozenset[int] = frozenset()
        while True:
            time.sleep(WATCH_PERIOD_S)
            with self.lp.lock:
                tr = self.lp.transition
                if tr is None or not all(v.alive for v in self.kernel.machine.vcpus):
                    return
                now = (id(tr), tr.target)
                name, target = tr.patch.name, STATE_NAMES.get(tr.target, str(tr.target))
                reversed_ = seen is not None and seen[0] == now[0] and seen[1] != now[1]
                seen = now
                stalled = self._stalled(tr) and stalled_for != now
                blocked = self._blocked(tr) if stalled else []
                waited = time.monotonic() - tr.started
                blocked_now = frozenset(tr.blocked)
            if reversed_:  # by the stall policy (a disable request emits its own)
                self._started[name] = time.monotonic()
                self.service.metrics.transition_reversals.labels("policy").inc()
                self.emit("patch.transition.reversed", patch=name, target=target, by="policy")
            if stalled:
                stalled_for = now
                self.service.metrics.transition_stalls.inc()
                log.warning("transition_stalled", patch=name, target=target, waited_s=round(waited, 3),
                            blocked=[b.model_dump() for b in blocked])
                self.emit("patch.transition.stalled", patch=name, target=target, waited_s=round(waited, 3),
                          blocked=[b.model_dump() for b in blocked])
            if stalled or reversed_ or blocked_now != blocked_seen:
                blocked_seen = blocked_now
                self.publish()

    # -- views -----------------------------------------------------------------------------------------------

    def _blocked(self, tr: Transition) -> list[BlockedTask]:
        tasks = {t.pid: t for t in self.kernel.tasks()}
        out = []
        for pid, why in sorted(tr.blocked.items()):
            t = tasks.get(pid)
            out.append(BlockedTask(pid=pid, comm=t.comm if t else "?", cpu=t.cpu if t else -1, why=why))
        return out

    def _progress(self) -> TransitionProgress | None:
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
            stalled=self._stalled(tr), blocked=self._blocked(tr))

    def _summaries(self) -> list[PatchSummary]:
        tr = self.lp.transition
        return [PatchSummary(name=p.name, enabled=p.enabled, transition=tr is not None and tr.patch is p,
                             replace=p.replace, stack_order=i + 1, forced=p.forced, replaced=p.replaced,
                             funcs=[f.sysfs_name for f in p.funcs() if not f.nop])
                for i, p in enumerate(self.lp.patches)]

    def change_data(self, name: str, *, waited_s: float | None = None, reversed_: bool = False) -> PatchChangeData:
        with self.lp.lock:
            p = self.lp.patch(name)
            tr = self.lp.transition
            mine = tr is not None and tr.patch is p
            return PatchChangeData(name=p.name, enabled=p.enabled, forced=p.forced, replaced=p.replaced,
                                   completed=not mine, reversed=reversed_, waited_s=waited_s,
                                   transition=self._progress() if mine else None)

    def info_data(self, name: str) -> PatchInfoData:
        with self.lp.lock:
            p = self.lp.patch(name)
            view = sysfs.patch_view(self.lp, name)
            mine = self.lp.transition is not None and self.lp.transition.patch is p
            item = self.desired.get(KIND, name) if self.desired is not None else None
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
                key_id=self._key_ids.get(name),
                states=[StateInfo(id=i, version=v) for i, v in sorted(p.states.items())], objects=objects,
                progress=self._progress() if mine else None,
                desired_enabled=None if item is None else bool(item.doc.get("enabled")), sysfs=files)

    # -- changes ---------------------------------------------------------------------------------------------

    def _already(self, ctx: RequestContext) -> bool:
        """A replayed request whose change reached the desired state before the crash (and was restored)."""
        return ctx.replayed and self.desired is not None and self.desired.applied(ctx.request_id)

    def _wait_cap(self, timeout_s: float) -> float:
        """A wait inside a handler must end before the service's request timeout cuts it off."""
        return max(0.0, min(timeout_s, self.service.request_timeout_s * 0.8))

    def load(self, bundle: PatchBundle, raw: bytes, request_id: str | None) -> PatchLoadData:
        if self.lp.trusted_keys is not None and not self.lp.trusted_keys and bundle.signature is not None:
            raise NoTrustedKeys(f"patch {bundle.name} is refused: this daemon trusts no signing key",
                                patch=bundle.name, hint=NO_KEYS_HINT)
        key_id = bundle.signature.key_id if bundle.signature is not None else None
        with self.lp.lock, self._held():
            patch = self.lp.load(bundle)  # admission first: nothing is loaded unless every check passes
            self._key_ids[patch.name] = key_id  # before the held "loaded" event goes out
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
        with self.lp.lock, self._held():
            self.lp.enable(name, wait=False)
            self._started[name] = time.monotonic()
            self._record(name, {"enabled": True}, request_id)
            self.emit("patch.enabled", patch=name, request_id=request_id)
            self.emit("patch.transition.started", patch=name, target="patched")
        return self._after_change(name, wait, timeout_s)

    def disable(self, name: str, request_id: str | None, *, wait: bool = False,
                timeout_s: float = 10.0) -> PatchChangeData:
        with self.lp.lock, self._held():
            tr = self.lp.transition
            reversing = tr is not None and tr.patch.name == name
            self.lp.disable(name, wait=False)
            self._started[name] = time.monotonic()
            self._record(name, {"enabled": False}, request_id)
            self.emit("patch.disabled", patch=name, request_id=request_id, reversed=reversing)
            if reversing:
                self.service.metrics.transition_reversals.labels("request").inc()
                self.emit("patch.transition.reversed", patch=name, target="unpatched", by="request")
            else:
                self.emit("patch.transition.started", patch=name, target="unpatched")
        return self._after_change(name, wait, timeout_s, reversed_=reversing)

    def _after_change(self, name: str, wait: bool, timeout_s: float, *, reversed_: bool = False) -> PatchChangeData:
        self._watch()
        self.publish()
        waited = None
        if wait:
            t0 = time.monotonic()
            self.lp.wait(self._wait_cap(timeout_s))
            waited = round(time.monotonic() - t0, 6)
        return self.change_data(name, waited_s=waited, reversed_=reversed_)

    def force(self, name: str, request_id: str | None) -> PatchChangeData:
        with self.lp.lock, self._held():
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
                with self._held():  # the completion it causes is handled now, counted as forced
                    self.lp.force(name)
            finally:
                self._forcing.discard(name)
            self._record(name, {"forced": True}, request_id)
        self.publish()
        return self.change_data(name)

    def unload(self, name: str, request_id: str | None) -> PatchUnloadData:
        with self.lp.lock, self._held():
            self.lp.unload(name)
            if self.desired is not None:
                self.desired.delete(KIND, name, request_id=request_id)
        self.publish()
        return PatchUnloadData(name=name, unloaded=True)

    def _record(self, name: str, changes: dict[str, Any], request_id: str | None) -> None:
        if self.desired is None:
            return
        if self.desired.get(KIND, name) is None:  # loaded outside the verbs (a test, an extension): not journaled
            return
        self.desired.update(KIND, name, changes, request_id=request_id)

    # -- boot --------------------------------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Re-load every desired patch in order, then re-enable the enabled ones one by one (each transition
        waited for). Blocking: call it in a worker thread, before the journal replay and before going online."""
        report = RestoreReport()
        t0 = time.monotonic()
        items = self.desired.items(KIND) if self.desired is not None else []
        for item in items:
            try:
                if item.blob is None:
                    raise BundleFormatError(f"the desired state of {item.key} holds no bundle", patch=item.key)
                bundle = PatchBundle.from_bytes(item.blob, f"desired bundle {item.key}")
                self._key_ids[item.key] = bundle.signature.key_id if bundle.signature is not None else None
                self.lp.load(bundle)
                report.loaded.append(item.key)
            except LivepatchdError as exc:
                self._restore_failed(report, item.key, exc.code, exc.message)
        for item in items:
            if not item.doc.get("enabled") or item.key not in report.loaded:
                continue
            try:
                self._started[item.key] = time.monotonic()
                self.lp.enable(item.key, wait=False)
                if not self.lp.wait(self.restore_timeout_s):
                    self._restore_failed(report, item.key, "timeout", f"the transition of {item.key} did not "
                                         f"complete within {self.restore_timeout_s} s; it goes on")
                    self._watch()
                    break
                report.enabled.append(item.key)
            except LivepatchdError as exc:
                self._restore_failed(report, item.key, exc.code, exc.message)
        report.duration_s = round(time.monotonic() - t0, 6)
        self.restored = report
        if items:
            log.info("patches_restored", loaded=report.loaded, enabled=report.enabled, failed=report.failed,
                     duration_s=report.duration_s)
            self.emit("patch.restored", patches=report.loaded, enabled=report.enabled, failed=report.failed,
                      duration_s=report.duration_s)
        self.publish()
        return report

    def _restore_failed(self, report: RestoreReport, name: str, code: str, message: str) -> None:
        report.failed.append({"patch": name, "code": code, "message": message})
        log.error("patch_restore_failed", patch=name, code=code, message=message)
        self.emit("patch.restore_failed", patch=name, code=code, message=message)


def decode_bundle(text: str) -> tuple[PatchBundle, bytes]:
    """The request's base64 bundle: (parsed bundle, the file's bytes)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError("bundle is not valid base64 (send base64 of the bundle file)",
                                field="bundle") from None
    return PatchBundle.from_bytes(raw, "the request's bundle"), raw


def register(service: Service, kernel: Kernel, livepatch: Livepatch, *, desired: DesiredState | None = None,
             stall_after_s: float = 1.0, restore_timeout_s: float = 30.0,
             call_timeout_s: float = 10.0) -> PatchVerbs:
    """Serve the live-patch verbs of ``livepatch`` on ``service``; ``desired`` makes patches survive restarts
    (then call ``restore()`` on the result before the journal replay)."""
    verbs = PatchVerbs(service, kernel, livepatch, desired, stall_after_s=stall_after_s,
                       restore_timeout_s=restore_timeout_s)
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
        sym = kernel_verbs.callable_symbol(kernel, req.function, req.sympos, req.cpu)
        buf = kernel.host_buffer.alloc(req.size)
        try:
            n = kernel.call(sym.addr, buf, req.size, cpu=req.cpu, timeout=call_timeout_s)
            text = kernel.memory.read(buf, min(n, req.size)).decode("utf-8", "replace")
        finally:
            kernel.host_buffer.free(buf, req.size)
        return CallReadData(function=sym.name, cpu=req.cpu, length=n, text=text)

    verbs.publish()
    return verbs


__all__ = ["KIND", "NoTrustedKeys", "PatchVerbs", "RestoreReport", "decode_bundle", "dev_signing_key", "register",
           "trusted_keys"]
