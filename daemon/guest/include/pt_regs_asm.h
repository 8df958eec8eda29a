/*
 * Assembler macros shared by the entry code that builds a struct pt_regs on the stack (the BRK exception entry
 * and the register-saving kretprobe trampoline), as arm64's kernel_entry/kernel_exit share theirs. Each caller
 * adds what differs: regs[30] and sp, pc and pstate, and how it returns.
 */
#ifndef LPD_PT_REGS_ASM_H
#define LPD_PT_REGS_ASM_H
#ifdef __ASSEMBLER__

/* sp -= PT_REGS_SIZE; regs[0..29] = x0..x29 */
.macro	pt_regs_push_x0_x29
	sub	sp, sp, #PT_REGS_SIZE
	stp	x0, x1, [sp, #16 * 0]
	stp	x2, x3, [sp, #16 * 1]
	stp	x4, x5, [sp, #16 * 2]
	stp	x6, x7, [sp, #16 * 3]
	stp	x8, x9, [sp, #16 * 4]
	stp	x10, x11, [sp, #16 * 5]
	stp	x12, x13, [sp, #16 * 6]
	stp	x14, x15, [sp, #16 * 7]
	stp	x16, x17, [sp, #16 * 8]
	stp	x18, x19, [sp, #16 * 9]
	stp	x20, x21, [sp, #16 * 10]
	stp	x22, x23, [sp, #16 * 11]
	stp	x24, x25, [sp, #16 * 12]
	stp	x26, x27, [sp, #16 * 13]
	stp	x28, x29, [sp, #16 * 14]
.endm

/* x0..x29 = regs[0..29] (sp still points at the frame) */
.macro	pt_regs_pop_x0_x29
	ldp	x0, x1, [sp, #16 * 0]
	ldp	x2, x3, [sp, #16 * 1]
	ldp	x4, x5, [sp, #16 * 2]
	ldp	x6, x7, [sp, #16 * 3]
	ldp	x8, x9, [sp, #16 * 4]
	ldp	x10, x11, [sp, #16 * 5]
	ldp	x12, x13, [sp, #16 * 6]
	ldp	x14, x15, [sp, #16 * 7]
	ldp	x16, x17, [sp, #16 * 8]
	ldp	x18, x19, [sp, #16 * 9]
	ldp	x20, x21, [sp, #16 * 10]
	ldp	x22, x23, [sp, #16 * 11]
	ldp	x24, x25, [sp, #16 * 12]
	ldp	x26, x27, [sp, #16 * 13]
	ldp	x28, x29, [sp, #16 * 14]
.endm

#endif /* __ASSEMBLER__ */
#endif /* LPD_PT_REGS_ASM_H */
