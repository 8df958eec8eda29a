"""First-fit allocator over a guest memory range: kernel data the host builds (ops, hashes, buffers)."""

from __future__ import annotations

import threading

from daemon.errors import GuestError


class GuestAllocator:
    """Hands out 16-byte aligned blocks of [base, base + size); frees coalesce."""

    def __init__(self, base: int, size: int, name: str) -> None:
        self.base, self.size, self.name = base, size, name
        self._free: list[tuple[int, int]] = [(base, size)]
        self._lock = threading.Lock()

    @staticmethod
    def _round(size: int) -> int:
        return -(-max(size, 1) // 16) * 16

    def alloc(self, size: int) -> int:
        size = self._round(size)
        with self._lock:
            for i, (addr, avail) in enumerate(self._free):
                if avail >= size:
                    self._free[i] = (addr + size, avail - size)
                    return addr
        raise GuestError(f"{self.name} exhausted ({size} bytes requested)", requested=size)

    def free(self, addr: int, size: int) -> None:
        size = self._round(size)
        with self._lock:
            blocks = sorted([*self._free, (addr, size)])
            merged: list[tuple[int, int]] = []
            for a, s in blocks:
                if merged and merged[-1][0] + merged[-1][1] == a:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                elif s:
                    merged.append((a, s))
            self._free = merged

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._free)
