"""Build, cache and load the native TLB fill callback (``tlb_fill.c``) reproducibly.

    python -m daemon.emu.native.build            rebuild for every supported host; update tlb_fill.sha256
    python -m daemon.emu.native.build --check    rebuild in a temporary folder; exit 1 if a digest differs

The compiler is the ``ziglang`` package's clang (a PyPI dependency: nothing else to install), so a fresh machine
builds the library on first use, whether livepatchd was installed with ``pip install .`` or ``-e .``. The result
is cached per user under a name derived from the source, the flags, the compiler version and the target, so a
daemon start costs one ``stat`` and a ``dlopen`` once it is built; an edit of the source builds a new file.
The source is compiled under a relative name in an empty folder, freestanding, without a build id, so the bytes
depend on nothing but those inputs (``tlb_fill.sha256`` holds them; CI checks them as the guest image's).
A library that cannot be built is an error that says why: the daemon never falls back to a slower mode.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from daemon.errors import NativeBuildError

NATIVE_DIR = Path(__file__).resolve().parent
SOURCE = NATIVE_DIR / "tlb_fill.c"
DIGESTS = NATIVE_DIR / "tlb_fill.sha256"
SYMBOL = "lpd_tlb_fill"
TARGETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
"""Host machine (``platform.machine()``, normalised) -> zig target triple."""
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
CFLAGS = ["-shared", "-fPIC", "-O2", "-g0", "-ffreestanding", "-nostdlib", "-fno-stack-protector", "-Wall",
          "-Werror", "-Wl,--build-id=none"]
CACHE_ENV = "LIVEPATCHD_CACHE_DIR"

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}


def host_target() -> str:
    """The zig target triple of this host, or NativeBuildError on a host the library is not built for."""
    machine = platform.machine().lower()
    machine = _MACHINE_ALIASES.get(machine, machine)
    if sys.platform != "linux" or machine not in TARGETS:
        raise NativeBuildError(f"the native TLB fill callback is built for Linux on {', '.join(TARGETS)}, not "
                               f"{sys.platform} on {platform.machine()}", platform=sys.platform,
                               machine=platform.machine())
    return TARGETS[machine]


def _zig_version() -> str:
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError as exc:
        raise NativeBuildError("the ziglang package (livepatchd's C compiler) is not installed: "
                               "pip install ziglang") from exc


def cache_key(target: str) -> str:
    """What the library's bytes depend on: source, flags, compiler version, target."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), _zig_version().encode(), target.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "livepatchd" / "native"


def compile_to(target: str, out: Path) -> None:
    """Compile ``tlb_fill.c`` for ``target`` into ``out`` (in an empty folder, under a relative name)."""
    with tempfile.TemporaryDirectory(prefix="lpd-native-") as tmp:
        shutil.copy(SOURCE, Path(tmp) / SOURCE.name)
        cmd = [sys.executable, "-m", "ziglang", "cc", "-target", target, *CFLAGS, "-o", "lib.so", SOURCE.name]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeBuildError(f"cannot run the C compiler ({' '.join(cmd[:4])}): {exc}") from exc
        if proc.returncode != 0:
            raise NativeBuildError(f"building the native TLB fill callback failed (zig cc, target {target}):\n"
                                   f"{proc.stderr.strip()}", target=target)
        shutil.copyfile(Path(tmp) / "lib.so", out)


def library_path(target: str | None = None) -> Path:
    """The cached library for ``target`` (default: this host), built first if it is not there yet."""
    target = target or host_target()
    path = cache_dir() / f"tlb_fill-{target}-{cache_key(target)}.so"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise NativeBuildError(f"cannot write the native library cache {path.parent}: {exc.strerror}; set "
                               f"{CACHE_ENV} to a writable folder", path=str(path.parent)) from exc
    tmp = Path(tmp_name)
    try:
        compile_to(target, tmp)
        os.replace(tmp, path)  # atomic: a concurrent builder of the same key writes the same bytes
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fill_callback_address() -> int:
    """Address of ``lpd_tlb_fill`` in the (built, cached, loaded once per process) library for this host."""
    with _lock:
        path = library_path()
        lib = _loaded.get(path)
        if lib is None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise NativeBuildError(f"cannot load the native TLB fill callback {path}: {exc}; delete it to "
                                       "rebuild", path=str(path)) from exc
            _loaded[path] = lib
        address = ctypes.cast(getattr(lib, SYMBOL), ctypes.c_void_p).value
    if not address:
        raise NativeBuildError(f"{path} has no {SYMBOL}", path=str(path))
    return address


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_digests() -> dict[str, str]:
    out = {}
    for line in DIGESTS.read_text().splitlines():
        if line.strip():
            digest, target = line.split()
            out[target] = digest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.emu.native.build", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a fresh build differs from tlb_fill.sha256")
    args = parser.parse_args(argv)
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lpd-native-check-") as tmp:
        for target in TARGETS.values():
            out = Path(tmp) / f"{target}.so"
            compile_to(target, out)
            digests[target] = _digest(out)
    if args.check:
        committed = read_digests()
        bad = [t for t in TARGETS.values() if committed.get(t) != digests[t]]
        for t in bad:
            print(f"{t}: built {digests[t]}, {DIGESTS.name} says {committed.get(t, 'nothing')}", file=sys.stderr)
        if bad:
            print(f"the native library is not reproducible from source (zig {_zig_version()}): rebuild with "
                  "python -m daemon.emu.native.build and commit tlb_fill.sha256", file=sys.stderr)
            return 1
        print(f"native library reproducible: {', '.join(f'{t} {d[:16]}' for t, d in digests.items())}")
        return 0
    DIGESTS.write_text("".join(f"{d}  {t}\n" for t, d in digests.items()))
    print(f"wrote {DIGESTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
