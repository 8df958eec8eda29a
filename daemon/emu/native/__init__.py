"""Native helpers of the emulator, shipped prebuilt: one shared object per host architecture.

``tlbfill.c`` is the vCPUs' virtual-TLB fill callback (see :mod:`daemon.emu.tlb`). It is built with the
``ziglang`` toolchain that the guest kernel already uses, cross-compiled for every supported host from any
host, with flags that make the bytes depend on the source alone; the objects are committed and packaged like
the guest image, so no daemon start compiles anything, and CI checks that the source still builds to the
committed bytes (``python -m daemon.emu.native --check``).

=========================  ===========================================================================
host (``platform.machine``)  object
=========================  ===========================================================================
x86_64 / AMD64               ``tlbfill-x86_64-linux.so``
aarch64 / arm64              ``tlbfill-aarch64-linux.so``
=========================  ===========================================================================
"""

from __future__ import annotations

import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tlbfill.c"
TARGETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class NativeUnavailable(RuntimeError):
    """No native object for this host: the virtual TLB cannot be used (the message says what to do)."""


def host_arch() -> str:
    machine = platform.machine().lower()
    arch = _ALIASES.get(machine)
    if arch is None or platform.system() != "Linux":
        raise NativeUnavailable(
            f"no native TLB fill object for {platform.system()}/{machine} (shipped: "
            f"{', '.join(f'Linux/{a}' for a in TARGETS)}); run with tlb_mode='cpu' "
            "(LIVEPATCHD_TLB_MODE=cpu) or add the target to daemon/emu/native")
    return arch


def object_path(arch: str) -> Path:
    return HERE / f"tlbfill-{arch}-linux.so"


def host_object() -> Path:
    """The committed object for this host, or a clear error."""
    path = object_path(host_arch())
    if not path.is_file():
        raise NativeUnavailable(f"{path} is missing from the installation: rebuild it with "
                                "`python -m daemon.emu.native` (needs the ziglang package)")
    return path
