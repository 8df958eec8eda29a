"""Live patches survive restarts (kpatch's load-at-boot): kill -9 and clean stops, a request accepted before a
crash done or redone exactly once, re-applying plus replaying never applies a change twice."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

from mqtt_fixtures import DaemonProcess, DaemonThread, Mosquitto, next_status, run, wait_for
from test_service_patch import PATCHED_CMDLINE, b64, signed, signer, trusting_settings

from clients.sdk import LivepatchClient
from daemon.service.livepatch import KIND
from daemon.service.store.desired import DesiredState
from daemon.service.store.journal import Journal, fingerprint

SLOW = 250_000_000  # getpid_loop iterations: a few seconds of guest time


def journal_row(path: Path, rid: str) -> tuple[int, str | None] | None:
    """(attempts, reply) of a request, read the way another process would."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT attempts, reply FROM requests WHERE request_id = ?", (rid,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return (int(row[0]), row[1]) if row else None


def log_events(proc: DaemonProcess) -> list[str]:
    return [json.loads(line)["event"] for line in proc.log.read_text().splitlines() if line.startswith("{")]


def trusting_process(tmp: Path, broker_url: str) -> DaemonProcess:
    return DaemonProcess(tmp, broker_url, LIVEPATCHD_TRUSTED_KEYS=str(signer().public_path))


async def assert_patched(c: LivepatchClient, name: str = "livepatch_cmdline") -> None:
    info = await c.patch_info(name)
    assert (info.enabled, info.transition, info.desired_enabled) == (True, False, True)
    assert (await c.call_read("proc_cmdline_read")).text == PATCHED_CMDLINE


def test_kill_9_after_enable_restores_the_patch_before_online(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proc = trusting_process(tmp_path, mosquitto.url).start()
    try:
        proc.wait_online()

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, proc.host, timeout=60) as c, \
                    LivepatchClient(mosquitto.url, proc.host) as watcher:
                statuses = watcher.statuses()
                assert (await anext(statuses)).state == "online"
                await c.patch_load(signed("livepatch_cmdline").to_bytes())
                await c.patch_load(signed("livepatch_demo_target").to_bytes())
                await c.patch_enable("livepatch_cmdline", wait=True)
                await c.patch_enable("livepatch_demo_target", wait=True)
                await c.patch_disable("livepatch_demo_target", wait=True)  # loaded, not enabled
                await assert_patched(c)
                proc.kill()
                died = await anext(statuses)
                assert (died.state, died.boot_seq) == ("offline", 1)
                proc.start()
                back = await next_status(watcher, "online", 2)
                assert back.reason == "started"
                await statuses.aclose()
                # restored before the daemon announced itself: the first request already sees it
                await assert_patched(c)
                listing = await c.patch_list()
                assert [(p.name, p.enabled) for p in listing.patches] == [("livepatch_cmdline", True),
                                                                          ("livepatch_demo_target", False)]
                assert (await c.call("klp_demo_target", 7)).value == 22
                state = await c.state()
                assert state is not None
                assert state.components["livepatch"]["restored"] == {
                    "loaded": ["livepatch_cmdline", "livepatch_demo_target"], "enabled": ["livepatch_cmdline"],
                    "failed": [], "held_back": []}
        run(main())
        events = log_events(proc)
        second_boot = events[events.index("daemon_starting", 1):]
        assert second_boot.index("patches_restored") < second_boot.index("daemon_online")
    finally:
        proc.kill()


def test_enable_accepted_before_kill_9_is_answered_once_after_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proc = trusting_process(tmp_path, mosquitto.url).start()
    try:
        proc.wait_online()
        rid = f"enable-{uuid.uuid4().hex}"

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, proc.host, timeout=120) as c, \
                    LivepatchClient(mosquitto.url, proc.host) as watcher:
                statuses = watcher.statuses()
                assert (await anext(statuses)).state == "online"
                await c.patch_load(signed("livepatch_cmdline").to_bytes())
                # a slow mutating call first: the enable is accepted (journaled) and waits behind it
                slow = asyncio.ensure_future(c.request_raw("call", {"function": "getpid_loop", "args": [SLOW]}))
                await asyncio.sleep(0.2)
                pending = asyncio.ensure_future(c.request_raw("patch.enable", {"name": "livepatch_cmdline"},
                                                              request_id=rid))
                await wait_for(lambda: journal_row(proc.journal, rid) is not None)
                proc.kill()
                row = journal_row(proc.journal, rid)
                assert row is not None
                assert row[1] is None, "accepted, not answered"
                await anext(statuses)  # the last will
                proc.start()
                await next_status(watcher, "online", 2)
                await statuses.aclose()
                raw = await pending
                assert raw.reply.ok, raw.payload
                assert raw.reply.data is not None
                assert raw.reply.data["enabled"] is True
                assert (await slow).reply.ok
                await assert_patched(c)
                again = await c.request_raw("patch.enable", {"name": "livepatch_cmdline"}, request_id=rid)
                assert again.payload == raw.payload, "answered once: a retry gets the journaled reply"
                assert (await c.info()).requests.replayed == 2
        run(main())
        row = journal_row(proc.journal, rid)
        assert row is not None
        assert row[0] == 2
    finally:
        proc.kill()


def test_clean_restart_restores_the_desired_state(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proc = trusting_process(tmp_path, mosquitto.url).start()
    try:
        proc.wait_online()

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, proc.host, timeout=60) as c:
                for name in ("livepatch_cmdline", "livepatch_demo_target", "livepatch_atomic_replace"):
                    await c.patch_load(signed(name).to_bytes())
                    await c.patch_enable(name, wait=True)
                await c.patch_unload("livepatch_demo_target")  # replaced: unloads without a disable
                before = [(p.name, p.enabled, p.replaced, p.stack_order) for p in (await c.patch_list()).patches]
                text = (await c.call_read("proc_cmdline_read")).text
                statuses = c.statuses()
                assert (await anext(statuses)).state == "online"
                assert proc.terminate() == 0
                assert (await anext(statuses)).reason == "shutdown"
                proc.start()
                await next_status(c, "online", 2)
                await statuses.aclose()
                after = [(p.name, p.enabled, p.replaced, p.stack_order) for p in (await c.patch_list()).patches]
                assert after == before == [("livepatch_cmdline", False, True, 1),
                                           ("livepatch_atomic_replace", True, False, 2)]
                assert (await c.call_read("proc_cmdline_read")).text == text
                assert (await c.call("klp_demo_target", 7)).value == 22
                refused = await c.request_raw("patch.enable", {"name": "livepatch_cmdline"})
                assert refused.reply.error is not None
                assert refused.reply.error.code == "livepatch_bad_state"  # still replaced: load it again instead
                assert "replaced" in refused.reply.error.message
        run(main())
    finally:
        proc.kill()


def test_replayed_request_already_in_the_desired_state_is_not_applied_twice(mosquitto: Mosquitto,
                                                                            tmp_path: Path) -> None:
    """The crash window between recording a change and journaling its reply: at restart the change is restored,
    and the replayed request is answered from the state (a second enable would fail with 'already enabled')."""
    settings = trusting_settings(tmp_path, mosquitto.url)
    first = DaemonThread(settings).start()
    rid = f"enable-{uuid.uuid4().hex}"
    try:
        async def load() -> None:
            async with LivepatchClient(first.url, first.host, timeout=30) as c:
                await c.patch_load(signed("livepatch_cmdline").to_bytes())
        run(load())
    finally:
        first.stop()
    # what the crashed run left: the enable accepted, its change recorded under its id, no reply yet
    journal = Journal(settings.journal_path)
    params = {"request_id": rid, "reply_to": None, "name": "livepatch_cmdline", "wait": False, "timeout_s": 10.0}
    journal.accept(rid, "patch.enable", json.dumps(params), fp=fingerprint("patch.enable", params),
                   reply_topic=f"livepatch/v1/{settings.host_id}/reply", correlation=None, boot_seq=1)
    journal.close()
    desired = DesiredState(settings.desired_path)
    desired.update(KIND, "livepatch_cmdline", {"enabled": True}, request_id=rid)
    desired.close()
    second = DaemonThread(settings).start()
    try:
        lp = second.daemon.livepatch
        assert lp is not None
        assert lp.log.count("livepatch: enabling patch 'livepatch_cmdline'") == 1
        service = second.daemon.service
        assert service is not None
        entry = service.journal.get(rid)
        assert entry is not None
        assert entry.reply is not None
        reply = json.loads(entry.reply)
        assert reply["ok"] is True, reply
        assert (reply["data"]["name"], reply["data"]["enabled"], reply["data"]["completed"]) == (
            "livepatch_cmdline", True, True)

        async def check() -> None:
            async with LivepatchClient(second.url, second.host, timeout=30) as c:
                await assert_patched(c)
        run(check())
    finally:
        second.stop()


def test_a_patch_whose_signer_is_no_longer_trusted_is_not_restored(mosquitto: Mosquitto, tmp_path: Path) -> None:
    settings = trusting_settings(tmp_path, mosquitto.url)
    first = DaemonThread(settings).start()
    try:
        async def load() -> None:
            async with LivepatchClient(first.url, first.host, timeout=30) as c:
                await c.request("patch.load", {"bundle": b64(signed("livepatch_cmdline"))})
                await c.patch_enable("livepatch_cmdline", wait=True)
        run(load())
    finally:
        first.stop()
    second = DaemonThread(settings.model_copy(update={"trusted_keys": []})).start()  # the key was withdrawn
    try:
        async def check() -> None:
            async with LivepatchClient(second.url, second.host, timeout=30) as c:
                assert (await c.patch_list()).patches == []
                state = await c.state()
                assert state is not None
                (failed,) = state.components["livepatch"]["restored"]["failed"]
                assert (failed["patch"], failed["code"]) == ("livepatch_cmdline", "patch_signature_untrusted")
                assert (await c.call_read("proc_cmdline_read")).text != PATCHED_CMDLINE
        run(check())
    finally:
        second.stop()
