"""An example patch that reads a struct field whose offset changed between builds (``struct seq_file``: ``count``
at 16 in 6.1, at 24 in 6.6-lp1), built per build with ``patch build --all-builds``, loaded on a fleet host of
each build and giving the right output on every one of them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mqtt_fixtures import Mosquitto, run, wait_for
from test_fleet import overrides, running
from test_guest_builds import RELEASES, _build
from test_service_patch import signer

from clients.sdk import LivepatchClient, ReplyError
from daemon.fleet.runner import FleetRunner
from patchformat.bundle import PatchBundle
from schemas.fleet import FleetSpec

LINE = "livepatch_seq_count: this has been live patched\n"
SIZE = 4096  # call_read's buffer


def test_a_patch_reading_a_moved_field_is_right_on_every_build(mosquitto: Mosquitto, tmp_path: Path) -> None:
    code, doc = _build(tmp_path, "livepatch_seq_count", "--all-builds", "--key", str(signer().private_path))
    assert code == 0, doc
    bundles = {str(b["release"]): Path(str(b["bundle"])) for b in doc["bundles"]}  # type: ignore[attr-defined]
    assert sorted(bundles) == RELEASES
    objects = {r: PatchBundle.from_bytes(p.read_bytes()).object for r, p in bundles.items()}
    assert objects["6.1-lp1"] != objects["6.6-lp1"], "the 6.6 object reads count at another offset"

    prefix = f"b{uuid.uuid4().hex[:6]}"
    hosts = {r: f"{prefix}-{i:04d}" for i, r in enumerate(RELEASES)}
    spec = FleetSpec.model_validate({"hosts": 3, "prefix": prefix,
                                     "overrides": {h: {"release": r} for r, h in hosts.items()}})
    runner = FleetRunner(spec, overrides(tmp_path / "fleet", mosquitto.url,
                                         trusted_keys=[str(signer().public_path)]), workers=0)

    async def scenario() -> None:
        async with running(runner, mosquitto.url):
            await wait_for(lambda: len(runner.online) == 3, 120)
            for release, host in hosts.items():
                async with LivepatchClient(mosquitto.url, host, protocol="3.1.1") as c:
                    assert (await c.state()).kernel.release == release  # type: ignore[union-attr]
                    wrong = "6.6-lp1" if release != "6.6-lp1" else "6.1-lp1"
                    with pytest.raises(ReplyError) as refused:  # another build's layout is never loaded
                        await c.patch_load(bundles[wrong].read_bytes())
                    assert refused.value.code == "patch_build_id_mismatch"
                    await c.patch_load(bundles[release].read_bytes())
                    assert (await c.patch_enable("livepatch_seq_count", wait=True, timeout_s=10)).completed
                    text = (await c.call_read("proc_cmdline_read", size=SIZE)).text
                    assert text == f"{LINE}seq_file: {len(LINE)} of {SIZE} bytes used\n", release

    run(scenario())
