"""Building live patches from C, and the checks a patch bundle must pass before anything is loaded.

A live patch is a relocatable object compiled from C with the guest kernel's own flags
(:data:`daemon.guest.build.CFLAGS`: same target, same ``-fpatchable-function-entry=4,2``, so the replacement
functions are traceable too) plus its :class:`~patchformat.manifest.Manifest`, in a
:class:`~patchformat.bundle.PatchBundle`. The build is reproducible: each source is compiled in its own
folder under a relative name with ``-g0``, so the object's bytes depend only on the source, the headers and
the compiler.

:func:`admit` is the gate, in this order (each refusal has its own code, see ``daemon/errors.py``):

1. signature: present, by a trusted key, over exactly this object and manifest (:func:`signing.verify`);
2. object: a well-formed AArch64 ET_REL that defines every new function and callback the manifest names;
3. target: the kernel's build id, and every old function in kallsyms (``old_sympos`` when the name is
   duplicated) with a patchable-entry record (traceable).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.errors import (
    AmbiguousSymbol,
    BuildIdMismatch,
    OldFuncAmbiguous,
    OldFuncNotFound,
    OldFuncNotTraceable,
    PatchBuildError,
    PatchFuncMissing,
    PatchMisaligned,
    SymbolError,
)
from daemon.ftrace import ftrace_call_adjust, func_addr
from daemon.guest import build
from daemon.kernel.image import KernelImage
from daemon.kernel.kallsyms import Kallsyms, Symbol
from daemon.module_loader import elf
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.manifest import Manifest

PATCHES_DIR = build.GUEST_DIR / "patches"  # example patches and livepatch.h, the patch-side ABI
COMPILE_TIMEOUT = 120.0


def compile_object(source: str, name: str, workdir: Path, *, suffix: str = ".c",
                   include_dirs: Sequence[Path] = (PATCHES_DIR,), release: str = build.DEFAULT_RELEASE) -> bytes:
    """Compile one C (or ``.S``) source with the flags and defines of the guest build ``release`` (so that its
    struct layouts are that build's); returns the relocatable object.

    Works in ``workdir/name/``: the guest headers and the generated ABI header go to ``include/`` (with the
    ``*.h`` of ``include_dirs``), the source is written as ``name + suffix``.
    """
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    build.write_headers(folder)
    for inc in include_dirs:
        for header in sorted(inc.glob("*.h")):
            shutil.copy(header, folder / "include" / header.name)
    src, obj = f"{name}{suffix}", f"{name}.o"
    (folder / src).write_text(source)
    try:
        proc = subprocess.run([sys.executable, "-m", "ziglang", "cc", *build.CFLAGS,
                               *build.GUEST_BUILDS[release].defines, "-c", src, "-o", obj], cwd=folder,
                              capture_output=True, text=True, check=False, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise PatchBuildError(f"compiling {src} took more than {COMPILE_TIMEOUT} s", source=src) from None
    if proc.returncode != 0:
        raise PatchBuildError(f"compiling {src} failed:\n{proc.stderr.strip()}", source=src,
                              stderr=proc.stderr)
    return (folder / obj).read_bytes()


def build_patch(source: str, manifest: Manifest, workdir: Path, *,
                include_dirs: Sequence[Path] = (PATCHES_DIR,), release: str = build.DEFAULT_RELEASE) -> PatchBundle:
    """Compile a patch's C source into an (unsigned) bundle for the guest build ``release``, checked against
    its manifest (the manifest's build_id is not checked here: see :func:`build_for`)."""
    obj = compile_object(source, manifest.name, workdir, include_dirs=include_dirs, release=release)
    check_object(manifest, obj)
    return PatchBundle(manifest, obj)


def build_for(source: str, template: Manifest, workdir: Path, *, release: str, image: KernelImage,
              kallsyms: Kallsyms, include_dirs: Sequence[Path] = (PATCHES_DIR,)) -> PatchBundle:
    """Build a patch for one shipped build: its build id in the manifest, its defines, and every old function
    checked against its kallsyms first (a function the build lacks, e.g. inlined away, is refused here, with the
    function and the build named, not at load time on a host)."""
    manifest = template.model_copy(update={"build_id": image.build_id})
    for o in manifest.objects:
        for f in o.funcs:
            try:
                old_function(kallsyms, f.old_name, f.old_sympos, manifest.name)
            except OldFuncNotFound:
                raise OldFuncNotFound(f"patch {manifest.name}: kernel build {release} ({image.build_id[:16]}) has "
                                      f"no function {f.old_name!r} (renamed or inlined away in that build); "
                                      "drop that build or adapt the patch", patch=manifest.name,
                                      symbol=f.old_name, release=release, build_id=image.build_id) from None
    subdir = workdir / release
    subdir.mkdir(parents=True, exist_ok=True)
    return build_patch(source, manifest, subdir, include_dirs=include_dirs, release=release)


def defined_functions(obj: bytes) -> set[str]:
    """Names of the functions the object defines in executable sections."""
    parsed = elf.parse(obj)
    code = {s.index for s in parsed.sections if s.alloc and s.executable}
    return {s.name for s in parsed.symbols if s.type == elf.STT_FUNC and s.shndx in code and s.name}


def check_object(manifest: Manifest, obj: bytes) -> None:
    """The object is a well-formed relocatable object defining every function the manifest names."""
    have = defined_functions(obj)
    missing = [name for name in manifest.functions() if name not in have]
    if missing:
        raise PatchFuncMissing(f"patch {manifest.name}: the object does not define {', '.join(missing)}",
                               patch=manifest.name, missing=missing)


_TRACEABLE: dict[str, frozenset[int]] = {}  # by build id: an image's records never change


def traceable_functions(image: KernelImage) -> frozenset[int]:
    """Addresses of the functions that have a patchable-entry record (mcount_loc)."""
    found = _TRACEABLE.get(image.build_id)
    if found is None:
        out = set()
        for entry in image.mcount_loc():
            try:
                out.add(func_addr(ftrace_call_adjust(entry)))
            except PatchMisaligned:
                continue  # a misaligned record can never be used: its function is not traceable
        found = _TRACEABLE[image.build_id] = frozenset(out)
    return found


def old_function(kallsyms: Kallsyms, name: str, sympos: int, patch: str) -> Symbol:
    """klp_find_object_symbol: the function a patch replaces."""
    try:
        sym = kallsyms.lookup(name, sympos)
    except AmbiguousSymbol as exc:
        raise OldFuncAmbiguous(f"patch {patch}: {exc.message}", patch=patch, **exc.details) from None
    except SymbolError as exc:
        raise OldFuncNotFound(f"patch {patch}: {exc.message}", patch=patch, **exc.details) from None
    if not sym.is_func:
        raise OldFuncNotFound(f"patch {patch}: {name!r} is not a function", patch=patch, symbol=name)
    return sym


def check_target(manifest: Manifest, image: KernelImage, kallsyms: Kallsyms) -> None:
    """The patch is for this kernel build and every old function exists and is traceable."""
    if manifest.build_id != image.build_id:
        raise BuildIdMismatch(f"patch {manifest.name} is for kernel build {manifest.build_id[:16]}, this kernel "
                              f"is {image.build_id[:16]}", patch=manifest.name, expected=manifest.build_id,
                              actual=image.build_id)
    traceable = traceable_functions(image)
    for o in manifest.objects:
        for f in o.funcs:
            sym = old_function(kallsyms, f.old_name, f.old_sympos, manifest.name)
            if sym.addr not in traceable:
                raise OldFuncNotTraceable(f"patch {manifest.name}: {f.old_name} has no patchable entry (notrace)",
                                          patch=manifest.name, symbol=f.old_name)


def admit(bundle: PatchBundle, trusted_public_keys: Iterable[Ed25519PublicKey], image: KernelImage,
          kallsyms: Kallsyms) -> str:
    """Every check a bundle must pass before it is loaded; returns the signer's key id."""
    key = signing.verify(bundle, trusted_public_keys)
    check_object(bundle.manifest, bundle.object)
    check_target(bundle.manifest, image, kallsyms)
    return key
