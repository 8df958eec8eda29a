"""AArch64 ELF relocations the module loader applies, with the ABI's formulas and overflow checks.

``S`` is the symbol's address (for a branch out of range: its PLT veneer), ``A`` the addend, ``P`` the place,
``X`` the computed value, ``Page(x) = x & ~0xfff``. Checks are on X as a signed 64-bit value unless noted.

=====  ============================  =====  ======================  ==========================================
type   name                          bytes  X                       field / check
=====  ============================  =====  ======================  ==========================================
0,256  NONE                          0      -                       nothing
257    ABS64                         8      S + A                   none
258    ABS32                         4      S + A                   -2^31 <= X < 2^32
259    ABS16                         2      S + A                   -2^15 <= X < 2^16
260    PREL64                        8      S + A - P               none
261    PREL32                        4      S + A - P               -2^31 <= X < 2^32
262    PREL16                        2      S + A - P               -2^15 <= X < 2^16
263    MOVW_UABS_G0                  4      S + A                   imm16 = X[15:0], X unsigned < 2^16
264    MOVW_UABS_G0_NC               4      S + A                   imm16 = X[15:0]
265    MOVW_UABS_G1                  4      S + A                   imm16 = X[31:16], X unsigned < 2^32
266    MOVW_UABS_G1_NC               4      S + A                   imm16 = X[31:16]
267    MOVW_UABS_G2                  4      S + A                   imm16 = X[47:32], X unsigned < 2^48
268    MOVW_UABS_G2_NC               4      S + A                   imm16 = X[47:32]
269    MOVW_UABS_G3                  4      S + A                   imm16 = X[63:48]
273    LD_PREL_LO19                  4      S + A - P               imm19 = X >> 2, +-1 MiB, 4-aligned
274    ADR_PREL_LO21                 4      S + A - P               ADR imm21, +-1 MiB
275    ADR_PREL_PG_HI21              4      Page(S+A) - Page(P)     ADRP imm21 = X >> 12, +-4 GiB
276    ADR_PREL_PG_HI21_NC           4      Page(S+A) - Page(P)     ADRP imm21 = X >> 12, no check
277    ADD_ABS_LO12_NC               4      S + A                   imm12 = X[11:0]
278    LDST8_ABS_LO12_NC             4      S + A                   imm12 = X[11:0]
284    LDST16_ABS_LO12_NC            4      S + A                   imm12 = X[11:1], 2-aligned
285    LDST32_ABS_LO12_NC            4      S + A                   imm12 = X[11:2], 4-aligned
286    LDST64_ABS_LO12_NC            4      S + A                   imm12 = X[11:3], 8-aligned
299    LDST128_ABS_LO12_NC           4      S + A                   imm12 = X[11:4], 16-aligned
279    TSTBR14                       4      S + A - P               imm14 = X >> 2, +-32 KiB
280    CONDBR19                      4      S + A - P               imm19 = X >> 2, +-1 MiB
282    JUMP26                        4      S + A - P               B imm26, +-128 MiB (else a PLT veneer)
283    CALL26                        4      S + A - P               BL imm26, +-128 MiB (else a PLT veneer)
=====  ============================  =====  ======================  ==========================================

The alignment checks on LDSTn are the linker's (the ABI only takes the bits): a misaligned value would load
from the wrong address.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from daemon.arch.arm64 import insn
from daemon.errors import InsnError, ModuleFormatError, RelocationOverflow, UnsupportedRelocation

_MASK64 = (1 << 64) - 1

R_AARCH64_NONE, R_AARCH64_NONE_OLD = 0, 256
R_AARCH64_ABS64, R_AARCH64_ABS32, R_AARCH64_ABS16 = 257, 258, 259
R_AARCH64_PREL64, R_AARCH64_PREL32, R_AARCH64_PREL16 = 260, 261, 262
R_AARCH64_MOVW_UABS_G0, R_AARCH64_MOVW_UABS_G0_NC = 263, 264
R_AARCH64_MOVW_UABS_G1, R_AARCH64_MOVW_UABS_G1_NC = 265, 266
R_AARCH64_MOVW_UABS_G2, R_AARCH64_MOVW_UABS_G2_NC = 267, 268
R_AARCH64_MOVW_UABS_G3 = 269
R_AARCH64_LD_PREL_LO19, R_AARCH64_ADR_PREL_LO21 = 273, 274
R_AARCH64_ADR_PREL_PG_HI21, R_AARCH64_ADR_PREL_PG_HI21_NC = 275, 276
R_AARCH64_ADD_ABS_LO12_NC, R_AARCH64_LDST8_ABS_LO12_NC = 277, 278
R_AARCH64_TSTBR14, R_AARCH64_CONDBR19 = 279, 280
R_AARCH64_JUMP26, R_AARCH64_CALL26 = 282, 283
R_AARCH64_LDST16_ABS_LO12_NC, R_AARCH64_LDST32_ABS_LO12_NC = 284, 285
R_AARCH64_LDST64_ABS_LO12_NC, R_AARCH64_LDST128_ABS_LO12_NC = 286, 299

BRANCH_TYPES = frozenset({R_AARCH64_JUMP26, R_AARCH64_CALL26})


def signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


@dataclass(frozen=True)
class RelocType:
    name: str
    width: int  # bytes written at the place
    pc_relative: bool
    encode: Callable[[int, int, int], int]  # (old field value, place, S + A) -> new field value


class _Overflow(Exception):
    """Raised inside an encoder; turned into RelocationOverflow with the relocation's context."""


def _range(x: int, lo: int, hi: int) -> int:
    if not lo <= x < hi:
        raise _Overflow(f"{x:#x} is outside [{lo:#x}, {hi:#x})")
    return x


def _data(width: int, pc_relative: bool) -> Callable[[int, int, int], int]:
    bits = width * 8

    def encode(_old: int, place: int, value: int) -> int:
        x = signed64(value - place if pc_relative else value)
        if width < 8:
            _range(x, -(1 << (bits - 1)), 1 << bits)
        return x & ((1 << bits) - 1)

    return encode


def _movw(group: int, check: bool) -> Callable[[int, int, int], int]:
    def encode(old: int, _place: int, value: int) -> int:
        x = value & _MASK64
        if check:
            _range(x, 0, 1 << (16 * (group + 1)))
        return insn.set_movw_imm16(old, x >> (16 * group))

    return encode


def _insn(setter: Callable[[int, int, int], int]) -> Callable[[int, int, int], int]:
    """Wrap an insn.py setter: its InsnError (out of range, misaligned) is a relocation overflow."""

    def encode(old: int, place: int, value: int) -> int:
        try:
            return setter(old, place, value & _MASK64)
        except InsnError as exc:
            raise _Overflow(exc.message) from None

    return encode


def _adrp_nc(old: int, place: int, value: int) -> int:
    pages = signed64((value & ~0xFFF) - (place & ~0xFFF)) >> 12
    wrapped = ((pages & 0x1FFFFF) ^ 0x100000) - 0x100000  # the 21 bits the field keeps, sign-extended
    return insn.set_adrp_imm(old, place, (place & ~0xFFF) + (wrapped << 12))


def _adr(old: int, place: int, value: int) -> int:
    if old & 0x9F000000 != 0x10000000:
        raise _Overflow(f"{old:#010x} is not an ADR instruction")
    return insn.gen_adr(old & 0x1F, place, value)


def _tbz(old: int, place: int, value: int) -> int:
    delta = signed64(value - place)
    if delta & 3:
        raise _Overflow(f"branch offset {delta:#x} is not a multiple of 4")
    _range(delta, -(1 << 15), 1 << 15)
    return (old & ~(0x3FFF << 5)) | (((delta >> 2) & 0x3FFF) << 5)


def _branch(link: bool) -> Callable[[int, int, int], int]:
    def encode(old: int, place: int, value: int) -> int:
        if insn.decode_branch(old, place) is None:
            raise ModuleFormatError(f"a {'CALL26' if link else 'JUMP26'} relocation at {place:#x} patches "
                                    f"{old:#010x}, which is not a B/BL instruction", place=place)
        return insn.set_imm26(old, place, value)

    return encode


def _lo12(scale: int) -> Callable[[int, int, int], int]:
    return lambda old, _place, value: insn.set_imm12(old, value, scale=scale)


TYPES: dict[int, RelocType] = {
    R_AARCH64_ABS64: RelocType("R_AARCH64_ABS64", 8, False, _data(8, False)),
    R_AARCH64_ABS32: RelocType("R_AARCH64_ABS32", 4, False, _data(4, False)),
    R_AARCH64_ABS16: RelocType("R_AARCH64_ABS16", 2, False, _data(2, False)),
    R_AARCH64_PREL64: RelocType("R_AARCH64_PREL64", 8, True, _data(8, True)),
    R_AARCH64_PREL32: RelocType("R_AARCH64_PREL32", 4, True, _data(4, True)),
    R_AARCH64_PREL16: RelocType("R_AARCH64_PREL16", 2, True, _data(2, True)),
    R_AARCH64_MOVW_UABS_G0: RelocType("R_AARCH64_MOVW_UABS_G0", 4, False, _movw(0, True)),
    R_AARCH64_MOVW_UABS_G0_NC: RelocType("R_AARCH64_MOVW_UABS_G0_NC", 4, False, _movw(0, False)),
    R_AARCH64_MOVW_UABS_G1: RelocType("R_AARCH64_MOVW_UABS_G1", 4, False, _movw(1, True)),
    R_AARCH64_MOVW_UABS_G1_NC: RelocType("R_AARCH64_MOVW_UABS_G1_NC", 4, False, _movw(1, False)),
    R_AARCH64_MOVW_UABS_G2: RelocType("R_AARCH64_MOVW_UABS_G2", 4, False, _movw(2, True)),
    R_AARCH64_MOVW_UABS_G2_NC: RelocType("R_AARCH64_MOVW_UABS_G2_NC", 4, False, _movw(2, False)),
    R_AARCH64_MOVW_UABS_G3: RelocType("R_AARCH64_MOVW_UABS_G3", 4, False, _movw(3, False)),
    R_AARCH64_LD_PREL_LO19: RelocType("R_AARCH64_LD_PREL_LO19", 4, True, _insn(insn.set_ldr_literal_imm19)),
    R_AARCH64_ADR_PREL_LO21: RelocType("R_AARCH64_ADR_PREL_LO21", 4, True, _insn(_adr)),
    R_AARCH64_ADR_PREL_PG_HI21: RelocType("R_AARCH64_ADR_PREL_PG_HI21", 4, True, _insn(insn.set_adrp_imm)),
    R_AARCH64_ADR_PREL_PG_HI21_NC: RelocType("R_AARCH64_ADR_PREL_PG_HI21_NC", 4, True, _adrp_nc),
    R_AARCH64_ADD_ABS_LO12_NC: RelocType("R_AARCH64_ADD_ABS_LO12_NC", 4, False, _lo12(0)),
    R_AARCH64_LDST8_ABS_LO12_NC: RelocType("R_AARCH64_LDST8_ABS_LO12_NC", 4, False, _lo12(0)),
    R_AARCH64_LDST16_ABS_LO12_NC: RelocType("R_AARCH64_LDST16_ABS_LO12_NC", 4, False, _insn(_lo12(1))),
    R_AARCH64_LDST32_ABS_LO12_NC: RelocType("R_AARCH64_LDST32_ABS_LO12_NC", 4, False, _insn(_lo12(2))),
    R_AARCH64_LDST64_ABS_LO12_NC: RelocType("R_AARCH64_LDST64_ABS_LO12_NC", 4, False, _insn(_lo12(3))),
    R_AARCH64_LDST128_ABS_LO12_NC: RelocType("R_AARCH64_LDST128_ABS_LO12_NC", 4, False, _insn(_lo12(4))),
    R_AARCH64_TSTBR14: RelocType("R_AARCH64_TSTBR14", 4, True, _tbz),
    R_AARCH64_CONDBR19: RelocType("R_AARCH64_CONDBR19", 4, True, _insn(insn.set_ldr_literal_imm19)),
    R_AARCH64_JUMP26: RelocType("R_AARCH64_JUMP26", 4, True, _insn(_branch(link=False))),
    R_AARCH64_CALL26: RelocType("R_AARCH64_CALL26", 4, True, _insn(_branch(link=True))),
}
_NONE = frozenset({R_AARCH64_NONE, R_AARCH64_NONE_OLD})
_FORMATS = {2: "<H", 4: "<I", 8: "<Q"}


def lookup(rtype: int) -> RelocType | None:
    """The relocation's description; None for R_AARCH64_NONE; UnsupportedRelocation if unknown."""
    if rtype in _NONE:
        return None
    found = TYPES.get(rtype)
    if found is None:
        raise UnsupportedRelocation(f"relocation type {rtype} is not supported by the module loader", type=rtype)
    return found


def apply(kind: RelocType, buf: bytearray, offset: int, place: int, value: int, *, symbol: str = "") -> None:
    """Write relocation ``kind`` at ``buf[offset:]`` (guest address ``place``) for ``value`` = S + A."""
    fmt = _FORMATS[kind.width]
    (old,) = struct.unpack_from(fmt, buf, offset)
    try:
        new = kind.encode(old, place, value)
    except _Overflow as exc:
        raise RelocationOverflow(f"{kind.name} at {place:#x} against {symbol or hex(value)}: {exc}",
                                 type=kind.name, place=place, symbol=symbol, value=value & _MASK64) from None
    struct.pack_into(fmt, buf, offset, new)
