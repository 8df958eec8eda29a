"""The emulated generic timer: what guest timestamps (``cntvct_el0`` ticks) are worth in wall time."""

from __future__ import annotations

from daemon.guest import abi

TICKS_PER_SECOND = abi.CNTFRQ_HZ


def ticks_to_us(ticks: int) -> int:
    """Whole microseconds in ``ticks`` counter ticks (rounded down, as the kernel's trace clock prints them)."""
    return ticks * 1_000_000 // TICKS_PER_SECOND
