"""AArch64 instruction encoders and decoders (the kernel's aarch64_insn_gen_* helpers), as 32-bit ints.

=====================  ===========================================  =====================================
instruction            encoding                                     range / notes
=====================  ===========================================  =====================================
NOP                    0xd503201f                                   HINT #0
B / BL label           0x14000000 / 0x94000000 | imm26              imm26 = (target - pc) >> 2, +-128 MiB
MOV Xd, Xm             0xaa0003e0 | Rm << 16 | Rd                   ORR Xd, XZR, Xm
LDR Xt, label          0x58000000 | imm19 << 5 | Rt                 +-1 MiB, 4-byte aligned
ADR / ADRP Xd, label   0x10000000 / 0x90000000 | immlo<<29 | immhi<<5 +-1 MiB / +-4 GiB (4 KiB pages)
ADD Xd, Xn, #imm12     0x91000000 | sh << 22 | imm12 << 10 | Rn << 5 | Rd
MOVZ / MOVK Xd, #imm   0xd2800000 / 0xf2800000 | hw << 21 | imm16 << 5 | Rd
BR / BLR / RET Xn      0xd61f0000 / 0xd63f0000 / 0xd65f0000 | Rn << 5
BRK / SVC #imm16       0xd4200000 / 0xd4000001 | imm16 << 5
=====================  ===========================================  =====================================

A module PLT entry (Linux ``struct plt_entry``) is ``adrp x16, dst; add x16, x16, :lo12:dst; br x16``.
"""

from __future__ import annotations

from typing import Final

from daemon.errors import BranchOutOfRange, InsnError

NOP: Final = 0xD503201F
MOV_X9_LR: Final = 0xAA1E03E9
RET: Final = 0xD65F03C0
BL_RANGE: Final = 128 * 1024 * 1024

_MASK64 = (1 << 64) - 1
_B, _BL = 0x14000000, 0x94000000
_X16 = 16


def _signed(delta: int) -> int:
    """A 64-bit difference as a signed Python int."""
    delta &= _MASK64
    return delta - (1 << 64) if delta >> 63 else delta


def _reg(r: int, *, allow_zr: bool = False) -> int:
    if not 0 <= r <= (31 if allow_zr else 30):
        raise InsnError(f"register x{r} cannot be used here", register=r)
    return r


def _aligned(pc: int, target: int) -> None:
    if pc & 3 or target & 3:
        raise InsnError(f"branch from {pc:#x} to {target:#x}: instructions are 4-byte aligned", pc=pc,
                        target=target)


def reachable_by_bl(pc: int, target: int) -> bool:
    """Linux's reachable_by_bl: -128 MiB <= target - pc < 128 MiB."""
    return -BL_RANGE <= _signed(target - pc) < BL_RANGE


def gen_branch(pc: int, target: int, *, link: bool) -> int:
    """B or BL from ``pc`` to ``target``."""
    _aligned(pc, target)
    if not reachable_by_bl(pc, target):
        raise BranchOutOfRange(f"{'BL' if link else 'B'} from {pc:#x} to {target:#x} is out of range (+-128 MiB)",
                               pc=pc, target=target)
    return (_BL if link else _B) | ((_signed(target - pc) >> 2) & 0x3FFFFFF)


def decode_branch(insn: int, pc: int) -> tuple[int, bool] | None:
    """(target, is_link) of a B/BL word, else None."""
    if insn & 0x7C000000 != 0x14000000:
        return None
    imm = insn & 0x3FFFFFF
    offset = (imm - (1 << 26) if imm >> 25 else imm) << 2
    return (pc + offset) & _MASK64, bool(insn >> 31)


def is_nop(insn: int) -> bool:
    return insn == NOP


def is_bl(insn: int) -> bool:
    return insn & 0xFC000000 == _BL


def is_b(insn: int) -> bool:
    return insn & 0xFC000000 == _B


def set_imm26(insn: int, pc: int, target: int) -> int:
    """Retarget an existing B/BL word (R_AARCH64_CALL26 / JUMP26)."""
    if decode_branch(insn, pc) is None:
        raise InsnError(f"{insn:#010x} is not a B/BL instruction", insn=insn)
    return gen_branch(pc, target, link=bool(insn >> 31))


def gen_mov_reg(rd: int, rm: int) -> int:
    """MOV Xd, Xm (ORR Xd, XZR, Xm)."""
    return 0xAA0003E0 | (_reg(rm) << 16) | _reg(rd)


def gen_ldr_literal(rt: int, pc: int, target: int) -> int:
    """LDR Xt, <label> (64-bit literal load)."""
    return set_ldr_literal_imm19(0x58000000 | _reg(rt), pc, target)


def set_ldr_literal_imm19(insn: int, pc: int, target: int) -> int:
    """Set the imm19 of a literal load or conditional branch (R_AARCH64_LD_PREL_LO19)."""
    _aligned(pc, target)
    delta = _signed(target - pc)
    if not -(1 << 20) <= delta < (1 << 20):
        raise InsnError(f"literal at {target:#x} is out of range (+-1 MiB) of {pc:#x}", pc=pc, target=target)
    return (insn & ~(0x7FFFF << 5)) | (((delta >> 2) & 0x7FFFF) << 5)


def _set_adr_imm(insn: int, imm21: int) -> int:
    imm21 &= 0x1FFFFF
    return (insn & ~((3 << 29) | (0x7FFFF << 5))) | ((imm21 & 3) << 29) | ((imm21 >> 2) << 5)


def gen_adr(rd: int, pc: int, target: int) -> int:
    """ADR Xd, <label> (+-1 MiB, byte granular)."""
    delta = _signed(target - pc)
    if not -(1 << 20) <= delta < (1 << 20):
        raise InsnError(f"ADR from {pc:#x} to {target:#x} is out of range (+-1 MiB)", pc=pc, target=target)
    return _set_adr_imm(0x10000000 | _reg(rd), delta)


def set_adrp_imm(insn: int, pc: int, target: int) -> int:
    """Set the page delta of an ADRP word (R_AARCH64_ADR_PREL_PG_HI21)."""
    pages = _signed((target & ~0xFFF) - (pc & ~0xFFF)) >> 12
    if not -(1 << 20) <= pages < (1 << 20):
        raise InsnError(f"ADRP from {pc:#x} to {target:#x} is out of range (+-4 GiB)", pc=pc, target=target)
    return _set_adr_imm(insn, pages)


def gen_adrp(rd: int, pc: int, target: int) -> int:
    """ADRP Xd, <label>: the 4 KiB page of ``target``, +-4 GiB from ``pc``'s page."""
    return set_adrp_imm(0x90000000 | _reg(rd), pc, target)


def gen_add_imm(rd: int, rn: int, imm12: int, *, shift12: bool = False) -> int:
    """ADD Xd, Xn, #imm12{, LSL #12} (register 31 is SP here)."""
    if not 0 <= imm12 < 4096:
        raise InsnError(f"ADD immediate {imm12} does not fit 12 bits", imm=imm12)
    return 0x91000000 | (int(shift12) << 22) | (imm12 << 10) | (_reg(rn, allow_zr=True) << 5) | _reg(rd, allow_zr=True)


def set_imm12(insn: int, value: int, *, scale: int) -> int:
    """Set the imm12 of ADD (scale 0) or of a scaled load/store (LDST8..128_ABS_LO12_NC: scale 0..4)."""
    lo12 = value & 0xFFF
    if lo12 & ((1 << scale) - 1):
        raise InsnError(f"{value:#x} is not aligned to {1 << scale} bytes for a scaled load/store", value=value,
                        scale=scale)
    return (insn & ~(0xFFF << 10)) | ((lo12 >> scale) << 10)


def set_movw_imm16(insn: int, value: int) -> int:
    """Set the imm16 of MOVZ/MOVK/MOVN (R_AARCH64_MOVW_UABS_G*)."""
    return (insn & ~(0xFFFF << 5)) | ((value & 0xFFFF) << 5)


def gen_movz(rd: int, imm16: int, shift: int = 0) -> int:
    return _gen_movw(0xD2800000, rd, imm16, shift)


def gen_movk(rd: int, imm16: int, shift: int = 0) -> int:
    return _gen_movw(0xF2800000, rd, imm16, shift)


def _gen_movw(base: int, rd: int, imm16: int, shift: int) -> int:
    if shift not in (0, 16, 32, 48) or not 0 <= imm16 <= 0xFFFF:
        raise InsnError(f"MOVZ/MOVK #{imm16:#x}, LSL #{shift} is not encodable", imm=imm16, shift=shift)
    return base | ((shift // 16) << 21) | (imm16 << 5) | _reg(rd, allow_zr=True)


def gen_br(rn: int) -> int:
    return 0xD61F0000 | (_reg(rn) << 5)


def gen_blr(rn: int) -> int:
    return 0xD63F0000 | (_reg(rn) << 5)


def gen_ret(rn: int = 30) -> int:
    return 0xD65F0000 | (_reg(rn) << 5)


def gen_brk(imm16: int) -> int:
    if not 0 <= imm16 <= 0xFFFF:
        raise InsnError(f"BRK #{imm16:#x} does not fit 16 bits", imm=imm16)
    return 0xD4200000 | (imm16 << 5)


def gen_svc(imm16: int) -> int:
    if not 0 <= imm16 <= 0xFFFF:
        raise InsnError(f"SVC #{imm16:#x} does not fit 16 bits", imm=imm16)
    return 0xD4000001 | (imm16 << 5)


def gen_plt_entry(pc: int, target: int) -> tuple[int, int, int]:
    """Module PLT at ``pc``: ``adrp x16, target; add x16, x16, :lo12:target; br x16``."""
    return gen_adrp(_X16, pc, target), gen_add_imm(_X16, _X16, target & 0xFFF), gen_br(_X16)


def decode_plt_entry(words: tuple[int, int, int], pc: int) -> int | None:
    """The target of a PLT entry at ``pc``, or None if the words are not one."""
    adrp, add, br = words
    if adrp & 0x9F00001F != 0x90000000 | _X16 or add & 0xFFC003FF != 0x91000000 | (_X16 << 5) | _X16:
        return None
    if br != gen_br(_X16):
        return None
    imm21 = ((adrp >> 29) & 3) | (((adrp >> 5) & 0x7FFFF) << 2)
    pages = imm21 - (1 << 21) if imm21 >> 20 else imm21
    return ((pc & ~0xFFF) + (pages << 12) + ((add >> 10) & 0xFFF)) & _MASK64
