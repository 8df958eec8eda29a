"""Build the emulated kernel image (``daemon/guest/image/vmlinux``) reproducibly.

    python -m daemon.guest.build                    rebuild every shipped build's committed image
    python -m daemon.guest.build --check            rebuild each in a temporary folder; exit 1 if one differs
    python -m daemon.guest.build --release 6.6-lp1  only that build

Several builds ship (:data:`GUEST_BUILDS`), as a fleet runs several kernels: the same sources compiled with
per-build preprocessor defines (``-DLP_BUILD_6_1_LP2``, ``-DLP_BUILD_6_6``) and corpus variants, so that they
differ where live patches care — a function's body and size, a function renamed, a struct's layout, the
corpus — and in build id. A patch for a build is compiled with that build's defines (``GuestBuild.defines``), so
it sees the build's struct layouts.

The compiler is the ``ziglang`` package's clang. Every source is copied into one build folder and compiled
there under a relative name with ``-g0``, so the bytes do not depend on where the checkout lives.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from daemon.guest import abi, corpus
from daemon.guest.layout import render_c

GUEST_DIR = Path(__file__).resolve().parent
IMAGE_PATH = GUEST_DIR / "image" / "vmlinux"
"""The default build's image (:data:`DEFAULT_RELEASE`)."""


@dataclass(frozen=True)
class GuestBuild:
    """One shipped kernel build: its release string, the defines it is compiled with, its corpus, its image."""

    release: str
    defines: tuple[str, ...]
    corpus: corpus.CorpusVariant
    image: Path
    summary: str


DEFAULT_RELEASE = "6.1-lp1"
GUEST_BUILDS: dict[str, GuestBuild] = {b.release: b for b in (
    GuestBuild(DEFAULT_RELEASE, (), corpus.DEFAULT_CORPUS, IMAGE_PATH, "the reference build"),
    GuestBuild("6.1-lp2", ("-DLP_BUILD_6_1_LP2",), corpus.DEFAULT_CORPUS, GUEST_DIR / "image" / "vmlinux-6.1-lp2",
               "a stable update: cmdline_proc_show checks its seq_file (a larger body); same corpus"),
    GuestBuild("6.6-lp1", ("-DLP_BUILD_6_6",), corpus.CorpusVariant(nr_functions=10_880, params_seed=20261166),
               GUEST_DIR / "image" / "vmlinux-6.6-lp1",
               "a new series: cmdline_proc_show as in 6.1-lp2, klp_demo_target renamed klp_demo_compute, "
               "struct seq_file gained a field before count, a larger corpus with other constants"),
)}
"""Every shipped build, by release (``KernelState.release``)."""


def release_of(image: Path) -> str | None:
    """The release of a shipped build's image, or None for any other image."""
    resolved = image.resolve()
    return next((b.release for b in GUEST_BUILDS.values() if b.image.resolve() == resolved), None)

# -fpatchable-function-entry=4,2 as Linux's CALL_OPS build: two NOPs before the symbol (the 8-byte ops
# literal) and two at entry; zig's driver wants the offset through -Xclang. 8-byte function alignment keeps
# the literal naturally aligned. No sibling calls, so every non-leaf function keeps its frame record; leaf
# functions have none (a task can only be stopped inside schedule(), never in a leaf, so the unwinder loses
# nothing, and unicorn 2.1.4 makes every store dear: ~30 ns on the notdirty slow path).
CFLAGS = [
    "--target=aarch64-freestanding-none",
    "-O2",
    "-g0",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-fno-stack-protector",
    "-fno-pic",
    "-mgeneral-regs-only",
    "-fno-omit-frame-pointer",
    "-momit-leaf-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-falign-functions=8",
    "-fpatchable-function-entry=4",
    "-Xclang",
    "-fpatchable-function-entry-offset=2",
    "-Wall",
    "-Werror",
    "-Iinclude",
]
LDFLAGS = ["--target=aarch64-freestanding-none", "-nostdlib", "-Wl,--no-gc-sections", "-Wl,--build-id=sha1",
           "-Wl,-T,kernel.lds", "-Wl,-z,norelro"]
SOURCES = ["entry.S", "ftrace_entry.S", "sched.c", "lib.c", "workload.c", "ftrace.c", "fgraph.c", "livepatch.c",
           "kprobes_entry.S", "kprobes.c", "kprobes_selftest.c"]


def _zig_cc(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ziglang", "cc", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"zig cc {' '.join(args)} failed:\n{proc.stderr}")


def write_headers(build_dir: Path) -> None:
    """The guest's headers and the generated ABI header in ``build_dir/include`` (-Iinclude); live patches too."""
    (build_dir / "include").mkdir(parents=True, exist_ok=True)
    for header in (GUEST_DIR / "include").glob("*.h"):
        shutil.copy(header, build_dir / "include" / header.name)
    (build_dir / "include" / "abi.h").write_text(
        render_c(abi.STRUCTS, abi.CONSTANTS, "Generated by daemon/guest/build.py from daemon/guest/abi.py."))


def prepare(build_dir: Path, variant: corpus.CorpusVariant = corpus.DEFAULT_CORPUS) -> list[str]:
    """Lay out sources, the generated ABI header and the corpus in ``build_dir``; returns sources to compile."""
    write_headers(build_dir)
    for src in SOURCES:
        shutil.copy(GUEST_DIR / "src" / src, build_dir / src)
    shutil.copy(GUEST_DIR / "kernel.lds", build_dir / "kernel.lds")
    return SOURCES + [p.name for p in corpus.write_sources(build_dir, variant)]


def build(build_dir: Path, release: str = DEFAULT_RELEASE) -> Path:
    """Compile and link the build ``release`` into ``build_dir/vmlinux``."""
    spec = GUEST_BUILDS[release]
    sources = prepare(build_dir, spec.corpus)
    lds = (build_dir / "kernel.lds").read_text()
    if f"{abi.KIMAGE_VADDR:#x}" not in lds:
        raise RuntimeError("kernel.lds does not link at abi.KIMAGE_VADDR")
    objects = [Path(s).with_suffix(".o").name for s in sources]
    with ThreadPoolExecutor() as pool:
        jobs = [pool.submit(_zig_cc, [*CFLAGS, *spec.defines, "-c", src, "-o", obj], build_dir)
                for src, obj in zip(sources, objects, strict=True)]
        for job in jobs:
            job.result()
    _zig_cc([*LDFLAGS, "-o", "vmlinux", *objects], build_dir)
    return build_dir / "vmlinux"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a fresh build differs from its image")
    parser.add_argument("--release", action="append", choices=sorted(GUEST_BUILDS),
                        help="only this build (repeatable; default: every shipped build)")
    args = parser.parse_args(argv)
    stale = 0
    for release in args.release or list(GUEST_BUILDS):
        image = GUEST_BUILDS[release].image
        with tempfile.TemporaryDirectory(prefix="lpd-guest-") as tmp:
            built = build(Path(tmp), release)
            if args.check:
                if not image.exists() or _digest(built) != _digest(image):
                    print(f"guest image {release} is stale: rebuild with `python -m daemon.guest.build` ({image})")
                    stale += 1
                else:
                    print(f"guest image {release} up to date ({_digest(built)[:16]})")
                continue
            image.parent.mkdir(exist_ok=True)
            shutil.copy(built, image)
            print(f"wrote {release}: {image} ({image.stat().st_size} bytes, sha256 {_digest(image)[:16]})")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
