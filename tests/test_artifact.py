"""Patch artifacts: example patches built with the guest toolchain, loaded and run; manifests, bundles, the gate."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.errors import (
    BuildIdMismatch,
    BundleFormatError,
    LivepatchdError,
    ManifestError,
    OldFuncAmbiguous,
    OldFuncNotFound,
    OldFuncNotTraceable,
    PatchBuildError,
    PatchFuncMissing,
    SignatureMissing,
)
from daemon.kernel.kernel import Kernel
from daemon.livepatch import artifact, examples
from daemon.module_loader import LoadedModule, ModuleLoader
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.manifest import Callbacks, FuncSpec, Manifest, ObjectSpec


@pytest.fixture(scope="module")
def kernel(module_kernel: Kernel) -> Kernel:
    return module_kernel


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, kernel: Kernel) -> dict[str, PatchBundle]:
    return examples.build_examples(tmp_path_factory.mktemp("examples"), kernel.image.build_id)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return signing.generate_key()


@pytest.fixture
def loader(kernel: Kernel) -> Iterator[ModuleLoader]:
    ml = ModuleLoader(kernel)
    yield ml
    for name in list(ml.modules):
        ml.unload(name)


def load(loader: ModuleLoader, bundle: PatchBundle) -> LoadedModule:
    return loader.load(bundle.name, bundle.object)


def guest_str(kernel: Kernel, text: str) -> int:
    addr = kernel.host_buffer.alloc(len(text) + 1)
    kernel.memory.write(addr, text.encode() + b"\0")
    return addr


def klp_log(kernel: Kernel, m: LoadedModule) -> str:
    log = m.addr("klp_log")
    return kernel.memory.read(log + 8, kernel.memory.read_u64(log)).decode()


def render(kernel: Kernel, fn: int) -> str:
    """Call a cmdline_proc_show-like fn(struct seq_file *m, void *v) and return what it printed."""
    buf, seq = kernel.host_buffer.alloc(256), kernel.host_buffer.alloc(24)
    try:
        kernel.memory.write(seq, struct.pack("<QQQ", buf, 256, 0))
        assert kernel.call(fn, seq, 0) == 0
        return kernel.memory.read(buf, kernel.memory.read_u64(seq + 16)).decode()
    finally:
        kernel.host_buffer.free(buf, 256)
        kernel.host_buffer.free(seq, 24)


def i32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >> 31 else value


# -- the examples ----------------------------------------------------------------------------------------------

def test_every_example_builds_and_passes_the_gate(kernel: Kernel, bundles: dict[str, PatchBundle],
                                                  key: Ed25519PrivateKey) -> None:
    """Signed, defining what its manifest names, for this kernel, replacing traceable functions."""
    assert sorted(bundles) == examples.example_names()
    for bundle in bundles.values():
        signed = signing.sign(bundle, key)
        assert artifact.admit(signed, [key.public_key()], kernel.image, kernel.kallsyms) == \
            signing.key_id(key.public_key())


def test_examples_build_reproducibly(tmp_path: Path, kernel: Kernel, bundles: dict[str, PatchBundle]) -> None:
    again = examples.build_example("livepatch_syscall", tmp_path, kernel.image.build_id)
    assert again.object == bundles["livepatch_syscall"].object
    assert again.manifest == bundles["livepatch_syscall"].manifest


def test_replacement_functions_are_traceable(kernel: Kernel, loader: ModuleLoader,
                                             bundles: dict[str, PatchBundle]) -> None:
    """Compiled with the kernel's patchable entries: each new function has a record in the module."""
    for name in ("livepatch_cmdline", "livepatch_syscall", "livepatch_callbacks_demo"):
        m = load(loader, bundles[name])
        for f in bundles[name].manifest.objects[0].funcs:
            assert m.addr(f.new_name) - 8 in m.patchable_entries


@pytest.mark.parametrize(("name", "replace"), [("livepatch_cmdline", False), ("livepatch_atomic_replace", True)])
def test_cmdline_examples(kernel: Kernel, loader: ModuleLoader, bundles: dict[str, PatchBundle], name: str,
                          replace: bool) -> None:
    """The new cmdline_proc_show renders through seq_printf (a kernel call through a veneer)."""
    bundle = bundles[name]
    assert bundle.manifest.replace is replace
    func = bundle.manifest.objects[0].funcs[0]
    assert func.old_name == "cmdline_proc_show"
    m = load(loader, bundle)
    assert render(kernel, m.addr(func.new_name)) == f"{name}: this has been live patched\n"
    assert render(kernel, kernel.kallsyms.addr("cmdline_proc_show")).startswith("console=")


def test_callbacks_demo(kernel: Kernel, loader: ModuleLoader, bundles: dict[str, PatchBundle]) -> None:
    """Each callback logs itself and the object; pre_patch returns pre_patch_ret; work_step_c is preserved."""
    bundle = bundles["livepatch_callbacks_demo"]
    callbacks = bundle.manifest.objects[0].callbacks.named()
    assert list(callbacks) == ["pre_patch", "post_patch", "pre_unpatch", "post_unpatch"]
    m = load(loader, bundle)
    vmlinux = guest_str(kernel, "vmlinux")
    assert i32(kernel.call(m.addr(callbacks["pre_patch"]), vmlinux)) == 0
    kernel.memory.write(m.addr("pre_patch_ret"), struct.pack("<i", -19))
    assert i32(kernel.call(m.addr(callbacks["pre_patch"]), vmlinux)) == -19
    for kind in ("post_patch", "pre_unpatch", "post_unpatch"):
        kernel.call(m.addr(callbacks[kind]), vmlinux)
    assert klp_log(kernel, m).splitlines() == [
        "pre_patch_callback: vmlinux", "pre_patch_callback: vmlinux", "post_patch_callback: vmlinux",
        "pre_unpatch_callback: vmlinux", "post_unpatch_callback: vmlinux"]
    new = m.addr("livepatch_work_step_c")
    for x in (0, 1, 0xDEADBEEF, 1 << 63):
        assert kernel.call(new, x, cpu=1) == kernel.call("work_step_c", x, cpu=1)
    assert kernel.memory.read_u64(m.addr("livepatch_work_step_c_calls") + 8) == 4  # CPU 1's counter


def test_syscall_example(kernel: Kernel, loader: ModuleLoader, bundles: dict[str, PatchBundle]) -> None:
    """The new getpid returns the caller's pid and crosses it off klp_pids (the selftest's npids)."""
    m = load(loader, bundles["livepatch_syscall"])
    workers = [t.pid for t in kernel.tasks() if t.kind == "worker" and t.cpu == 0]
    pids = m.addr("klp_pids")
    for i, pid in enumerate(workers):
        kernel.memory.write_u64(pids + 8 * i, pid)
    got = kernel.call(m.addr("livepatch_sys_getpid"), 0, cpu=0)
    assert got in workers
    left = [kernel.memory.read_u64(pids + 8 * i) for i in range(len(workers))]
    assert sorted(p for p in left if p) == sorted(p for p in workers if p != got)


def test_state_examples(kernel: Kernel, loader: ModuleLoader, bundles: dict[str, PatchBundle]) -> None:
    """state v1, state2 v2, state3 v2: cumulative (replace), no functions, callbacks naming their version."""
    versions = {"livepatch_state": 1, "livepatch_state2": 2, "livepatch_state3": 2}
    vmlinux = guest_str(kernel, "vmlinux")
    for name, version in versions.items():
        mf = bundles[name].manifest
        assert (mf.replace, [(s.id, s.version) for s in mf.states], mf.objects[0].funcs) == (True, [(1, version)], ())
        m = load(loader, bundles[name])
        assert i32(kernel.call(m.addr(mf.objects[0].callbacks.named()["pre_patch"]), vmlinux)) == 0
        assert klp_log(kernel, m) == f"pre_patch_callback: vmlinux: state 0x1 version {version}\n"


# -- manifests -------------------------------------------------------------------------------------------------

def good_manifest(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {"name": "p", "build_id": "ab" * 20,
                              "objects": [{"funcs": [{"old_name": "cmdline_proc_show", "new_name": "n"}]}]}
    return {**doc, **changes}


def test_manifest_defaults_and_round_trip() -> None:
    m = Manifest.from_dict(good_manifest())
    assert (m.replace, m.states, m.objects[0].name, m.objects[0].funcs[0].old_sympos) == (False, (), "vmlinux", 0)
    assert Manifest.from_json(json.dumps(m.to_dict())) == m
    assert m.to_dict()["schema"] == 1


@pytest.mark.parametrize("changes", [
    {"objects": []},
    {"objects": [{"name": "some_module", "funcs": []}]},
    {"objects": [{"funcs": [{"old_name": "f", "new_name": "g"}, {"old_name": "f", "new_name": "h"}]}]},
    {"objects": [{"funcs": []}, {"funcs": []}]},
    {"states": [{"id": 1, "version": 1}, {"id": 1, "version": 2}]},
    {"states": [{"id": -1, "version": 1}]},
    {"name": "has space"},
    {"build_id": "not-hex"},
    {"replace": "yes please"},
    {"unknown_field": 1},
    {"schema": 2},
    {"objects": [{"funcs": [{"old_name": "f", "new_name": "g", "old_sympos": -1}]}]},
    {"objects": [{"funcs": [], "callbacks": {"pre_patch": "not an identifier"}}]},
])
def test_bad_manifests(changes: dict[str, object]) -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(good_manifest(**changes))
    assert err.value.code == "patch_manifest_invalid"


# -- the gate against a kernel ---------------------------------------------------------------------------------

def manifest_for(kernel: Kernel, old: str, sympos: int = 0) -> Manifest:
    return Manifest(name="p", build_id=kernel.image.build_id,
                    objects=(ObjectSpec(funcs=(FuncSpec(old_name=old, old_sympos=sympos, new_name="n"),)),))


def test_target_checks(kernel: Kernel) -> None:
    """Build id, existence (with sympos), ambiguity and traceability of every old function."""
    image, ks = kernel.image, kernel.kallsyms
    artifact.check_target(manifest_for(kernel, "cmdline_proc_show"), image, ks)
    artifact.check_target(manifest_for(kernel, "corpus_helper", 3), image, ks)
    wrong = manifest_for(kernel, "cmdline_proc_show").model_copy(update={"build_id": "00" * 20})
    cases: list[tuple[Manifest, type[LivepatchdError]]] = [
        (wrong, BuildIdMismatch),
        (manifest_for(kernel, "no_such_function"), OldFuncNotFound),
        (manifest_for(kernel, "corpus_helper", 99), OldFuncNotFound),
        (manifest_for(kernel, "saved_command_line"), OldFuncNotFound),  # data, not a function
        (manifest_for(kernel, "corpus_helper"), OldFuncAmbiguous),
        (manifest_for(kernel, "loadgen_round"), OldFuncNotTraceable),  # notrace
        (manifest_for(kernel, "memcpy"), OldFuncNotTraceable),
    ]
    for m, error in cases:
        with pytest.raises(error):
            artifact.check_target(m, image, ks)
    assert len({c.code for _, c in cases}) == 4


def test_object_must_define_what_the_manifest_names(bundles: dict[str, PatchBundle]) -> None:
    obj = bundles["livepatch_cmdline"].object
    good = bundles["livepatch_cmdline"].manifest
    artifact.check_object(good, obj)
    missing_func = good.model_copy(update={"objects": (ObjectSpec(funcs=(
        FuncSpec(old_name="cmdline_proc_show", new_name="not_in_object"),)),)})
    missing_callback = good.model_copy(update={"objects": (ObjectSpec(
        funcs=good.objects[0].funcs, callbacks=Callbacks(post_patch="no_such_callback")),)})
    for m, name in [(missing_func, "not_in_object"), (missing_callback, "no_such_callback")]:
        with pytest.raises(PatchFuncMissing) as err:
            artifact.check_object(m, obj)
        assert err.value.details["missing"] == [name]


def test_signature_is_checked_first(kernel: Kernel, bundles: dict[str, PatchBundle],
                                    key: Ed25519PrivateKey) -> None:
    """An unsigned bundle for another kernel is refused for the missing signature, before anything else."""
    b = bundles["livepatch_cmdline"]
    other = PatchBundle(b.manifest.model_copy(update={"build_id": "00" * 20}), b.object)
    with pytest.raises(SignatureMissing):
        artifact.admit(other, [key.public_key()], kernel.image, kernel.kallsyms)
    with pytest.raises(BuildIdMismatch):
        artifact.admit(signing.sign(other, key), [key.public_key()], kernel.image, kernel.kallsyms)


def test_compile_errors(tmp_path: Path, kernel: Kernel) -> None:
    m = manifest_for(kernel, "cmdline_proc_show")
    with pytest.raises(PatchBuildError, match="error"):
        artifact.build_patch("int n(void) { return undeclared; }\n", m, tmp_path)


# -- the bundle file -------------------------------------------------------------------------------------------

def test_bundle_round_trip(tmp_path: Path, bundles: dict[str, PatchBundle], key: Ed25519PrivateKey) -> None:
    for b in (bundles["livepatch_state"], signing.sign(bundles["livepatch_state"], key)):
        path = tmp_path / "b.lpb"
        b.save(path)
        assert PatchBundle.load(path) == b
        doc = json.loads(path.read_text())
        assert doc["format"] == "livepatchd-bundle/1"
        assert base64.b64decode(doc["object"]) == b.object


def test_malformed_bundles(tmp_path: Path, bundles: dict[str, PatchBundle], key: Ed25519PrivateKey) -> None:
    good = json.loads(signing.sign(bundles["livepatch_state"], key).to_bytes())
    sig = good["signature"]
    broken = [
        b"not json",
        json.dumps({**good, "format": "something-else/1"}).encode(),
        json.dumps({**good, "object": "***"}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "signature"}).encode(),
        json.dumps({**good, "signature": {**sig, "value": base64.b64encode(b"short").decode()}}).encode(),
        json.dumps({**good, "signature": {**sig, "algorithm": "rsa"}}).encode(),
        json.dumps({**good, "signature": {**sig, "key_id": "xyz"}}).encode(),
    ]
    for raw in broken:
        with pytest.raises(BundleFormatError):
            PatchBundle.from_bytes(raw)
    with pytest.raises(ManifestError):
        PatchBundle.from_bytes(json.dumps({**good, "manifest": {**good["manifest"], "name": ""}}).encode())
    with pytest.raises(BundleFormatError):
        PatchBundle.load(tmp_path / "absent.lpb")
