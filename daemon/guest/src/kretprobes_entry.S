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
#include "pt_regs_asm.h"

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
	pt_regs_push_x0_x29
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
	pt_regs_pop_x0_x29
	add	sp, sp, #PT_REGS_SIZE
	ret
	.size	arch_rethook_trampoline, . - arch_rethook_trampoline
