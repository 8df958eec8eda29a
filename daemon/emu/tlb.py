"""Which TLB a vCPU engine translates guest addresses with.

================  ===================================================================================
mode              what happens
================  ===================================================================================
``virtual``       Unicorn's virtual TLB, filled by the native ``lp_tlb_fill`` (:mod:`daemon.emu.native`):
                  guest virtual = guest physical; the regions' permissions are enforced below the TLB,
                  as in ``cpu`` mode. Stores take the fast path. The default.
``cpu``           the emulated CPU's own TLB. Unicorn 2.1.4 sends every guest store through its
                  ``notdirty_write`` slow path in this mode (~60 ns a store).
================  ===================================================================================

Both modes fault the same way: a store to text is ``UC_ERR_WRITE_PROT``, a fetch from data
``UC_ERR_FETCH_PROT``, an access outside every region ``UC_ERR_*_UNMAPPED`` (tests/test_tlb.py holds both modes
to it).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

import unicorn
from unicorn.unicorn_py3 import unicorn as _binding

from daemon.emu.native import host_object

TlbMode = Literal["virtual", "cpu"]
TLB_MODES: tuple[TlbMode, ...] = ("virtual", "cpu")


@functools.cache
def _fill_function() -> int:
    """Address of ``lp_tlb_fill`` in the native object (loaded once per process; it holds no state)."""
    lib = ctypes.CDLL(str(host_object()))
    address = ctypes.cast(lib.lp_tlb_fill, ctypes.c_void_p).value
    assert address is not None
    return address


class FillCounter:
    """One engine's TLB miss counter, incremented by the native fill (keep it alive as long as the engine)."""

    def __init__(self) -> None:
        self._value = ctypes.c_uint64(0)

    @property
    def fills(self) -> int:
        return int(self._value.value)

    @property
    def address(self) -> int:
        return ctypes.addressof(self._value)


def use_virtual_tlb(uc: unicorn.Uc, counter: FillCounter) -> None:
    """Switch ``uc`` to the virtual TLB with the native identity fill, counting misses in ``counter``."""
    uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
    handle = _binding.uc_hook_h()
    # The binding only registers Python callbacks; the native one goes to uc_hook_add directly, as the
    # binding's own registration does (begin=1, end=0: every address).
    status = _binding.uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_TLB_FILL,
                                        ctypes.c_void_p(_fill_function()), ctypes.c_void_p(counter.address),
                                        ctypes.c_uint64(1), ctypes.c_uint64(0))
    if status != unicorn.UC_ERR_OK:
        raise unicorn.UcError(status)
