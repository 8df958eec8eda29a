"""The shipped kernel builds (6.1-lp1, 6.1-lp2, 6.6-lp1): each boots; they differ where patches care (a
function's size, a function inlined away, a struct layout, the corpus) and in build id; a patch built per build
loads on a host of that build and is refused on another; a patch for a function a build lacks is refused at
build time; fleet hosts boot the build their plan says and report it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import uuid
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, run, wait_for
from test_service_patch import PATCHED_CMDLINE, signer, trusting_settings
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient, ReplyError
from daemon.cli import main as livepatchd
from daemon.errors import PatchBuildError, SymbolError
from daemon.fleet.runner import FleetRunner
from daemon.guest import build, corpus
from daemon.guest.build import DEFAULT_RELEASE, GUEST_BUILDS
from daemon.kernel.kernel import Kernel, KernelConfig, load_image
from daemon.livepatch.artifact import PATCHES_DIR, compile_object
from daemon.settings import Settings
from schemas.fleet import FleetSpec

RELEASES = ["6.1-lp1", "6.1-lp2", "6.6-lp1"]


def _size(release: str, name: str) -> int | None:
    try:
        return load_image(GUEST_BUILDS[release].image)[1].lookup(name, 0).size
    except SymbolError:
        return None


def test_three_builds_ship_with_distinct_build_ids() -> None:
    assert list(GUEST_BUILDS) == RELEASES
    assert DEFAULT_RELEASE == "6.1-lp1"
    ids = {r: load_image(GUEST_BUILDS[r].image)[0].build_id for r in RELEASES}
    assert len(set(ids.values())) == 3
    assert all(len(i) == 40 for i in ids.values())


def test_builds_differ_where_patches_care() -> None:
    # a function's body and size: the stable fix in 6.1-lp2 (and 6.6) checks the seq_file and counts reads
    sizes = {r: _size(r, "cmdline_proc_show") for r in RELEASES}
    assert sizes["6.1-lp1"] is not None
    assert sizes["6.1-lp2"] is not None
    assert sizes["6.1-lp1"] < sizes["6.1-lp2"] == sizes["6.6-lp1"]
    assert [_size(r, "cmdline_proc_reads") is not None for r in RELEASES] == [False, True, True]
    # a function renamed: 6.6 has klp_demo_compute, no klp_demo_target (the sleeper chain is in every build)
    assert [_size(r, "klp_demo_target") is not None for r in RELEASES] == [True, True, False]
    assert [_size(r, "klp_demo_compute") is not None for r in RELEASES] == [False, False, True]
    assert all(_size(r, "sleeper_middle") is not None for r in RELEASES)
    # a different corpus: more functions, other constants (so other bodies)
    last = corpus.function_names(10_880)[-1]
    assert [_size(r, last) is not None for r in RELEASES] == [False, False, True]
    assert _size("6.6-lp1", corpus.function_names(1)[0]) is not None


@pytest.mark.parametrize(("release", "offset"), [("6.1-lp1", 16), ("6.6-lp1", 24)])
def test_a_patch_compiles_against_its_builds_struct_layout(tmp_path: Path, release: str, offset: int) -> None:
    probe = f'#include "livepatch.h"\n_Static_assert(__builtin_offsetof(struct seq_file, count) == {offset}, "");\n'
    compile_object(probe, "probe", tmp_path, release=release)
    other = "6.6-lp1" if release == "6.1-lp1" else "6.1-lp1"
    with pytest.raises(PatchBuildError):
        compile_object(probe, "probe2", tmp_path, release=other)


@pytest.mark.parametrize("release", RELEASES)
def test_every_build_boots_and_runs(release: str) -> None:
    kernel = Kernel(KernelConfig(nr_cpus=1, image=GUEST_BUILDS[release].image)).boot()
    try:
        assert kernel.image.build_id == load_image(GUEST_BUILDS[release].image)[0].build_id
        demo = "klp_demo_compute" if release == "6.6-lp1" else "klp_demo_target"
        assert kernel.call(demo, 5) == 16
        assert kernel.read_string("proc_cmdline_read").startswith("console=ttyAMA0")
    finally:
        kernel.shutdown()


def _build(tmp: Path, source: str, *extra: str) -> tuple[int, dict[str, object]]:
    out = tmp / "out"
    args = ["patch", "--json", "build", str(PATCHES_DIR / f"{source}.c"), "--manifest",
            str(PATCHES_DIR / f"{source}.manifest.json"), "--out", str(out / "p.lpb"), *extra]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = livepatchd(args)
    return code, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_a_patch_for_a_missing_function_is_refused_at_build_time(tmp_path: Path) -> None:
    code, doc = _build(tmp_path, "livepatch_demo_target", "--all-builds")
    assert code == 1
    error = doc["error"]
    assert isinstance(error, dict)
    assert error["code"] == "patch_old_func_not_found"
    assert "klp_demo_target" in error["message"]
    assert "6.6-lp1" in error["message"]
    assert error["details"]["release"] == "6.6-lp1"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), "all or nothing"
    code, doc = _build(tmp_path, "livepatch_demo_target", "--build", "6.1-lp1", "--build", "6.1-lp2")
    assert code == 0
    assert sorted(Path(str(b["bundle"])).name for b in doc["bundles"]) == ["p-6.1-lp1.lpb", "p-6.1-lp2.lpb"]
    code, doc = _build(tmp_path, "livepatch_demo_target", "--build", "7.0-lp1")
    assert code == 1
    assert "unknown kernel build 7.0-lp1" in str(doc["error"])
    result = CliRunner().invoke(app, ["patch", "build", str(PATCHES_DIR / "livepatch_demo_target.c"),
                                      "--manifest", str(PATCHES_DIR / "livepatch_demo_target.manifest.json"), "--out",
                                      str(tmp_path / "l.lpb"), "--build", "6.6-lp1"])
    assert result.exit_code == 1
    assert "klp_demo_target" in result.stderr
    assert "6.6-lp1" in result.stderr


def test_lpctl_builds_one_bundle_per_build(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--json", "patch", "build", str(PATCHES_DIR / "livepatch_cmdline.c"),
                                      "--manifest", str(PATCHES_DIR / "livepatch_cmdline.manifest.json"),
                                      "--out", str(tmp_path / "cmd.lpb"), "--all-builds", "--key",
                                      str(signer().private_path)])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [b["release"] for b in doc["bundles"]] == RELEASES
    assert sorted(p.name for p in tmp_path.glob("*.lpb")) == [f"cmd-{r}.lpb" for r in RELEASES]
    for b in doc["bundles"]:
        assert b["build_id"] == load_image(GUEST_BUILDS[b["release"]].image)[0].build_id
        assert b["key_id"]
    result = CliRunner().invoke(app, ["patch", "build", str(PATCHES_DIR / "livepatch_cmdline.c"), "--manifest",
                                      str(PATCHES_DIR / "livepatch_cmdline.manifest.json"), "--out",
                                      str(tmp_path / "x.lpb"), "--all-builds", "--build-id", "ab" * 20])
    assert result.exit_code == 2


def test_a_patch_built_per_build_loads_on_its_build_only(mosquitto: Mosquitto, tmp_path: Path) -> None:
    code, doc = _build(tmp_path, "livepatch_cmdline", "--all-builds", "--key", str(signer().private_path))
    assert code == 0
    bundles = {str(b["release"]): Path(str(b["bundle"])) for b in doc["bundles"]}  # type: ignore[attr-defined]
    d = DaemonThread(trusting_settings(tmp_path / "h66", mosquitto.url, kernel_build="6.6-lp1")).start()
    try:
        async def scenario() -> None:
            async with LivepatchClient(d.url, d.host) as c:
                info = await c.info()
                assert info.kernel_build_id == load_image(GUEST_BUILDS["6.6-lp1"].image)[0].build_id
                state = await c.state()
                assert state is not None
                assert (state.kernel.release, state.kernel.build_id) == ("6.6-lp1", info.kernel_build_id)
                for other in ("6.1-lp1", "6.1-lp2"):
                    with pytest.raises(ReplyError) as refused:
                        await c.patch_load(bundles[other])
                    assert refused.value.code == "patch_build_id_mismatch"
                await c.patch_load(bundles["6.6-lp1"])
                await c.patch_enable("livepatch_cmdline", wait=True)
                assert (await c.call_read("proc_cmdline_read")).text == PATCHED_CMDLINE
        run(scenario())
    finally:
        d.stop()


def test_settings_refuse_an_unknown_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown kernel build '5\.4'"):
        Settings(state_dir=tmp_path, kernel_build="5.4")


def test_fleet_hosts_boot_the_build_of_their_plan(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    spec = FleetSpec.model_validate({
        "hosts": 3, "prefix": prefix, "seed": 3, "builds": [{"release": r, "share": s} for r, s in
                                                         zip(RELEASES, (0.4, 0.3, 0.3), strict=True)],
        "overrides": {f"{prefix}-{i:04d}": {"release": r} for i, r in enumerate(RELEASES)}})
    runner = FleetRunner(spec, {"broker_url": mosquitto.url, "state_dir": str(tmp_path), "log_level": "warning"},
                         workers=1)
    hosts = spec.host_ids()

    async def scenario() -> None:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(runner.run())
            try:
                await wait_for(lambda: runner.all_online, 90)
                for host, release in zip(hosts, RELEASES, strict=True):
                    async with LivepatchClient(mosquitto.url, host) as c:
                        state = await c.state()
                        assert state is not None
                        assert state.kernel.release == release
                        assert state.kernel.build_id == load_image(GUEST_BUILDS[release].image)[0].build_id
                        assert (await c.info()).kernel_build_id == state.kernel.build_id
            finally:
                runner.stop()
                await asyncio.wait_for(asyncio.shield(task), 60)
    run(scenario())


@pytest.mark.parametrize("release", ["6.1-lp2", "6.6-lp1"])
def test_every_build_rebuilds_byte_identical(tmp_path: Path, release: str) -> None:
    built = build.build(tmp_path, release)
    assert hashlib.sha256(built.read_bytes()).digest() == hashlib.sha256(
        GUEST_BUILDS[release].image.read_bytes()).digest()


def test_examples_per_build_skip_what_a_build_lacks(tmp_path: Path) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert livepatchd(["patch", "--json", "examples", "--out", str(tmp_path), "--build", "6.6-lp1",
                           "livepatch_cmdline", "livepatch_sleeper"]) == 0
    doc = json.loads(buf.getvalue())
    assert sorted(p.name for p in tmp_path.glob("*.lpb")) == ["livepatch_cmdline-6.6-lp1.lpb",
                                                              "livepatch_sleeper-6.6-lp1.lpb"]
    assert {b["build_id"] for b in doc["bundles"]} == {load_image(GUEST_BUILDS["6.6-lp1"].image)[0].build_id}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert livepatchd(["patch", "--json", "examples", "--out", str(tmp_path / "all"), "--build", "6.6-lp1"]) == 0
    doc = json.loads(buf.getvalue())
    assert [(k["name"], k["release"]) for k in doc["skipped"]] == [("livepatch_demo_target", "6.6-lp1")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert livepatchd(["patch", "examples", "--out", str(tmp_path / "one"), "--build", "6.6-lp1",
                           "livepatch_demo_target"]) == 1
