"""Typed access to guest structs, using the layouts of daemon.guest.abi (the single source of truth)."""

from __future__ import annotations

from daemon.emu.memory import Memory
from daemon.guest.layout import Struct


class StructRef:
    """A guest struct at ``addr``: ``ref.get("job.ret")``, ``ref.set("lg.mode", 1)``, ``ref.addr_of("job")``."""

    __slots__ = ("addr", "mem", "struct")

    def __init__(self, mem: Memory, struct: Struct, addr: int) -> None:
        self.mem = mem
        self.struct = struct
        self.addr = addr

    def addr_of(self, path: str, index: int = 0) -> int:
        off, f = self.struct.resolve(path)
        return self.addr + off + index * f.elem_size

    def get(self, path: str, index: int = 0) -> int:
        off, f = self.struct.resolve(path)
        at = self.addr + off + index * f.elem_size
        if f.elem_size == 8:
            return self.mem.read_u64(at)
        if f.elem_size == 4:
            return self.mem.read_u32(at)
        return int.from_bytes(self.mem.read(at, f.elem_size), "little")

    def set(self, path: str, value: int, index: int = 0) -> None:
        off, f = self.struct.resolve(path)
        at = self.addr + off + index * f.elem_size
        if f.elem_size == 8:
            self.mem.write_u64(at, value)
        elif f.elem_size == 4:
            self.mem.write_u32(at, value)
        else:
            self.mem.write(at, value.to_bytes(f.elem_size, "little"))

    def get_bytes(self, path: str) -> bytes:
        off, f = self.struct.resolve(path)
        return self.mem.read(self.addr + off, f.size)
