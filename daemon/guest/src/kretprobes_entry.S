/*
 * The two kretprobe trampolines a hijacked return can land in (the entry handler in kretprobes.c put one of
 * them in x30). Both end in kretprobe_trampoline_handler(regs, x29), which pops the task's newest instance,
 * runs the return handler and hands back the real return address; they differ in the pt_regs it sees:
 *
 *   __kretprobe_trampoline    BRK #KRETPROBES_BRK_IMM: a real debug exception, so kprobes_entry.S builds a
 *                             genuine pt_regs (pstate from SPSR_EL1) and the exception return resumes at the
 *                             real return address. One exception per return. (arm64 since Linux 6.9.)
 *   arch_rethook_trampoline   no exception: the registers are saved by hand into a pt_regs-shaped frame, pc is
 *                             0 and pstate is *synthesized* from NZCV, DAIF, CurrentEL and SPSel (the bits a
 *                             real SPSR would hold beside them are missing), and only NZCV is restored. Cheaper,
 *                             but a handler reading regs->pstate sees made-up state. (arm64 2016-6.8.)
 *
 * Both are blacklisted for kprobes (no ftrace record) and recognised by the host unwinder, which translates
 * them through the task's instances as Linux's kretprobe_find_ret_addr does.
 */
#include "abi.h"

	.text
	.globl	__kretprobe_trampoline
	.type	__kretprobe_trampoline, %function
	.balign	8
__kretprobe_trampoline:
	brk	#KRETPROBES_BRK_IMM
	brk	#0x800				// never reached: the handler moved pc to the real return address
	.size	__kretprobe_trampoline, . - __kretprobe_trampoline

	.globl	arch_rethook_trampoline
	.type	arch_rethook_trampoline, %function
	.balign	8
arch_rethook_trampoline:
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
	add	x0, sp, #PT_REGS_SIZE
	stp	x30, x0, [sp, #PT_REGS_REGS + 8 * 30]
	mrs	x0, nzcv			// "a useful saved PSTATE", made up
	mrs	x1, daif
	orr	x0, x0, x1
	mrs	x1, CurrentEL
	orr	x0, x0, x1
	mrs	x1, SPSel
	orr	x0, x0, x1
	stp	xzr, x0, [sp, #PT_REGS_PC]	// pc = 0: there is no exception pc
	mov	x0, sp
	mov	x1, x29
	bl	kretprobe_trampoline_handler
	mov	x30, x0				// the real return address
	ldr	x0, [sp, #PT_REGS_PSTATE]
	msr	nzcv, x0			// the only part of the pstate restored
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
	add	sp, sp, #PT_REGS_SIZE
	ret
	.size	arch_rethook_trampoline, . - arch_rethook_trampoline
