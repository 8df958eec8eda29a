"""The live-patch changes (load, enable, disable, force, unload): each made under Livepatch's lock, recorded in
the desired state with its request id, and followed by a republished state section."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from daemon.errors import PatchStateError
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import STATE_NAMES
from daemon.service.livepatch.desired import PatchRecorder
from daemon.service.livepatch.events import Change, PatchEvents
from daemon.service.livepatch.trust import NO_KEYS_HINT, NoTrustedKeys
from daemon.service.livepatch.views import PatchViews
from patchformat.bundle import PatchBundle
from schemas.livepatch import PatchChangeData, PatchLoadData, PatchUnloadData

log = structlog.get_logger(__name__)


class PatchChanges:
    """The use-cases that change one Livepatch's patches; ``publish`` republishes the state section."""

    def __init__(self, livepatch: Livepatch, recorder: PatchRecorder, views: PatchViews, events: PatchEvents, *,
                 publish: Callable[[], None], request_timeout_s: float) -> None:
        self.lp = livepatch
        self.recorder = recorder
        self.views = views
        self.events = events
        self.publish = publish
        self.request_timeout_s = request_timeout_s

    def _wait_cap(self, timeout_s: float) -> float:
        """A wait inside a handler must end before the service's request timeout cuts it off."""
        return max(0.0, min(timeout_s, self.request_timeout_s * 0.8))

    def load(self, bundle: PatchBundle, raw: bytes, request_id: str | None) -> PatchLoadData:
        if self.lp.trusted_keys is not None and not self.lp.trusted_keys and bundle.signature is not None:
            raise NoTrustedKeys(f"patch {bundle.name} is refused: this daemon trusts no signing key",
                                patch=bundle.name, hint=NO_KEYS_HINT)
        key_id = bundle.signature.key_id if bundle.signature is not None else None
        with self.lp.lock:
            patch = self.lp.load(bundle)  # admission first: nothing is loaded unless every check passes
            try:
                self.recorder.loaded(patch.name, bundle, raw, request_id)
            except BaseException:
                self.lp.unload(patch.name)
                raise
            data = self.views.load_data(patch, key_id, bundle)
        self.publish()
        return data

    def enable(self, name: str, request_id: str | None, *, wait: bool = False,
               timeout_s: float = 10.0) -> PatchChangeData:
        with self.lp.lock:
            with self.events.making(Change("enable", name, request_id)):  # its events go as its transition starts
                self.lp.enable(name, wait=False)
            self.recorder.record(name, {"enabled": True, "held_back": None}, request_id)  # a retry clears it
        return self._after_change(name, wait, timeout_s)

    def disable(self, name: str, request_id: str | None, *, wait: bool = False,
                timeout_s: float = 10.0) -> PatchChangeData:
        with self.lp.lock:
            tr = self.lp.transition
            reversing = tr is not None and tr.patch.name == name
            with self.events.making(Change("disable", name, request_id)):
                self.lp.disable(name, wait=False)
            self.recorder.record(name, {"enabled": False}, request_id)
        return self._after_change(name, wait, timeout_s, reversed_=reversing)

    def _after_change(self, name: str, wait: bool, timeout_s: float, *, reversed_: bool = False) -> PatchChangeData:
        self.publish()
        waited = None
        if wait:
            t0 = time.monotonic()
            self.lp.wait(self._wait_cap(timeout_s))
            waited = round(time.monotonic() - t0, 6)
        return self.views.change_data(name, waited_s=waited, reversed_=reversed_)

    def force(self, name: str, request_id: str | None) -> PatchChangeData:
        with self.lp.lock:
            tr = self.lp.transition
            if tr is None or tr.patch.name != name:
                self.lp.patch(name)  # PatchNotFound first
                raise PatchStateError(f"patch {name!r} is not in transition: nothing to force", patch=name)
            target = STATE_NAMES.get(tr.target, str(tr.target))
            log.warning("transition_forced", patch=name, target=target,
                        note="tasks switched without a stack check; the module can never be unloaded")
            self.events.emit("patch.forced", patch=name, target=target, request_id=request_id)
            with self.events.forcing(name):  # the completion it causes is counted as forced
                self.lp.force(name)
            self.recorder.record(name, {"forced": True}, request_id)
        self.publish()
        return self.views.change_data(name)

    def unload(self, name: str, request_id: str | None) -> PatchUnloadData:
        with self.lp.lock:
            self.lp.unload(name)
            self.recorder.unloaded(name, request_id)
        self.publish()
        return PatchUnloadData(name=name, unloaded=True)
