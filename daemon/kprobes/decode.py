"""arm64's kprobe instruction decoder (arch/arm64/kernel/probes/decode-insn.c): step, simulate or refuse.

``decode(insn)`` returns the ``KP_*`` kind the guest's handler acts on, or raises :class:`KprobeRefused` with
the reason, mirroring ``arm_kprobe_decode_insn``:

* simulated (they read or write the PC, so they would be wrong in a slot): NOP, B/BL, B.cond, CBZ/CBNZ,
  TBZ/TBNZ, ADR/ADRP, LDR/LDRSW (literal), BR/BLR/RET;
* refused: exception-generating instructions (SVC, HVC, SMC, BRK, HLT, DCPS), ERET, MSR (immediate and
  register), MRS of DAIF (the step masks DAIF), hints other than the steppable ones, other branches
  (BRAA..., ERETAA), other PC-relative literal users (PRFM literal, SIMD/FP LDR literal), load/store
  exclusive (LDXR/STXR, LDAXR/STLXR and pairs: ``aarch64_insn_is_exclusive``; LDAR/STLR and CAS are stepped, as
  in Linux), and any instruction inside an LL/SC sequence (``is_probed_address_atomic``);
* everything else is stepped out of line.
"""

from __future__ import annotations

from collections.abc import Sequence

from daemon.errors import KprobeRefused
from daemon.guest import abi

NOP = 0xD503201F
_STEPPABLE_HINTS = frozenset({
    0xD503201F,  # NOP (simulated anyway)
    0xD503233F, 0xD503237F,  # PACIASP, PACIBSP
    0xD503231F, 0xD503235F,  # PACIAZ, PACIBZ
    0xD503241F, 0xD503245F, 0xD503249F, 0xD50324DF,  # BTI, BTI c/j/jc
})
REFUSAL_REASONS = frozenset({
    "exception-generating instruction (SVC/HVC/SMC/BRK/HLT/DCPS)",
    "branch that is not simulated (ERET, authenticated or register branches)", "hint that is not steppable",
    "MSR (immediate) changes PSTATE", "MSR (register) writes a system register",
    "MRS of DAIF: the single step runs with DAIF masked",
    "PC-relative literal load that is not simulated (PRFM or SIMD/FP literal)",
    "load/store exclusive (LDXR/STXR, LDAXR/STLXR, LDXP/STXP)", "inside an atomic (LL/SC) sequence"})
"""Every ``reason`` the decoder refuses an instruction with (the documented refusal classes)."""
MAX_ATOMIC_CONTEXT_SIZE = 16  # instructions scanned back for an open load-exclusive (Linux: 16)


# Linux's masks (arch/arm64/include/asm/insn.h): ``exclusive`` 0x3F800000/0x08000000 is LDXR/STXR, LDAXR/STLXR
# and their pair forms (o2 = 0); LDAR/STLR, LDLAR/STLLR and CAS (o2 = 1) are ordered, not exclusive, and are
# stepped out of line. load_ex/store_ex include bit 23 (the later fix that stopped LDAR counting as a load-exclusive
# in is_probed_address_atomic).


def is_exclusive(insn: int) -> bool:
    return (insn & 0x3F800000) == 0x08000000


def is_load_exclusive(insn: int) -> bool:
    return (insn & 0x3FC00000) == 0x08400000


def is_store_exclusive(insn: int) -> bool:
    return (insn & 0x3FC00000) == 0x08000000


def decode(insn: int) -> int:
    """The kind of ``insn`` (``abi.KP_*``); raises :class:`KprobeRefused` for what may not be probed."""
    insn &= 0xFFFF_FFFF
    if insn == NOP:
        return abi.KP_SIM_NOP
    if (insn & 0x7C000000) == 0x14000000:
        return abi.KP_SIM_B
    if (insn & 0xFF000010) == 0x54000000:
        return abi.KP_SIM_BCOND
    if (insn & 0x7E000000) == 0x34000000:
        return abi.KP_SIM_CBZ
    if (insn & 0x7E000000) == 0x36000000:
        return abi.KP_SIM_TBZ
    if (insn & 0x1F000000) == 0x10000000:
        return abi.KP_SIM_ADR
    if (insn & 0xBF000000) == 0x18000000 or (insn & 0xFF000000) == 0x98000000:
        return abi.KP_SIM_LDR_LIT
    if (insn & 0xFFFFFC1F) in (0xD61F0000, 0xD63F0000, 0xD65F0000):
        return abi.KP_SIM_BR
    _refuse_unsteppable(insn)
    return abi.KP_STEP


def _refuse_unsteppable(insn: int) -> None:
    def no(reason: str) -> None:
        raise KprobeRefused(f"instruction {insn:#010x} cannot be probed: {reason}", insn=f"{insn:#010x}",
                            reason=reason)

    if (insn & 0xFF000000) == 0xD4000000:
        no("exception-generating instruction (SVC/HVC/SMC/BRK/HLT/DCPS)")
    if (insn & 0xFE000000) == 0xD6000000:
        no("branch that is not simulated (ERET, authenticated or register branches)")
    if (insn & 0xFFC00000) == 0xD5000000:  # system instructions
        if (insn & 0xFFFFF01F) == 0xD503201F:
            if insn not in _STEPPABLE_HINTS:
                no("hint that is not steppable")
            return
        if (insn & 0xFFF8F01F) == 0xD500401F:
            no("MSR (immediate) changes PSTATE")
        if (insn & 0xFFF00000) == 0xD5100000:
            no("MSR (register) writes a system register")
        if (insn & 0xFFFFFFE0) == 0xD53B4220:
            no("MRS of DAIF: the single step runs with DAIF masked")
        return
    if (insn & 0x3B000000) == 0x18000000:
        no("PC-relative literal load that is not simulated (PRFM or SIMD/FP literal)")
    if is_exclusive(insn):
        no("load/store exclusive (LDXR/STXR, LDAXR/STLXR, LDXP/STXP)")


def check_atomic_context(words: Sequence[int], index: int) -> None:
    """Refuse a probe at ``words[index]`` inside an LL/SC sequence: scanning back (within the function, at most
    ``MAX_ATOMIC_CONTEXT_SIZE`` instructions), a load-exclusive met before any store-exclusive."""
    for i in range(index, max(-1, index - MAX_ATOMIC_CONTEXT_SIZE), -1):
        w = words[i]
        if i != index and is_store_exclusive(w):
            return
        if is_load_exclusive(w) and i != index:
            raise KprobeRefused(f"instruction {words[index]:#010x} lies inside an LL/SC sequence (exclusive load "
                                f"{index - i} instructions before it)", insn=f"{words[index]:#010x}",
                                reason="inside an atomic (LL/SC) sequence")
