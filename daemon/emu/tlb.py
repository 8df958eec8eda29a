"""The vCPUs' TLB: Unicorn's emulated CPU TLB, or its virtual TLB filled by the native ``lpd_tlb_fill``.

unicorn 2.1.4 sends every guest store through the ``notdirty_write`` slow path under the CPU TLB (with the
guest MMU off every page is also executable, so a page's dirty state is never cached), ~30 ns a store. The
virtual TLB asks a fill callback for each page it misses; ``daemon/emu/native/tlb_fill.c`` answers with the
permissions of the region holding the page (text r-x, rodata r--, data rw-, ...), so data pages are not
executable and their stores run at full speed. A Python callback would cost ~3 µs a miss, hence native code.

Unicorn's AArch64 target page is 1 KiB: fills arrive for ``vaddr & ~0x3ff``. A refused fill stops the engine
with ``UC_ERR_EXCEPTION``; :func:`refusal_error` turns the refusal the callback recorded back into the error the
CPU TLB reports for the same access (``UC_ERR_WRITE_PROT``, ``UC_ERR_READ_UNMAPPED``, ...), so a guest fault
reads the same in both modes.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence

import unicorn
from unicorn.unicorn_py3 import unicorn as uc_binding

from daemon.emu.memory import Region
from daemon.emu.native.build import fill_callback_address
from daemon.errors import NativeBuildError

MAX_REGIONS = 32  # LPD_MAX_REGIONS in tlb_fill.c
TARGET_PAGE_SIZE = 1 << 10
"""Unicorn's AArch64 TARGET_PAGE_SIZE: the TLB's granule (and the fill callback's)."""
_NOT_MAPPED = (1 << 64) - 1
_UC_MEM_READ, _UC_MEM_WRITE, _UC_MEM_FETCH = 16, 17, 18


class TlbMode(enum.StrEnum):
    CPU = "cpu"
    """Unicorn's emulated CPU TLB: every guest store takes the notdirty slow path."""
    VIRTUAL = "virtual"
    """Unicorn's virtual TLB with the native fill callback: the faster mode for traced and patched calls."""


DEFAULT_TLB_MODE = TlbMode.VIRTUAL


class _Region(ctypes.Structure):
    _fields_ = (("base", ctypes.c_uint64), ("end", ctypes.c_uint64), ("perms", ctypes.c_uint64))


class FillTable(ctypes.Structure):
    """``struct lpd_tlb_table``: one per engine, read by its fill callback, written only by its vCPU thread."""

    _fields_ = (
        ("nr_regions", ctypes.c_uint64),
        ("fills", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("refused_page", ctypes.c_uint64),
        ("refused_type", ctypes.c_uint64),
        ("refused_perms", ctypes.c_uint64),
        ("regions", _Region * MAX_REGIONS),
    )
    fills_at_flush: int = 0
    """``fills`` when grow_tlb_if_churning last flushed (host-side bookkeeping, not seen by the C code)."""
    flushes: int = 0

    @classmethod
    def of(cls, regions: Sequence[Region]) -> FillTable:
        if len(regions) > MAX_REGIONS:
            raise NativeBuildError(f"{len(regions)} memory regions: the TLB fill table holds {MAX_REGIONS}",
                                   regions=len(regions))
        table = cls()
        ordered = sorted(regions, key=lambda r: r.base)
        for i, r in enumerate(ordered):
            if r.base % TARGET_PAGE_SIZE or r.size % TARGET_PAGE_SIZE:
                raise ValueError(f"region {r.name} is not aligned to the TLB's {TARGET_PAGE_SIZE}-byte pages")
            table.regions[i] = _Region(r.base, r.end, int(r.perms))
        table.nr_regions = len(ordered)
        return table


def install_fill_hook(uc: unicorn.Uc, table: FillTable) -> None:
    """Switch ``uc`` to the virtual TLB, filled by the native callback from ``table`` (kept alive by the caller).

    The binding's ``hook_add`` only takes Python callables; the C function's address goes straight to
    ``uc_hook_add`` (the binding's own call, with the table as user data).
    """
    address = fill_callback_address()
    uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
    handle = uc_binding.uc_hook_h()
    status = uc_binding.uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_TLB_FILL,
                                          ctypes.c_void_p(address), ctypes.cast(ctypes.byref(table), ctypes.c_void_p),
                                          ctypes.c_uint64(1), ctypes.c_uint64(0))
    if status != unicorn.UC_ERR_OK:
        raise unicorn.UcError(status)


GROW_AFTER_FILLS = 1024
"""Fills since the last flush past which a host call flushes the engine's TLB (see grow_tlb_if_churning)."""


def grow_tlb_if_churning(uc: unicorn.Uc, table: FillTable) -> bool:
    """Flush ``uc``'s TLB if it missed ``GROW_AFTER_FILLS`` times since the last flush; on its vCPU's thread only.

    QEMU sizes each TLB only when it is flushed (``tlb_mmu_resize_locked``: doubled when more than 70 % of it
    was in use, from 256 entries), and nothing flushes it here: the guest never changes its MMU. So a working set
    larger than 256 pages of 1 KiB (the corpus walk: random calls over ~600 KiB of text and ~320 KiB of tables)
    misses 1.4 times a call forever, ~100 ns each. Flushing when the misses pile up lets QEMU grow the TLB to the
    working set (the corpus walk then misses ~0.003 times a call); a TLB that does not churn is never flushed,
    so the rule costs nothing in steady state and never shrinks a TLB in use (QEMU shrinks only below 30 % use).
    """
    if table.fills - table.fills_at_flush < GROW_AFTER_FILLS:
        return False
    uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
    table.fills_at_flush = table.fills
    table.flushes += 1
    return True


def refusal_error(table: FillTable) -> unicorn.UcError | None:
    """The CPU TLB's error for the access the fill callback refused last, or None if it refused nothing."""
    if not table.refused:
        return None
    kind = table.refused_type
    if table.refused_perms == _NOT_MAPPED:
        errno = {_UC_MEM_WRITE: unicorn.UC_ERR_WRITE_UNMAPPED,
                 _UC_MEM_FETCH: unicorn.UC_ERR_FETCH_UNMAPPED}.get(kind, unicorn.UC_ERR_READ_UNMAPPED)
    else:
        errno = {_UC_MEM_WRITE: unicorn.UC_ERR_WRITE_PROT,
                 _UC_MEM_FETCH: unicorn.UC_ERR_FETCH_PROT}.get(kind, unicorn.UC_ERR_READ_PROT)
    return unicorn.UcError(errno)
