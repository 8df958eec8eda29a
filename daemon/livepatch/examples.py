"""The example patches in ``daemon/guest/patches``, modelled on Linux's livepatch selftest modules.

Each example is ``<name>.c`` with ``<name>.manifest.json`` beside it: the manifest without ``build_id``,
which is filled in for the kernel the patch is built for (by default the committed image).

==========================  ==================================  =============================================
example                     replaces (replace flag)             shows
==========================  ==================================  =============================================
livepatch_cmdline           cmdline_proc_show                   basic patching (test_klp_livepatch)
livepatch_atomic_replace    cmdline_proc_show (replace)         atomic replace (test_klp_atomic_replace)
livepatch_callbacks_demo    work_step_c, same result, counted   the four callbacks, a failing pre_patch
livepatch_syscall           __arm64_sys_getpid                  per-task switching on a hot syscall
livepatch_state             nothing (replace), state 1 v1       system states (test_klp_state)
livepatch_state2            nothing (replace), state 1 v2       taking a state over (test_klp_state2)
livepatch_state3            nothing (replace), state 1 v2       compatible with state2 (test_klp_state3)
livepatch_shadow_vars       nothing                             shadow variables (test_klp_shadow_vars), through
                                                                the kernel's :class:`Livepatch` (its ShadowVars)
livepatch_sleeper           sleeper_middle (+20 instead of +10) a busy task stalling the transition, with
                                                                logging callbacks (test_klp_callbacks_busy)
livepatch_demo_target       klp_demo_target (5x+2 for 3x+1)     a result that tells versions apart (stress)
livepatch_seq_count         cmdline_proc_show                   reading a struct whose layout changed between
                                                                builds (seq_file.count: 16 in 6.1, 24 in 6.6),
                                                                built per build
==========================  ==================================  =============================================
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from daemon.errors import ManifestError
from daemon.guest.build import GUEST_BUILDS, IMAGE_PATH
from daemon.kernel.kernel import load_image
from daemon.livepatch.artifact import PATCHES_DIR, build_for, build_patch
from patchformat.bundle import PatchBundle
from patchformat.manifest import Manifest

_SUFFIX = ".manifest.json"


def example_names() -> list[str]:
    return sorted(p.name.removesuffix(_SUFFIX) for p in PATCHES_DIR.glob(f"*{_SUFFIX}"))


def example_manifest(name: str, build_id: str) -> Manifest:
    """The example's manifest for the kernel build ``build_id``."""
    path = PATCHES_DIR / f"{name}{_SUFFIX}"
    try:
        template = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read example manifest {path}: {exc}", path=str(path)) from None
    return Manifest.from_dict({**template, "build_id": build_id})


def example_source(name: str) -> str:
    return (PATCHES_DIR / f"{name}.c").read_text()


def build_example(name: str, workdir: Path, build_id: str | None = None) -> PatchBundle:
    """Compile one example into an unsigned bundle for ``build_id`` (default: the committed image's)."""
    if build_id is None:
        build_id = load_image(IMAGE_PATH)[0].build_id
    return build_patch(example_source(name), example_manifest(name, build_id), workdir)


def build_example_for(name: str, workdir: Path, release: str) -> PatchBundle:
    """Compile one example for the shipped kernel build ``release`` (its defines and build id); a function the
    build lacks is refused (``patch_old_func_not_found`` naming the function and the build)."""
    image, kallsyms = load_image(GUEST_BUILDS[release].image)
    return build_for(example_source(name), example_manifest(name, image.build_id), workdir / name, release=release,
                     image=image, kallsyms=kallsyms)


def build_examples(workdir: Path, build_id: str | None = None) -> dict[str, PatchBundle]:
    """Compile every example (in parallel) into unsigned bundles, by name."""
    if build_id is None:
        build_id = load_image(IMAGE_PATH)[0].build_id
    names = example_names()
    with ThreadPoolExecutor(max_workers=4) as pool:
        bundles = list(pool.map(lambda n: build_example(n, workdir, build_id), names))
    return dict(zip(names, bundles, strict=True))
