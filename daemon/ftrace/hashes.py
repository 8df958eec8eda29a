"""Guest ftrace hash tables: open addressing over record ips, probed by the guest's hash_contains().

The bucket of ``ip`` is ``((ip >> 2) * HASH_MULTIPLIER) >> (64 - size_bits)`` with linear probing, 0 marking
an empty bucket; tables are at most half full, so a lookup touches one or two buckets.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from daemon.guest import abi
from daemon.kernel.heap import GuestAllocator
from daemon.kernel.kernel import Kernel

_MASK64 = (1 << 64) - 1


def bucket(ip: int, size_bits: int) -> int:
    return (((ip >> 2) * abi.HASH_MULTIPLIER) & _MASK64) >> (64 - size_bits)


class GuestHash:
    """A hash table written into guest memory; ``addr`` is its struct ftrace_hash."""

    def __init__(self, kernel: Kernel, ips: Collection[int]) -> None:
        self.kernel = kernel
        self.ips = frozenset(ips)
        self.size_bits = max(2, (2 * len(self.ips)).bit_length())
        size = 1 << self.size_bits
        table = [0] * size
        for ip in sorted(self.ips):
            i = bucket(ip, self.size_bits)
            while table[i]:
                i = (i + 1) & (size - 1)
            table[i] = ip
        heap: GuestAllocator = kernel.heap
        self._buckets_size = 8 * size
        self.buckets = heap.alloc(self._buckets_size)
        kernel.memory.write(self.buckets, struct.pack(f"<{size}Q", *table))
        self.addr = heap.alloc(abi.ftrace_hash.size)
        kernel.memory.write(self.addr, abi.ftrace_hash.pack(size_bits=self.size_bits, count=len(self.ips),
                                                            buckets=self.buckets))

    def free(self) -> None:
        self.kernel.heap.free(self.buckets, self._buckets_size)
        self.kernel.heap.free(self.addr, abi.ftrace_hash.size)
