"""The orchestrator service over a real Mosquitto against real fleet hosts (each a full daemon with its own
emulated kernel): create, dry run, waves, stall policy, rollback, request dedupe, bad input, lpctl."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import overrides, running
from test_service_patch import signed, signer

from clients.rollout.service import Orchestrator
from clients.sdk import LivepatchClient, ReplyError, RolloutClient
from daemon.fleet.runner import FleetRunner
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import load_image
from schemas.fleet import FleetSpec

BUILD = load_image(IMAGE_PATH)[0].build_id
SLEEPER = "livepatch_sleeper"


def bundle_file(tmp: Path, name: str = "livepatch_cmdline") -> str:
    path = tmp / f"{name}.lpb"
    path.write_bytes(signed(name).to_bytes())
    return str(path)


@contextlib.asynccontextmanager
async def orchestrator(url: str, db: str, worker: str = "w1") -> AsyncIterator[Orchestrator]:
    orch = Orchestrator(url, db, worker=worker, poll_s=0.1)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.get_running_loop().create_task(orch.serve(ready=ready.set, stop=stop))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield orch
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def fleet_runner(tmp: Path, url: str, n: int,
                 faults: list[dict[str, Any]] | None = None) -> tuple[FleetRunner, list[str]]:
    p = f"o{uuid.uuid4().hex[:6]}"
    spec = FleetSpec.model_validate({"hosts": n, "prefix": p, "labels": {"zone": {"eu": 0.5, "us": 0.5}},
                                     "faults": faults or []})
    runner = FleetRunner(spec, overrides(tmp / "hosts", url, trusted_keys=[str(signer().public_path)],
                                         transition_stall_s=0.3), workers=0)
    return runner, spec.host_ids()


def spec_doc(name: str, prefix: str, bundle: str, patch: str = "livepatch_cmdline", **more: Any) -> dict[str, Any]:
    return {"name": name, "patch": patch, "bundles": {BUILD: bundle},
            "targets": {"globs": [f"{prefix}-*"]}, **more}


def test_rollout_across_real_hosts(mosquitto: Mosquitto, tmp_path: Path) -> None:
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 8, [
        {"kind": "stall", "hosts": [], "count": 1, "mode": "uninterruptible"}])
    prefix = hosts[0].rsplit("-", 1)[0]
    bundle = bundle_file(tmp_path, "livepatch_sleeper")  # the stall fault sleeps in the function it replaces
    db = str(tmp_path / "orch.sqlite3")

    async def scenario() -> None:
        async with running(runner, mosquitto.url), orchestrator(mosquitto.url, db) as orch:
            await wait_for(lambda: len(runner.online) == 8, 60)
            # this fleet's own states: the session broker also holds other tests' retained hosts
            await wait_for(lambda: all(h in orch.driver._states for h in hosts), 30)
            async with RolloutClient(mosquitto.url, protocol="3.1.1", timeout=30) as r:
                # bad input first: refused with a code, nothing stored, nothing sent
                for bad, code in [
                    (spec_doc("bad1", prefix, bundle, SLEEPER, targets={"hosts": ["nope-0000"]}), "unknown_host"),
                    (spec_doc("bad2", prefix, bundle, SLEEPER, targets={"labels": {"zone": "mars"}}), "unknown_label"),
                    (spec_doc("bad3", prefix, bundle, SLEEPER, waves={"count": 99}), "wave_spec_invalid"),
                    (spec_doc("bad4", prefix, bundle, SLEEPER, bundles={"ee" * 20: bundle}), "bundle_build_mismatch"),
                ]:
                    with pytest.raises(ReplyError) as exc:
                        await r.create(bad)
                    assert exc.value.code == code, bad
                with pytest.raises(ReplyError) as exc:
                    await r.create({**spec_doc("bad5", prefix, bundle, SLEEPER), "waves": {"count": 0}})
                assert exc.value.code == "bad_request"
                assert "waves.count" in str(exc.value)
                deep: dict[str, Any] = {}
                for _ in range(40):
                    deep = {"x": deep}
                with pytest.raises(ReplyError) as exc:
                    await r.request("rollout.create", {"spec": deep})
                assert exc.value.code == "bad_request"
                assert "deeper than 32" in str(exc.value)
                assert (await r.rollouts()) == []
                assert orch.driver.requests == 0, "refused at create: nothing sent to any host"
                stalled_hosts = [h for h in hosts if any(f["kind"] == "stall" for f in
                                                         orch.driver._states[h]["components"]["fleet"]["faults"])]
                assert len(stalled_hosts) == 1

                dry = await r.dry_run(spec_doc("r1", prefix, bundle, SLEEPER, waves={"count": 2}))
                assert [len(w) for w in dry.waves] == [4, 4]
                assert dry.projected_s >= 0
                sent = orch.driver.verbs.copy()
                assert set(sent) == {"patch.check"}, "a dry run sends only read-only checks"
                assert sent["patch.check"] == 8
                assert list(dry.would_stall) == stalled_hosts, "the stall fault's host, predicted before any load"
                assert dry.would_stall[stalled_hosts[0]][0]["reason"] == "uninterruptible"
                assert dry.unchecked == {}
                assert (await r.rollouts()) == []

                spec = spec_doc("r1", prefix, bundle, SLEEPER, waves={"count": 2, "success_threshold": 50},
                                stall={"wait_s": 1, "then_wait_s": 1, "action": "revert"}, verify=False)
                created = await r.create(spec)
                assert created.rollout.state == "CREATED"
                changes: dict[str, list[tuple[int, str]]] = {}

                async def follow_changes() -> None:
                    async for e in r.execution_changes("r1"):
                        changes.setdefault(e.host, []).append((e.version, e.state.value))
                follower = asyncio.get_running_loop().create_task(follow_changes())
                await asyncio.sleep(0.5)  # subscribed before the start
                started = await r.request("rollout.start", {"name": "r1"}, request_id="start-once")
                again = await r.request("rollout.start", {"name": "r1"}, request_id="start-once")
                assert started == again, "a repeated request id is answered from the store"
                with pytest.raises(ReplyError) as exc:
                    await r.start("r1")
                assert exc.value.code == "rollout_bad_state"

                docs: list[Any] = []

                async def watch() -> None:
                    async for doc in r.watch("r1"):
                        docs.append(doc)
                        if doc.state in ("COMPLETED", "CANCELED", "ROLLED_BACK"):
                            return
                await asyncio.wait_for(watch(), 120)
                final = docs[-1]
                assert final.state == "COMPLETED"
                status = await r.rollout_status("r1")
                states = {e.host: e.state.value for e in status.executions}
                await asyncio.sleep(0.5)
                follower.cancel()
                for e in status.executions:  # every change announced, in version order, ending where status is
                    seen = changes[e.host]
                    assert seen == sorted(seen), e.host
                    assert seen[-1] == (e.version, e.state.value), e.host
                assert Counter(states.values()) == {"SUCCEEDED": 7, "REVERTED": 1}
                stalled = [e for e in status.executions if e.state.value == "REVERTED"]
                assert stalled[0].details["stalled"] is True
                assert all(e.version > 1 for e in status.executions)
                for h in hosts:
                    async with LivepatchClient(mosquitto.url, h, protocol="3.1.1") as c:
                        listing = await c.patch_list()
                        on = [p.name for p in listing.patches if p.enabled]
                        assert on == ([] if states[h] == "REVERTED" else [SLEEPER])
                async with LivepatchClient(mosquitto.url, hosts[0], protocol="3.1.1") as c:
                    for bad, code in [({"name": SLEEPER, "functions": [{"name": "sleeper_middle"}]}, "bad_request"),
                                      ({}, "bad_request"),
                                      ({"functions": [{"name": "no_such_fn"}]}, "patch_old_func_not_found")]:
                        with pytest.raises(ReplyError) as exc:
                            await c.request("patch.check", bad)
                        assert exc.value.code == code, bad
                report = await r.report("r1")
                assert report.report["counts"] == {"REVERTED": 1, "SUCCEEDED": 7}
                assert "## Timeline" in report.markdown

                await r.rollback("r1")
                await wait_for(lambda: orch.engine.doc("r1").state == "ROLLED_BACK", 60)
                for h in hosts:
                    async with LivepatchClient(mosquitto.url, h, protocol="3.1.1") as c:
                        assert (await c.patch_list()).patches == [], "rolled back: disabled and unloaded"

    run(scenario())


def test_lpctl_rollout_commands(mosquitto: Mosquitto, tmp_path: Path) -> None:
    runner, hosts = fleet_runner(tmp_path, mosquitto.url, 4)
    prefix = hosts[0].rsplit("-", 1)[0]
    bundle = bundle_file(tmp_path)
    spec_path = tmp_path / "rollout.json"
    spec_path.write_text(json.dumps(spec_doc("cli1", prefix, bundle, waves={"count": 2})))
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps({"name": "x", "patch": "p"}))
    faults_path = tmp_path / "faults.json"
    faults_path.write_text(json.dumps([{"kind": "reject", "count": 1}]))
    env = {**os.environ, "LPCTL_BROKER": mosquitto.url, "LPCTL_PROTOCOL": "3.1.1"}

    def lpctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clients.cli", "--timeout", "30", *args], env=env,
                              capture_output=True, text=True, check=False)

    async def scenario() -> None:
        async with running(runner, mosquitto.url), orchestrator(mosquitto.url, str(tmp_path / "o.sqlite3")) as orch:
            await wait_for(lambda: len(runner.online) == 4 and all(h in orch.driver._states for h in hosts), 60)
            loop = asyncio.get_running_loop()
            bad = await loop.run_in_executor(None, lpctl, "rollout", "create", str(bad_path))
            assert bad.returncode == 2
            assert "bundles" in bad.stderr or "targets" in bad.stderr
            reh = await loop.run_in_executor(None, lpctl, "rollout", "rehearse", str(spec_path), "--faults",
                                             str(faults_path), "--seed", "3", "--out", str(tmp_path / "a.json"))
            assert reh.returncode == 0, reh.stderr
            reh2 = await loop.run_in_executor(None, lpctl, "rollout", "rehearse", str(spec_path), "--faults",
                                              str(faults_path), "--seed", "3", "--out", str(tmp_path / "b.json"))
            assert reh2.returncode == 0, reh2.stderr
            a, b = (tmp_path / "a.json").read_bytes(), (tmp_path / "b.json").read_bytes()
            assert a == b, "the same rehearsal gives a byte-identical report"
            assert json.loads(a)["counts"].get("REJECTED") == 1
            made = await loop.run_in_executor(None, lpctl, "rollout", "create", str(spec_path))
            assert made.returncode == 0, made.stderr
            assert "CREATED" in made.stdout
            start = await loop.run_in_executor(None, lpctl, "rollout", "start", "cli1")
            assert start.returncode == 0, start.stderr
            watched = await loop.run_in_executor(None, lpctl, "--json", "rollout", "watch", "cli1")
            assert watched.returncode == 0, watched.stderr
            assert json.loads(watched.stdout.strip().splitlines()[-1])["state"] == "COMPLETED"
            table = await loop.run_in_executor(None, lpctl, "rollout", "watch", "cli1")
            assert table.returncode == 0, table.stderr
            assert "hosts by state" in table.stdout
            row = next(line for line in table.stdout.splitlines() if "SUCCEEDED" in line and hosts[0] in line)
            assert "│ 4 " in row or " 4 " in row, table.stdout
            nowhere = await loop.run_in_executor(None, lpctl, "rollout", "watch", "nope", "--seconds", "20")
            assert nowhere.returncode == 1
            assert "rollout_not_found" in nowhere.stderr
            listing = await loop.run_in_executor(None, lpctl, "rollout", "list")
            assert "cli1" in listing.stdout
            assert "COMPLETED" in listing.stdout
            status = await loop.run_in_executor(None, lpctl, "rollout", "status", "cli1")
            assert status.stdout.count("SUCCEEDED") >= 4
            report = await loop.run_in_executor(None, lpctl, "rollout", "report", "cli1", "--markdown",
                                                str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"))
            assert report.returncode == 0, report.stderr
            assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
            missing = await loop.run_in_executor(None, lpctl, "rollout", "status", "nope")
            assert missing.returncode == 1
            assert "rollout_not_found" in missing.stderr

    run(scenario())


def test_rollout_documents_come_back_after_a_broker_restart(tmp_path: Path) -> None:
    """A broker restarted without persistence has lost every retained document: the orchestrator publishes its
    rollouts' documents again on the reconnect, so a page or `lpctl rollout watch` finds them."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    runner, hosts = fleet_runner(tmp_path, broker.url, 1)
    prefix = hosts[0].rsplit("-", 1)[0]

    async def first_doc(url: str) -> Any:
        async with RolloutClient(url, protocol="3.1.1", timeout=10) as r:
            async for doc in r.watch("again"):
                return doc
        return None

    async def scenario() -> None:
        async with running(runner, broker.url), orchestrator(broker.url, str(tmp_path / "o.sqlite3")) as orch:
            await wait_for(lambda: len(orch.driver._states) >= 1, 60)
            async with RolloutClient(broker.url, protocol="3.1.1", timeout=30) as r:
                await r.create(spec_doc("again", prefix, bundle_file(tmp_path)))
            assert (await asyncio.wait_for(first_doc(broker.url), 10)).state == "CREATED"
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
            doc = None
            for _ in range(100):  # until the orchestrator has reconnected and published again
                with contextlib.suppress(TimeoutError):
                    doc = await asyncio.wait_for(first_doc(broker.url), 2)
                if doc is not None:
                    break
            assert doc is not None, "the retained rollout document was not published again"
            assert doc.name == "again"

    try:
        run(scenario())
    finally:
        broker.stop()
