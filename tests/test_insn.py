"""The AArch64 encoders and decoders in daemon.arch.arm64.insn, checked against capstone's disassembly.

Every encoded word is disassembled by capstone at a chosen pc; the mnemonic and the operands (register names,
immediates, and the absolute targets capstone computes for B/BL/ADR/ADRP/LDR-literal) must say what was asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.arch.arm64 import insn
from daemon.arch.arm64.insn import BL_RANGE
from daemon.errors import BranchOutOfRange, InsnError, LivepatchdError

MASK64 = (1 << 64) - 1
MIB = 1 << 20
PAGE = 4096
ADRP_RANGE = 4 << 30  # +-4 GiB, in bytes of page delta

# Capstone 5 calls the architecture ARM64, capstone 6 AARCH64.
_ARCH = capstone.CS_ARCH_AARCH64 if hasattr(capstone, "CS_ARCH_AARCH64") else capstone.CS_ARCH_ARM64
_CS = capstone.Cs(_ARCH, capstone.CS_MODE_ARM)

PROPERTY = settings(max_examples=300, deadline=None, database=None)

# Strategies: any 64-bit address, a 4-byte aligned one, general registers usable as Xn (0..30) or with 31.
addr64 = st.integers(0, MASK64)
pc4 = st.integers(0, MASK64 >> 2).map(lambda w: w << 2)
gpr = st.integers(0, 30)
reg31 = st.integers(0, 31)
imm16 = st.integers(0, 0xFFFF)
hw_shift = st.sampled_from([0, 16, 32, 48])

_REG_ALIASES = {"lr": "x30", "fp": "x29", "ip0": "x16", "ip1": "x17"}


# --------------------------------------------------------------------------------------------------------------
# capstone helpers


def _parse_operands(op_str: str) -> tuple[object, ...]:
    """capstone's op_str as a tuple: registers as names, immediates as ints (mod 2**64), ``lsl #n`` as
    ("lsl", n), a memory operand ``[xn, #off]`` as a nested tuple."""
    out: list[object] = []
    for raw in re.findall(r"\s*(\[[^\]]*\]|[^,\[]+)", op_str):
        tok = raw.strip()
        if not tok:
            continue
        if tok.startswith("["):
            out.append(_parse_operands(tok[1:-1]))
        elif tok.startswith("lsl "):
            out.append(("lsl", int(tok[4:].strip().lstrip("#"), 0)))
        elif re.fullmatch(r"#?-?(0x[0-9a-f]+|[0-9]+)", tok):
            out.append(int(tok.lstrip("#"), 0) & MASK64)
        else:
            out.append(_REG_ALIASES.get(tok, tok))
    return tuple(out)


@dataclass(frozen=True)
class Dis:
    mnemonic: str
    ops: tuple[object, ...]


def dis(word: int, pc: int = 0x1000) -> Dis:
    """Capstone's reading of one 32-bit word placed at ``pc``."""
    assert 0 <= word < 1 << 32, f"{word:#x} is not a 32-bit word"
    got = list(_CS.disasm(word.to_bytes(4, "little"), pc))
    assert len(got) == 1, f"capstone cannot decode {word:#010x}"
    return Dis(str(got[0].mnemonic), _parse_operands(str(got[0].op_str)))


def dis_many(words: tuple[int, ...], pc: int) -> list[Dis]:
    code = b"".join(w.to_bytes(4, "little") for w in words)
    got = [Dis(str(i.mnemonic), _parse_operands(str(i.op_str))) for i in _CS.disasm(code, pc)]
    assert len(got) == len(words), f"capstone decoded {len(got)} of {len(words)} words"
    return got


def x(r: int) -> str:
    return f"x{r}"


def sp_or_x(r: int) -> str:
    return "sp" if r == 31 else x(r)


def zr_or_x(r: int) -> str:
    return "xzr" if r == 31 else x(r)


def test_parse_operands_helper() -> None:
    """The op_str parser the rest of the file relies on."""
    assert _parse_operands("x9, x30") == ("x9", "x30")
    assert _parse_operands("x1, sp, #5, lsl #12") == ("x1", "sp", 5, ("lsl", 12))
    assert _parse_operands("x0, [x1, #0x10]") == ("x0", ("x1", 16))
    assert _parse_operands("#0xfffffffffffffffc") == (MASK64 - 3,)
    assert _parse_operands("x0, #-0x10") == ("x0", (-16) & MASK64)
    assert _parse_operands("lr") == ("x30",)
    assert _parse_operands("") == ()


# --------------------------------------------------------------------------------------------------------------
# constants


def test_nop() -> None:
    assert insn.NOP == 0xD503201F
    assert dis(insn.NOP) == Dis("nop", ())
    assert insn.is_nop(insn.NOP)
    assert not insn.is_nop(insn.RET)


def test_mov_x9_lr() -> None:
    """The ftrace call-site prologue ``mov x9, x30`` is ORR x9, xzr, x30."""
    assert dis(insn.MOV_X9_LR) == Dis("mov", ("x9", "x30"))
    assert insn.gen_mov_reg(9, 30) == insn.MOV_X9_LR


def test_ret_constant() -> None:
    assert dis(insn.RET) == Dis("ret", ())
    assert insn.RET == insn.gen_ret() == insn.gen_ret(30)


# --------------------------------------------------------------------------------------------------------------
# B / BL


@pytest.mark.parametrize("link", [False, True], ids=["b", "bl"])
@pytest.mark.parametrize(
    ("pc", "delta", "imm26"),
    [
        (0x1000, 0, 0),
        (0x1000, 4, 1),
        (0x1000, -4, 0x3FFFFFF),
        (0xFFFF_8000_1000_0000, BL_RANGE - 4, 0x1FFFFFF),  # furthest forward
        (0xFFFF_8000_1000_0000, -BL_RANGE, 0x2000000),  # furthest backward
        (0, -4, 0x3FFFFFF),  # wraps below 0
        (MASK64 - 3, 4, 1),  # wraps above 2**64
        (0x0800_0000, -BL_RANGE, 0x2000000),  # lands exactly on 0
    ],
)
def test_gen_branch_encodings_and_limits(pc: int, delta: int, imm26: int, link: bool) -> None:
    target = (pc + delta) & MASK64
    word = insn.gen_branch(pc, target, link=link)
    assert word == (0x94000000 if link else 0x14000000) | imm26
    assert dis(word, pc) == Dis("bl" if link else "b", (target,))
    assert insn.decode_branch(word, pc) == (target, link)
    assert insn.is_bl(word) is link
    assert insn.is_b(word) is not link
    assert insn.reachable_by_bl(pc, target)


@pytest.mark.parametrize("link", [False, True], ids=["b", "bl"])
@pytest.mark.parametrize("delta", [BL_RANGE, -BL_RANGE - 4, 1 << 40, -(1 << 40), 1 << 63])
def test_gen_branch_one_insn_beyond_range_raises(delta: int, link: bool) -> None:
    pc = 0xFFFF_8000_1000_0000
    target = (pc + delta) & MASK64
    assert not insn.reachable_by_bl(pc, target)
    with pytest.raises(BranchOutOfRange, match=r"out of range") as exc:
        insn.gen_branch(pc, target, link=link)
    err = exc.value
    assert isinstance(err, InsnError)
    assert isinstance(err, LivepatchdError)
    assert err.code == "branch_out_of_range"
    assert err.errno == -22
    assert err.details == {"pc": pc, "target": target}
    assert ("BL " if link else "B ") in err.message


@pytest.mark.parametrize(("pc", "target"), [(0x1000, 0x2002), (0x1000, 0x2001), (0x1002, 0x2000), (0x1001, 0x1001)])
def test_gen_branch_misaligned_raises(pc: int, target: int) -> None:
    with pytest.raises(InsnError, match="4-byte aligned") as exc:
        insn.gen_branch(pc, target, link=True)
    assert not isinstance(exc.value, BranchOutOfRange)
    assert exc.value.code == "insn_error"
    assert exc.value.details == {"pc": pc, "target": target}


def test_gen_branch_misaligned_and_out_of_range_is_still_an_insn_error() -> None:
    with pytest.raises(InsnError):
        insn.gen_branch(0x1000, 0x1000 + BL_RANGE + 2, link=False)


@pytest.mark.parametrize(
    ("delta", "reachable"),
    [
        (0, True),
        (BL_RANGE - 4, True),
        (BL_RANGE - 1, True),  # reachable_by_bl is a pure range check, alignment is gen_branch's business
        (BL_RANGE, False),
        (-BL_RANGE, True),
        (-BL_RANGE - 1, False),
        (-BL_RANGE - 4, False),
        (1 << 63, False),
        (-(1 << 63), False),
    ],
)
def test_reachable_by_bl_edges(delta: int, reachable: bool) -> None:
    assert BL_RANGE == 128 * 1024 * 1024
    for pc in (0, 0x4000_0000, 0xFFFF_FFFF_F000_0000):
        assert insn.reachable_by_bl(pc, (pc + delta) & MASK64) is reachable


@PROPERTY
@given(pc=pc4, words=st.integers(-(1 << 25), (1 << 25) - 1), link=st.booleans())
def test_gen_branch_matches_capstone(pc: int, words: int, link: bool) -> None:
    target = (pc + 4 * words) & MASK64
    word = insn.gen_branch(pc, target, link=link)
    assert dis(word, pc) == Dis("bl" if link else "b", (target,))
    assert insn.decode_branch(word, pc) == (target, link)
    assert insn.is_bl(word) is link
    assert insn.is_b(word) is not link


@PROPERTY
@given(
    pc=pc4,
    words=st.one_of(st.integers(1 << 25, 1 << 61), st.integers(-(1 << 61), -(1 << 25) - 1)),
    link=st.booleans(),
)
def test_gen_branch_out_of_range_property(pc: int, words: int, link: bool) -> None:
    target = (pc + 4 * words) & MASK64
    assert not insn.reachable_by_bl(pc, target)
    with pytest.raises(BranchOutOfRange):
        insn.gen_branch(pc, target, link=link)


@PROPERTY
@given(word=st.integers(0, (1 << 32) - 1), pc=pc4)
def test_decode_branch_agrees_with_capstone_on_any_word(word: int, pc: int) -> None:
    """decode_branch recognises exactly the words capstone reads as an unconditional B/BL, with the same target."""
    got = list(_CS.disasm(word.to_bytes(4, "little"), pc))
    decoded = insn.decode_branch(word, pc)
    if got and got[0].mnemonic in ("b", "bl"):
        assert decoded == (_parse_operands(str(got[0].op_str))[0], got[0].mnemonic == "bl")
    else:
        assert decoded is None


@pytest.mark.parametrize("word", [insn.NOP, insn.RET, insn.MOV_X9_LR, 0x54000000, 0xB4000000, 0xD61F0200, 0x18000000])
def test_decode_branch_rejects_other_words(word: int) -> None:
    assert insn.decode_branch(word, 0x1000) is None
    assert not insn.is_b(word)
    assert not insn.is_bl(word)


@PROPERTY
@given(imm=st.integers(0, (1 << 26) - 1), link=st.booleans(), pc=pc4)
def test_decode_branch_round_trips_every_imm26(imm: int, link: bool, pc: int) -> None:
    word = (0x94000000 if link else 0x14000000) | imm
    decoded = insn.decode_branch(word, pc)
    assert decoded is not None
    target, is_link = decoded
    assert is_link is link
    assert insn.gen_branch(pc, target, link=link) == word


@PROPERTY
@given(
    pc=pc4, old=st.integers(-(1 << 25), (1 << 25) - 1), new=st.integers(-(1 << 25), (1 << 25) - 1), link=st.booleans()
)
def test_set_imm26_retargets_and_keeps_the_kind(pc: int, old: int, new: int, link: bool) -> None:
    word = insn.gen_branch(pc, (pc + 4 * old) & MASK64, link=link)
    target = (pc + 4 * new) & MASK64
    out = insn.set_imm26(word, pc, target)
    assert out == insn.gen_branch(pc, target, link=link)
    assert dis(out, pc) == Dis("bl" if link else "b", (target,))


def test_set_imm26_errors() -> None:
    bl = insn.gen_branch(0x1000, 0x2000, link=True)
    with pytest.raises(InsnError, match="not a B/BL") as exc:
        insn.set_imm26(insn.NOP, 0x1000, 0x2000)
    assert exc.value.details == {"insn": insn.NOP}
    with pytest.raises(BranchOutOfRange):
        insn.set_imm26(bl, 0x1000, 0x1000 + BL_RANGE)
    with pytest.raises(InsnError, match="aligned"):
        insn.set_imm26(bl, 0x1000, 0x2002)
    assert insn.set_imm26(bl, 0x1000, 0x1000 - BL_RANGE) == 0x96000000


# --------------------------------------------------------------------------------------------------------------
# MOV (register)


@PROPERTY
@given(rd=gpr, rm=gpr)
def test_gen_mov_reg_matches_capstone(rd: int, rm: int) -> None:
    word = insn.gen_mov_reg(rd, rm)
    assert word == 0xAA0003E0 | rm << 16 | rd
    assert dis(word) == Dis("mov", (x(rd), x(rm)))


@pytest.mark.parametrize(("rd", "rm"), [(31, 0), (0, 31), (-1, 0), (0, -1), (32, 0), (0, 99)])
def test_gen_mov_reg_bad_register(rd: int, rm: int) -> None:
    with pytest.raises(InsnError, match="register") as exc:
        insn.gen_mov_reg(rd, rm)
    assert exc.value.details["register"] in (rd, rm)
    assert exc.value.code == "insn_error"


# --------------------------------------------------------------------------------------------------------------
# LDR (literal) and other imm19 users


@pytest.mark.parametrize(
    ("delta", "imm19"),
    [(0, 0), (4, 1), (-4, 0x7FFFF), (MIB - 4, 0x3FFFF), (-MIB, 0x40000)],
)
def test_gen_ldr_literal_limits(delta: int, imm19: int) -> None:
    pc = 0xFFFF_8000_0010_0000
    target = (pc + delta) & MASK64
    word = insn.gen_ldr_literal(7, pc, target)
    assert word == 0x58000000 | imm19 << 5 | 7
    assert dis(word, pc) == Dis("ldr", ("x7", target))


@pytest.mark.parametrize("delta", [MIB, -MIB - 4, 1 << 32, -(1 << 32)])
def test_gen_ldr_literal_out_of_range(delta: int) -> None:
    pc = 0xFFFF_8000_0010_0000
    target = (pc + delta) & MASK64
    with pytest.raises(InsnError, match=r"out of range \(\+-1 MiB\)") as exc:
        insn.gen_ldr_literal(0, pc, target)
    assert exc.value.details == {"pc": pc, "target": target}


@pytest.mark.parametrize(("pc", "target"), [(0x1000, 0x1002), (0x1000, 0x1001), (0x1002, 0x1000), (0x1003, 0x1007)])
def test_gen_ldr_literal_misaligned(pc: int, target: int) -> None:
    with pytest.raises(InsnError, match="aligned"):
        insn.gen_ldr_literal(0, pc, target)


@pytest.mark.parametrize("rt", [-1, 31, 32])
def test_gen_ldr_literal_bad_register(rt: int) -> None:
    with pytest.raises(InsnError, match="register"):
        insn.gen_ldr_literal(rt, 0x1000, 0x1008)


@PROPERTY
@given(rt=gpr, pc=pc4, words=st.integers(-(1 << 18), (1 << 18) - 1))
def test_gen_ldr_literal_matches_capstone(rt: int, pc: int, words: int) -> None:
    target = (pc + 4 * words) & MASK64
    assert dis(insn.gen_ldr_literal(rt, pc, target), pc) == Dis("ldr", (x(rt), target))


@PROPERTY
@given(pc=pc4, words=st.integers(-(1 << 18), (1 << 18) - 1), cond=st.integers(0, 13), rt=reg31)
def test_set_ldr_literal_imm19_on_conditional_branches(pc: int, words: int, cond: int, rt: int) -> None:
    """LD_PREL_LO19 also retargets B.cond and CBZ words, keeping their condition / register."""
    target = (pc + 4 * words) & MASK64
    conds = ["eq", "ne", "hs", "lo", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le"]
    b_cond = insn.set_ldr_literal_imm19(0x54000000 | cond, pc, target)
    assert dis(b_cond, pc) == Dis(f"b.{conds[cond]}", (target,))
    cbz = insn.set_ldr_literal_imm19(0xB4000000 | rt | 0x7FFFF << 5, pc, target)  # old imm19 all ones: replaced
    assert dis(cbz, pc) == Dis("cbz", (zr_or_x(rt), target))


def test_set_ldr_literal_imm19_errors() -> None:
    ldr = insn.gen_ldr_literal(1, 0x10_0000, 0x10_0000)
    with pytest.raises(InsnError, match="out of range"):
        insn.set_ldr_literal_imm19(ldr, 0x10_0000, 0x20_0000)
    with pytest.raises(InsnError, match="aligned"):
        insn.set_ldr_literal_imm19(ldr, 0x10_0000, 0x10_0006)
    assert insn.set_ldr_literal_imm19(ldr, 0x10_0000, 0x20_0000 - 4) == 0x58000000 | 0x3FFFF << 5 | 1


# --------------------------------------------------------------------------------------------------------------
# ADR / ADRP


@pytest.mark.parametrize(
    ("delta", "word"), [(0, 0x10000003), (1, 0x30000003), (MIB - 1, 0x707FFFE3), (-MIB, 0x10800003), (-1, 0x70FFFFE3)]
)
def test_gen_adr_limits(delta: int, word: int) -> None:
    pc = 0x4000_1000
    target = (pc + delta) & MASK64
    assert insn.gen_adr(3, pc, target) == word
    assert dis(word, pc) == Dis("adr", ("x3", target))


@pytest.mark.parametrize("delta", [MIB, -MIB - 1, 1 << 40])
def test_gen_adr_out_of_range(delta: int) -> None:
    with pytest.raises(InsnError, match=r"ADR .* out of range"):
        insn.gen_adr(0, 0x4000_0000, 0x4000_0000 + delta)


@pytest.mark.parametrize("rd", [-1, 31, 32])
def test_gen_adr_bad_register(rd: int) -> None:
    with pytest.raises(InsnError, match="register"):
        insn.gen_adr(rd, 0x1000, 0x1000)


@PROPERTY
@given(rd=gpr, pc=addr64, delta=st.integers(-MIB, MIB - 1))
def test_gen_adr_matches_capstone(rd: int, pc: int, delta: int) -> None:
    target = (pc + delta) & MASK64
    assert dis(insn.gen_adr(rd, pc, target), pc) == Dis("adr", (x(rd), target))


@pytest.mark.parametrize(
    ("pc", "target", "pages"),
    [
        (0x1234, 0x1FFF, 0),  # same page, any offsets
        (0x1FFC, 0x2000, 1),  # next page although only 4 bytes away
        (0x2000, 0x1FFF, -1),
        (0x8000_0000_0000, 0x8000_0000_0000 + ADRP_RANGE - PAGE + 0xFFF, (1 << 20) - 1),  # last page forward
        (0x8000_0000_0FFF, 0x8000_0000_0000 - ADRP_RANGE, -(1 << 20)),  # last page backward
        (0x0, MASK64, -1),  # wraps below 0
    ],
)
def test_gen_adrp_page_arithmetic(pc: int, target: int, pages: int) -> None:
    word = insn.gen_adrp(16, pc, target)
    imm21 = pages & 0x1FFFFF
    assert word == 0x90000000 | (imm21 & 3) << 29 | (imm21 >> 2) << 5 | 16
    assert dis(word, pc) == Dis("adrp", ("x16", target & ~0xFFF & MASK64))


@pytest.mark.parametrize(
    ("pc", "target"),
    [
        (0x8000_0000_0000, 0x8000_0000_0000 + ADRP_RANGE),  # one page beyond the last
        (0x8000_0000_0FFF, 0x8000_0000_0000 - ADRP_RANGE - 1),  # one byte (so one page) below
        (0x8000_0000_0000, 0x8000_0000_0000 + (1 << 40)),
        (0xFFFF_8000_0000_0000, 0x1000),
    ],
)
def test_gen_adrp_out_of_range(pc: int, target: int) -> None:
    with pytest.raises(InsnError, match=r"ADRP .* out of range \(\+-4 GiB\)") as exc:
        insn.gen_adrp(0, pc, target)
    assert exc.value.details == {"pc": pc, "target": target}


@pytest.mark.parametrize("rd", [-1, 31, 32])
def test_gen_adrp_bad_register(rd: int) -> None:
    with pytest.raises(InsnError, match="register"):
        insn.gen_adrp(rd, 0x1000, 0x1000)


@PROPERTY
@given(rd=gpr, pc=addr64, pages=st.integers(-(1 << 20), (1 << 20) - 1), lo12=st.integers(0, 0xFFF))
def test_gen_adrp_matches_capstone(rd: int, pc: int, pages: int, lo12: int) -> None:
    page = ((pc & ~0xFFF) + pages * PAGE) & MASK64
    word = insn.gen_adrp(rd, pc, page | lo12)
    assert dis(word, pc) == Dis("adrp", (x(rd), page))


@PROPERTY
@given(rd=gpr, pc=addr64, pages=st.integers(-(1 << 20), (1 << 20) - 1), junk=st.integers(0, (1 << 21) - 1))
def test_set_adrp_imm_replaces_the_old_immediate(rd: int, pc: int, pages: int, junk: int) -> None:
    old = 0x90000000 | (junk & 3) << 29 | (junk >> 2) << 5 | rd
    page = ((pc & ~0xFFF) + pages * PAGE) & MASK64
    word = insn.set_adrp_imm(old, pc, page)
    assert word == insn.gen_adrp(rd, pc, page)
    assert dis(word, pc) == Dis("adrp", (x(rd), page))


def test_set_adrp_imm_out_of_range() -> None:
    with pytest.raises(InsnError, match="out of range"):
        insn.set_adrp_imm(0x90000000, 0, ADRP_RANGE)


# --------------------------------------------------------------------------------------------------------------
# ADD (immediate) and imm12 relocations


def _expect_add(rd: int, rn: int, imm12: int, shift12: bool) -> Dis:
    if imm12 == 0 and not shift12 and 31 in (rd, rn):
        return Dis("mov", (sp_or_x(rd), sp_or_x(rn)))  # the MOV (to/from SP) alias
    ops: tuple[object, ...] = (sp_or_x(rd), sp_or_x(rn), imm12)
    return Dis("add", (*ops, ("lsl", 12)) if shift12 else ops)


@pytest.mark.parametrize(
    ("rd", "rn", "imm12", "shift12", "word"),
    [
        (1, 2, 3, False, 0x91000C41),
        (31, 31, 16, False, 0x910043FF),
        (1, 31, 5, True, 0x914017E1),
        (31, 2, 0, False, 0x9100005F),
        (0, 0, 4095, True, 0x917FFC00),
        (16, 16, 0, False, 0x91000210),
    ],
)
def test_gen_add_imm_examples(rd: int, rn: int, imm12: int, shift12: bool, word: int) -> None:
    assert insn.gen_add_imm(rd, rn, imm12, shift12=shift12) == word
    assert dis(word) == _expect_add(rd, rn, imm12, shift12)


@PROPERTY
@given(rd=reg31, rn=reg31, imm12=st.integers(0, 4095), shift12=st.booleans())
def test_gen_add_imm_matches_capstone(rd: int, rn: int, imm12: int, shift12: bool) -> None:
    assert dis(insn.gen_add_imm(rd, rn, imm12, shift12=shift12)) == _expect_add(rd, rn, imm12, shift12)


@pytest.mark.parametrize("imm12", [-1, 4096, 1 << 20])
def test_gen_add_imm_bad_immediate(imm12: int) -> None:
    with pytest.raises(InsnError, match="12 bits") as exc:
        insn.gen_add_imm(0, 0, imm12)
    assert exc.value.details == {"imm": imm12}


@pytest.mark.parametrize(("rd", "rn"), [(32, 0), (0, 32), (-1, 0), (0, -1)])
def test_gen_add_imm_bad_register(rd: int, rn: int) -> None:
    with pytest.raises(InsnError, match="register"):
        insn.gen_add_imm(rd, rn, 0)


# (base word with Rt=0, Rn=1; mnemonic; Rt name; scale) for LDST8..LDST128_ABS_LO12_NC
_LOADS = [
    (0x39400020, "ldrb", "w0", 0),
    (0x79400020, "ldrh", "w0", 1),
    (0xB9400020, "ldr", "w0", 2),
    (0xF9400020, "ldr", "x0", 3),
    (0x3DC00020, "ldr", "q0", 4),
]


@PROPERTY
@given(load=st.sampled_from(_LOADS), value=st.integers(0, MASK64), junk=st.integers(0, 0xFFF))
def test_set_imm12_on_scaled_loads(load: tuple[int, str, str, int], value: int, junk: int) -> None:
    base, mnemonic, rt, scale = load
    value &= ~((1 << scale) - 1)  # aligned to the access size
    word = insn.set_imm12(base | junk << 10, value, scale=scale)
    off = value & 0xFFF
    assert dis(word) == Dis(mnemonic, (rt, ("x1", off) if off else ("x1",)))


@PROPERTY
@given(value=st.integers(0, MASK64), junk=st.integers(0, 0xFFF))
def test_set_imm12_on_add(value: int, junk: int) -> None:
    word = insn.set_imm12(insn.gen_add_imm(1, 2, junk), value, scale=0)
    assert word == insn.gen_add_imm(1, 2, value & 0xFFF)
    assert dis(word) == Dis("add", ("x1", "x2", value & 0xFFF))


@pytest.mark.parametrize(("value", "scale"), [(1, 1), (0x1002, 2), (0xFFC, 3), (0x8, 4), (0xFFF, 4)])
def test_set_imm12_misaligned(value: int, scale: int) -> None:
    with pytest.raises(InsnError, match="not aligned") as exc:
        insn.set_imm12(0xF9400020, value, scale=scale)
    assert exc.value.details == {"value": value, "scale": scale}


def test_set_imm12_only_the_low_12_bits_count() -> None:
    """A :lo12: relocation ignores the high bits, so 0x...1001 is fine for ADD and 0x2008 for a 64-bit load."""
    assert insn.set_imm12(0xF9400020, 0xFFFF_0000_0000_2008, scale=3) == 0xF9400420
    assert insn.set_imm12(0x91000041, 0x1001, scale=0) == 0x91000441


# --------------------------------------------------------------------------------------------------------------
# MOVZ / MOVK and MOVW relocations


def _expect_movz(rd: int, imm: int, shift: int) -> Dis:
    if imm == 0 and shift:
        return Dis("movz", (zr_or_x(rd), 0, ("lsl", shift)))
    return Dis("mov", (zr_or_x(rd), imm << shift))  # the MOV (wide immediate) alias


def _expect_movk(rd: int, imm: int, shift: int) -> Dis:
    ops: tuple[object, ...] = (zr_or_x(rd), imm)
    return Dis("movk", (*ops, ("lsl", shift)) if shift else ops)


@pytest.mark.parametrize("shift", [0, 16, 32, 48])
def test_movz_movk_every_shift(shift: int) -> None:
    for imm in (0, 1, 0x1234, 0xFFFF):
        z, k = insn.gen_movz(5, imm, shift), insn.gen_movk(5, imm, shift)
        assert z == 0xD2800000 | (shift // 16) << 21 | imm << 5 | 5
        assert k == 0xF2800000 | (shift // 16) << 21 | imm << 5 | 5
        assert dis(z) == _expect_movz(5, imm, shift)
        assert dis(k) == _expect_movk(5, imm, shift)


def test_movz_movk_default_shift_is_zero() -> None:
    assert insn.gen_movz(0, 7) == insn.gen_movz(0, 7, 0) == 0xD28000E0
    assert insn.gen_movk(0, 7) == insn.gen_movk(0, 7, 0) == 0xF28000E0


@PROPERTY
@given(rd=reg31, imm=imm16, shift=hw_shift)
def test_movz_movk_match_capstone(rd: int, imm: int, shift: int) -> None:
    assert dis(insn.gen_movz(rd, imm, shift)) == _expect_movz(rd, imm, shift)
    assert dis(insn.gen_movk(rd, imm, shift)) == _expect_movk(rd, imm, shift)


@pytest.mark.parametrize(("imm", "shift"), [(-1, 0), (0x10000, 0), (1, 8), (1, 64), (1, -16), (1, 1)])
@pytest.mark.parametrize("movk", [False, True], ids=["movz", "movk"])
def test_movz_movk_bad_immediate_or_shift(movk: bool, imm: int, shift: int) -> None:
    gen = insn.gen_movk if movk else insn.gen_movz
    with pytest.raises(InsnError, match="not encodable") as exc:
        gen(0, imm, shift)
    assert exc.value.details == {"imm": imm, "shift": shift}


@pytest.mark.parametrize("rd", [-1, 32])
def test_movz_movk_bad_register(rd: int) -> None:
    with pytest.raises(InsnError, match="register"):
        insn.gen_movz(rd, 0)
    with pytest.raises(InsnError, match="register"):
        insn.gen_movk(rd, 0)


@PROPERTY
@given(rd=reg31, old=imm16, value=st.integers(0, MASK64), shift=hw_shift)
def test_set_movw_imm16(rd: int, old: int, value: int, shift: int) -> None:
    """Only the low 16 bits of the value are written; register and shift are kept."""
    movk = insn.set_movw_imm16(insn.gen_movk(rd, old, shift), value)
    assert movk == insn.gen_movk(rd, value & 0xFFFF, shift)
    assert dis(movk) == _expect_movk(rd, value & 0xFFFF, shift)
    movz = insn.set_movw_imm16(insn.gen_movz(rd, old, shift), value)
    assert dis(movz) == _expect_movz(rd, value & 0xFFFF, shift)


# --------------------------------------------------------------------------------------------------------------
# BR / BLR / RET / BRK / SVC


@PROPERTY
@given(rn=gpr)
def test_indirect_branches_match_capstone(rn: int) -> None:
    assert dis(insn.gen_br(rn)) == Dis("br", (x(rn),))
    assert dis(insn.gen_blr(rn)) == Dis("blr", (x(rn),))
    assert dis(insn.gen_ret(rn)) == Dis("ret", () if rn == 30 else (x(rn),))


def test_indirect_branch_encodings() -> None:
    assert insn.gen_br(16) == 0xD61F0200
    assert insn.gen_blr(3) == 0xD63F0060
    assert insn.gen_ret(5) == 0xD65F00A0


@pytest.mark.parametrize("rn", [-1, 31, 32])
def test_indirect_branches_bad_register(rn: int) -> None:
    for gen in (insn.gen_br, insn.gen_blr, insn.gen_ret):
        with pytest.raises(InsnError, match="register") as exc:
            gen(rn)
        assert exc.value.details == {"register": rn}


@PROPERTY
@given(imm=imm16)
def test_brk_svc_match_capstone(imm: int) -> None:
    assert insn.gen_brk(imm) == 0xD4200000 | imm << 5
    assert insn.gen_svc(imm) == 0xD4000001 | imm << 5
    assert dis(insn.gen_brk(imm)) == Dis("brk", (imm,))
    assert dis(insn.gen_svc(imm)) == Dis("svc", (imm,))


@pytest.mark.parametrize("imm", [-1, 0x10000, 1 << 32])
def test_brk_svc_bad_immediate(imm: int) -> None:
    with pytest.raises(InsnError, match="16 bits"):
        insn.gen_brk(imm)
    with pytest.raises(InsnError, match="16 bits"):
        insn.gen_svc(imm)


# --------------------------------------------------------------------------------------------------------------
# module PLT veneer


def _plt_target_by_capstone(words: tuple[int, int, int], pc: int) -> int:
    adrp, add, br = dis_many(words, pc)
    assert adrp.mnemonic == "adrp"
    assert adrp.ops[0] == "x16"
    assert add.mnemonic == "add"
    assert add.ops[:2] == ("x16", "x16")
    assert len(add.ops) == 3
    assert br == Dis("br", ("x16",))
    page, lo12 = adrp.ops[1], add.ops[2]
    assert isinstance(page, int)
    assert isinstance(lo12, int)
    return (page + lo12) & MASK64


@pytest.mark.parametrize(
    ("pc", "target"),
    [
        (0xFFFF_8000_0800_0000, 0xFFFF_8000_1234_5678),
        (0xFFFF_8000_0800_0FFC, 0xFFFF_8000_0800_0000),
        (0xFFFF_8001_0000_0000, 0xFFFF_8000_0000_0000),  # exactly -4 GiB page delta
        (0xFFFF_8000_0000_0000, 0xFFFF_8000_FFFF_FFFF),  # last reachable page forward
        (0x1000, 0x1000),
    ],
)
def test_plt_entry_examples(pc: int, target: int) -> None:
    words = insn.gen_plt_entry(pc, target)
    assert words[2] == 0xD61F0200
    assert _plt_target_by_capstone(words, pc) == target
    assert insn.decode_plt_entry(words, pc) == target


@PROPERTY
@given(pc=pc4, delta=st.integers(-ADRP_RANGE, ADRP_RANGE - 1))
def test_plt_entry_matches_capstone(pc: int, delta: int) -> None:
    target = ((pc & ~0xFFF) + delta) & MASK64  # any byte of any page within +-4 GiB of pc's page
    words = insn.gen_plt_entry(pc, target)
    assert _plt_target_by_capstone(words, pc) == target
    assert insn.decode_plt_entry(words, pc) == target


def test_plt_entry_out_of_range() -> None:
    with pytest.raises(InsnError, match="ADRP"):
        insn.gen_plt_entry(0xFFFF_8000_0000_0000, 0xFFFF_8001_0000_0000)


def test_decode_plt_entry_rejects_other_sequences() -> None:
    pc, target = 0xFFFF_8000_0800_0000, 0xFFFF_8000_1234_5678
    adrp, add, br = insn.gen_plt_entry(pc, target)
    assert insn.decode_plt_entry((adrp, add, br), pc) == target
    others = [
        (insn.gen_adrp(17, pc, target), add, br),  # ADRP into x17
        (insn.gen_adr(16, pc, pc), add, br),  # ADR, not ADRP
        (adrp, insn.gen_add_imm(17, 16, target & 0xFFF), br),  # ADD into x17
        (adrp, insn.gen_add_imm(16, 17, target & 0xFFF), br),  # ADD from x17
        (adrp, insn.gen_add_imm(16, 16, target & 0xFFF, shift12=True), br),  # LSL #12
        (adrp, insn.gen_add_imm(16, 16, target & 0xFFF) | 1 << 29, br),  # ADDS
        (adrp, add, insn.gen_br(17)),
        (adrp, add, insn.gen_blr(16)),
        (insn.NOP, insn.NOP, insn.NOP),
        (br, add, adrp),
    ]
    for words in others:
        assert insn.decode_plt_entry(words, pc) is None, [f"{w:#010x}" for w in words]
