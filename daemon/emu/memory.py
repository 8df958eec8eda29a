"""Guest physical memory: host buffers that every vCPU engine maps with ``mem_map_ptr``.

A :class:`Backing` is one anonymous host mapping (zero-filled, committed lazily by the OS). A :class:`Region`
is a page-aligned window of a backing with guest permissions; the kernel image is one backing cut into text
(r-x), rodata (r--) and data (rw-) regions. The host reads and writes guest memory directly through the
backing, like the kernel's fixmap alias for text: guest permissions bind the guest, not the host.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
from dataclasses import dataclass
from enum import IntFlag

import numpy as np
import numpy.typing as npt

from daemon.errors import GuestFault

PAGE_SIZE = 4096


class Perm(IntFlag):
    """Guest access rights; values equal Unicorn's UC_PROT_* bits."""

    NONE = 0
    R = 1
    W = 2
    X = 4
    RW = R | W
    RX = R | X
    RWX = R | W | X


class Backing:
    """A zero-filled host buffer; its address is what the engines map."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"backing size must be a positive multiple of {PAGE_SIZE}: {size}")
        self.size = size
        self._mm = mmap.mmap(-1, size)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mm)


@dataclass(frozen=True)
class Region:
    """Guest range [base, base + size) backed by ``backing[offset:offset + size]``."""

    name: str
    base: int
    size: int
    perms: Perm
    backing: Backing
    offset: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def host_address(self) -> int:
        return self.backing.address + self.offset

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.end


class Memory:
    """The set of mapped regions, with typed host access to guest addresses."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._bases: list[int] = []

    def add(self, region: Region) -> Region:
        if region.base % PAGE_SIZE or region.size % PAGE_SIZE or region.size <= 0:
            raise ValueError(f"region {region.name} is not page aligned")
        if region.offset + region.size > region.backing.size:
            raise ValueError(f"region {region.name} overruns its backing")
        for other in self.regions:
            if region.base < other.end and other.base < region.end:
                raise ValueError(f"region {region.name} overlaps {other.name}")
        i = bisect.bisect(self._bases, region.base)
        self.regions.insert(i, region)
        self._bases.insert(i, region.base)
        return region

    def find(self, addr: int, length: int = 1) -> Region | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0 and self.regions[i].contains(addr, length):
            return self.regions[i]
        return None

    def region(self, addr: int, length: int = 1) -> Region:
        found = self.find(addr, length)
        if found is None:
            raise GuestFault(f"guest address {addr:#x} (+{length}) is not mapped", address=addr, length=length)
        return found

    def _at(self, addr: int, length: int) -> tuple[memoryview, int]:
        r = self.region(addr, length)
        return r.backing.view, r.offset + (addr - r.base)

    def read(self, addr: int, length: int) -> bytes:
        view, off = self._at(addr, length)
        return bytes(view[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        view, off = self._at(addr, len(data))
        view[off : off + len(data)] = data

    def read_u32(self, addr: int) -> int:
        view, off = self._at(addr, 4)
        value: int = struct.unpack_from("<I", view, off)[0]
        return value

    def write_u32(self, addr: int, value: int) -> None:
        view, off = self._at(addr, 4)
        struct.pack_into("<I", view, off, value)

    def read_u64(self, addr: int) -> int:
        view, off = self._at(addr, 8)
        value: int = struct.unpack_from("<Q", view, off)[0]
        return value

    def write_u64(self, addr: int, value: int) -> None:
        view, off = self._at(addr, 8)
        struct.pack_into("<Q", view, off, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_cstr(self, addr: int, limit: int = 4096) -> str:
        r = self.region(addr)
        raw = self.read(addr, min(limit, r.end - addr))
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def words(self, region: Region) -> npt.NDArray[np.uint32]:
        """The region as little-endian 32-bit words (a live view: writes go to guest memory)."""
        return np.frombuffer(region.backing.view, dtype="<u4", count=region.size // 4, offset=region.offset)
