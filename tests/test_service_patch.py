"""The live-patch verbs end to end: real mosquitto, a real daemon and emulator, real compiled example patches
signed with a key the daemon trusts. Also the helpers the other patch test files share (signed examples, a
daemon that trusts the test key, a task asleep in a patched function, an event collector)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

from clients.sdk import LivepatchClient, ReplyError
from clients.sdk.patch_api import TransitionTimeout
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import Kernel, load_image
from daemon.livepatch import examples
from daemon.livepatch.transition import StallPolicy
from daemon.settings import Settings
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.manifest import Manifest
from schemas import EventDoc

ORIGINAL_CMDLINE = "console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1\n"
PATCHED_CMDLINE = "livepatch_cmdline: this has been live patched\n"

# -- helpers shared by the patch test files ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signer:
    private_path: Path
    public_path: Path

    @property
    def key(self) -> Ed25519PrivateKey:
        return signing.load_private_key(self.private_path)


@functools.cache
def signer() -> Signer:
    """One test signing key pair per session (in a private temporary directory)."""
    folder = Path(tempfile.mkdtemp(prefix="lpd-test-keys-"))
    key = signing.generate_key()
    signing.save_private_key(key, folder / "test.key")
    signing.save_public_key(key.public_key(), folder / "test.pub")
    return Signer(folder / "test.key", folder / "test.pub")


@functools.cache
def unsigned_examples() -> dict[str, PatchBundle]:
    """Every example patch, compiled once per session for the committed kernel image."""
    return examples.build_examples(Path(tempfile.mkdtemp(prefix="lpd-test-patches-")),
                                   load_image(IMAGE_PATH)[0].build_id)


def signed(name: str) -> PatchBundle:
    return signing.sign(unsigned_examples()[name], signer().key)


def b64(bundle: PatchBundle | bytes) -> str:
    return base64.b64encode(bundle if isinstance(bundle, bytes) else bundle.to_bytes()).decode()


def trusting_settings(tmp: Path, broker_url: str | None, **overrides: Any) -> Settings:
    """Settings of a daemon that trusts the test key (transitions blocked for 0.2 s are reported stalled)."""
    values: dict[str, Any] = {"trusted_keys": [signer().public_path], "transition_stall_s": 0.2}
    values.update(overrides)
    return daemon_settings(tmp, broker_url, **values)


def quiet_policy(d: DaemonThread) -> None:
    """No fake signals: a task asleep in a patched function holds the transition up for as long as it sleeps."""
    assert d.daemon.livepatch is not None
    d.daemon.livepatch.policy = StallPolicy(retry_interval=0.02, signal_after=None)


def kernel_of(d: DaemonThread) -> Kernel:
    assert d.daemon.kernel is not None
    return d.daemon.kernel


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


class Sleeper:
    """A worker of CPU 1 asleep in sleeper_middle (sleeper_outer -> sleeper_middle -> sleeper_inner) until woken."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.flag = kernel.host_buffer.alloc(8)
        kernel.memory.write_u64(self.flag, 0)
        self.future = kernel.submit("sleeper_outer", self.flag, cpu=1)
        wait_until(lambda: any(t.waiting and t.kind == "worker" and t.cpu == 1 for t in kernel.tasks()))

    def wake(self, value: int = 5) -> int:
        self.kernel.memory.write_u64(self.flag, value)
        self.kernel.machine.kick(1)
        result = self.future.result(10)
        self.kernel.host_buffer.free(self.flag, 8)
        return result


class Session:
    """A client of one daemon with the host's events collected in the background."""

    def __init__(self, url: str, host: str, timeout: float = 30.0) -> None:
        self.c = LivepatchClient(url, host, timeout=timeout)
        self.seen: list[EventDoc] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        await self.c.__aenter__()
        self._task = asyncio.create_task(self._collect())
        await asyncio.sleep(0.1)  # the events subscription is in place
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.c.__aexit__(None, None, None)

    async def _collect(self) -> None:
        async for e in self.c.events():
            self.seen.append(e)

    def types(self, prefix: str = "patch.") -> list[str]:
        return [e.type for e in self.seen if e.type.startswith(prefix)]

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e.data for e in self.seen if e.type == type_]

    async def event(self, type_: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for data in self.of(type_):
                if all(data.get(k) == v for k, v in match.items()):
                    return data
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {type_} event with {match}; seen: {self.types()}")

    async def error(self, verb: str, params: dict[str, Any]) -> dict[str, Any]:
        """The error of a request that must fail."""
        raw = await self.c.request_raw(verb, params)
        assert not raw.reply.ok, raw.payload
        assert raw.reply.error is not None
        return raw.reply.error.model_dump()

    async def cleanup(self) -> None:
        """Disable and unload every patch (a test leaves the module's daemon as it found it)."""
        listing = await self.c.patch_list()
        for p in reversed(listing.patches):
            if p.enabled or p.transition:
                await self.c.patch_disable(p.name, wait=True)
        for p in reversed((await self.c.patch_list()).patches):
            await self.c.patch_unload(p.name)
        assert (await self.c.patch_list()).patches == []


# -- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patchd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """A daemon that trusts the test key, with no fake signals (stalls last until the sleeper wakes)."""
    d = DaemonThread(trusting_settings(tmp_path_factory.mktemp("patchd"), mosquitto.url)).start()
    quiet_policy(d)
    yield d
    d.stop()


# -- the happy path ---------------------------------------------------------------------------------------------------


def test_load_enable_read_disable_unload(patchd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            assert (await c.call_read("proc_cmdline_read")).text == ORIGINAL_CMDLINE
            loaded = await c.patch_load(signed("livepatch_cmdline").to_bytes())
            assert (loaded.name, loaded.key_id, loaded.stack_order, loaded.funcs) == (
                "livepatch_cmdline", signing.key_id(signer().key.public_key()), 1, ["cmdline_proc_show,1"])
            assert (await c.call_read("proc_cmdline_read")).text == ORIGINAL_CMDLINE, "loaded, not enabled"
            listing = await c.patch_list()
            assert [(p.name, p.enabled, p.transition) for p in listing.patches] == [("livepatch_cmdline", False,
                                                                                     False)]
            assert listing.trusted_keys == 1
            change = await c.patch_enable("livepatch_cmdline")
            assert change.enabled
            if not change.completed:
                await c.wait_transition("livepatch_cmdline", 10)
            read = await c.call_read("proc_cmdline_read")
            assert (read.text, read.length) == (PATCHED_CMDLINE, len(PATCHED_CMDLINE))
            info = await c.patch_info("livepatch_cmdline")
            assert (info.enabled, info.transition, info.replace, info.stack_order, info.forced, info.replaced) == (
                True, False, False, 1, False, False)
            assert info.desired_enabled is True
            assert info.key_id == loaded.key_id
            (obj,) = info.objects
            (func,) = obj.funcs
            assert (obj.name, obj.patched, func.old_name, func.new_name, func.patched) == (
                "vmlinux", True, "cmdline_proc_show", "livepatch_cmdline_proc_show", True)
            assert func.new_addr >= info.module_base
            symbol = await c.symbol("cmdline_proc_show")
            assert func.old_addr == symbol.address
            files = {f.path: f.content for f in info.sysfs}
            assert files["livepatch_cmdline/enabled"] == "1\n"
            assert files["livepatch_cmdline/vmlinux/patched"] == "1\n"
            tr = await c.patch_transition()
            assert not tr.in_progress
            assert tr.progress is None
            assert len(tr.tasks) == 12
            assert all(t.patch_state == "idle" and not t.pending for t in tr.tasks)
            state = await c.state()
            assert state is not None
            section = state.components["livepatch"]
            assert [p["name"] for p in section["patches"]] == ["livepatch_cmdline"]
            assert section["patches"][0]["enabled"] is True
            off = await c.patch_disable("livepatch_cmdline", wait=True)
            assert (off.enabled, off.completed) == (False, True)
            assert (await c.call_read("proc_cmdline_read")).text == ORIGINAL_CMDLINE
            assert (await c.patch_unload("livepatch_cmdline")).unloaded
            assert (await c.patch_list()).patches == []
            await s.event("patch.unloaded", patch="livepatch_cmdline")
            assert s.types() == ["patch.loaded", "patch.enabled", "patch.transition.started",
                                 "patch.transition.completed", "patch.disabled", "patch.transition.started",
                                 "patch.transition.completed", "patch.unloaded"]
            assert s.of("patch.transition.completed")[0]["target"] == "patched"
            assert s.of("patch.transition.completed")[1]["target"] == "unpatched"
            assert s.of("patch.loaded")[0]["key_id"] == loaded.key_id
    run(main())


def test_atomic_replace_and_stacking(patchd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            for name in ("livepatch_cmdline", "livepatch_demo_target"):
                await c.patch_load(signed(name).to_bytes())
                await c.patch_enable(name, wait=True)
            assert (await c.call("klp_demo_target", 7)).value == 37
            await c.patch_load(signed("livepatch_atomic_replace").to_bytes())
            done = await c.patch_enable("livepatch_atomic_replace", wait=True)
            assert done.completed
            assert (await c.call("klp_demo_target", 7)).value == 22, "the NOP func sends calls to the original"
            text = (await c.call_read("proc_cmdline_read")).text
            assert text not in (ORIGINAL_CMDLINE, PATCHED_CMDLINE)
            listing = {p.name: p for p in (await c.patch_list()).patches}
            assert [(n, p.enabled, p.replaced, p.stack_order) for n, p in listing.items()] == [
                ("livepatch_cmdline", False, True, 1), ("livepatch_demo_target", False, True, 2),
                ("livepatch_atomic_replace", True, False, 3)]
            info = await c.patch_info("livepatch_cmdline")
            assert info.desired_enabled is False, "the desired state follows the replacement"
            err = await s.error("patch.enable", {"request_id": uuid.uuid4().hex, "name": "livepatch_cmdline"})
            assert err["code"] == "livepatch_bad_state"
            for name in ("livepatch_cmdline", "livepatch_demo_target"):
                await c.patch_unload(name)  # replaced patches unload without a disable
            await s.cleanup()
    run(main())


def test_ftrace_enabled_and_live_patches_exclude_each_other(patchd: DaemonThread) -> None:
    """test-ftrace.sh over MQTT: no patch can be enabled while kernel.ftrace_enabled is 0, and it cannot be
    cleared while a patch is enabled (both ftrace_busy, -16), nothing changing either way."""
    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            await c.ftrace_sysctl(False)
            err = await s.error("patch.enable", {"request_id": uuid.uuid4().hex, "name": "livepatch_cmdline"})
            assert err["code"] == "livepatch_ftrace_failed", err
            assert (await c.call_read("proc_cmdline_read")).text == ORIGINAL_CMDLINE
            await c.ftrace_sysctl(True)
            await c.patch_enable("livepatch_cmdline", wait=True)
            err = await s.error("ftrace.sysctl", {"request_id": uuid.uuid4().hex, "ftrace_enabled": False})
            assert err["code"] == "ftrace_busy"
            assert "PERMANENT ops are registered: klp:cmdline_proc_show" in err["message"]
            assert (await c.ftrace_sysctl()).ftrace_enabled is True
            assert (await c.call_read("proc_cmdline_read")).text == PATCHED_CMDLINE
            await s.cleanup()
    run(main())


def test_repeated_request_id_is_answered_from_the_journal(patchd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            rid = f"load-{uuid.uuid4().hex}"
            params = {"bundle": b64(signed("livepatch_cmdline"))}
            first = await c.request_raw("patch.load", params, request_id=rid)
            again = await c.request_raw("patch.load", params, request_id=rid)
            assert first.reply.ok
            assert again.payload == first.payload, "the journaled reply, not a second load (which would fail)"
            await asyncio.sleep(0.1)
            assert s.types() == ["patch.loaded"]
            rid = f"enable-{uuid.uuid4().hex}"
            one = await c.request_raw("patch.enable", {"name": "livepatch_cmdline"}, request_id=rid)
            two = await c.request_raw("patch.enable", {"name": "livepatch_cmdline"}, request_id=rid)
            assert one.reply.ok
            assert two.payload == one.payload
            conflict = await c.request_raw("patch.enable", {"name": "livepatch_sleeper"}, request_id=rid)
            assert conflict.reply.error is not None
            assert conflict.reply.error.code == "request_id_conflict"
            await s.cleanup()
    run(main())


# -- refusals ------------------------------------------------------------------------------------------------------


def _with_manifest(bundle: PatchBundle, **changes: Any) -> PatchBundle:
    return dataclasses.replace(bundle, manifest=Manifest.from_dict({**bundle.manifest.to_dict(), **changes}))


def test_bad_bundles_are_refused_before_anything_is_loaded(patchd: DaemonThread) -> None:
    good = signed("livepatch_cmdline")
    other_key = signing.generate_key()
    assert good.signature is not None
    bad_value = dataclasses.replace(good.signature, value=bytes(64))
    cmdline = good.manifest.objects[0]
    unknown_func = dataclasses.replace(unsigned_examples()["livepatch_cmdline"], manifest=Manifest.from_dict({
        **good.manifest.to_dict(), "objects": [{**cmdline.model_dump(mode="json"), "funcs": [
            {"old_name": "no_such_function_anywhere", "old_sympos": 0, "new_name": "livepatch_cmdline_proc_show"}]}]}))
    cases: list[tuple[str, str, str]] = [
        ("unsigned", b64(unsigned_examples()["livepatch_cmdline"]), "patch_signature_missing"),
        ("untrusted key", b64(signing.sign(good, other_key)), "patch_signature_untrusted"),
        ("bad signature", b64(dataclasses.replace(good, signature=bad_value)), "patch_signature_invalid"),
        ("tampered object", b64(dataclasses.replace(good, object=good.object[:-1] + b"\x01")),
         "patch_object_tampered"),
        ("tampered manifest", b64(_with_manifest(good, replace=True)), "patch_manifest_tampered"),
        ("malformed base64", "this is not base64!!", "patch_bundle_malformed"),
        ("not a bundle", b64(b'{"format": "zip"}'), "patch_bundle_malformed"),
        ("bad ELF", b64(signing.sign(dataclasses.replace(good, object=b"\x7fELF" + bytes(60)), signer().key)),
         "module_bad_elf"),
        ("unknown old function", b64(signing.sign(unknown_func, signer().key)), "patch_old_func_not_found"),
        ("build id mismatch", b64(signing.sign(_with_manifest(unsigned_examples()["livepatch_cmdline"],
                                                              build_id="ab" * 20), signer().key)),
         "patch_build_id_mismatch"),
        ("missing new function", b64(signing.sign(dataclasses.replace(unsigned_examples()["livepatch_cmdline"],
                                                                      object=unsigned_examples()[
                                                                          "livepatch_demo_target"].object),
                                                  signer().key)), "patch_func_missing"),
    ]

    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            before = (await s.c.state())
            assert before is not None
            for what, bundle, code in cases:
                err = await s.error("patch.load", {"request_id": uuid.uuid4().hex, "bundle": bundle})
                assert err["code"] == code, (what, err)
                assert (await s.c.patch_list()).patches == [], what
            # a schema violation, unknown patches and functions (oversized payloads: test_service_mqtt)
            assert (await s.error("patch.load", {"request_id": "x", "bundle": b64(good), "sig": 1}))["code"] == \
                "bad_request"
            assert (await s.error("patch.enable", {"request_id": uuid.uuid4().hex, "name": "nope"}))["code"] == \
                "livepatch_not_found"
            assert (await s.error("patch.enable", {"request_id": "y", "name": "a/b"}))["code"] == "bad_request"
            assert (await s.error("patch.info", {"request_id": "z", "name": "nope"}))["code"] == "livepatch_not_found"
            assert (await s.error("patch.unload", {"request_id": uuid.uuid4().hex, "name": "nope"}))["code"] == \
                "livepatch_not_found"
            assert (await s.error("patch.force", {"request_id": uuid.uuid4().hex, "name": "nope"}))["code"] == \
                "livepatch_not_found"
            assert (await s.error("call.read", {"request_id": uuid.uuid4().hex, "function": "nope_x"}))["code"] == \
                "unknown_symbol"
            await asyncio.sleep(0.1)
            assert s.types() == [], "nothing was loaded"
            failed = s.of("request.failed")
            assert {f["code"] for f in failed} >= {"patch_signature_missing", "module_bad_elf"}
            assert (await s.c.info()).host == patchd.host  # still serving
            after = await s.c.state()
            assert after is not None
            assert after.components["livepatch"]["patches"] == []
            # and a good bundle still loads
            await s.c.patch_load(good.to_bytes())
            await s.cleanup()
    run(main())


def test_a_daemon_trusting_no_key_refuses_every_patch_with_a_hint(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(lpd.url, lpd.host) as s:
            err = await s.error("patch.load", {"request_id": uuid.uuid4().hex, "bundle": b64(signed(
                "livepatch_cmdline"))})
            assert err["code"] == "patch_signature_untrusted"
            assert "trusts no signing key" in err["message"]
            assert "LIVEPATCHD_TRUSTED_KEYS" in err["details"]["hint"]
            assert "--dev-signing-key" in err["details"]["hint"]
            assert "--trusted-key FILE.pub" in err["details"]["hint"]
            assert "--trusted-keys-dir DIR" in err["details"]["hint"]
            listing = await s.c.patch_list()
            assert (listing.patches, listing.trusted_keys) == ([], 0)
    run(main())


# -- transitions that stall -------------------------------------------------------------------------------------------


def test_a_stalled_transition_is_reported_then_reversed(patchd: DaemonThread) -> None:
    kernel = kernel_of(patchd)

    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            sleeper = await asyncio.to_thread(Sleeper, kernel)
            await c.patch_load(signed("livepatch_sleeper").to_bytes())
            change = await c.patch_enable("livepatch_sleeper")
            assert (change.enabled, change.completed) == (True, False)
            assert change.transition is not None
            assert change.transition.target == "patched"
            stalled = await s.event("patch.transition.stalled", patch="livepatch_sleeper")
            assert [(b["cpu"], b["why"]) for b in stalled["blocked"]] == [(1, "sleeping on function sleeper_middle")]
            pid = stalled["blocked"][0]["pid"]
            tr = await c.patch_transition("livepatch_sleeper")
            assert tr.in_progress
            p = tr.progress
            assert p is not None
            assert (p.patch, p.target, p.stalled, p.tasks_total, p.tasks_switched) == (
                "livepatch_sleeper", "patched", True, 12, 11)
            assert p.attempts >= 2
            task = next(t for t in tr.tasks if t.pid == pid)
            assert [(b.pid, b.comm, b.cpu, b.why) for b in p.blocked] == [
                (pid, task.comm, 1, "sleeping on function sleeper_middle")]
            assert task.kind == "worker"
            assert (task.patch_state, task.pending, task.blocked) == ("unpatched", True,
                                                                      "sleeping on function sleeper_middle")
            assert all(t.patch_state == "patched" for t in tr.tasks if t.pid != pid)
            # one transition at a time
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            busy = await s.error("patch.enable", {"request_id": uuid.uuid4().hex, "name": "livepatch_cmdline"})
            assert busy["code"] == "livepatch_transition_busy"
            with pytest.raises(TransitionTimeout) as timeout:
                await c.wait_transition("livepatch_sleeper", timeout=0.3)
            assert "sleeper_middle" in str(timeout.value)
            state = await c.state()
            assert state is not None
            assert state.components["livepatch"]["transition"]["stalled"] is True
            # disable reverses it: nothing stands in the way of unpatching
            back = await c.patch_disable("livepatch_sleeper", wait=True)
            assert (back.reversed, back.enabled, back.completed) == (True, False, True)
            await s.event("patch.transition.completed", patch="livepatch_sleeper", target="unpatched")
            assert s.of("patch.transition.reversed")[0] == {"patch": "livepatch_sleeper", "target": "unpatched",
                                                           "by": "request"}
            assert await asyncio.to_thread(sleeper.wake) == 5 + 1 + 10 + 100, "it finished in the original"
            assert (await c.patch_info("livepatch_sleeper")).desired_enabled is False
            metrics = patchd.daemon.metrics
            assert metrics.transition_stalls._value.get() >= 1
            assert metrics.transition_reversals.labels("request")._value.get() >= 1
            assert metrics.transitions.labels("unpatched", "completed")._value.get() >= 1
            await s.cleanup()
    run(main())


def test_enable_wait_replies_at_completion_or_timeout(patchd: DaemonThread) -> None:
    kernel = kernel_of(patchd)

    async def main() -> None:
        async with Session(patchd.url, patchd.host) as s:
            c = s.c
            sleeper = await asyncio.to_thread(Sleeper, kernel)
            await c.patch_load(signed("livepatch_sleeper").to_bytes())
            t0 = time.monotonic()
            change = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=0.4)
            assert 0.35 <= time.monotonic() - t0 < 5
            assert (change.enabled, change.completed) == (True, False)
            assert change.waited_s is not None
            assert change.waited_s >= 0.39
            assert change.transition is not None
            assert [(b.cpu, b.why) for b in change.transition.blocked] == [(1, "sleeping on function sleeper_middle")]
            woken = asyncio.ensure_future(asyncio.to_thread(sleeper.wake))
            final = await c.wait_transition("livepatch_sleeper", timeout=10)
            assert not final.in_progress
            assert await woken == 116
            assert (await c.patch_info("livepatch_sleeper")).enabled
            flag = kernel.host_buffer.alloc(8)
            kernel.memory.write_u64(flag, 7)
            assert (await c.call("sleeper_outer", flag)).value == 7 + 1 + 20 + 100, "patched now"
            kernel.host_buffer.free(flag, 8)
            await s.cleanup()
    run(main())


def test_force_completes_stalled_transitions_and_pins_the_module(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonThread(trusting_settings(tmp_path, mosquitto.url)).start()  # its own: a forced patch stays forever
    try:
        quiet_policy(d)
        kernel = kernel_of(d)

        async def main() -> None:
            async with Session(d.url, d.host) as s:
                c = s.c
                # a stalled patching transition, forced
                sleeper = await asyncio.to_thread(Sleeper, kernel)
                await c.patch_load(signed("livepatch_sleeper").to_bytes())
                assert not (await c.patch_enable("livepatch_sleeper")).completed
                unknown = await s.error("patch.force", {"request_id": uuid.uuid4().hex, "name": "livepatch_x"})
                assert unknown["code"] == "livepatch_not_found"
                forced = await c.patch_force("livepatch_sleeper")
                assert (forced.enabled, forced.completed) == (True, True)
                await s.event("patch.transition.completed", patch="livepatch_sleeper", target="patched")
                assert s.types()[-2:] == ["patch.forced", "patch.transition.completed"]
                assert d.daemon.metrics.transitions.labels("patched", "forced")._value.get() == 1
                assert not (await c.patch_transition()).in_progress
                assert await asyncio.to_thread(sleeper.wake) == 116, "it was asleep in the original"
                # a stalled unpatching transition (asleep in the new function), forced: the module is pinned
                sleeper = await asyncio.to_thread(Sleeper, kernel)
                off = await c.patch_disable("livepatch_sleeper")
                assert not off.completed
                assert off.transition is not None
                assert off.transition.blocked[0].why == "sleeping on function livepatch_sleeper_middle"
                forced = await c.patch_force("livepatch_sleeper")
                assert (forced.enabled, forced.forced, forced.completed) == (False, True, True)
                pinned = await s.error("patch.unload", {"request_id": uuid.uuid4().hex, "name": "livepatch_sleeper"})
                assert pinned["code"] == "livepatch_in_use"
                again = await s.error("patch.force", {"request_id": uuid.uuid4().hex, "name": "livepatch_sleeper"})
                assert again["code"] == "livepatch_bad_state", "not in transition: nothing to force"
                assert (await c.patch_info("livepatch_sleeper")).forced
                assert await asyncio.to_thread(sleeper.wake) == 5 + 1 + 20 + 100, "it was asleep in the new one"
        run(main())
    finally:
        d.stop()


def test_dev_signing_key_is_generated_and_trusted(tmp_path: Path) -> None:
    d = DaemonThread(daemon_settings(tmp_path, None, dev_signing_key=True)).start()  # embedded broker
    try:
        key_file = tmp_path / d.host / "dev-signing.key"
        assert key_file.stat().st_mode & 0o077 == 0
        bundle = signing.sign(unsigned_examples()["livepatch_cmdline"], signing.load_private_key(key_file))

        async def main() -> None:
            async with LivepatchClient(d.url, d.host, timeout=30) as c:
                assert (await c.patch_list()).trusted_keys == 1
                await c.patch_load(bundle.to_bytes())
                await c.patch_enable("livepatch_cmdline", wait=True)
                assert (await c.call_read("proc_cmdline_read")).text == PATCHED_CMDLINE
                with pytest.raises(ReplyError) as refused:
                    await c.patch_load(signed("livepatch_demo_target").to_bytes())
                assert refused.value.code == "patch_signature_untrusted"
        run(main())
    finally:
        d.stop()


def test_trusted_keys_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "b.pub").write_bytes(signer().public_path.read_bytes())
    (keys / "notes.txt").write_text("not a key")
    monkeypatch.setenv("LIVEPATCHD_TRUSTED_KEYS", f"{tmp_path}/x.pub,{tmp_path}/y.pem")
    monkeypatch.setenv("LIVEPATCHD_TRUSTED_KEYS_DIR", str(keys))
    s = Settings(state_dir=tmp_path)
    assert s.trusted_key_paths() == [tmp_path / "x.pub", tmp_path / "y.pem", keys / "b.pub"]
    monkeypatch.setenv("LIVEPATCHD_TRUSTED_KEYS", f'["{tmp_path}/z.pub"]')
    assert Settings(state_dir=tmp_path).trusted_keys == [tmp_path / "z.pub"]
