"""Stop-machine text patching: validate every site of a batch, then write them all, while every vCPU is parked.

The contract is the kernel's ``ftrace_modify_code`` for each site, extended to the whole batch:

=====================================  =================  ===================================================
failure                                Linux              here (nothing is written in any case)
=====================================  =================  ===================================================
address not mapped                     -EFAULT            :class:`~daemon.errors.PatchReadFault`
address not 4-byte aligned             -EINVAL            :class:`~daemon.errors.PatchMisaligned`
site not in text (not executable)      -EPERM             :class:`~daemon.errors.PatchWriteFault`
word differs from the expected one     -EINVAL            :class:`~daemon.errors.PatchMismatch`
=====================================  =================  ===================================================

Address checks run before the vCPUs are stopped; the compare runs inside the pause, vectorised, then the
writes, then each engine drops its translations of the touched text range (one ``ctl_remove_cache`` per
engine per batch, not per site). No vCPU can observe half a batch: all of them are parked at a safe point
from before the first compare until after their own invalidation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.arch.arm64.callsite import DataPatch, InsnPatch
from daemon.emu.memory import Memory, Perm, Region
from daemon.errors import PatchMisaligned, PatchMismatch, PatchReadFault, PatchWriteFault
from daemon.kernel.kernel import Kernel

_MAX_REPORTED = 8


@dataclass(frozen=True)
class _RegionEdits:
    region: Region
    index: npt.NDArray[np.intp]  # word indices in the region
    old: npt.NDArray[np.uint32]
    new: npt.NDArray[np.uint32]
    span: tuple[int, int]  # guest [begin, end) covering every edited word


@dataclass(frozen=True)
class BatchResult:
    sites: int
    data: int
    pause_ns: int


class TextPatcher:
    """Applies batches of :class:`InsnPatch` / :class:`DataPatch` to one kernel, one batch at a time."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.memory: Memory = kernel.memory
        self._lock = threading.Lock()

    def read_insn(self, addr: int) -> int:
        """aarch64_insn_read: the word at ``addr`` (PatchReadFault if unmapped)."""
        if self.memory.find(addr, 4) is None:
            raise PatchReadFault(f"cannot read instruction at {addr:#x}: not mapped", address=addr)
        return self.memory.read_u32(addr)

    def apply(self, sites: Sequence[InsnPatch], data: Sequence[DataPatch] = ()) -> BatchResult:
        """Validate and apply one batch atomically with respect to every vCPU; all-or-nothing."""
        edits = self._prepare(sites)
        for d in data:
            self._check_data(d)
        spans = [e.span for e in edits]
        with self._lock:
            machine = self.kernel.machine
            before = machine.pauses_total
            machine.stop_machine(lambda: self._commit(edits, data), invalidate=spans)
            pause = machine.pauses[-1].pause_ns if machine.pauses_total > before else 0
        return BatchResult(len(sites), len(data), pause)

    def apply_bulk(self, addrs: npt.NDArray[np.uint64], old: npt.NDArray[np.uint32], new: npt.NDArray[np.uint32],
                   literals: npt.NDArray[np.uint64], value: int) -> BatchResult:
        """:meth:`apply` for many sites of one text region and the same 64-bit ``value`` stored at each of
        ``literals`` (ftrace_init at boot: ten thousand sites), checked and written as arrays: the per-site
        Python of :meth:`apply` was most of a fleet host's boot. A batch spanning regions goes the general way."""
        if not addrs.size:
            return BatchResult(0, 0, 0)
        lo = int(min(addrs.min(), literals.min() if literals.size else addrs.min()))
        hi = int(max(addrs.max() + np.uint64(4), literals.max() + np.uint64(8) if literals.size else addrs.max()))
        region = self.memory.find(lo, hi - lo)
        misaligned = bool((addrs & np.uint64(3)).any() or (literals & np.uint64(7)).any())
        dup = np.unique(addrs).size != addrs.size
        if region is None or not region.perms & Perm.X or misaligned or dup:
            return self.apply([InsnPatch(int(a), int(o), int(n)) for a, o, n in zip(addrs, old, new, strict=True)],
                              [DataPatch(int(a), value) for a in literals])
        base = np.uint64(region.base)
        edits = _RegionEdits(region=region, index=((addrs - base) // np.uint64(4)).astype(np.intp),
                             old=old.astype(np.uint32), new=new.astype(np.uint32),
                             span=(int(addrs.min()), int(addrs.max()) + 4))
        words_at = ((literals - base) // np.uint64(4)).astype(np.intp)
        v = value & 0xFFFF_FFFF_FFFF_FFFF

        def commit() -> None:
            self._commit([edits], ())
            words = self.memory.words(region)
            words[words_at] = v & 0xFFFF_FFFF  # little endian: the low word first
            words[words_at + 1] = v >> 32
        with self._lock:
            machine = self.kernel.machine
            before = machine.pauses_total
            machine.stop_machine(commit, invalidate=[edits.span])
            pause = machine.pauses[-1].pause_ns if machine.pauses_total > before else 0
        return BatchResult(int(addrs.size), int(literals.size), pause)

    # -- inside and outside the pause ------------------------------------------------------------------------

    def _prepare(self, sites: Sequence[InsnPatch]) -> list[_RegionEdits]:
        grouped: dict[int, list[InsnPatch]] = {}
        regions: dict[int, Region] = {}
        seen: set[int] = set()
        for s in sites:
            if s.addr in seen:
                raise PatchMismatch(f"site {s.addr:#x} appears twice in one batch", address=s.addr)
            seen.add(s.addr)
            region = self.memory.find(s.addr, 4)
            if region is None:
                raise PatchReadFault(f"cannot patch {s.addr:#x}: address not mapped", address=s.addr)
            if s.addr & 3:
                raise PatchMisaligned(f"cannot patch {s.addr:#x}: instructions are 4-byte aligned", address=s.addr)
            if not region.perms & Perm.X:
                raise PatchWriteFault(f"cannot patch {s.addr:#x}: {region.name} is not text", address=s.addr,
                                      region=region.name)
            grouped.setdefault(region.base, []).append(s)
            regions[region.base] = region
        out = []
        for base, group in grouped.items():
            region = regions[base]
            addrs = np.fromiter((s.addr for s in group), dtype=np.uint64, count=len(group))
            out.append(_RegionEdits(
                region=region,
                index=((addrs - np.uint64(region.base)) // np.uint64(4)).astype(np.intp),
                old=np.fromiter((s.old for s in group), dtype=np.uint32, count=len(group)),
                new=np.fromiter((s.new for s in group), dtype=np.uint32, count=len(group)),
                span=(int(addrs.min()), int(addrs.max()) + 4)))
        return out

    def _check_data(self, d: DataPatch) -> None:
        region = self.memory.find(d.addr, 8)
        if region is None:
            raise PatchReadFault(f"cannot write data at {d.addr:#x}: address not mapped", address=d.addr)
        if d.addr & 7:
            raise PatchMisaligned(f"cannot write data at {d.addr:#x}: literals are 8-byte aligned", address=d.addr)

    def _commit(self, edits: list[_RegionEdits], data: Sequence[DataPatch]) -> None:
        views = [(e, self.memory.words(e.region)) for e in edits]
        for e, words in views:
            current = words[e.index]
            bad = np.nonzero(current != e.old)[0]
            if bad.size:
                found = [{"address": hex(e.region.base + 4 * int(e.index[i])), "expected": hex(int(e.old[i])),
                          "found": hex(int(current[i]))} for i in bad[:_MAX_REPORTED]]
                raise PatchMismatch(f"{bad.size} site(s) do not hold the expected instruction; nothing was written",
                                    mismatches=found, count=int(bad.size))
        for d in data:
            self.memory.write_u64(d.addr, d.value)
        for e, words in views:
            words[e.index] = e.new
